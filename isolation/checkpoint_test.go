package isolation_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os/exec"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/internal/testutil"
)

// bridgeFlags gives the test its own bridge and subnet (removed at the end), as hot checkpoint
// keeps a bridged container's network namespace outside CRIU.
func bridgeFlags(t *testing.T) []string {
	t.Helper()
	for _, c := range []string{"nsenter", "nft", "ip"} {
		testutil.RequireCommand(t, c)
	}
	b := make([]byte, 3)
	rand.Read(b)
	bridge := "hotiso" + hex.EncodeToString(b)[:5]
	t.Cleanup(func() {
		exec.Command("ip", "link", "del", bridge).Run()
		exec.Command("nft", "delete", "table", "ip", "hot-"+bridge).Run()
	})
	return []string{"--bridge", bridge, "--subnet", fmt.Sprintf("10.196.%d.0/24", 10+int(b[0])%240)}
}

// TestIsolationSurvivesCheckpointRestore: after hot checkpoint and hot restore, checkpoint
// --leave-running and hot update (each skipped while the command is not in the build), the
// container's PID 1 has the same capabilities, no_new_privs and seccomp
// filter on every thread, and the restored process itself still cannot mount, load BPF, open
// raw sockets, reboot or set the clock.
func TestIsolationSurvivesCheckpointRestore(t *testing.T) {
	e := newEnv(t)
	if _, err := criubin.Find(context.Background(), ""); err != nil {
		t.Skipf("needs CRIU >= 4.2 (make deps installs it): %v", err)
	}
	pid := e.startServe("iso", bridgeFlags(t)...)
	first := e.waitReport(pid, 0)
	first.check(t, defaultExpect())
	threads := threadStatus(t, pid)
	want := threads[pid]
	if want["Seccomp"] != "2" || want["NoNewPrivs"] != "1" {
		t.Fatalf("not confined before the checkpoint: %v", want)
	}

	verify := func(step string, n int) {
		t.Helper()
		pid := e.pidOf("iso")
		after := threadStatus(t, pid)
		for _, k := range []string{"CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters"} {
			if after[pid][k] != want[k] {
				t.Errorf("after %s: PID 1 %s = %q, before %q", step, k, after[pid][k], want[k])
			}
		}
		for tid, st := range after {
			if st["Seccomp"] != "2" || st["NoNewPrivs"] != "1" || st["CapEff"] != want["CapEff"] || st["CapBnd"] != want["CapBnd"] {
				t.Errorf("after %s: thread %d: %v", step, tid, st)
			}
		}
		// The restored process probes again, itself.
		if err := unix.Kill(pid, unix.SIGUSR1); err != nil {
			t.Fatalf("after %s: signal the probe: %v", step, err)
		}
		r := e.waitReport(pid, n)
		r.check(t, defaultExpect())
		t.Logf("after %s: pid %d status %v", step, pid, after[pid])
	}

	e.mustHot("checkpoint", "iso")
	e.mustHot("restore", "iso")
	verify("checkpoint/restore", 1)

	e.mustHot("checkpoint", "--leave-running", "iso")
	verify("checkpoint --leave-running", 2)

	// A different config (env) makes a different image: the same rootfs and config would
	// have the same image ID, and hot update refuses to "update" to the running image.
	e.mustHot("image", "import", "--rootfs", probeRootfs(t), "--tag", "secprobe:v2", "--entrypoint", "/bin/secprobe", "--env", "PROBE_VERSION=2")
	e.mustHot("update", "iso", "secprobe:v2")
	verify("update", 3)
}
