package cgroups

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/internal/testutil"
)

// testName returns a cgroup name private to this test, under a parent private to it too, and
// removes whatever is left of it at the end.
func testName(t testing.TB) string {
	t.Helper()
	parent := fmt.Sprintf("hottest-%d-%x", os.Getpid(), rand.Uint32())
	name := parent + "/c1"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if c, err := Load(name); err == nil {
			_ = c.Kill(ctx)
			_ = c.Destroy(ctx)
		}
	})
	return name
}

// startBusy starts a CPU-bound shell loop, moves it into c, and reaps it in the background.
func startBusy(t testing.TB, c *Cgroup) (pid int, done <-chan error) {
	t.Helper()
	cmd := exec.Command("sh", "-c", "i=0; while :; do i=$((i+1)); done")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ch := make(chan error, 1)
	go func() { ch <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	if err := c.AddProc(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid, ch
}

// cpuTicks returns utime+stime of pid and its state letter.
func cpuTicks(t testing.TB, pid int) (int64, string) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return ut + st, f[0]
}

func TestLifecycle(t *testing.T) {
	testutil.RequireRoot(t)
	mode, err := Mode()
	if err != nil {
		t.Skipf("requires a mounted cgroup hierarchy (kernel feature): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	name := testName(t)
	c, err := Create(ctx, name, Resources{MemoryBytes: 64 << 20, PidsMax: 42})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("mode %s, paths %v", mode, c.Paths())

	// Limits are what the kernel files say.
	memFile, memDir := "memory.limit_in_bytes", c.Paths()["memory"]
	pidsDir := c.Paths()["pids"]
	if mode == ModeV2 {
		memFile, memDir, pidsDir = "memory.max", c.Paths()[unifiedKey], c.Paths()[unifiedKey]
	}
	if v, _ := readTrim(filepath.Join(memDir, memFile)); v != strconv.Itoa(64<<20) {
		t.Errorf("%s = %q, want %d", memFile, v, 64<<20)
	}
	if v, _ := readTrim(filepath.Join(pidsDir, "pids.max")); v != "42" {
		t.Errorf("pids.max = %q, want 42", v)
	}

	pid, done := startBusy(t, c)
	for key, dir := range c.Paths() {
		pids, err := readPids(filepath.Join(dir, "cgroup.procs"))
		if err != nil || len(pids) != 1 || pids[0] != pid {
			t.Errorf("%s: cgroup.procs = %v, %v; want [%d]", key, pids, err, pid)
		}
	}
	if got, err := c.Procs(); err != nil || len(got) != 1 || got[0] != pid {
		t.Errorf("Procs = %v, %v", got, err)
	}

	// A second Create of the same name with a live process is refused.
	if _, err := Create(ctx, name, Resources{}); err == nil || !strings.Contains(err.Error(), "still has processes") {
		t.Errorf("Create over a live group: %v", err)
	}

	checkFreezeThaw(t, c, pid)

	if err := c.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("process survived Kill")
	}
	if err := c.Destroy(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Destroy(ctx); err != nil {
		t.Errorf("second Destroy: %v", err)
	}
	for key, dir := range c.Paths() {
		for _, d := range []string{dir, filepath.Dir(dir)} {
			if _, err := os.Stat(d); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s: %s still exists after Destroy (%v)", key, d, err)
			}
		}
	}
	if _, err := Load(name); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load after Destroy: %v, want ErrNotExist", err)
	}
}

// checkFreezeThaw proves that Freeze really stops pid (no CPU time, not running) and Thaw
// lets it continue.
func checkFreezeThaw(t *testing.T, c *Cgroup, pid int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	time.Sleep(50 * time.Millisecond)
	if err := c.Freeze(ctx); err != nil {
		t.Fatal(err)
	}
	if f, err := c.Frozen(); err != nil || !f {
		t.Errorf("Frozen after Freeze = %v, %v", f, err)
	}
	t0, state := cpuTicks(t, pid)
	if state == "R" {
		t.Errorf("process state %s right after Freeze returned, want not running", state)
	}
	time.Sleep(200 * time.Millisecond)
	t1, _ := cpuTicks(t, pid)
	if t1 != t0 {
		t.Errorf("frozen process used CPU: %d -> %d ticks", t0, t1)
	}
	if err := c.Thaw(ctx); err != nil {
		t.Fatal(err)
	}
	if f, err := c.Frozen(); err != nil || f {
		t.Errorf("Frozen after Thaw = %v, %v", f, err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		t2, _ := cpuTicks(t, pid)
		if t2 > t1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("thawed process makes no progress (%d ticks)", t2)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestFreezeV2OnHybrid exercises the cgroup2 freezer (cgroup.freeze + cgroup.events) on a
// hybrid host, where Create picks the v1 freezer, by pointing the freezer at the unified group.
func TestFreezeV2OnHybrid(t *testing.T) {
	testutil.RequireRoot(t)
	if m, _ := Mode(); m != ModeHybrid {
		t.Skipf("requires a hybrid host (cgroup mode here: %q); the v2 freezer is covered by TestLifecycle on pure v2, and absent on v1", m)
	}
	ctx := context.Background()
	c, err := Create(ctx, testName(t), Resources{})
	if err != nil {
		t.Fatal(err)
	}
	c.freezer, c.v2 = c.Paths()[unifiedKey], true
	pid, done := startBusy(t, c)
	checkFreezeThaw(t, c, pid)
	kctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := c.Kill(kctx); err != nil {
		t.Fatal(err)
	}
	<-done
	if err := c.Destroy(kctx); err != nil {
		t.Fatal(err)
	}
}

func TestFreezeTimeoutThawsBack(t *testing.T) {
	testutil.RequireRoot(t)
	if _, err := Mode(); err != nil {
		t.Skipf("requires a mounted cgroup hierarchy (kernel feature): %v", err)
	}
	ctx := context.Background()
	c, err := Create(ctx, testName(t), Resources{})
	if err != nil {
		t.Fatal(err)
	}
	pid, done := startBusy(t, c)
	_ = pid
	// An already expired context: Freeze may win the race (the kernel can freeze a single
	// task before the first check); if it does not, it must thaw back and say why.
	expired, cancel := context.WithDeadline(ctx, time.Now().Add(-time.Second))
	defer cancel()
	if err := c.Freeze(expired); err != nil {
		if f, _ := c.Frozen(); f {
			t.Errorf("Freeze failed (%v) but left the group frozen", err)
		}
		if !strings.Contains(err.Error(), "thawed again") {
			t.Errorf("error does not say it thawed back: %v", err)
		}
		t.Logf("expired Freeze: %v", err)
	} else if err := c.Thaw(ctx); err != nil {
		t.Fatal(err)
	}
	kctx, kcancel := context.WithTimeout(ctx, 10*time.Second)
	defer kcancel()
	if err := c.Kill(kctx); err != nil {
		t.Fatal(err)
	}
	<-done
	if err := c.Destroy(kctx); err != nil {
		t.Fatal(err)
	}
}

func TestCreateBadInput(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	if _, err := Create(ctx, "/abs", Resources{}); err == nil {
		t.Error("absolute name accepted")
	}
	if _, err := Create(ctx, "hot/x", Resources{MemoryBytes: -1}); err == nil || !strings.Contains(err.Error(), "0 for unlimited") {
		t.Errorf("negative memory: %v", err)
	}
}

// BenchmarkFreezeThaw measures one freeze (until FROZEN) plus one thaw of a group holding a
// sleeping process, and reports the median in µs.
func BenchmarkFreezeThaw(b *testing.B) {
	testutil.RequireRoot(b)
	kinds := []string{"default"}
	if m, _ := Mode(); m == ModeHybrid {
		kinds = append(kinds, "v2-unified")
	}
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			ctx := context.Background()
			c, err := Create(ctx, testName(b), Resources{})
			if err != nil {
				b.Fatal(err)
			}
			if kind == "v2-unified" {
				c.freezer, c.v2 = c.Paths()[unifiedKey], true
			}
			cmd := exec.Command("sleep", "1000")
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			go func() { _ = cmd.Wait() }()
			if err := c.AddProc(cmd.Process.Pid); err != nil {
				b.Fatal(err)
			}
			freeze := make([]time.Duration, 0, b.N)
			thaw := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				if err := c.Freeze(ctx); err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				if err := c.Thaw(ctx); err != nil {
					b.Fatal(err)
				}
				freeze = append(freeze, t1.Sub(t0))
				thaw = append(thaw, time.Since(t1))
			}
			b.StopTimer()
			b.ReportMetric(medianMicros(freeze), "freeze-median-µs")
			b.ReportMetric(medianMicros(thaw), "thaw-median-µs")
			b.ReportMetric(maxMicros(freeze), "freeze-max-µs")
			kctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			if err := c.Kill(kctx); err != nil {
				b.Fatal(err)
			}
			if err := c.Destroy(kctx); err != nil {
				b.Fatal(err)
			}
		})
	}
}

func medianMicros(d []time.Duration) float64 {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return float64(s[len(s)/2].Nanoseconds()) / 1e3
}

func maxMicros(d []time.Duration) float64 {
	var m time.Duration
	for _, x := range d {
		m = max(m, x)
	}
	return float64(m.Nanoseconds()) / 1e3
}

// TestCreateReusesLeftover: an empty group left behind (here: frozen, as a crash in the middle
// of a checkpoint leaves it) is reused by Create, thawed and with the new limits.
func TestCreateReusesLeftover(t *testing.T) {
	testutil.RequireRoot(t)
	if _, err := Mode(); err != nil {
		t.Skipf("requires a mounted cgroup hierarchy (kernel feature): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	name := testName(t)
	old, err := Create(ctx, name, Resources{PidsMax: 5})
	if err != nil {
		t.Fatal(err)
	}
	if err := old.Freeze(ctx); err != nil {
		t.Fatal(err)
	}
	c, err := Create(ctx, name, Resources{PidsMax: 7})
	if err != nil {
		t.Fatal(err)
	}
	if f, err := c.Frozen(); err != nil || f {
		t.Errorf("reused group frozen = %v, %v; want thawed", f, err)
	}
	dir := c.Paths()["pids"]
	if c.Mode() == ModeV2 {
		dir = c.Paths()[unifiedKey]
	}
	if v, _ := readTrim(filepath.Join(dir, "pids.max")); v != "7" {
		t.Errorf("pids.max = %q, want 7", v)
	}
	if err := c.Destroy(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestUnfrozenTasksNamesRunners: the report a failed Freeze returns names running tasks with
// their pid, command and state, and leaves out frozen ones.
func TestUnfrozenTasksNamesRunners(t *testing.T) {
	testutil.RequireRoot(t)
	if _, err := Mode(); err != nil {
		t.Skipf("requires a mounted cgroup hierarchy (kernel feature): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Create(ctx, testName(t), Resources{})
	if err != nil {
		t.Fatal(err)
	}
	pid, done := startBusy(t, c)
	time.Sleep(20 * time.Millisecond)
	stuck := c.unfrozenTasks()
	want := fmt.Sprintf("%d/%d (sh) state ", pid, pid)
	if len(stuck) != 1 || !strings.HasPrefix(stuck[0], want) {
		t.Errorf("running group: unfrozenTasks = %q, want one entry starting %q", stuck, want)
	}
	if err := c.Freeze(ctx); err != nil {
		t.Fatal(err)
	}
	if stuck := c.unfrozenTasks(); len(stuck) != 0 {
		t.Errorf("frozen group: unfrozenTasks = %q, want none", stuck)
	}
	if err := c.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	<-done
	if err := c.Destroy(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestKillWithoutReaper: Kill returns and Destroy succeeds while the killed processes are
// still unreaped zombies (a crashed monitor cannot reap), and a forking child is caught too.
func TestKillWithoutReaper(t *testing.T) {
	testutil.RequireRoot(t)
	if _, err := Mode(); err != nil {
		t.Skipf("requires a mounted cgroup hierarchy (kernel feature): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Create(ctx, testName(t), Resources{})
	if err != nil {
		t.Fatal(err)
	}
	// The shell keeps forking sleepers; its children join the group with it.
	cmd := exec.Command("sh", "-c", "while :; do sleep 100 & sleep 0.01; done")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if err := c.AddProc(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if pids, _ := c.Procs(); len(pids) < 3 {
		t.Fatalf("want the shell and several sleepers in the group, got %v", pids)
	}
	if err := c.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Destroy(ctx); err != nil {
		t.Fatal(err)
	}
	err = cmd.Wait() // reaped only now
	if ee, ok := err.(*exec.ExitError); !ok || ee.ProcessState.String() != "signal: killed" {
		t.Errorf("shell exit: %v, want killed", err)
	}
}
