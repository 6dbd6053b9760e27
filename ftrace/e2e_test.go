package ftrace_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hotctl/hot/ftrace"
	"github.com/hotctl/hot/internal/testutil"
	"golang.org/x/sys/unix"
)

// The end-to-end tests apply fixes through the real hot binary, then check behaviour with
// fresh processes (this test binary re-executed as a helper) inside and outside the fix's
// cgroup, after the CLI has exited.

const helperEnv = "HOT_FTRACE_TEST_HELPER"

func TestMain(m *testing.M) {
	if action := os.Getenv(helperEnv); action != "" {
		os.Exit(helperMain(action))
	}
	os.Exit(m.Run())
}

// helperMain joins the cgroup named by $HOT_FTRACE_TEST_CGROUP (if any), performs one
// action and prints "ok" or the errno name of the failure.
func helperMain(action string) int {
	if cg := os.Getenv("HOT_FTRACE_TEST_CGROUP"); cg != "" {
		if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
			fmt.Println("join cgroup:", err)
			return 1
		}
	}
	arg := os.Getenv("HOT_FTRACE_TEST_ARG")
	var err error
	switch action {
	case "socket6":
		var fd int
		if fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_STREAM, 0); err == nil {
			unix.Close(fd)
		}
	case "socket4":
		var fd int
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0); err == nil {
			unix.Close(fd)
		}
	case "connect":
		var c net.Conn
		if c, err = net.DialTimeout("tcp", arg, 3*time.Second); err == nil {
			c.Close()
		}
	case "bind":
		var l net.Listener
		if l, err = net.Listen("tcp", arg); err == nil {
			l.Close()
		}
	case "sysctl":
		// Runs in its own UTS namespace (see runHelper), so the host's name is untouched.
		err = os.WriteFile("/proc/sys/kernel/domainname", []byte(arg), 0)
	case "open":
		var f *os.File
		if f, err = os.Open(arg); err == nil {
			f.Close()
		}
	default:
		fmt.Println("unknown helper action", action)
		return 1
	}
	fmt.Println(errnoOf(err))
	return 0
}

func errnoOf(err error) string {
	if err == nil {
		return "ok"
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return unix.ErrnoName(errno)
	}
	return err.Error()
}

// runHelper runs one action in a fresh process, inside cgroup when it is not empty.
func runHelper(t *testing.T, cgroup, action, arg string) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+action, "HOT_FTRACE_TEST_CGROUP="+cgroup, "HOT_FTRACE_TEST_ARG="+arg)
	if action == "sysctl" {
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWUTS}
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper %s: %v: %s", action, err, out)
	}
	return strings.TrimSpace(string(out))
}

// testCgroup creates a cgroup2 directory for the test and removes it afterwards.
func testCgroup(t *testing.T) string {
	t.Helper()
	var base string
	for _, p := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		var fs unix.Statfs_t
		if unix.Statfs(p, &fs) == nil && fs.Type == unix.CGROUP2_SUPER_MAGIC {
			base = p
			break
		}
	}
	if base == "" {
		t.Skip("no cgroup2 hierarchy mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified: cgroup-BPF needs cgroup v2")
	}
	dir := filepath.Join(base, fmt.Sprintf("hot-ftrace-test-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create test cgroup: %v", err)
	}
	t.Cleanup(func() {
		// The helpers have exited; their cgroup may take a moment to be empty.
		for i := 0; i < 50; i++ {
			if err := os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("remove test cgroup %s: still busy", dir)
	})
	return dir
}

// testRoot returns a bpffs directory of the test's own (bpffs names cannot contain dots).
func testRoot(t *testing.T) string {
	t.Helper()
	root := fmt.Sprintf("/sys/fs/bpf/hot-test-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6)
	t.Cleanup(func() {
		if err := os.RemoveAll(root); err != nil {
			t.Errorf("clean bpffs test root: %v", err)
		}
	})
	return root
}

func hot(t *testing.T, root string, args ...string) testutil.Result {
	t.Helper()
	return testutil.RunHot(t, 60*time.Second, append([]string{"hotfix", "--bpffs", root}, args...)...)
}

func listFixes(t *testing.T, root string) []ftrace.Fix {
	t.Helper()
	res := hot(t, root, "list", "--json")
	if res.ExitCode != 0 {
		t.Fatalf("hot hotfix list: exit %d: %s", res.ExitCode, res.Stderr)
	}
	var fixes []ftrace.Fix
	if err := json.Unmarshal([]byte(res.Stdout), &fixes); err != nil {
		t.Fatalf("decode list output %q: %v", res.Stdout, err)
	}
	return fixes
}

func requireMechanism(t *testing.T, m ftrace.Mechanism) {
	t.Helper()
	for _, s := range ftrace.Probe(t.Context()) {
		if s.Mechanism == m && s.Err != nil {
			t.Skipf("kernel does not allow %s: %v", m, s.Err)
		}
	}
}

func TestCgroupFixesChangeBehaviourInsideTheirCgroupOnly(t *testing.T) {
	testutil.RequireRoot(t)
	requireMechanism(t, ftrace.MechSockCreate)
	cg, root := testCgroup(t), testRoot(t)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	addr := ln.Addr().(*net.TCPAddr)
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	bindAddr := free.Addr().String()
	free.Close()
	_, bindPort, _ := net.SplitHostPort(bindAddr)

	type check struct{ action, arg string }
	fixes := []struct {
		name, spec string
		check      check
		denied     string // helper result inside the cgroup while the fix is applied
	}{
		{"no-v6", "sock-create-deny:family=inet6,cgroup=" + cg, check{"socket6", ""}, "EPERM"},
		{"no-peer", fmt.Sprintf("connect-deny:addr=127.0.0.1,port=%d,cgroup=%s", addr.Port, cg), check{"connect", addr.String()}, "EPERM"},
		{"no-bind", fmt.Sprintf("bind-deny:port=%s,cgroup=%s", bindPort, cg), check{"bind", bindAddr}, "EPERM"},
		{"no-domainname", "sysctl-deny:name=kernel.domainname,cgroup=" + cg, check{"sysctl", "hot-test"}, "EPERM"},
		{"no-null", "device-deny:type=c,major=1,minor=3,access=rw,cgroup=" + cg, check{"open", "/dev/null"}, "EPERM"},
	}

	// Before: everything works inside the cgroup.
	for _, f := range fixes {
		if got := runHelper(t, cg, f.check.action, f.check.arg); got != "ok" {
			t.Fatalf("before any fix, %s inside the cgroup: %s", f.check.action, got)
		}
	}
	for _, f := range fixes {
		res := hot(t, root, "apply", f.spec, "--name", f.name)
		if res.ExitCode != 0 {
			t.Fatalf("hot hotfix apply %s: exit %d: %s", f.spec, res.ExitCode, res.Stderr)
		}
		if !strings.Contains(res.Stdout, f.name+" applied") {
			t.Errorf("apply output %q", res.Stdout)
		}
	}
	// The CLI has exited; fresh processes inside the cgroup are refused, outside are not.
	for _, f := range fixes {
		got := runHelper(t, cg, f.check.action, f.check.arg)
		if got != f.denied {
			t.Errorf("%s: %s inside the cgroup = %s, want it refused (%s)", f.name, f.check.action, got, f.denied)
		}
		t.Logf("%s: inside the cgroup %s -> %s", f.name, f.check.action, got)
		if got := runHelper(t, "", f.check.action, f.check.arg); got != "ok" {
			t.Errorf("%s: %s outside the cgroup = %s, want ok", f.name, f.check.action, got)
		}
	}
	// IPv4 sockets are still allowed inside: the fix is narrow.
	if got := runHelper(t, cg, "socket4", ""); got != "ok" {
		t.Errorf("inet socket inside the cgroup = %s, want ok (only inet6 is denied)", got)
	}

	// list reads the pins: links, program ids, hit counters.
	listed := listFixes(t, root)
	if len(listed) != len(fixes) {
		t.Fatalf("list shows %d fixes, want %d: %+v", len(listed), len(fixes), listed)
	}
	for _, f := range listed {
		if !f.Healthy || f.Hits < 1 || len(f.Links) == 0 {
			t.Errorf("fix %s: healthy=%v hits=%d links=%d, want healthy with hits", f.Name, f.Healthy, f.Hits, len(f.Links))
		}
		for _, l := range f.Links {
			if l.LinkType != "cgroup" || l.ProgramID == 0 || l.LinkID == 0 || l.CgroupID == 0 || l.Target != cg {
				t.Errorf("fix %s link %+v: want a cgroup link with ids on %s", f.Name, l, cg)
			}
		}
	}

	// Idempotent apply: the same spec changes nothing (same link ids).
	res := hot(t, root, "apply", fixes[0].spec, "--name", fixes[0].name, "--json")
	var ar ftrace.ApplyResult
	if err := json.Unmarshal([]byte(res.Stdout), &ar); err != nil || ar.Action != ftrace.Unchanged {
		t.Fatalf("re-apply: exit %d, %q (%v), want action unchanged", res.ExitCode, res.Stdout, err)
	}

	// Remove: behaviour is back to normal, pins are gone.
	for _, f := range fixes {
		if res := hot(t, root, "remove", f.name); res.ExitCode != 0 {
			t.Fatalf("remove %s: exit %d: %s", f.name, res.ExitCode, res.Stderr)
		}
		if got := runHelper(t, cg, f.check.action, f.check.arg); got != "ok" {
			t.Errorf("after remove %s, %s inside the cgroup = %s, want ok", f.name, f.check.action, got)
		}
		if _, err := os.Stat(filepath.Join(root, f.name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("after remove %s its pin dir is still there: %v", f.name, err)
		}
	}
	if l := listFixes(t, root); len(l) != 0 {
		t.Errorf("list after remove: %+v", l)
	}
	if res := hot(t, root, "remove", "no-v6"); res.ExitCode != 1 || !strings.Contains(res.Stderr, "no such fix") {
		t.Errorf("remove of a removed fix: exit %d %q", res.ExitCode, res.Stderr)
	}
}

func TestReplaceAttachesNewBeforeDroppingOld(t *testing.T) {
	testutil.RequireRoot(t)
	requireMechanism(t, ftrace.MechSockCreate)
	cg, root := testCgroup(t), testRoot(t)

	if res := hot(t, root, "apply", "sock-create-deny:family=inet6,cgroup="+cg, "--name", "fam"); res.ExitCode != 0 {
		t.Fatalf("apply: %s", res.Stderr)
	}
	before := listFixes(t, root)
	res := hot(t, root, "apply", "sock-create-deny:family=inet,cgroup="+cg, "--name", "fam", "--json")
	var ar ftrace.ApplyResult
	if err := json.Unmarshal([]byte(res.Stdout), &ar); err != nil || ar.Action != ftrace.Replaced {
		t.Fatalf("replace: exit %d %q %s", res.ExitCode, res.Stdout, res.Stderr)
	}
	after := listFixes(t, root)
	if len(after) != 1 || after[0].Links[0].LinkID == before[0].Links[0].LinkID || !after[0].Healthy {
		t.Fatalf("after replace: %+v (before %+v)", after, before)
	}
	// The new link has a higher id: it was created while the old one still existed.
	if after[0].Links[0].LinkID < before[0].Links[0].LinkID {
		t.Errorf("new link id %d < old %d", after[0].Links[0].LinkID, before[0].Links[0].LinkID)
	}
	if got := runHelper(t, cg, "socket6", ""); got != "ok" {
		t.Errorf("after replacing with an inet fix, inet6 inside = %s, want ok (old fix dropped)", got)
	}
	if got := runHelper(t, cg, "socket4", ""); got != "EPERM" {
		t.Errorf("after replacing with an inet fix, inet inside = %s, want EPERM", got)
	}
	entries, _ := os.ReadDir(root)
	if len(entries) != 1 {
		t.Errorf("bpffs root holds %d entries after replace, want only the fix", len(entries))
	}
}

func TestBadSpecsRefusedBeforeLoadingAnything(t *testing.T) {
	testutil.RequireRoot(t)
	cg, root := testCgroup(t), testRoot(t)
	for _, tc := range []struct{ spec, want string }{
		{"frobnicate:x=1", "unknown fix kind"},
		{"sock-create-deny:family=unix,cgroup=" + cg, "want inet or inet6"},
		{"sock-create-deny:family=inet6,cgroup=/sys/fs/cgroup", "cgroup"},
		{"sock-create-deny:family=inet6,cgroup=/tmp", "not a cgroup2 directory"},
		{"count:func=hot_no_such_kernel_function", "unknown target: the kernel BTF has no function hot_no_such_kernel_function"},
		{"hook-deny:hook=inode_free,comm=x", "wrong signature: security_inode_free returns void"},
		{"open-deny:path=/nonexistent/file", "no such file"},
	} {
		res := hot(t, root, "apply", tc.spec)
		if res.ExitCode != 2 || !strings.Contains(res.Stderr, tc.want) {
			t.Errorf("apply %s: exit %d, stderr %q; want exit 2 mentioning %q", tc.spec, res.ExitCode, res.Stderr, tc.want)
		}
	}
	if _, err := os.Stat(root); !errors.Is(err, os.ErrNotExist) {
		entries, _ := os.ReadDir(root)
		t.Errorf("bad specs left pins behind in %s: %v", root, entries)
	}
}

func TestTrampolineFixesReportTheKernelsRefusal(t *testing.T) {
	testutil.RequireRoot(t)
	var fmodRet ftrace.MechanismSupport
	for _, s := range ftrace.Probe(t.Context()) {
		if s.Mechanism == ftrace.MechFmodRet {
			fmodRet = s
		}
	}
	if fmodRet.Err == nil {
		t.Skip("this kernel allows fmod_ret: the refusal path is not reachable here (the VM test covers the allowed path)")
	}
	if !errors.Is(fmodRet.Err, ftrace.ErrNotSupported) {
		t.Fatalf("fmod_ret probe is inconclusive: %v", fmodRet.Err)
	}
	root := testRoot(t)
	res := hot(t, root, "apply", "open-deny:path=/etc/hostname,comm=cat", "--name", "tramp")
	if res.ExitCode != 1 || !strings.Contains(res.Stderr, "fmod_ret not supported by this kernel") {
		t.Fatalf("apply fmod_ret fix: exit %d, stderr %q; want the kernel's refusal", res.ExitCode, res.Stderr)
	}
	var ue *ftrace.UnsupportedError
	if errors.As(fmodRet.Err, &ue) && ue.Errno != 0 && !strings.Contains(res.Stderr, unix.ErrnoName(ue.Errno)) {
		t.Errorf("apply error %q does not name the errno the probe saw (%v)", res.Stderr, ue.Errno)
	}
	entries, _ := os.ReadDir(root)
	if len(entries) != 0 {
		t.Errorf("refused trampoline fix left pins: %v", entries)
	}
	// probe says so too, with the reason.
	pr := testutil.RunHot(t, time.Minute, "hotfix", "probe", "--json")
	var got []struct {
		Mechanism string `json:"mechanism"`
		Supported bool   `json:"supported"`
		Error     string `json:"error"`
	}
	if err := json.Unmarshal([]byte(pr.Stdout), &got); err != nil {
		t.Fatalf("probe --json: %v: %q", err, pr.Stdout)
	}
	for _, g := range got {
		if g.Mechanism == "fmod_ret" && (g.Supported || g.Error == "") {
			t.Errorf("probe reports fmod_ret %+v, want unsupported with a reason", g)
		}
	}
}
