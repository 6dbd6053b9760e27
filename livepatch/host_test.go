package livepatch_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/internal/testutil"
	"github.com/hotctl/hot/livepatch"
)

// TestCommandsRefuseOnKernelWithoutLivepatch drives every `hot livepatch` command on the
// host. On a kernel without module loading or livepatch (the reference hosts), each must
// fail at once with one line that says why.
func TestCommandsRefuseOnKernelWithoutLivepatch(t *testing.T) {
	testutil.RequireRoot(t)
	err := livepatch.Supported()
	if err == nil {
		t.Skip("this kernel supports livepatch; the refusal test needs one that does not (the VM test covers the rest)")
	}
	var nse *livepatch.NotSupportedError
	if !errors.As(err, &nse) || len(nse.Reasons) == 0 {
		t.Fatalf("Supported() = %v, want nil or a NotSupportedError with reasons", err)
	}
	ko := filepath.Join(t.TempDir(), "lp.ko")
	if err := os.WriteFile(ko, []byte("not even a module"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"load", ko, "--wait"}, {"list"}, {"list", "--json"}, {"status", "lp_x"},
		{"enable", "lp_x"}, {"disable", "lp_x", "--wait"}, {"unload", "lp_x"},
	} {
		start := time.Now()
		res := testutil.RunHot(t, 30*time.Second, append([]string{"livepatch"}, args...)...)
		took := time.Since(start)
		msg := strings.TrimSpace(res.Stderr)
		if res.ExitCode != 1 || strings.Count(msg, "\n") != 0 || res.Stdout != "" {
			t.Errorf("hot livepatch %v: exit %d, stdout %q, stderr %q; want exit 1 and one line", args, res.ExitCode, res.Stdout, msg)
			continue
		}
		for _, reason := range nse.Reasons {
			if !strings.Contains(msg, reason) {
				t.Errorf("hot livepatch %v: %q does not give the reason %q", args, msg, reason)
			}
		}
		if took > 5*time.Second {
			t.Errorf("hot livepatch %v took %s to refuse", args, took)
		}
	}
}
