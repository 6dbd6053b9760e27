package restore_test

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"golang.org/x/sys/unix"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/internal/testapps"
	"github.com/hotctl/hot/internal/testapps/loadclient"
	"github.com/hotctl/hot/internal/testutil"
	"github.com/hotctl/hot/restore"
	"github.com/hotctl/hot/sockets"
)

// env is one test's private hot installation (testutil.HotEnv) with the httpcount image
// imported and one container "web" running it.
type env struct {
	*testutil.HotEnv
}

func newEnv(t testing.TB, runArgs ...string) *env {
	t.Helper()
	e := &env{testutil.NewHotEnv(t)}
	dir := t.TempDir()
	rootfs := filepath.Join(dir, "image")
	if err := os.MkdirAll(filepath.Join(rootfs, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", appBinary(t), filepath.Join(rootfs, "bin", "httpcount")).CombinedOutput(); err != nil {
		t.Fatalf("copy app: %v: %s", err, out)
	}
	e.MustHot("image", "import", "--rootfs", rootfs, "--tag", "httpcount:test", "--entrypoint", "/bin/httpcount")
	e.Run(append([]string{"--name", "web", "httpcount:test"}, runArgs...)...)
	return e
}

// appBinary is the static httpcount test app.
func appBinary(t testing.TB) string {
	return testapps.Build(t, "github.com/hotctl/hot/internal/testapps/httpcount")
}

func (e *env) inspect() container.Container {
	e.T.Helper()
	var c container.Container
	if err := json.Unmarshal([]byte(e.MustHot("inspect", "--json", "web")), &c); err != nil {
		e.T.Fatalf("decode inspect: %v", err)
	}
	return c
}

// clients connects 4 keep-alive clients to the container and waits until they all answered.
func (e *env) clients() *loadclient.Load {
	e.T.Helper()
	addr := e.inspect().Network.IP.String() + ":8080"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var load *loadclient.Load
	var err error
	for ctx.Err() == nil {
		if load, err = loadclient.Start(context.Background(), addr, 4, 5*time.Millisecond); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		e.T.Fatalf("clients: %v", err)
	}
	e.T.Cleanup(func() { load.Stop() })
	return load
}

// progress waits until every client answered more requests than in before.
func progress(t testing.TB, load *loadclient.Load, before loadclient.Report) loadclient.Report {
	t.Helper()
	now, err := load.WaitProgress(before, 5, 15*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return now
}

func checkClean(t testing.TB, load *loadclient.Load) {
	t.Helper()
	final := load.Stop()
	if final.Failures != 0 || final.Regressions != 0 {
		t.Fatalf("failures %d (%v), counter regressions %d", final.Failures, final.Errors, final.Regressions)
	}
	if final.LastValue < int64(final.Requests) {
		t.Fatalf("counter %d below the %d answered requests: state lost", final.LastValue, final.Requests)
	}
	t.Logf("%d requests on the same 4 connections, longest wait %v", final.Requests, final.MaxGap)
}

func TestCheckpointRestoreContainer(t *testing.T) {
	for _, lazy := range []bool{false, true} {
		t.Run(fmt.Sprintf("lazy=%v", lazy), func(t *testing.T) {
			e := newEnv(t)
			load := e.clients()
			before := progress(t, load, load.Snapshot())
			ipBefore := e.inspect().Network.IP

			var cres checkpoint.ContainerResult
			if err := json.Unmarshal([]byte(e.MustHot("checkpoint", "--json", "web")), &cres); err != nil {
				t.Fatal(err)
			}
			t.Logf("checkpoint: freeze %v, dump %v, total %v, %d pages", cres.Stats.Freeze, cres.Stats.Dump, cres.Stats.Total, cres.Stats.PagesWritten)
			if cres.Stats.PagesWritten == 0 {
				t.Errorf("checkpoint reports no memory written: %+v", cres.Stats)
			}
			c := e.inspect()
			if c.Status != container.StatusCheckpointed || c.Network.IP != ipBefore {
				t.Fatalf("after checkpoint: status %s, IP %v (want checkpointed, %v)", c.Status, c.Network.IP, ipBefore)
			}
			if !lazy {
				inspectCheckpoint(t, e, "web", load.Snapshot().LocalAddrs)
			}
			paused := load.Snapshot()
			if paused.Failures != 0 {
				t.Fatalf("failures during checkpoint: %v", paused.Errors)
			}

			args := []string{"restore", "--json", "web"}
			if lazy {
				args = []string{"restore", "--lazy", "--json", "web"}
			}
			var rres restore.ContainerResult
			if err := json.Unmarshal([]byte(e.MustHot(args...)), &rres); err != nil {
				t.Fatal(err)
			}
			t.Logf("restore: running after %v, memory in after %v", rres.Running, rres.MemoryIn)
			c = e.inspect()
			if c.Status != container.StatusRunning || c.Pid != rres.PID {
				t.Fatalf("after restore: status %s pid %d (want running, %d)", c.Status, c.Pid, rres.PID)
			}
			// The restored init is the monitor's child, in the container's cgroup.
			if ppid := parentOf(t, c.Pid); ppid != c.MonitorPid {
				t.Errorf("restored init %d has parent %d, want the monitor %d", c.Pid, ppid, c.MonitorPid)
			}
			if cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", c.Pid)); !strings.Contains(string(cg), c.Cgroup) {
				t.Errorf("restored init is not in cgroup %s: %s", c.Cgroup, cg)
			}
			after := progress(t, load, paused)
			// The restored app's output still reaches the container log (a new monitor pipe).
			if logs := e.MustHot("logs", "web"); !strings.Contains(logs, fmt.Sprintf("request %d ", after.LastValue)) {
				t.Errorf("container log lacks request %d after the restore: ...%s", after.LastValue, logs[max(0, len(logs)-300):])
			}
			if r := e.Hot("restore", "web"); r.ExitCode == 0 || !strings.Contains(r.Stderr, "running") {
				t.Errorf("restoring a running container: exit %d, stderr %q; want a refusal", r.ExitCode, r.Stderr)
			}
			if locks, err := sockets.CRIULocks(context.Background(), c.Network.NetnsPath); err != nil || len(locks) > 0 {
				t.Errorf("network lock after restore: %v %v", locks, err)
			}
			checkClean(t, load)
			if before.Requests == 0 {
				t.Error("no requests before the checkpoint")
			}
		})
	}
}

func TestCheckpointLeaveRunning(t *testing.T) {
	e := newEnv(t)
	load := e.clients()
	progress(t, load, load.Snapshot())
	e.MustHot("checkpoint", "--leave-running", "web")
	if c := e.inspect(); c.Status != container.StatusRunning {
		t.Fatalf("after --leave-running: status %s", c.Status)
	}
	progress(t, load, load.Snapshot())
	checkClean(t, load)
}

func TestFailedCheckpointKeepsContainerRunning(t *testing.T) {
	for _, fp := range []string{"checkpoint-post-dump", "checkpoint-kill-criu"} {
		t.Run(fp, func(t *testing.T) {
			e := newEnv(t)
			load := e.clients()
			progress(t, load, load.Snapshot())
			t.Setenv("HOT_FAILPOINT", fp)
			r := e.Hot("checkpoint", "web")
			os.Unsetenv("HOT_FAILPOINT")
			if r.ExitCode == 0 || !strings.Contains(r.Stderr, "criu dump failed") || strings.Contains(r.Stderr, "RLIMIT") {
				t.Fatalf("injected failure: exit %d, stderr %q; want the CRIU error (not the rlimit line)", r.ExitCode, r.Stderr)
			}
			c := e.inspect()
			if c.Status != container.StatusRunning {
				t.Fatalf("after a failed checkpoint the container is %s", c.Status)
			}
			if locks, err := sockets.CRIULocks(context.Background(), c.Network.NetnsPath); err != nil || len(locks) > 0 {
				t.Fatalf("network lock left behind: %v %v", locks, err)
			}
			if fp == "checkpoint-kill-criu" {
				// See checkpoint's test: connections in TCP repair mode may be lost when CRIU
				// dies; the container must keep running, its state and be reachable.
				before := load.Stop()
				l2, err := loadclient.Start(context.Background(), c.Network.IP.String()+":8080", 1, 5*time.Millisecond)
				if err != nil {
					t.Fatalf("container unreachable after a killed dump: %v", err)
				}
				time.Sleep(200 * time.Millisecond)
				if after := l2.Stop(); after.Failures != 0 || after.LastValue <= before.LastValue {
					t.Fatalf("after a killed dump: %v, counter %d (was %d)", after.Errors, after.LastValue, before.LastValue)
				}
				return
			}
			progress(t, load, load.Snapshot())
			checkClean(t, load)
		})
	}
}

func parentOf(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "PPid:"); ok {
			var p int
			fmt.Sscan(strings.TrimSpace(v), &p)
			return p
		}
	}
	return 0
}

func TestExportRemoveImport(t *testing.T) {
	e := newEnv(t)
	load := e.clients()
	progress(t, load, load.Snapshot())
	c0 := e.inspect()
	archive := filepath.Join(t.TempDir(), "web.ckpt.zst")
	e.MustHot("checkpoint", "--export", archive, "--zstd", "web")
	e.MustHot("rm", "web")

	// Corrupted copies are refused before anything is created, naming the member.
	for _, tc := range []struct{ kind, member, reason string }{
		{"flip", "images/pages-1.img", "sha256"},
		{"truncate", "images/pages-1.img", "truncated"},
		{"drop", "images/core-1.img", "missing"},
	} {
		bad := filepath.Join(t.TempDir(), "bad.ckpt")
		corruptArchive(t, archive, bad, tc.kind, tc.member)
		r := e.Hot("restore", "--import", bad, "--name", "web")
		if r.ExitCode == 0 || !strings.Contains(r.Stderr, "member "+tc.member) || !strings.Contains(r.Stderr, tc.reason) {
			t.Fatalf("%s %s: exit %d, stderr %q; want a refusal naming the member (%s)", tc.kind, tc.member, r.ExitCode, r.Stderr, tc.reason)
		}
		if out := e.MustHot("ps", "-aq"); strings.TrimSpace(out) != "" {
			t.Fatalf("a refused import left containers: %q", out)
		}
		if ents, _ := filepath.Glob(filepath.Join(e.RunRoot, ".import-*")); len(ents) != 0 {
			t.Fatalf("a refused import left staging dirs: %v", ents)
		}
	}

	// Into a store without the image: refused naming the image digest.
	other := &testutil.HotEnv{T: t, Root: filepath.Join(t.TempDir(), "root"), RunRoot: filepath.Join(e.RunRoot, "other"), Bridge: e.Bridge, Subnet: e.Subnet}
	r := other.Hot("restore", "--import", archive)
	if r.ExitCode == 0 || !strings.Contains(r.Stderr, c0.ImageID.String()) {
		t.Fatalf("import without the image: exit %d, stderr %q; want a refusal naming %s", r.ExitCode, r.Stderr, c0.ImageID)
	}

	if sum := inspectCheckpoint(t, e, archive, load.Snapshot().LocalAddrs); sum.Manifest == nil || sum.Manifest.Container.ImageID != c0.ImageID {
		t.Errorf("inspect of the archive: manifest %+v, want image %s", sum.Manifest, c0.ImageID)
	}
	var res restore.ContainerResult
	if err := json.Unmarshal([]byte(e.MustHot("restore", "--import", archive, "--json")), &res); err != nil {
		t.Fatal(err)
	}
	c := e.inspect()
	if c.Status != container.StatusRunning || c.Network.IP != c0.Network.IP || c.ID == c0.ID {
		t.Fatalf("imported container: status %s, IP %v (want running, %v), id %s (old %s)", c.Status, c.Network.IP, c0.Network.IP, c.ID, c0.ID)
	}
	if cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", c.Pid)); !strings.Contains(string(cg), c.Cgroup) {
		t.Errorf("imported init is not in its new cgroup %s: %s", c.Cgroup, cg)
	}
	progress(t, load, load.Snapshot())
	checkClean(t, load)
}

// corruptArchive copies a (zstd) archive to dst as plain tar, corrupted: "flip" one byte of
// member, "truncate" the file in the middle of member, or "drop" member.
func corruptArchive(t *testing.T, src, dst, kind, member string) {
	t.Helper()
	out, err := exec.Command("sh", "-c", "zstd -dc '"+src+"' > '"+dst+"'").CombinedOutput()
	if err != nil {
		t.Fatalf("zstd: %v: %s", err, out)
	}
	b, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if kind == "drop" {
		tr := tar.NewReader(bytes.NewReader(b))
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for {
			hdr, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			data, _ := io.ReadAll(tr)
			if hdr.Name == member {
				continue
			}
			tw.WriteHeader(hdr)
			tw.Write(data)
		}
		tw.Close()
		b = buf.Bytes()
	} else {
		// Tar headers are 512-byte blocks with the name first; the data follows the header.
		off := -1
		for o := 0; o+512 <= len(b); o += 512 {
			if strings.HasPrefix(string(b[o:o+100]), member+"\x00") {
				off = o
				break
			}
		}
		if off < 0 {
			t.Fatalf("member %s not found in %s", member, src)
		}
		switch kind {
		case "flip":
			b[off+512+100] ^= 0xff
		case "truncate":
			b = b[:off+512+1000]
		}
	}
	if err := os.WriteFile(dst, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// inspectCheckpoint runs `hot checkpoint inspect` and checks it shows the app, its memory, its
// mounts and exactly the clients' connections.
func inspectCheckpoint(t *testing.T, e *env, what string, clients []string) *checkpoint.Summary {
	t.Helper()
	var sum checkpoint.Summary
	if err := json.Unmarshal([]byte(e.MustHot("checkpoint", "inspect", "--json", what)), &sum); err != nil {
		t.Fatal(err)
	}
	if len(sum.Processes) == 0 || sum.Processes[0].Comm != "httpcount" || sum.MemoryBytes < 1<<20 {
		t.Errorf("inspect %s: processes %+v, memory %d", what, sum.Processes, sum.MemoryBytes)
	}
	peers := map[string]bool{}
	for _, c := range sum.TCP {
		if c.State == "ESTABLISHED" {
			peers[c.Peer] = true
		}
	}
	for _, a := range clients {
		if !peers[a] {
			t.Errorf("inspect %s: client connection from %s not among the dumped ones %+v", what, a, sum.TCP)
		}
	}
	root := false
	for _, m := range sum.Mounts {
		root = root || m.Mountpoint == "/"
	}
	if !root || len(sum.Files) == 0 {
		t.Errorf("inspect %s: mounts %+v, files %+v", what, sum.Mounts, sum.Files)
	}
	return &sum
}

// TestFailedRestoreKeepsImagesForRetry: CRIU fails after restoring the tree (before it
// resumes); the container stays checkpointed with its images and network lock, and a second
// `hot restore` brings back the same connections and state.
func TestFailedRestoreKeepsImagesForRetry(t *testing.T) {
	e := newEnv(t)
	load := e.clients()
	progress(t, load, load.Snapshot())
	e.MustHot("checkpoint", "web")
	t.Setenv("HOT_FAILPOINT", "restore-post-restore")
	r := e.Hot("restore", "web")
	os.Unsetenv("HOT_FAILPOINT")
	if r.ExitCode == 0 || !strings.Contains(r.Stderr, "criu restore failed") || strings.Contains(r.Stderr, "RLIMIT") {
		t.Fatalf("injected restore failure: exit %d, stderr %q; want the CRIU error", r.ExitCode, r.Stderr)
	}
	c := e.inspect()
	if c.Status != container.StatusCheckpointed {
		t.Fatalf("after a failed restore the container is %s, want checkpointed", c.Status)
	}
	rec, err := checkpoint.LoadRecord(filepath.Join(e.Root, "containers", c.ID))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(rec.ImagesDir, "inventory.img")); err != nil {
		t.Fatalf("images gone after a failed restore: %v", err)
	}
	paused := load.Snapshot()
	e.MustHot("restore", "web")
	progress(t, load, paused)
	checkClean(t, load)
}

// TestGoDefaultListenerIsCheckpointable: Go >= 1.24 listens with MPTCP by default, which CRIU
// cannot dump; the container's network namespace has MPTCP disabled (package network), so an
// unmodified Go server falls back to TCP and checkpoint/restore works.
func TestGoDefaultListenerIsCheckpointable(t *testing.T) {
	e := newEnv(t, "serve", "-addr", ":8080", "-go-default-listener")
	load := e.clients()
	progress(t, load, load.Snapshot())
	e.MustHot("checkpoint", "web")
	paused := load.Snapshot()
	e.MustHot("restore", "web")
	progress(t, load, paused)
	checkClean(t, load)
}

// TestKilledCheckpointRecoversWithResume: `hot checkpoint` SIGKILLed while CRIU holds the
// frozen tree with every image written (CRIU then gives up at its next message to hot and
// leaves the container frozen); `hot ps` shows it paused with the reason, and `hot resume`
// brings back the same connections.
func TestKilledCheckpointRecoversWithResume(t *testing.T) {
	e := newEnv(t, "serve", "-addr", ":8080", "-rss", "256")
	load := e.clients()
	progress(t, load, load.Snapshot())
	// hot is killed from inside at CRIU's post-dump notification: CRIU holds the tree
	// (ptrace) and has written every image. (A kill from outside after a sleep raced with
	// dumps that got faster: the dump could complete first.)
	cmd := exec.Command(testutil.HotBinary(t), e.Args("checkpoint", "web")...)
	cmd.Env = append(os.Environ(), "HOT_FAILPOINT=checkpoint-kill-self")
	if err := cmd.Run(); err == nil {
		t.Fatal("hot checkpoint with the kill-self failpoint exited 0, want killed")
	}
	// CRIU outlives hot: it holds the tasks (ptrace) until its next message to hot fails, then
	// puts them back frozen. Either way the container shows as paused, with the hint.
	c := e.inspect()
	for deadline := time.Now().Add(10 * time.Second); c.Status != container.StatusPaused && time.Now().Before(deadline); c = e.inspect() {
		time.Sleep(20 * time.Millisecond) // CRIU notices the dead hot at its next message
	}
	if c.Status != container.StatusPaused || !strings.Contains(c.Reason, "hot resume") {
		t.Fatalf("after a killed checkpoint: status %s (%s), want paused with a hint", c.Status, c.Reason)
	}
	t.Logf("after the kill: %s", c.Reason)
	paused := load.Snapshot()
	e.MustHot("resume", "web")
	if c := e.inspect(); c.Status != container.StatusRunning {
		t.Fatalf("after resume: %s (%s)", c.Status, c.Reason)
	}
	if locks, err := sockets.CRIULocks(context.Background(), c.Network.NetnsPath); err != nil || len(locks) > 0 {
		t.Fatalf("network lock left after resume: %v %v", locks, err)
	}
	progress(t, load, paused)
	checkClean(t, load)
}

// TestKilledCheckpointAfterCompletedDump: `hot checkpoint` SIGKILLed once CRIU completed the
// dump (processes gone, every image written) but before the container was recorded as
// checkpointed. It must not be left "exited" (a `hot rm` would discard the checkpoint): the
// next hot command records it as checkpointed and `hot restore` brings back the same
// connections and state.
func TestKilledCheckpointAfterCompletedDump(t *testing.T) {
	e := newEnv(t)
	load := e.clients()
	progress(t, load, load.Snapshot())
	cmd := exec.Command(testutil.HotBinary(t), e.Args("checkpoint", "web")...)
	cmd.Env = append(os.Environ(), "HOT_FAILPOINT=checkpoint-kill-self-after-dump")
	if err := cmd.Run(); err == nil {
		t.Fatal("hot checkpoint with the kill-self-after-dump failpoint exited 0, want killed")
	}
	paused := load.Snapshot()
	e.MustHot("ps") // recovers
	if c := e.inspect(); c.Status != container.StatusCheckpointed {
		t.Fatalf("after a checkpoint killed once the dump completed: %s (%s), want checkpointed", c.Status, c.Reason)
	}
	e.MustHot("restore", "web")
	progress(t, load, paused)
	checkClean(t, load)
}

// TestRestoreAfterMonitorDied: the monitor of a checkpointed container is killed; `hot
// restore` starts a new one and the restored tree becomes its child, same connections.
func TestRestoreAfterMonitorDied(t *testing.T) {
	e := newEnv(t)
	load := e.clients()
	progress(t, load, load.Snapshot())
	e.MustHot("checkpoint", "web")
	old := e.inspect().MonitorPid
	if err := unix.Kill(old, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200 && unix.Kill(old, 0) == nil; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if c := e.inspect(); c.Status != container.StatusCheckpointed || !strings.Contains(c.Reason, "monitor") {
		t.Fatalf("checkpointed container without monitor: %s (%s)", c.Status, c.Reason)
	}
	paused := load.Snapshot()
	e.MustHot("restore", "web")
	c := e.inspect()
	if c.Status != container.StatusRunning || c.MonitorPid == old || parentOf(t, c.Pid) != c.MonitorPid {
		t.Fatalf("after restore: %s, monitor %d (old %d), parent of init %d", c.Status, c.MonitorPid, old, parentOf(t, c.Pid))
	}
	progress(t, load, paused)
	checkClean(t, load)
}
