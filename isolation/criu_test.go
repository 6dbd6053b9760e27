package isolation_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/internal/testutil"
	"github.com/hotctl/hot/isolation"
)

const restrictEnv = "HOT_ISOLATION_TEST_RESTRICT"

// restrictAndExec applies the default isolation's process side (no mount namespace here:
// capabilities, no_new_privs, seccomp) on this locked thread and execs args.
func restrictAndExec(args []string) error {
	runtime.LockOSThread()
	spec := &specs.Spec{Process: &specs.Process{Args: args}, Linux: &specs.Linux{}}
	if err := isolation.Apply(spec, isolation.Options{}); err != nil {
		return err
	}
	r, err := isolation.NewRestrictor(spec.Process, spec.Linux)
	if err != nil {
		return err
	}
	if err := r.BeforeSetuid(); err != nil {
		return err
	}
	if err := r.BeforeExec(); err != nil {
		return err
	}
	return unix.Exec(args[0], args, os.Environ())
}

// threadStatus reads the isolation fields of every thread of pid.
func threadStatus(t *testing.T, pid int) map[int]map[string]string {
	t.Helper()
	tasks, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]map[string]string{}
	for _, task := range tasks {
		tid, _ := strconv.Atoi(task.Name())
		out[tid] = procStatus(t, tid)
	}
	return out
}

// TestCRIURestoresIsolation checks, with CRIU itself and no container runtime in between, that
// a dump and restore keep a confined process's capabilities, no_new_privs and seccomp filter
// on every thread, and that the restored process still cannot do what it could not before.
func TestCRIURestoresIsolation(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	criu, err := criubin.Find(ctx, "")
	if err != nil {
		t.Skipf("needs CRIU >= 4.2 (make deps installs it): %v", err)
	}
	probe := filepath.Join(probeRootfs(t), "bin", "secprobe")
	dir := t.TempDir()
	work, img := filepath.Join(dir, "work"), filepath.Join(dir, "img")
	os.MkdirAll(work, 0o755)
	os.MkdirAll(img, 0o700)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "probe.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	null, _ := os.Open(os.DevNull)
	defer null.Close()
	cmd := exec.Command(self, probe, "serve", work)
	cmd.Env = append(os.Environ(), restrictEnv+"=1", "TMPDIR="+work)
	cmd.Dir = work
	cmd.Stdin, cmd.Stdout, cmd.Stderr = null, logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	restored := 0
	t.Cleanup(func() {
		cmd.Process.Kill()
		if restored != 0 {
			unix.Kill(restored, unix.SIGKILL)
		}
	})
	e := &env{t: t}
	before := e.reportAt(work, 0)
	want := expect{"mount": "EPERM", "unshare_mount_ns": "EPERM", "bpf_prog_load": "EPERM",
		"raw_socket": "EPERM", "settimeofday": "EPERM", "clock_settime": "EPERM", "chown": "ok"}
	before.check(t, want)
	if before.Status["Seccomp"] != "2" || before.Status["NoNewPrivs"] != "1" {
		t.Fatalf("the probe is not confined before the dump: %v", before.Status)
	}
	threadsBefore := threadStatus(t, pid)
	main := threadsBefore[pid]

	criuRun := func(args ...string) {
		t.Helper()
		c := exec.CommandContext(ctx, criu.Path, args...)
		if out, err := c.CombinedOutput(); err != nil {
			logName := args[len(args)-1]
			b, _ := os.ReadFile(filepath.Join(img, logName))
			t.Fatalf("criu %s: %v\n%s\nlog: %s", args[0], err, out, criubin.FirstError(string(b)))
		}
	}
	criuRun("dump", "-t", strconv.Itoa(pid), "-D", img, "-v4", "-o", "dump.log")
	cmd.Wait() // CRIU killed it
	pidfile := filepath.Join(dir, "restored.pid")
	criuRun("restore", "-D", img, "-d", "--pidfile", pidfile, "-v4", "-o", "restore.log")
	b, err := os.ReadFile(pidfile)
	if err != nil {
		t.Fatal(err)
	}
	restored, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	if restored != pid {
		t.Fatalf("restored pid %d, dumped %d", restored, pid)
	}

	threadsAfter := threadStatus(t, pid)
	for _, k := range []string{"CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters"} {
		if threadsAfter[pid][k] != main[k] {
			t.Errorf("after restore %s = %q, before %q", k, threadsAfter[pid][k], main[k])
		}
	}
	if len(threadsAfter) != len(threadsBefore) {
		t.Errorf("%d threads after restore, %d before", len(threadsAfter), len(threadsBefore))
	}
	for tid, st := range threadsAfter {
		if st["Seccomp"] != "2" || st["NoNewPrivs"] != "1" || st["CapEff"] != main["CapEff"] {
			t.Errorf("thread %d after restore: %v", tid, st)
		}
	}
	t.Logf("before: %v; after restore: %v (%d threads)", main, threadsAfter[pid], len(threadsAfter))

	// The same process, restored, probes again.
	if err := unix.Kill(pid, unix.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	after := e.reportAt(work, 1)
	after.check(t, want)
	if after.Status["Seccomp"] != "2" || after.Status["NoNewPrivs"] != "1" || after.Status["CapEff"] != before.Status["CapEff"] {
		t.Errorf("restored process reports %v, before %v", after.Status, before.Status)
	}
}
