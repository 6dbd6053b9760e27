package livepatch

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// ErrNotSupported is matched (errors.Is) by every error that means "this kernel cannot do
// livepatch"; the concrete *NotSupportedError says why.
var ErrNotSupported = errors.New("not supported")

// NotSupportedError says why the kernel cannot load livepatches.
type NotSupportedError struct {
	Reasons []string // what is missing, e.g. "no /sys/kernel/livepatch (kernel built without CONFIG_LIVEPATCH)"
}

func (e *NotSupportedError) Error() string {
	return "kernel livepatch not supported on this kernel: " + strings.Join(e.Reasons, "; ")
}

// Is makes errors.Is(err, ErrNotSupported) true.
func (e *NotSupportedError) Is(target error) bool { return target == ErrNotSupported }

// Module refusal reasons; a *ModuleError matches ErrInvalidModule and exactly one of them.
var (
	ErrInvalidModule = errors.New("invalid livepatch module")
	ErrNotModule     = errors.New("not a kernel module")
	ErrTruncated     = errors.New("truncated module file")
	ErrNotLivepatch  = errors.New("not a livepatch module")
	ErrVermagic      = errors.New("module built for another kernel")
)

// ModuleError is a refusal to load a module file, decided before the kernel sees it.
type ModuleError struct {
	Path   string
	Kind   error  // ErrNotModule, ErrTruncated, ErrNotLivepatch or ErrVermagic
	Detail string // what is wrong
	Fix    string // what to do
}

func (e *ModuleError) Error() string {
	msg := fmt.Sprintf("refusing %s: %s: %s", e.Path, e.Kind, e.Detail)
	if e.Fix != "" {
		msg += "; " + e.Fix
	}
	return msg
}

// Is matches ErrInvalidModule and the refusal kind.
func (e *ModuleError) Is(target error) bool { return target == ErrInvalidModule || target == e.Kind }

// ErrNotFound means no loaded patch or module has the name.
var ErrNotFound = errors.New("no such livepatch")

// ErrStalled is matched by *StalledError.
var ErrStalled = errors.New("livepatch transition stalled")

// StalledError reports a transition that did not finish in time, with the tasks blocking it.
type StalledError struct {
	Patch     string
	Target    State
	Waited    time.Duration
	Signalled bool // the kernel's signal mechanism was tried
	Tasks     []Task
}

func (e *StalledError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "transition of %s to %s not finished after %s", e.Patch, e.Target, e.Waited.Round(time.Millisecond))
	if len(e.Tasks) > 0 {
		fmt.Fprintf(&b, ": %d task(s) still on the old code: %s", len(e.Tasks), TaskSummary(e.Tasks, 5))
	}
	if e.Signalled {
		b.WriteString("; signalling them did not help")
	}
	fmt.Fprintf(&b, "; the patch stays in transition: check 'hot livepatch status %s', reverse with 'hot livepatch %s %s', or finish with --force (skips the consistency check; after a forced disable the module can never be unloaded)",
		e.Patch, map[State]string{Enabled: "disable", Disabled: "enable"}[e.Target], e.Patch)
	return b.String()
}

// Is makes errors.Is(err, ErrStalled) true.
func (e *StalledError) Is(target error) bool { return target == ErrStalled }
