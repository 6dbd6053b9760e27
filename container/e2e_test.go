package container_test

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/internal/testutil"
)

const appImage = "httpcount:test"

// env is one test's private hot installation: its own --root, --run-root, bridge and subnet.
type env struct {
	t              *testing.T
	root, runRoot  string
	bridge, subnet string
}

var (
	appOnce sync.Once
	appDir  string
	appErr  error
)

// appRootfs builds internal/testapps/httpcount statically into a root file system dir (once).
func appRootfs(t *testing.T) string {
	t.Helper()
	appOnce.Do(func() {
		appDir, appErr = os.MkdirTemp("", "hot-httpcount-rootfs-")
		if appErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", filepath.Join(appDir, "bin", "httpcount"), "./internal/testapps/httpcount")
		cmd.Dir = testutil.ModuleRoot(t)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			appErr = fmt.Errorf("build httpcount: %v: %s", err, out)
		}
	})
	if appErr != nil {
		t.Fatal(appErr)
	}
	return appDir
}

func TestMain(m *testing.M) {
	code := m.Run()
	if appDir != "" {
		os.RemoveAll(appDir)
	}
	os.Exit(code)
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func newEnv(t *testing.T) *env {
	t.Helper()
	testutil.RequireRoot(t)
	for _, c := range []string{"nsenter", "nft", "ip"} {
		testutil.RequireCommand(t, c)
	}
	rnd := make([]byte, 1)
	rand.Read(rnd)
	dir := t.TempDir()
	e := &env{t: t, root: filepath.Join(dir, "root"), runRoot: filepath.Join(dir, "run"),
		bridge: "hott" + randHex(3), subnet: fmt.Sprintf("10.198.%d.0/24", 10+int(rnd[0])%240)}
	t.Cleanup(func() {
		// Remove whatever the test left, then the test's own bridge and nftables table.
		out := testutil.RunHot(t, time.Minute, e.args("ps", "-aq")...)
		for _, id := range strings.Fields(out.Stdout) {
			testutil.RunHot(t, time.Minute, e.args("rm", "-f", id)...)
		}
		exec.Command("ip", "link", "del", e.bridge).Run()
		exec.Command("nft", "delete", "table", "ip", "hot-"+e.bridge).Run()
	})
	e.mustHot("image", "import", "--rootfs", appRootfs(t), "--tag", appImage, "--entrypoint", "/bin/httpcount")
	return e
}

func (e *env) args(a ...string) []string {
	return append([]string{"--root", e.root, "--run-root", e.runRoot}, a...)
}

func (e *env) hot(a ...string) testutil.Result {
	e.t.Helper()
	return testutil.RunHot(e.t, 2*time.Minute, e.args(a...)...)
}

func (e *env) mustHot(a ...string) string {
	e.t.Helper()
	r := e.hot(a...)
	if r.ExitCode != 0 {
		e.t.Fatalf("hot %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(a, " "), r.ExitCode, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

// run starts a detached container on the test's bridge.
func (e *env) run(a ...string) string {
	e.t.Helper()
	args := append([]string{"run", "-d", "--bridge", e.bridge, "--subnet", e.subnet}, a...)
	return strings.TrimSpace(e.mustHot(args...))
}

func (e *env) inspect(name string) container.Container {
	e.t.Helper()
	var c container.Container
	if err := json.Unmarshal([]byte(e.mustHot("inspect", "--json", name)), &c); err != nil {
		e.t.Fatalf("decode inspect: %v", err)
	}
	return c
}

func httpGet(t *testing.T, url string, timeout time.Duration) (string, error) {
	t.Helper()
	c := &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return strings.TrimSpace(string(b)), err
}

// waitHTTP polls url until it answers.
func waitHTTP(t *testing.T, url string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		body, err := httpGet(t, url, time.Second)
		if err == nil {
			return body
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %v", url, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// traces lists what a container could leave on the host, by its id, rootfs, host veth, IP and
// cgroup paths.
func traces(t *testing.T, c container.Container) []string {
	t.Helper()
	var found []string
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mi), "\n") {
		if strings.Contains(line, c.ID) {
			found = append(found, "mount: "+line)
		}
	}
	links, _ := exec.Command("ip", "-o", "link").Output()
	for _, line := range strings.Split(string(links), "\n") {
		if c.Network.HostVeth != "" && strings.Contains(line, c.Network.HostVeth+"@") || strings.Contains(line, " "+c.Network.HostVeth+":") && c.Network.HostVeth != "" {
			found = append(found, "link: "+line)
		}
	}
	netns, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(netns), c.ID) {
		found = append(found, "ip netns: "+string(netns))
	}
	rules, _ := exec.Command("nft", "list", "ruleset").Output()
	if c.Network.IP.IsValid() && strings.Contains(string(rules), c.Network.IP.String()+" ") {
		found = append(found, "nftables mentions "+c.Network.IP.String())
	}
	if strings.Contains(string(rules), c.ID) {
		found = append(found, "nftables mentions "+c.ID)
	}
	if len(c.CgroupPaths) == 0 {
		for _, ctrl := range []string{"memory", "pids", "freezer", "cpu", "unified"} {
			p := filepath.Join("/sys/fs/cgroup", ctrl, "hot", c.ID)
			if _, err := os.Stat(p); err == nil {
				found = append(found, "cgroup: "+p)
			}
		}
	}
	for _, p := range c.CgroupPaths {
		if fi, err := os.Stat(p); err == nil {
			procs, _ := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			found = append(found, fmt.Sprintf("cgroup: %s (procs %q, changed %s)", p, procs, fi.ModTime().Format("15:04:05.000000")))
		}
	}
	return found
}

func TestContainerLifecycle(t *testing.T) {
	e := newEnv(t)
	port := freePort(t)
	id := e.run("--name", "web", "-p", fmt.Sprintf("%d:8080", port), "-e", "GREETING=hi", "--memory", "256M",
		"--pids-limit", "64", "-w", "/srv", "--user", "1000:1000", appImage)
	c := e.inspect("web")
	if c.ID != id || c.Status != container.StatusRunning || c.Pid == 0 || !c.Network.IP.IsValid() {
		t.Fatalf("after run: %+v", c)
	}

	// Reached by IP and through the published port; the log shows each request.
	if body := waitHTTP(t, fmt.Sprintf("http://%s:8080/", c.Network.IP)); body != "count 1" {
		t.Errorf("GET by IP = %q, want count 1", body)
	}
	if body := waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/", port)); body != "count 2" {
		t.Errorf("GET published port = %q, want count 2", body)
	}
	// The monitor copies the container's output into the log: allow it a moment.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		logs := e.mustHot("logs", "web")
		if strings.Contains(logs, "request 1 GET /") && strings.Contains(logs, "request 2 GET /") {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("logs lack the requests:\n%s", logs)
			break
		}
	}

	// exec joins the namespaces: same loopback (count continues), hostname, env; exit codes pass through.
	if out := e.mustHot("exec", "web", "httpcount", "get", "http://127.0.0.1:8080/"); strings.TrimSpace(out) != "count 3" {
		t.Errorf("exec get = %q, want count 3", out)
	}
	if out := e.mustHot("exec", "web", "httpcount", "hostname"); strings.TrimSpace(out) != id[:12] {
		t.Errorf("exec hostname = %q, want %s", out, id[:12])
	}
	if out := e.mustHot("exec", "-e", "X=1", "web", "httpcount", "env"); !strings.Contains(out, "GREETING=hi") || !strings.Contains(out, "X=1") {
		t.Errorf("exec env:\n%s", out)
	}
	if out := e.mustHot("exec", "web", "httpcount", "cat", "/proc/self/cgroup"); !strings.Contains(out, "hot/"+id) {
		t.Errorf("exec'd process is not in the container's cgroup:\n%s", out)
	}
	if out := e.mustHot("exec", "web", "httpcount", "cat", "/proc/1/cmdline"); !strings.HasPrefix(out, "/bin/httpcount") {
		t.Errorf("PID 1 seen by exec is %q, want the container's entrypoint", out)
	}
	// User, working directory, mounts (proc, read-only sys, dev with pts and shm), pids limit.
	if out := e.mustHot("exec", "web", "httpcount", "cat", "/proc/self/status"); !strings.Contains(out, "Uid:\t1000\t") || !strings.Contains(out, "Gid:\t1000\t") {
		t.Errorf("exec does not run as the container's user 1000:1000:\n%s", out)
	}
	if out := e.mustHot("exec", "web", "httpcount", "pwd"); strings.TrimSpace(out) != "/srv" {
		t.Errorf("exec pwd = %q, want /srv", out)
	}
	mounts := map[string]string{}
	for _, line := range strings.Split(e.mustHot("exec", "web", "httpcount", "cat", "/proc/self/mountinfo"), "\n") {
		if f := strings.Fields(line); len(f) > 5 {
			mounts[f[4]] = f[5]
		}
	}
	for _, mp := range []string{"/", "/proc", "/dev", "/dev/pts", "/dev/shm", "/sys"} {
		if _, ok := mounts[mp]; !ok {
			t.Errorf("no mount at %s inside the container: %v", mp, mounts)
		}
	}
	if !strings.HasPrefix(mounts["/sys"], "ro") {
		t.Errorf("/sys mounted %q, want read-only", mounts["/sys"])
	}
	if out := e.mustHot("exec", "web", "httpcount", "cat", "/dev/null"); out != "" {
		t.Errorf("/dev/null gave %q", out)
	}
	if p := c.CgroupPaths["pids"]; p != "" {
		if b, err := os.ReadFile(filepath.Join(p, "pids.max")); err != nil || strings.TrimSpace(string(b)) != "64" {
			t.Errorf("pids.max %q, %v; want 64", b, err)
		}
	}
	if p := c.CgroupPaths["memory"]; p != "" {
		if b, err := os.ReadFile(filepath.Join(p, "memory.limit_in_bytes")); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(256<<20) {
			t.Errorf("memory limit %q, %v; want 256M", b, err)
		}
	}
	if r := e.hot("exec", "web", "httpcount", "exit", "7"); r.ExitCode != 7 {
		t.Errorf("exec exit 7: exit code %d (%s)", r.ExitCode, r.Stderr)
	}
	ps := e.mustHot("ps")
	if !strings.Contains(ps, "web") || !strings.Contains(ps, "running") || !strings.Contains(ps, c.Network.IP.String()) {
		t.Errorf("ps:\n%s", ps)
	}

	// pause: a request hangs; resume: it completes without error.
	e.mustHot("pause", "web")
	if c := e.inspect("web"); c.Status != container.StatusPaused {
		t.Errorf("after pause: status %s", c.Status)
	}
	type result struct {
		body string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		b, err := httpGet(t, fmt.Sprintf("http://%s:8080/", c.Network.IP), 30*time.Second)
		done <- result{b, err}
	}()
	select {
	case r := <-done:
		t.Fatalf("request answered while paused: %+v", r)
	case <-time.After(time.Second):
	}
	e.mustHot("resume", "web")
	select {
	case r := <-done:
		if r.err != nil || r.body != "count 4" {
			t.Errorf("request after resume: %q, %v; want count 4", r.body, r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("request still hangs after resume")
	}

	// Duplicate name: refused, nothing half-created.
	r := e.hot("run", "-d", "--bridge", e.bridge, "--subnet", e.subnet, "--name", "web", appImage)
	if r.ExitCode == 0 || !strings.Contains(r.Stderr, "already used") || strings.Count(strings.TrimSpace(r.Stderr), "\n") != 0 {
		t.Errorf("duplicate name: exit %d, stderr %q", r.ExitCode, r.Stderr)
	}

	// logs -f follows until the container exits; stop records the exit code; rm leaves nothing.
	follow := exec.Command(testutil.HotBinary(t), e.args("logs", "-f", "web")...)
	var followOut strings.Builder
	follow.Stdout = &followOut
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	followDone := make(chan error, 1)
	go func() { followDone <- follow.Wait() }()
	e.mustHot("stop", "web")
	select {
	case err := <-followDone:
		if err != nil || !strings.Contains(followOut.String(), "request 4 GET") || !strings.Contains(followOut.String(), "terminated, exiting") {
			t.Errorf("logs -f: %v, output:\n%s", err, followOut.String())
		}
	case <-time.After(10 * time.Second):
		follow.Process.Kill()
		t.Error("logs -f still running 10s after the container stopped")
	}
	c = e.inspect("web")
	if c.Status != container.StatusExited || c.Exit == nil || c.Exit.Code != 0 {
		t.Errorf("after stop: status %s exit %+v", c.Status, c.Exit)
	}
	if ps := e.mustHot("ps"); strings.Contains(ps, "web") {
		t.Errorf("ps without -a lists the exited container:\n%s", ps)
	}
	if ps := e.mustHot("ps", "-a"); !strings.Contains(ps, "exited (0)") {
		t.Errorf("ps -a:\n%s", ps)
	}
	e.mustHot("rm", "web")
	if tr := traces(t, c); len(tr) > 0 {
		t.Errorf("traces left after rm:\n%s", strings.Join(tr, "\n"))
	}
	if _, err := os.Stat(filepath.Join(e.root, "containers", id)); err == nil {
		t.Error("container dir left after rm")
	}
	if _, err := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/", port), time.Second); err == nil {
		t.Error("published port still answers after rm")
	}
}

func TestKillRecordsSignalAndCommandExit(t *testing.T) {
	e := newEnv(t)
	e.run("--name", "k", appImage)
	e.mustHot("kill", "k")
	deadline := time.Now().Add(10 * time.Second)
	for {
		c := e.inspect("k")
		if c.Status == container.StatusExited {
			if c.Exit == nil || c.Exit.Code != 137 {
				t.Errorf("after kill: exit %+v, want code 137", c.Exit)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("still %s after kill", c.Status)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// A command that exits by itself: its code is recorded, and `hot run` without -d returns it.
	r := e.hot("run", "--name", "x", "--network", "none", appImage, "exit", "3")
	if r.ExitCode != 3 {
		t.Errorf("hot run ... exit 3: exit code %d, stderr %s", r.ExitCode, r.Stderr)
	}
	if c := e.inspect("x"); c.Status != container.StatusExited || c.Exit == nil || c.Exit.Code != 3 {
		t.Errorf("x: %s %+v", c.Status, c.Exit)
	}
	e.mustHot("rm", "k", "x")

	// stop: a PID 1 that ignores SIGTERM is killed after the timeout.
	e.mustHot("run", "-d", "--name", "deaf", "--network", "none", appImage, "sleep", "600")
	deafPid := e.inspect("deaf").Pid
	for deadline := time.Now().Add(10 * time.Second); !ignoresSIGTERM(deafPid); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("httpcount sleep never ignored SIGTERM")
		}
	}
	start := time.Now()
	e.mustHot("stop", "-t", "1", "deaf")
	if d := time.Since(start); d < time.Second || d > 8*time.Second {
		t.Errorf("stop -t 1 of a container ignoring SIGTERM took %v", d)
	}
	if c := e.inspect("deaf"); c.Exit == nil || c.Exit.Code != 137 {
		t.Errorf("deaf: exit %+v, want 137 (SIGKILL); log:\n%s", c.Exit, e.mustHot("logs", "deaf"))
	}
	e.mustHot("rm", "deaf")

	// Attached run prints the container's output.
	if out := e.mustHot("run", "--name", "y", "--network", "none", "-e", "MARK=attached", appImage, "env"); !strings.Contains(out, "MARK=attached") {
		t.Errorf("attached run output:\n%s", out)
	}
	e.mustHot("rm", "y")

	// --network none: loopback only, and up.
	e.mustHot("run", "-d", "--name", "lo", "--network", "none", appImage)
	deadline = time.Now().Add(10 * time.Second)
	for {
		r := e.hot("exec", "lo", "httpcount", "get", "http://127.0.0.1:8080/")
		if r.ExitCode == 0 && strings.TrimSpace(r.Stdout) == "count 1" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("--network none: server not reachable on loopback: %+v", r)
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.mustHot("rm", "-f", "lo")
}

// ignoresSIGTERM reads the SigIgn mask of pid.
func ignoresSIGTERM(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "SigIgn:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && mask&(1<<(uint(syscall.SIGTERM)-1)) != 0
		}
	}
	return false
}

// TestConcurrentCommands: racing runs with one name create one container; racing removals
// remove it once and leave nothing.
func TestConcurrentCommands(t *testing.T) {
	e := newEnv(t)
	var wg sync.WaitGroup
	results := make([]testutil.Result, 4)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = testutil.RunHot(t, 2*time.Minute, e.args("run", "-d", "--bridge", e.bridge, "--subnet", e.subnet, "--name", "same", appImage)...)
		}()
	}
	wg.Wait()
	ok := 0
	for _, r := range results {
		if r.ExitCode == 0 {
			ok++
		} else if !strings.Contains(r.Stderr, "already used") {
			t.Errorf("losing run: exit %d, %q", r.ExitCode, r.Stderr)
		}
	}
	if ok != 1 {
		t.Fatalf("%d of 4 racing runs with one name succeeded, want 1", ok)
	}
	c := e.inspect("same")
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = testutil.RunHot(t, 2*time.Minute, e.args("rm", "-f", "same")...)
		}()
	}
	wg.Wait()
	ok = 0
	for _, r := range results {
		if r.ExitCode == 0 {
			ok++
		} else if !strings.Contains(r.Stderr, "no such container") {
			t.Errorf("losing rm: exit %d, %q", r.ExitCode, r.Stderr)
		}
	}
	if ok != 1 {
		t.Errorf("%d of 4 racing removals succeeded, want 1", ok)
	}
	noTraces(t, []container.Container{c})
	if ids := strings.Fields(e.mustHot("ps", "-aq")); len(ids) != 0 {
		t.Errorf("left: %v", ids)
	}
}

// subnetIP returns the address n of the test's subnet.
func (e *env) subnetIP(n int) string {
	base := strings.TrimSuffix(e.subnet, "0/24")
	return base + strconv.Itoa(n)
}

func oneLine(t *testing.T, what string, r testutil.Result, wantCode int, wantIn string) {
	t.Helper()
	msg := strings.TrimSpace(r.Stderr)
	if r.ExitCode != wantCode || strings.Contains(msg, "\n") || !strings.Contains(msg, wantIn) {
		t.Errorf("%s: exit %d (want %d), stderr %q (want one line containing %q)", what, r.ExitCode, wantCode, msg, wantIn)
	}
}

func TestBadInput(t *testing.T) {
	e := newEnv(t)
	ip := e.subnetIP(50)
	e.run("--name", "first", "--ip", ip, appImage)
	net := []string{"run", "-d", "--bridge", e.bridge, "--subnet", e.subnet}
	oneLine(t, "unknown image", e.hot(append(net, "nosuch:1")...), 1, "hot image import")
	oneLine(t, "bad memory", e.hot(append(net, "--memory", "12Q", appImage)...), 2, "512M")
	oneLine(t, "bad port", e.hot(append(net, "-p", "80", appImage)...), 2, "-p")
	oneLine(t, "bad port number", e.hot(append(net, "-p", "99999:80", appImage)...), 2, "-p")
	oneLine(t, "bad ip", e.hot(append(net, "--ip", "10.1", appImage)...), 2, "--ip")
	oneLine(t, "bad user", e.hot(append(net, "--user", "root", appImage)...), 2, "UID")
	oneLine(t, "bad name", e.hot(append(net, "--name", "a b", appImage)...), 1, "name")
	oneLine(t, "duplicate name", e.hot(append(net, "--name", "first", appImage)...), 1, "already used")
	oneLine(t, "address in use", e.hot(append(net, "--name", "second", "--ip", ip, appImage)...), 1, ip)
	r := e.hot(append(net, "--name", "fourth", "--entrypoint", "/no/such", appImage)...)
	oneLine(t, "missing executable", r, 1, "/no/such")

	// Nothing half-created: only the first container exists, and nothing of the others is mounted.
	ids := strings.Fields(e.mustHot("ps", "-aq"))
	if len(ids) != 1 {
		t.Errorf("ps -aq after bad runs: %v, want only the first container", ids)
	}
	ents, _ := os.ReadDir(filepath.Join(e.root, "containers"))
	var dirs []string
	for _, d := range ents {
		if d.IsDir() {
			dirs = append(dirs, d.Name())
		}
	}
	if len(dirs) != 1 {
		t.Errorf("container dirs after bad runs: %v", dirs)
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if n := strings.Count(string(mi), filepath.Join(e.root, "containers")); n != 1 {
		t.Errorf("%d mounts under the containers dir, want 1 (the first container's root)", n)
	}
	if n := strings.Count(string(mi), filepath.Join(e.runRoot, "netns")); n != 1 {
		t.Errorf("%d netns mounts, want 1", n)
	}
}

// hostSnapshot counts what this test's containers create on the host. It only looks at
// objects that belong to this test (its root and run root, its bridge and nftables table, its
// hot processes), because other work may share the machine.
func hostSnapshot(t *testing.T, e *env) map[string]int {
	t.Helper()
	snap := map[string]int{}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mi), "\n") {
		if strings.Contains(line, e.root) || strings.Contains(line, e.runRoot) {
			snap["mounts"]++
		}
	}
	links, _ := exec.Command("ip", "-o", "link", "show", "master", e.bridge).Output()
	snap["links on the bridge"] = strings.Count(string(links), "\n")
	rules, _ := exec.Command("nft", "list", "table", "ip", "hot-"+e.bridge).Output()
	snap["nft lines"] = strings.Count(string(rules), "\n")
	ents, _ := os.ReadDir(filepath.Join(e.root, "containers"))
	snap["container dirs"] = len(ents)
	ents, _ = os.ReadDir(e.runRoot)
	snap["run dirs"] = len(ents)
	ents, _ = os.ReadDir(filepath.Join(e.runRoot, "netns"))
	snap["netns files"] = len(ents)
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(b), e.root) {
			continue
		}
		st, err := os.ReadFile(strings.TrimSuffix(p, "cmdline") + "stat")
		// Zombies are not counted: a host init that does not reap orphans keeps them.
		if err == nil && !strings.Contains(string(st), ") Z ") {
			snap["live hot processes"]++
		}
	}
	return snap
}

// noTraces checks that none of the containers in ids left anything on the host.
func noTraces(t *testing.T, cs []container.Container) {
	t.Helper()
	for _, c := range cs {
		if tr := traces(t, c); len(tr) > 0 {
			t.Errorf("container %s left:\n%s", c.Name, strings.Join(tr, "\n"))
		}
	}
}

func TestRunRmCyclesLeakNothing(t *testing.T) {
	e := newEnv(t)
	port := freePort(t)
	// Warm up: the first container creates the bridge and its nftables table, which stay.
	e.run("--name", "warm", appImage)
	e.mustHot("rm", "-f", "warm")
	before := hostSnapshot(t, e)
	var seen []container.Container
	start := time.Now()
	for i := 0; i < 20; i++ {
		name := fmt.Sprintf("cycle%d", i)
		e.run("--name", name, "-p", fmt.Sprintf("%d:8080", port), appImage)
		c := e.inspect(name)
		seen = append(seen, c)
		if i%5 == 0 {
			waitHTTP(t, fmt.Sprintf("http://%s:8080/", c.Network.IP))
		}
		if i%2 == 0 {
			e.mustHot("stop", "-t", "5", name)
			e.mustHot("rm", name)
		} else {
			e.mustHot("rm", "-f", name)
		}
		if tr := traces(t, c); len(tr) > 0 {
			t.Errorf("%s: right after rm (%s):\n%s", name, time.Now().Format("15:04:05.000000"), strings.Join(tr, "\n"))
		}
	}
	t.Logf("20 run/rm cycles: %v (%v per cycle), done at %s", time.Since(start), time.Since(start)/20, time.Now().Format("15:04:05.000000"))
	after := hostSnapshot(t, e)
	for k, v := range before {
		if after[k] != v {
			t.Errorf("%s: %d before the cycles, %d after", k, v, after[k])
		}
	}
	noTraces(t, seen)
}

// TestCrashesAreReportedAndCleaned interrupts hot run at each failpoint, and kills a running
// container's monitor: hot ps must tell the truth, and hot rm -f must leave nothing.
func TestCrashesAreReportedAndCleaned(t *testing.T) {
	e := newEnv(t)
	e.run("--name", "warm", appImage)
	e.mustHot("rm", "-f", "warm")
	before := hostSnapshot(t, e)
	for _, fp := range []string{"run-after-mount", "run-after-network", "run-after-cgroup", "run-after-monitor-start"} {
		t.Run(fp, func(t *testing.T) {
			t.Setenv("HOT_FAILPOINT", fp)
			r := e.hot("run", "-d", "--bridge", e.bridge, "--subnet", e.subnet, "--name", "crash", appImage)
			os.Unsetenv("HOT_FAILPOINT")
			if r.ExitCode == 0 {
				t.Fatalf("hot run survived failpoint %s", fp)
			}
			c := e.inspect("crash")
			if fp == "run-after-monitor-start" {
				// The monitor went on and started the container; hot run died before recording it.
				if c.Status != container.StatusUnknown && c.Status != container.StatusRunning {
					t.Errorf("status %s (%s)", c.Status, c.Reason)
				}
			} else if c.Status != container.StatusUnknown || !strings.Contains(c.Reason, "interrupted") {
				t.Errorf("status %s, reason %q; want unknown, interrupted", c.Status, c.Reason)
			}
			if ps := e.mustHot("ps"); !strings.Contains(ps, "crash") {
				t.Errorf("ps does not list the interrupted container:\n%s", ps)
			}
			e.mustHot("rm", "-f", "crash")
			if tr := traces(t, c); len(tr) > 0 {
				t.Errorf("traces after rm -f:\n%s", strings.Join(tr, "\n"))
			}
		})
	}
	t.Run("monitor-before-release", func(t *testing.T) {
		t.Setenv("HOT_FAILPOINT", "monitor-before-release")
		r := e.hot("run", "-d", "--bridge", e.bridge, "--subnet", e.subnet, "--name", "nomon", appImage)
		os.Unsetenv("HOT_FAILPOINT")
		if r.ExitCode == 0 || !strings.Contains(r.Stderr, "monitor") {
			t.Errorf("run with the monitor dying: exit %d, stderr %q", r.ExitCode, r.Stderr)
		}
		if ids := strings.Fields(e.mustHot("ps", "-aq")); len(ids) != 0 {
			t.Errorf("failed run left containers %v", ids)
		}
	})
	t.Run("rm-before-unmount", func(t *testing.T) {
		e.run("--name", "half", appImage)
		c := e.inspect("half")
		t.Setenv("HOT_FAILPOINT", "rm-before-unmount")
		r := e.hot("rm", "-f", "half")
		os.Unsetenv("HOT_FAILPOINT")
		if r.ExitCode == 0 {
			t.Fatal("hot rm survived its failpoint")
		}
		// Processes are gone, mounts and network remain: never "running".
		if c := e.inspect("half"); c.Status == container.StatusRunning {
			t.Errorf("half-removed container shows as running")
		}
		e.mustHot("rm", "-f", "half")
		noTraces(t, []container.Container{c})
	})
	t.Run("monitor-killed", func(t *testing.T) {
		e.run("--name", "mon", appImage)
		c := e.inspect("mon")
		if err := syscall.Kill(c.MonitorPid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		pid := c.Pid
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			c = e.inspect("mon")
			if c.Status == container.StatusUnknown || time.Now().After(deadline) {
				break
			}
		}
		if c.Status != container.StatusUnknown || !strings.Contains(c.Reason, "monitor") || !strings.Contains(c.Reason, "still runs") {
			t.Errorf("after killing the monitor: %s (%s)", c.Status, c.Reason)
		}
		if c.Pid != pid {
			t.Errorf("pid changed from %d to %d", pid, c.Pid)
		}
		if ps := e.mustHot("ps"); !strings.Contains(ps, "unknown") {
			t.Errorf("ps:\n%s", ps)
		}
		r := e.hot("rm", "mon")
		oneLine(t, "rm without -f", r, 1, "rm -f")
		e.mustHot("rm", "-f", "mon")
		if tr := traces(t, c); len(tr) > 0 {
			t.Errorf("traces after rm -f:\n%s", strings.Join(tr, "\n"))
		}
		if stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", c.Pid)); err == nil {
			// Orphans are reparented to the host's init, which may be slow to reap: a zombie is dead.
			if f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:])); len(f) > 0 && f[0] != "Z" {
				t.Errorf("container init %d still alive (state %s) after rm -f", c.Pid, f[0])
			}
		}
	})
	after := hostSnapshot(t, e)
	for k, v := range before {
		if after[k] != v {
			t.Errorf("%s: %d before, %d after", k, v, after[k])
		}
	}
}
