package update_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/internal/testapps/loadclient"
	"github.com/hotctl/hot/internal/testutil"
	"github.com/hotctl/hot/sockets"
	"github.com/hotctl/hot/update"
)

// fixture is one container running demo:v1 under keep-alive load, shared by the steps of
// TestHotUpdate: every step must leave it serving, and the load must never see a failure.
type fixture struct {
	t    *testing.T
	e    *testutil.HotEnv
	name string
	addr string
	load *loadclient.Load
}

func newFixture(t *testing.T) *fixture {
	e := testutil.NewHotEnv(t)
	testutil.RequireCommand(t, "iptables")
	for _, v := range []struct{ ver, extra string }{{"v1", ""}, {"v2", "etc/demo/v2-notes"}} {
		extra := map[string]string{}
		if v.extra != "" {
			extra[v.extra] = "only in v2\n"
		}
		e.MustHot("image", "import", "--rootfs", testutil.DemoRootfs(t, v.ver, extra), "--tag", "demo:"+v.ver,
			"--entrypoint", "/app", "--cmd", "-listen", "--cmd", ":8080", "--cmd", "-write-on-start", "--cmd", "/var/lib/demo/written-by-v1")
	}
	f := &fixture{t: t, e: e, name: "web"}
	e.Run("--name", f.name, "demo:v1")
	c := f.inspect()
	f.addr = net.JoinHostPort(c.Network.IP.String(), "8080")
	waitHTTP(t, "http://"+f.addr+"/healthz")
	l, err := loadclient.Start(t.Context(), f.addr, 4, 5*time.Millisecond)
	if err != nil {
		t.Fatalf("start load: %v", err)
	}
	f.load = l
	t.Cleanup(func() { l.Stop() })
	return f
}

func (f *fixture) inspect() container.Container {
	f.t.Helper()
	var c container.Container
	if err := json.Unmarshal([]byte(f.e.MustHot("inspect", "--json", f.name)), &c); err != nil {
		f.t.Fatalf("decode inspect: %v", err)
	}
	return c
}

// serving checks that the container runs version want with nothing of an update left over,
// and that every load client got answers on its original connection since the last check.
func (f *fixture) serving(want string) {
	t := f.t
	t.Helper()
	c := f.inspect()
	if c.Status != container.StatusRunning {
		t.Fatalf("container is %s (%s), want running", c.Status, c.Reason)
	}
	if _, err := os.Stat(filepath.Join(c.Dir, update.JournalFile)); !os.IsNotExist(err) {
		t.Errorf("update journal still present: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(c.CgroupPaths["freezer"], "freezer.state")); err == nil && strings.TrimSpace(string(b)) != "THAWED" {
		t.Errorf("cgroup freezer is %s, want THAWED", b)
	}
	if rules, err := sockets.HoldRules(t.Context(), c.Network.NetnsPath); err != nil || len(rules) > 0 {
		t.Errorf("hold rules left in the container's netns: %v %v", rules, err)
	}
	if locks, err := sockets.CRIULocks(t.Context(), c.Network.NetnsPath); err != nil || len(locks) > 0 {
		t.Errorf("CRIU network lock left: %v %v", locks, err)
	}
	before := f.load.Snapshot()
	if _, err := f.load.WaitProgress(before, 3, 30*time.Second); err != nil {
		t.Fatalf("load after the step: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		body, err := get("http://" + f.addr + "/")
		if err == nil && strings.HasPrefix(body, "demo "+want+" ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("container answers %q (%v), want version %s", body, err, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestHotUpdate(t *testing.T) {
	f := newFixture(t)
	e := f.e
	f.serving("v1")

	t.Run("bad input changes nothing", func(t *testing.T) {
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"update", f.name, "demo:v9"}, "demo:v9"},
			{[]string{"update", f.name, "demo:v1"}, "already runs image demo:v1"},
			{[]string{"update", "nosuch", "demo:v2"}, "nosuch"},
			{[]string{"update", f.name, "demo:v2", "--reload-signal", "NOPE"}, "--reload-signal"},
		} {
			r := e.Hot(tc.args...)
			if r.ExitCode == 0 || !strings.Contains(r.Stderr, tc.want) {
				t.Errorf("hot %s: exit %d, stderr %q; want a failure naming %q", strings.Join(tc.args, " "), r.ExitCode, r.Stderr, tc.want)
			}
		}
		f.serving("v1")
	})

	for _, phase := range []string{"prepared", "dumping", "dumped", "swapped", "restored"} {
		t.Run("hot killed at "+phase+" rolls back", func(t *testing.T) {
			t.Setenv("HOT_FAILPOINT", "update-kill:"+phase)
			r := e.Hot("update", f.name, "demo:v2")
			if r.ExitCode != -1 && r.ExitCode != 137 {
				t.Fatalf("update with kill failpoint exited %d, want killed\n%s", r.ExitCode, r.Stderr)
			}
			os.Unsetenv("HOT_FAILPOINT")
			// The next command on the container recovers the interrupted update.
			e.MustHot("ps")
			f.serving("v1")
		})
	}

	t.Run("restore failure rolls back", func(t *testing.T) {
		t.Setenv("HOT_FAILPOINT", "update-restore")
		r := e.Hot("update", f.name, "demo:v2")
		if r.ExitCode != 1 || !strings.Contains(r.Stderr, "rolled back") || !strings.Contains(r.Stderr, "injected restore failure") {
			t.Fatalf("exit %d, stderr %q: want a rollback naming the restore failure", r.ExitCode, r.Stderr)
		}
		os.Unsetenv("HOT_FAILPOINT")
		f.serving("v1")
	})

	t.Run("failing health probe rolls back", func(t *testing.T) {
		r := e.Hot("update", f.name, "demo:v2", "--health-tcp", "9", "--health-timeout", "1s")
		if r.ExitCode != 1 || !strings.Contains(r.Stderr, "rolled back") || !strings.Contains(r.Stderr, "health probe") {
			t.Fatalf("exit %d, stderr %q: want a rollback naming the health probe", r.ExitCode, r.Stderr)
		}
		f.serving("v1")
	})

	t.Run("concurrent update is refused", func(t *testing.T) {
		slow := exec.Command(testutil.HotBinary(t), e.Args("update", f.name, "demo:v2", "--health-tcp", "9", "--health-timeout", "4s")...)
		var slowErr strings.Builder
		slow.Stderr = &slowErr
		if err := slow.Start(); err != nil {
			t.Fatal(err)
		}
		journal := filepath.Join(f.inspect().Dir, update.JournalFile)
		for i := 0; i < 200; i++ {
			if _, err := os.Stat(journal); err == nil {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		start := time.Now()
		r := e.Hot("update", f.name, "demo:v2")
		if r.ExitCode == 0 || !strings.Contains(r.Stderr, "busy") {
			t.Errorf("second update: exit %d, stderr %q; want it refused as busy", r.ExitCode, r.Stderr)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("refusal took %s; it must not wait for the first update", d)
		}
		if err := slow.Wait(); err == nil || !strings.Contains(slowErr.String(), "rolled back") {
			t.Errorf("first update: %v %s; want it rolled back by its health probe", err, slowErr.String())
		}
		f.serving("v1")
	})

	t.Run("update keeps connections, memory and files", func(t *testing.T) {
		before := f.load.Snapshot()
		out := e.MustHot("update", f.name, "demo:v2", "--reload-signal", "HUP", "--health-http", "8080/healthz", "--json")
		var sum update.Summary
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if err := json.Unmarshal([]byte(strings.Join(lastJSONObject(lines), "\n")), &sum); err != nil {
			t.Fatalf("decode summary: %v\n%s", err, out)
		}
		if sum.Outcome != "updated" || sum.TCPBefore < 4 || sum.TCPAfter < 4 || len(sum.Replaced) == 0 {
			t.Errorf("summary = %+v", sum)
		}
		t.Logf("freeze window %.1f ms, client pause %.1f ms (%s, %d packets), dump %.1f ms, restore %.1f ms",
			sum.FreezeWindowMS, sum.ClientPauseMS, sum.Holding, sum.HeldPackets, sum.DumpMS, sum.RestoreMS)
		f.serving("v2")
		after := f.load.Snapshot()
		if after.LastValue <= before.LastValue || after.Regressions > 0 {
			t.Errorf("counter did not continue: before %d, after %d, %d regressions", before.LastValue, after.LastValue, after.Regressions)
		}
		if after.LastVersion != "v2" {
			t.Errorf("load clients' connections answer %q, want v2 after the reload", after.LastVersion)
		}
		if body, _ := get("http://" + f.addr + "/cat?path=/etc/demo/v2-notes"); body != "only in v2\n" {
			t.Errorf("file new in v2: %q", body)
		}
		if body, _ := get("http://" + f.addr + "/cat?path=/var/lib/demo/written-by-v1"); body != "written by v1\n" {
			t.Errorf("file the container wrote: %q", body)
		}
		if hist := e.MustHot("history", f.name); !strings.Contains(hist, "demo:v2") {
			t.Errorf("history lacks the new generation:\n%s", hist)
		}
		if ev := e.MustHot("events", f.name); !strings.Contains(ev, "commit") {
			t.Errorf("events lack the commit:\n%s", ev)
		}
		if in := e.MustHot("inspect", f.name); !strings.Contains(in, "update done") || !strings.Contains(in, "freeze window") {
			t.Errorf("inspect does not show the update:\n%s", in)
		}
	})

	t.Run("rollback returns to v1 keeping memory", func(t *testing.T) {
		before := f.load.Snapshot()
		e.MustHot("rollback", f.name, "--reload-signal", "HUP", "--health-http", "8080/healthz")
		f.serving("v1")
		if after := f.load.Snapshot(); after.LastValue <= before.LastValue || after.Regressions > 0 {
			t.Errorf("counter did not continue across rollback: %d → %d", before.LastValue, after.LastValue)
		}
		if body, _ := get("http://" + f.addr + "/cat?path=/var/lib/demo/written-by-v1"); body != "written by v1\n" {
			t.Errorf("file the container wrote, after rollback: %q", body)
		}
	})

	rep := f.load.Stop()
	t.Logf("load: %d requests, %d failed, longest wait %s, counter %d, versions %v", rep.Requests, rep.Failures, rep.MaxGap, rep.LastValue, rep.Versions)
	if rep.Failures > 0 || rep.Regressions > 0 {
		t.Errorf("clients saw %d failures and %d counter regressions: %v", rep.Failures, rep.Regressions, rep.Errors)
	}
	for i, n := range rep.PerClient {
		if n == 0 {
			t.Errorf("client %d (%s) got no answer", i, rep.LocalAddrs[i])
		}
	}
}

func TestUpdateRefusesStoppedContainer(t *testing.T) {
	e := testutil.NewHotEnv(t)
	e.MustHot("image", "import", "--rootfs", testutil.DemoRootfs(t, "v1", nil), "--tag", "demo:v1", "--entrypoint", "/app")
	e.MustHot("image", "import", "--rootfs", testutil.DemoRootfs(t, "v2", nil), "--tag", "demo:v2", "--entrypoint", "/app")
	e.Run("--name", "stopped", "demo:v1")
	e.MustHot("stop", "-t", "1", "stopped")
	r := e.Hot("update", "stopped", "demo:v2")
	if r.ExitCode != 1 || !strings.Contains(r.Stderr, "only a running container") {
		t.Fatalf("exit %d, stderr %q", r.ExitCode, r.Stderr)
	}
	if hist := e.MustHot("history", "stopped"); strings.Contains(hist, "demo:v2") {
		t.Errorf("a refused update created a generation:\n%s", hist)
	}
}

// lastJSONObject returns the lines of the last top-level JSON object in lines (the summary
// after the JSON event lines).
func lastJSONObject(lines []string) []string {
	for i := len(lines) - 1; i >= 0; i-- {
		if lines[i] == "{" {
			return lines[i:]
		}
	}
	return lines
}

func get(url string) (string, error) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(bufio.NewReader(resp.Body))
	if resp.StatusCode != 200 {
		return string(b), fmt.Errorf("status %s", resp.Status)
	}
	return string(b), err
}

func waitHTTP(t *testing.T, url string) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if _, err := get(url); err == nil {
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("%s never answered", url)
}

// TestHotUpdateLazy is the update with lazy restore: the processes run again before their
// memory is in, and everything the eager update promises still holds, rollback included.
func TestHotUpdateLazy(t *testing.T) {
	f := newFixture(t)
	e := f.e
	f.serving("v1")
	// A post-copy update raises it for CRIU's page server and must put it back, also when killed.
	pipeMax, _ := os.ReadFile("/proc/sys/fs/pipe-max-size")

	t.Run("failing health probe rolls back", func(t *testing.T) {
		r := e.Hot("update", f.name, "demo:v2", "--lazy", "--health-tcp", "9", "--health-timeout", "1s")
		if r.ExitCode != 1 || !strings.Contains(r.Stderr, "rolled back") || !strings.Contains(r.Stderr, "health probe") {
			t.Fatalf("exit %d, stderr %q: want a rollback naming the health probe", r.ExitCode, r.Stderr)
		}
		f.serving("v1")
	})

	t.Run("restore failure rolls back to the originals", func(t *testing.T) {
		t.Setenv("HOT_FAILPOINT", "update-restore")
		r := e.Hot("update", f.name, "demo:v2", "--lazy")
		if r.ExitCode != 1 || !strings.Contains(r.Stderr, "rolled back") || !strings.Contains(r.Stderr, "injected restore failure") {
			t.Fatalf("exit %d, stderr %q: want a rollback naming the restore failure", r.ExitCode, r.Stderr)
		}
		os.Unsetenv("HOT_FAILPOINT")
		f.serving("v1")
	})

	// Killed before the commit: the originals (frozen under CRIU until then) run on.
	for _, phase := range []string{"dumping", "dumped", "swapped", "restored"} {
		t.Run("hot killed at "+phase+" resumes the originals", func(t *testing.T) {
			t.Setenv("HOT_FAILPOINT", "update-kill:"+phase)
			r := e.Hot("update", f.name, "demo:v2", "--lazy")
			if r.ExitCode != -1 && r.ExitCode != 137 {
				t.Fatalf("update with kill failpoint exited %d, want killed\n%s", r.ExitCode, r.Stderr)
			}
			os.Unsetenv("HOT_FAILPOINT")
			e.MustHot("ps")
			f.serving("v1")
			if got, _ := os.ReadFile("/proc/sys/fs/pipe-max-size"); string(got) != string(pipeMax) {
				t.Errorf("fs.pipe-max-size after the recovery is %q, was %q before the update", got, pipeMax)
			}
		})
	}

	t.Run("update keeps connections and memory", func(t *testing.T) {
		before := f.load.Snapshot()
		out := e.MustHot("update", f.name, "demo:v2", "--lazy", "--reload-signal", "HUP", "--health-http", "8080/healthz", "--json")
		var sum update.Summary
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if err := json.Unmarshal([]byte(strings.Join(lastJSONObject(lines), "\n")), &sum); err != nil {
			t.Fatalf("decode summary: %v\n%s", err, out)
		}
		if sum.Outcome != "updated" || sum.MemoryInMS <= 0 || sum.TCPAfter < 4 {
			t.Errorf("summary = %+v; want updated with the lazy memory copy timed", sum)
		}
		t.Logf("lazy: freeze window %.1f ms, client pause %.1f ms, restore %.1f ms, memory in after %.1f ms",
			sum.FreezeWindowMS, sum.ClientPauseMS, sum.RestoreMS, sum.MemoryInMS)
		f.serving("v2")
		after := f.load.Snapshot()
		if after.LastValue <= before.LastValue || after.Regressions > 0 || after.LastVersion != "v2" {
			t.Errorf("counter/version after the lazy update: %d → %d, %d regressions, version %q", before.LastValue, after.LastValue, after.Regressions, after.LastVersion)
		}
		if body, _ := get("http://" + f.addr + "/cat?path=/var/lib/demo/written-by-v1"); body != "written by v1\n" {
			t.Errorf("file the container wrote: %q", body)
		}
	})

	// Killed once every page is in: the copy is the container, the update is finished.
	t.Run("hot killed at committing finishes the update", func(t *testing.T) {
		t.Setenv("HOT_FAILPOINT", "update-kill:committing")
		r := e.Hot("update", f.name, "demo:v1", "--lazy", "--reload-signal", "HUP")
		if r.ExitCode != -1 && r.ExitCode != 137 {
			t.Fatalf("update with kill failpoint exited %d, want killed\n%s", r.ExitCode, r.Stderr)
		}
		os.Unsetenv("HOT_FAILPOINT")
		e.MustHot("ps")
		f.serving("v1")
		if out := e.MustHot("inspect", f.name); !strings.Contains(out, "demo:v1") {
			t.Errorf("after the recovered commit the container should be on demo:v1:\n%s", out)
		}
		// A second update still carries what the container wrote before the first one.
		if body, _ := get("http://" + f.addr + "/cat?path=/var/lib/demo/written-by-v1"); body != "written by v1\n" {
			t.Errorf("file the container wrote before the first update: %q", body)
		}
	})

	rep := f.load.Stop()
	t.Logf("load: %d requests, %d failed, longest wait %s", rep.Requests, rep.Failures, rep.MaxGap)
	if rep.Failures > 0 || rep.Regressions > 0 {
		t.Errorf("clients saw %d failures and %d counter regressions: %v", rep.Failures, rep.Regressions, rep.Errors)
	}
}
