package doctor

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hotctl/hot/internal/testutil"
)

func TestRunMarksUpdateImpossibleOnlyWhenRequiredMissing(t *testing.T) {
	optionalMissing := Checker{Name: "a", Run: func(context.Context, *Options) Result { return missing("x", "nope") }}
	requiredOK := Checker{Name: "b", Required: true, Run: func(context.Context, *Options) Result { return ok("fine") }}
	requiredMissing := Checker{Name: "c", Required: true, Run: func(context.Context, *Options) Result { return missing("y", "gone") }}

	rep := run(context.Background(), []Checker{optionalMissing, requiredOK}, Options{})
	if !rep.UpdateWorks {
		t.Error("an optional missing capability must not block updates")
	}
	if len(rep.Results) != 2 || rep.Results[0].Name != "a" || !rep.Results[1].Required {
		t.Errorf("results not named/flagged from their checkers: %+v", rep.Results)
	}
	if rep := run(context.Background(), []Checker{requiredOK, requiredMissing}, Options{}); rep.UpdateWorks {
		t.Error("a required missing capability must block updates")
	}
}

// TestDoctorCLI runs the real binary: every line has a reason, every non-ok line a fix,
// and the exit status agrees with the required checks.
func TestDoctorCLI(t *testing.T) {
	testutil.RequireRoot(t)
	res := testutil.RunHot(t, 60e9, "doctor", "--json")
	var rep Report
	if err := json.Unmarshal([]byte(res.Stdout), &rep); err != nil {
		t.Fatalf("doctor --json output is not JSON: %v\n%s\n%s", err, res.Stdout, res.Stderr)
	}
	names := map[string]Result{}
	for _, r := range rep.Results {
		names[r.Name] = r
		if r.Detail == "" {
			t.Errorf("%s: no detail", r.Name)
		}
		if r.Status != OK && r.Fix == "" && r.Name != "kernel" {
			t.Errorf("%s is %s without a fix: %s", r.Name, r.Status, r.Detail)
		}
	}
	for _, want := range []string{"kernel", "criu", "freezer", "overlayfs", "namespaces", "userfaultfd", "soft-dirty", "pipe-max-size", "bpf-trampoline", "cgroup-bpf", "livepatch"} {
		if _, ok := names[want]; !ok {
			t.Errorf("report lacks %q", want)
		}
	}
	if rep.UpdateWorks != (res.ExitCode == 0) {
		t.Errorf("updateWorks=%v but exit code %d", rep.UpdateWorks, res.ExitCode)
	}
	// CRIU is installed by `make deps`; doctor must find it and name the version.
	if r := names["criu"]; r.Status != OK || !strings.Contains(r.Detail, "criu 4.") {
		t.Errorf("criu line = %+v, want ok with version (run `make deps`)", r)
	}
	// With CRIU found and root, the kernel-check cache is CRIU's (tmpfs /run) or hot's.
	if r := names["criu-kdat-cache"]; r.Status != OK || !strings.Contains(r.Detail, "/run/criu.kdat") {
		t.Errorf("criu-kdat-cache line = %+v, want ok naming /run/criu.kdat", r)
	}
}

// TestDoctorRefusesOldCRIU points doctor at a CRIU that reports 3.17.1.
func TestDoctorRefusesOldCRIU(t *testing.T) {
	testutil.RequireRoot(t)
	fake := filepath.Join(t.TempDir(), "criu")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho 'Version: 3.17.1'\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	res := testutil.RunHot(t, 60e9, "--criu", fake, "doctor")
	if res.ExitCode != 1 {
		t.Errorf("exit code %d, want 1 (hot update cannot work with CRIU 3.17)", res.ExitCode)
	}
	for _, want := range []string{"missing", "criu 3.17.1", "needs >= 4.2", "make deps"} {
		if !strings.Contains(res.Stdout, want) {
			t.Errorf("doctor output lacks %q:\n%s", want, res.Stdout)
		}
	}
}
