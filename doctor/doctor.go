package doctor

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"
)

// Status is the outcome of one check.
type Status string

// Check outcomes.
const (
	OK      Status = "ok"      // works
	Limited Status = "limited" // works with a restriction the Detail names
	Missing Status = "missing" // does not work here
)

// Result is one line of the report.
type Result struct {
	Name   string `json:"name"`
	Status Status `json:"status"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
	// Required is true when `hot update` cannot work without this capability.
	Required bool          `json:"required"`
	Took     time.Duration `json:"tookNs"`
}

// Report is the outcome of all checks.
type Report struct {
	Results []Result `json:"results"`
	// UpdateWorks is false when a capability required by `hot update` is missing.
	UpdateWorks bool `json:"updateWorks"`
}

// Options tune the checks.
type Options struct {
	// CRIUPath is an explicit CRIU binary (--criu); empty means discovery.
	CRIUPath string
	// ScratchDir is where scratch mounts go; empty means os.TempDir().
	ScratchDir string
	// Extra checks appended after the built-in ones.
	Extra []Checker
}

// Checker is one named capability check.
type Checker struct {
	Name     string
	Required bool
	Run      func(ctx context.Context, o *Options) Result
}

// Run performs every check in order and returns the report.
func Run(ctx context.Context, o Options) Report {
	return run(ctx, append(allCheckers(), o.Extra...), o)
}

func run(ctx context.Context, checks []Checker, o Options) Report {
	rep := Report{UpdateWorks: true}
	for _, c := range checks {
		start := time.Now()
		r := c.Run(ctx, &o)
		r.Name, r.Required, r.Took = c.Name, c.Required, time.Since(start)
		if r.Required && r.Status == Missing {
			rep.UpdateWorks = false
		}
		rep.Results = append(rep.Results, r)
	}
	return rep
}

func ok(format string, a ...any) Result { return Result{Status: OK, Detail: fmt.Sprintf(format, a...)} }

func missing(fix, format string, a ...any) Result {
	return Result{Status: Missing, Detail: fmt.Sprintf(format, a...), Fix: fix}
}

func limited(fix, format string, a ...any) Result {
	return Result{Status: Limited, Detail: fmt.Sprintf(format, a...), Fix: fix}
}

func readTrim(path string) (string, error) {
	b, err := os.ReadFile(path)
	return strings.TrimSpace(string(b)), err
}
