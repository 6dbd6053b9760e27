package isolation_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hotctl/hot/internal/testutil"
	"github.com/hotctl/hot/isolation"
)

const probeImage = "secprobe:test"

// report is what internal/testapps/secprobe prints.
type report struct {
	PID    int               `json:"pid"`
	Status map[string]string `json:"status"`
	Probes map[string]struct {
		OK  bool   `json:"ok"`
		Err string `json:"err"`
	} `json:"probes"`
}

var (
	probeOnce sync.Once
	probeDir  string
	probeErr  error
)

// probeRootfs builds secprobe statically into a root file system dir (once per test binary).
func probeRootfs(t *testing.T) string {
	t.Helper()
	probeOnce.Do(func() {
		if probeDir, probeErr = os.MkdirTemp("", "hot-secprobe-rootfs-"); probeErr != nil {
			return
		}
		for _, d := range []string{"proc", "sys", "dev", "tmp"} {
			os.MkdirAll(filepath.Join(probeDir, d), 0o755)
		}
		os.Chmod(filepath.Join(probeDir, "tmp"), 0o1777)
		probeErr = testutil.BuildStatic(t, "./internal/testapps/secprobe", filepath.Join(probeDir, "bin", "secprobe"))
	})
	if probeErr != nil {
		t.Fatal(probeErr)
	}
	return probeDir
}

func TestMain(m *testing.M) {
	if os.Getenv(restrictEnv) == "1" {
		// Child of TestCRIURestoresIsolation: confine this process, then become secprobe.
		if err := restrictAndExec(os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	code := m.Run()
	if probeDir != "" {
		os.RemoveAll(probeDir)
	}
	os.Exit(code)
}

// env is one test's private hot installation.
type env struct {
	t             *testing.T
	root, runRoot string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	testutil.RequireRoot(t)
	dir := t.TempDir()
	e := &env{t: t, root: filepath.Join(dir, "root"), runRoot: filepath.Join(dir, "run")}
	t.Cleanup(func() {
		out := testutil.RunHot(t, time.Minute, e.args("ps", "-aq")...)
		for _, id := range strings.Fields(out.Stdout) {
			testutil.RunHot(t, time.Minute, e.args("rm", "-f", id)...)
		}
	})
	e.mustHot("image", "import", "--rootfs", probeRootfs(t), "--tag", probeImage, "--entrypoint", "/bin/secprobe")
	return e
}

func (e *env) args(a ...string) []string {
	return append([]string{"--root", e.root, "--run-root", e.runRoot}, a...)
}

func (e *env) mustHot(a ...string) string {
	e.t.Helper()
	r := testutil.RunHot(e.t, 2*time.Minute, e.args(a...)...)
	if r.ExitCode != 0 {
		e.t.Fatalf("hot %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(a, " "), r.ExitCode, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

// probe runs secprobe once in a new container started with flags and returns its report.
func (e *env) probe(flags ...string) report {
	e.t.Helper()
	args := append(append([]string{"run", "--network", "none"}, flags...), probeImage)
	out := e.mustHot(args...)
	var r report
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &r); err != nil {
		e.t.Fatalf("secprobe output %q: %v", out, err)
	}
	e.t.Logf("hot run %s: status %v", strings.Join(flags, " "), r.Status)
	return r
}

// capMask is the /proc/<pid>/status hex of a capability list, limited to what this host's
// root holds (a container cannot get more).
func capMask(t *testing.T, caps []string) string {
	t.Helper()
	nums := map[string]int{}
	for i, c := range isolation.AllCapabilities() {
		nums[c] = i
	}
	var m uint64
	for _, c := range caps {
		n, ok := nums[c]
		if !ok {
			t.Fatalf("unknown capability %s", c)
		}
		m |= 1 << n
	}
	return fmt.Sprintf("%016x", m&hostCaps(t))
}

func hostCaps(t *testing.T) uint64 {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		t.Fatal(err)
	}
	return uint64(data[0].Permitted) | uint64(data[1].Permitted)<<32
}

// expect is what one probe must report: "ok" or the errno name.
type expect map[string]string

func (r report) check(t *testing.T, want expect) {
	t.Helper()
	for name, w := range want {
		got, ok := r.Probes[name]
		if !ok {
			t.Errorf("probe %s: not run", name)
			continue
		}
		switch {
		case w == "ok" && !got.OK:
			t.Errorf("probe %s: failed with %s, want it to work", name, got.Err)
		case w == "fail" && got.OK:
			t.Errorf("probe %s: worked, want it to fail", name)
		case w != "ok" && w != "fail" && (got.OK || got.Err != w):
			t.Errorf("probe %s: ok=%v err=%q, want %s", name, got.OK, got.Err, w)
		}
	}
}

// hostHas reports whether the host has a non-empty p (a masked path only proves something
// where there is something to hide).
func hostHas(p string) bool {
	st, err := os.Stat(p)
	if err != nil {
		return false
	}
	if st.IsDir() {
		ents, _ := os.ReadDir(p)
		return len(ents) > 0
	}
	f, err := os.Open(p)
	if err != nil {
		return false
	}
	defer f.Close()
	n, _ := f.Read(make([]byte, 1))
	return n > 0
}

// defaultExpect is what a default container must show.
func defaultExpect() expect {
	want := expect{
		"mount": "EPERM", "unshare_mount_ns": "EPERM", "bpf_prog_load": "EPERM",
		"raw_socket": "EPERM", "reboot": "EPERM", "settimeofday": "EPERM",
		// EPERM, not EINVAL: the call never reached the kernel's argument check.
		"clock_settime": "EPERM", "read_kcore": "fail", "write_proc_sys": "EROFS",
		"bind_80": "ok", "write_file": "ok", "chown": "ok",
	}
	if hostHas("/proc/timer_list") {
		want["read_timer_list"] = "fail"
	}
	if hostHas("/sys/firmware") {
		want["list_sys_firmware"] = "fail"
	}
	return want
}

func TestDefaultContainerIsConfined(t *testing.T) {
	e := newEnv(t)
	r := e.probe()
	if r.PID != 1 {
		t.Errorf("secprobe runs as pid %d, want 1", r.PID)
	}
	r.check(t, defaultExpect())
	wantCaps := capMask(t, isolation.DefaultCapabilities())
	for _, k := range []string{"CapEff", "CapPrm", "CapBnd"} {
		if r.Status[k] != wantCaps {
			t.Errorf("%s = %s, want %s (the default set)", k, r.Status[k], wantCaps)
		}
	}
	for k, v := range map[string]string{"CapInh": "0000000000000000", "CapAmb": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"} {
		if r.Status[k] != v {
			t.Errorf("%s = %s, want %s", k, r.Status[k], v)
		}
	}
}

// A non-root user keeps the bounding set through setuid (PR_SET_KEEPCAPS) but, with no
// ambient capabilities, execs with none effective, as in Docker.
func TestNonRootUserHasNoCapabilities(t *testing.T) {
	e := newEnv(t)
	r := e.probe("-u", "1000:1000")
	r.check(t, expect{"bind_80": "EACCES", "mount": "EPERM", "raw_socket": "EPERM", "write_file": "ok"})
	for k, v := range map[string]string{"CapEff": "0000000000000000", "CapPrm": "0000000000000000",
		"CapBnd": capMask(t, isolation.DefaultCapabilities()), "NoNewPrivs": "1", "Seccomp": "2"} {
		if r.Status[k] != v {
			t.Errorf("%s = %s, want %s", k, r.Status[k], v)
		}
	}
}

func TestCapAddAndDropChangeExactlyThat(t *testing.T) {
	e := newEnv(t)
	r := e.probe("--cap-add", "NET_RAW", "--cap-add", "sys_time", "--cap-drop", "CAP_CHOWN")
	want := defaultExpect()
	want["raw_socket"] = "ok"
	want["settimeofday"] = "ok" // no arguments: checks the permission, changes nothing
	want["clock_settime"] = "EINVAL"
	want["chown"] = "EPERM"
	r.check(t, want)
	caps := []string{"CAP_NET_RAW", "CAP_SYS_TIME"}
	for _, c := range isolation.DefaultCapabilities() {
		if c != "CAP_CHOWN" {
			caps = append(caps, c)
		}
	}
	if got, w := r.Status["CapEff"], capMask(t, caps); got != w {
		t.Errorf("CapEff = %s, want %s", got, w)
	}
	if r.Status["NoNewPrivs"] != "1" || r.Status["Seccomp"] != "2" {
		t.Errorf("status %v: want no_new_privs and seccomp kept", r.Status)
	}
}

func TestPrivilegedLiftsEverything(t *testing.T) {
	e := newEnv(t)
	r := e.probe("--privileged")
	want := expect{
		"mount": "ok", "unshare_mount_ns": "ok", "bpf_prog_load": "ok", "raw_socket": "ok",
		// Permitted, but in a PID namespace the kernel refuses CAD_OFF with EINVAL.
		"reboot": "EINVAL", "settimeofday": "ok", "clock_settime": "EINVAL",
		"write_proc_sys": "ok", "bind_80": "ok", "write_file": "ok", "chown": "ok",
	}
	if hostHas("/proc/timer_list") {
		want["read_timer_list"] = "ok"
	}
	if hostHas("/sys/firmware") {
		want["list_sys_firmware"] = "ok"
	}
	r.check(t, want)
	all := capMask(t, isolation.AllCapabilities())
	if r.Status["CapEff"] != all || r.Status["CapBnd"] != all {
		t.Errorf("CapEff %s CapBnd %s, want every capability the host has: %s", r.Status["CapEff"], r.Status["CapBnd"], all)
	}
	if r.Status["NoNewPrivs"] != "0" || r.Status["Seccomp"] != "0" {
		t.Errorf("status %v: want no_new_privs and seccomp off", r.Status)
	}
}

func TestSecurityOptsInContainer(t *testing.T) {
	e := newEnv(t)
	// unconfined: the capability checks alone still stop mount and raw sockets, but
	// clock_settime now reaches the kernel's own permission check.
	r := e.probe("--security-opt", "seccomp=unconfined")
	r.check(t, expect{"mount": "EPERM", "raw_socket": "EPERM", "bind_80": "ok", "read_kcore": "fail"})
	if r.Status["Seccomp"] != "0" || r.Status["NoNewPrivs"] != "1" {
		t.Errorf("status %v: want seccomp off, no_new_privs on", r.Status)
	}
	// Without no_new_privs the default filter is loaded before the user switch (the kernel
	// needs CAP_SYS_ADMIN then) and must let the init finish.
	r = e.probe("--security-opt", "no-new-privileges=false")
	r.check(t, defaultExpect())
	if r.Status["Seccomp"] != "2" || r.Status["NoNewPrivs"] != "0" {
		t.Errorf("status %v: want seccomp on, no_new_privs off", r.Status)
	}
	// A custom profile: everything allowed except chown, which gets EACCES.
	prof := filepath.Join(t.TempDir(), "profile.json")
	os.WriteFile(prof, []byte(`{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["chown","fchownat","lchown"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}`), 0o644)
	r = e.probe("--security-opt", "seccomp="+prof, "--security-opt", "no-new-privileges=false")
	r.check(t, expect{"chown": "EACCES", "write_file": "ok", "mount": "EPERM"})
	if r.Status["Seccomp"] != "2" || r.Status["NoNewPrivs"] != "0" {
		t.Errorf("status %v: want the custom filter loaded without no_new_privs", r.Status)
	}

	for _, bad := range [][]string{{"--cap-add", "SYS_WIZARD"}, {"--security-opt", "apparmor=x"}, {"--security-opt", "seccomp=" + prof + ".missing"}} {
		res := testutil.RunHot(t, time.Minute, e.args(append(append([]string{"run", "--network", "none"}, bad...), probeImage)...)...)
		if res.ExitCode != 2 || strings.Count(strings.TrimSpace(res.Stderr), "\n") > 0 {
			t.Errorf("hot run %v: exit %d, stderr %q; want exit 2 and a one-line error", bad, res.ExitCode, res.Stderr)
		}
	}
}

// pidOf returns the host pid of a running container.
func (e *env) pidOf(name string) int {
	e.t.Helper()
	var c struct {
		Pid int `json:"pid"`
	}
	if err := json.Unmarshal([]byte(e.mustHot("inspect", "--json", name)), &c); err != nil || c.Pid == 0 {
		e.t.Fatalf("inspect %s: pid %d, %v", name, c.Pid, err)
	}
	return c.Pid
}

// procStatus reads the isolation fields of /proc/<pid>/status from the host.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		switch k {
		case "CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters":
			out[k] = strings.TrimSpace(v)
		}
	}
	return out
}

// startServe starts a detached container running `secprobe serve /tmp` and waits for its
// first report; it returns the container's host pid. Without a --network or --bridge flag the
// container gets --network none.
func (e *env) startServe(name string, flags ...string) int {
	e.t.Helper()
	args := []string{"run", "-d", "--name", name}
	if !strings.Contains(strings.Join(flags, " "), "--bridge") {
		args = append(args, "--network", "none")
	}
	args = append(append(args, flags...), probeImage, "serve", "/tmp")
	e.mustHot(args...)
	pid := e.pidOf(name)
	e.waitReport(pid, 0)
	return pid
}

// waitReport waits for probe-N.json in the container of pid and returns it.
func (e *env) waitReport(pid, n int) report {
	e.t.Helper()
	return e.reportAt(fmt.Sprintf("/proc/%d/root/tmp", pid), n)
}

// reportAt waits for dir/probe-N.json and returns it.
func (e *env) reportAt(dir string, n int) report {
	e.t.Helper()
	p := filepath.Join(dir, fmt.Sprintf("probe-%d.json", n))
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, err := os.ReadFile(p)
		if err == nil {
			var r report
			if err := json.Unmarshal(b, &r); err != nil {
				e.t.Fatalf("%s: %v", p, err)
			}
			return r
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("no report %s after 20s: %v", p, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// hot exec must not be a way around the isolation: the exec'ed process gets the container's
// capabilities, no_new_privs and seccomp filter.
func TestExecIsConfined(t *testing.T) {
	e := newEnv(t)
	pid := e.startServe("confined")
	var r report
	out := e.mustHot("exec", "confined", "/bin/secprobe")
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &r); err != nil {
		t.Fatalf("exec secprobe output %q: %v", out, err)
	}
	want := defaultExpect()
	delete(want, "reboot") // only probed as PID 1
	r.check(t, want)
	init := procStatus(t, pid)
	for _, k := range []string{"CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb", "NoNewPrivs", "Seccomp"} {
		if r.Status[k] != init[k] {
			t.Errorf("exec'ed process %s = %s, container's PID 1 has %s", k, r.Status[k], init[k])
		}
	}
	// With --user the command runs as that user: no capabilities left at all.
	out = e.mustHot("exec", "-u", "1000:1000", "confined", "/bin/secprobe")
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &r); err != nil {
		t.Fatalf("exec -u secprobe output %q: %v", out, err)
	}
	if r.Status["CapEff"] != "0000000000000000" || r.Status["Seccomp"] != "2" || r.Status["NoNewPrivs"] != "1" {
		t.Errorf("exec -u 1000: status %v, want no capabilities, seccomp and no_new_privs", r.Status)
	}
	r.check(t, expect{"bind_80": "EACCES", "mount": "EPERM", "raw_socket": "EPERM"})

	// hot inspect shows the isolation from config.json.
	var insp struct {
		Isolation isolation.Summary `json:"isolation"`
	}
	if err := json.Unmarshal([]byte(e.mustHot("inspect", "--json", "confined")), &insp); err != nil {
		t.Fatal(err)
	}
	if s := insp.Isolation; len(s.Capabilities) != len(isolation.DefaultCapabilities()) || !s.NoNewPrivileges ||
		!strings.Contains(s.Seccomp, "SCMP_ACT_ERRNO") || s.MaskedPaths == 0 || s.ReadonlyPaths == 0 {
		t.Errorf("inspect --json isolation = %+v", s)
	}
	if text := e.mustHot("inspect", "confined"); !strings.Contains(text, "NET_BIND_SERVICE") || !strings.Contains(text, "no_new_privs on") {
		t.Errorf("inspect does not show the isolation:\n%s", text)
	}

	// A privileged container's exec is privileged too.
	e.startServe("free", "--privileged")
	out = e.mustHot("exec", "free", "/bin/secprobe")
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &r); err != nil {
		t.Fatalf("exec secprobe output %q: %v", out, err)
	}
	r.check(t, expect{"mount": "ok", "raw_socket": "ok"})
	if r.Status["Seccomp"] != "0" {
		t.Errorf("privileged exec: status %v", r.Status)
	}
}
