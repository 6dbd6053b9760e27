package checkpoint_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/internal/testapps"
	"github.com/hotctl/hot/internal/testapps/loadclient"
	"github.com/hotctl/hot/internal/testutil"
	"github.com/hotctl/hot/internal/testutil/sandbox"
	"github.com/hotctl/hot/restore"
	"github.com/hotctl/hot/sockets"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	sandbox.MaybeInit()
	os.Exit(m.Run())
}

const counterPkg = "github.com/hotctl/hot/internal/testapps/httpcount"

// env is a sandboxed counter server with 4 keep-alive clients connected from the host.
type env struct {
	sb     *sandbox.Sandbox
	criu   criubin.Binary
	load   *loadclient.Load
	images string
}

func startEnv(t *testing.T, args ...string) *env {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireCommand(t, "nsenter")
	testutil.RequireCommand(t, "nft")
	ctx := context.Background()
	b, err := criubin.Find(ctx, "")
	if err != nil {
		t.Skipf("CRIU: %v", err)
	}
	app := testapps.Build(t, counterPkg)
	sb := sandbox.Start(t, sandbox.Options{App: app, Args: append([]string{"serve", "-addr", ":8080"}, args...)})
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := sandbox.WaitListening(wctx, sb.Addr(8080)); err != nil {
		t.Fatal(err)
	}
	load, err := loadclient.Start(ctx, sb.Addr(8080), 4, 5*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { load.Stop() })
	imagesTmp := t.TempDir()
	// Images on tmpfs, as in production (the run root is a tmpfs).
	if err := unix.Mount("tmpfs", imagesTmp, "tmpfs", 0, "mode=0700"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(imagesTmp, unix.MNT_DETACH) })
	return &env{sb: sb, criu: b, load: load, images: filepath.Join(imagesTmp, "images")}
}

func (e *env) dumpOptions() checkpoint.DumpOptions {
	return checkpoint.DumpOptions{
		CRIU:          e.criu,
		PID:           e.sb.PID,
		ImagesDir:     e.images,
		Netns:         &checkpoint.ExternalNetns{Path: e.sb.NetnsPath},
		Freezer:       e.sb.Cgroup,
		FreezerCgroup: checkpoint.FreezerDir(e.sb.Cgroup),
	}
}

func (e *env) restore(t *testing.T, lazy bool) *restore.Result {
	t.Helper()
	res, err := restore.Restore(context.Background(), restore.Options{
		CRIU:      e.criu,
		ImagesDir: e.images,
		Root:      e.sb.Rootfs,
		Netns:     &checkpoint.ExternalNetns{Path: e.sb.NetnsPath},
		Lazy:      lazy,
	})
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	e.sb.SetPID(res.PID)
	return res
}

// expectProgress waits until every client answered more requests than in before.
func (e *env) expectProgress(t *testing.T, before loadclient.Report) loadclient.Report {
	t.Helper()
	now, err := e.load.WaitProgress(before, 5, 15*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return now
}

func TestDumpRestoreKeepsConnections(t *testing.T) {
	e := startEnv(t, "-ghost", "/tmp/ghost")
	before := e.expectProgress(t, e.load.Snapshot())

	res, err := checkpoint.Dump(context.Background(), e.dumpOptions())
	if err != nil {
		t.Fatalf("dump: %v", err)
	}
	t.Logf("dump: %+v", res.Stats)
	if res.Stats.PagesWritten == 0 || res.Stats.BytesWritten == 0 {
		t.Errorf("dump stats report no pages written: %+v", res.Stats)
	}
	// Without --leave-running the processes are gone.
	if err := unix.Kill(e.sb.PID, 0); err == nil {
		var ws unix.WaitStatus
		if _, err := unix.Wait4(e.sb.PID, &ws, 0, nil); err != nil {
			t.Fatalf("dumped process still there: %v", err)
		}
	}
	paused := e.load.Snapshot()

	rr := e.restore(t, false)
	t.Logf("restore: pid %d, running after %v, stats %+v", rr.PID, rr.Running, rr.Stats)
	after := e.expectProgress(t, paused)
	// The deleted-but-open file came back from the images (CRIU ghost file, --link-remap).
	resp, err := http.Get("http://" + e.sb.Addr(8080) + "/ghost")
	if err != nil {
		t.Fatalf("ghost file after restore: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "ghost content\n" {
		t.Errorf("ghost file after restore reads %q", body)
	}
	final := e.load.Stop()
	if final.Failures != 0 || final.Regressions != 0 {
		t.Fatalf("failures %d (%v), regressions %d", final.Failures, final.Errors, final.Regressions)
	}
	if final.LastValue < int64(final.Requests) {
		t.Fatalf("counter %d below the %d answered requests: state lost", final.LastValue, final.Requests)
	}
	t.Logf("requests before dump %d, after restore %d, final %d; max gap %v", before.Requests, after.Requests, final.Requests, final.MaxGap)
	if locks, err := sockets.CRIULocks(context.Background(), e.sb.NetnsPath); err != nil || len(locks) > 0 {
		t.Fatalf("network lock left after restore: %v %v", locks, err)
	}
}

func TestDumpLeaveRunning(t *testing.T) {
	e := startEnv(t)
	e.expectProgress(t, e.load.Snapshot())
	opts := e.dumpOptions()
	opts.LeaveRunning = true
	if _, err := checkpoint.Dump(context.Background(), opts); err != nil {
		t.Fatalf("dump --leave-running: %v", err)
	}
	e.expectProgress(t, e.load.Snapshot())
	if _, err := os.Stat(filepath.Join(e.images, "inventory.img")); err != nil {
		t.Fatalf("no images written: %v", err)
	}
	if locks, _ := sockets.CRIULocks(context.Background(), e.sb.NetnsPath); len(locks) > 0 {
		t.Fatalf("network lock left after a leave-running dump: %v", locks)
	}
}

// TestLazyRestore also checks that none of the three CRIU calls (dump, restore, lazy-pages)
// probes the kernel where /run is not a tmpfs: Dump writes CRIU's kdat cache when it is missing.
func TestLazyRestore(t *testing.T) {
	e := startEnv(t, "-rss", "32")
	var run unix.Statfs_t
	diskRun := unix.Statfs("/run", &run) == nil && run.Type != unix.TMPFS_MAGIC
	if diskRun {
		for _, p := range []string{criubin.KdatCachePath, criubin.KdatMarkerPath} {
			os.Remove(p)
		}
	}
	e.expectProgress(t, e.load.Snapshot())
	if _, err := checkpoint.Dump(context.Background(), e.dumpOptions()); err != nil {
		t.Fatalf("dump: %v", err)
	}
	e.sb.Kill() // reap the dumped PID 1 (already gone)
	paused := e.load.Snapshot()
	rr := e.restore(t, true)
	t.Logf("lazy restore: running after %v, all memory in after %v", rr.Running, rr.MemoryIn)
	e.expectProgress(t, paused)
	if final := e.load.Stop(); final.Failures != 0 || final.Regressions != 0 {
		t.Fatalf("failures %d (%v), regressions %d", final.Failures, final.Errors, final.Regressions)
	}
	if !diskRun {
		return // CRIU keeps its cache on a tmpfs /run itself
	}
	for _, name := range []string{checkpoint.DumpLog, checkpoint.RestoreLog, restore.LazyPagesLog} {
		log, err := os.ReadFile(filepath.Join(e.images, name))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(log), "Loaded kdat cache from "+criubin.KdatCachePath) {
			t.Errorf("%s: CRIU probed the kernel instead of loading %s", name, criubin.KdatCachePath)
		}
	}
}

func TestFailedDumpKeepsRunningWithoutLock(t *testing.T) {
	for _, fp := range []string{checkpoint.FailAfterMemoryDump, checkpoint.FailKillCRIU} {
		t.Run(fp, func(t *testing.T) { testFailedDump(t, fp) })
	}
}

func testFailedDump(t *testing.T, failpoint string) {
	e := startEnv(t)
	e.expectProgress(t, e.load.Snapshot())
	opts := e.dumpOptions()
	opts.Failpoint = failpoint
	opts.Logger = testutil.Logger(t)
	_, err := checkpoint.Dump(context.Background(), opts)
	var cerr *checkpoint.CRIUError
	if !errors.As(err, &cerr) {
		t.Fatalf("dump with failpoint: want *CRIUError, got %v", err)
	}
	t.Logf("error: %v (go-criu: %v)", err, cerr.Err)
	if strings.Contains(cerr.Line, "RLIMIT_NOFILE") || cerr.Line == "" {
		t.Errorf("error names the harmless rlimit line or nothing: %q", cerr.Line)
	}
	if cerr.LogPath == "" || !strings.Contains(err.Error(), cerr.LogPath) {
		t.Errorf("error does not name the log: %v", err)
	}
	if locks, err := sockets.CRIULocks(context.Background(), e.sb.NetnsPath); err != nil || len(locks) > 0 {
		t.Fatalf("network lock left after failed dump: %v %v", locks, err)
	}
	if failpoint == checkpoint.FailKillCRIU {
		// CRIU killed while the connections are in TCP repair mode: it had already thawed the
		// freezer and held the tasks by ptrace, so they run the moment CRIU dies and may read
		// from a socket still in repair mode (EINVAL) and close it before Dump takes the
		// sockets out of repair mode. Established connections can be lost; the container must
		// keep running, its state, and accept new connections.
		before := e.load.Stop()
		load, err := loadclient.Start(context.Background(), e.sb.Addr(8080), 1, 5*time.Millisecond)
		if err != nil {
			t.Fatalf("container unreachable after a killed dump: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
		after := load.Stop()
		if after.Failures != 0 || after.LastValue <= before.LastValue {
			t.Fatalf("after a killed dump: failures %v, counter %d (was %d)", after.Errors, after.LastValue, before.LastValue)
		}
		return
	}
	e.expectProgress(t, e.load.Snapshot())
	if final := e.load.Stop(); final.Failures != 0 {
		t.Fatalf("failures %d: %v", final.Failures, final.Errors)
	}
}
