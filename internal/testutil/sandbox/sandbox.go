// Package sandbox starts a process the way a container runtime would, for tests of the
// checkpoint layer that must not depend on the runtime: PID 1 of fresh mount, PID, UTS, IPC
// and network namespaces, pivot_root'ed into its own root directory, in its own v1 freezer
// cgroup, with the network namespace bind-mounted to a file (it outlives the processes) and a
// veth pair to the host so host-side clients can connect.
//
// Test binaries that use it must call MaybeInit at the start of TestMain: the sandbox's init
// is the test binary itself, re-executed.
package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hotctl/hot/cgroups"
	"golang.org/x/sys/unix"
)

const initEnv = "HOT_TEST_SANDBOX_INIT"

// MaybeInit turns the process into a sandbox init when it was started as one (and then never
// returns); otherwise it does nothing.
func MaybeInit() {
	if os.Getenv(initEnv) != "1" {
		return
	}
	err := initMain(os.Args[1:])
	fmt.Fprintln(os.Stderr, "sandbox init:", err)
	os.Exit(111)
}

// initMain runs as PID 1 of the new namespaces: args are ROOTFS APP [ARGS...].
func initMain(args []string) error {
	runtime.LockOSThread()
	if len(args) < 2 {
		return errors.New("usage: ROOTFS APP [ARGS...]")
	}
	rootfs := args[0]
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private: %w", err)
	}
	if err := unix.Mount(rootfs, rootfs, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind root: %w", err)
	}
	for _, d := range []string{"proc", "tmp", ".oldroot"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			return err
		}
	}
	if err := unix.Mount("proc", filepath.Join(rootfs, "proc"), "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount proc: %w", err)
	}
	if err := unix.PivotRoot(rootfs, filepath.Join(rootfs, ".oldroot")); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	if err := unix.Unmount("/.oldroot", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach old root: %w", err)
	}
	os.Remove("/.oldroot")
	if err := unix.Sethostname([]byte("sandbox")); err != nil {
		return err
	}
	out, err := unix.Open("/app.log", unix.O_WRONLY|unix.O_CREAT|unix.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open /app.log: %w", err)
	}
	in, err := unix.Open("/app.log", unix.O_RDONLY, 0)
	if err != nil {
		return err
	}
	for fd, src := range []int{in, out, out} {
		if err := unix.Dup3(src, fd, 0); err != nil {
			return err
		}
	}
	// Nothing of the host may leak into the sandbox (CRIU cannot dump files outside its root).
	if err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err != nil {
		return fmt.Errorf("close_range: %w", err)
	}
	return unix.Exec(args[1], args[1:], []string{"PATH=/", "HOME=/"})
}

// Sandbox is one running sandbox.
type Sandbox struct {
	Name      string
	Rootfs    string          // the root directory (what a restore mounts as the root)
	NetnsPath string          // bind mount of the network namespace
	HostIP    string          // host end of the veth
	IP        string          // the sandbox's address
	Cgroup    *cgroups.Cgroup // its own cgroup (package cgroups: v1, v2 or hybrid hosts)
	PID       int             // host PID of the sandbox's PID 1 (changes after a restore: SetPID)

	cmd *exec.Cmd
}

// Options configure Start.
type Options struct {
	App  string   // a static binary, copied into the root as /app
	Args []string // its arguments
}

// Start starts a sandbox and registers its removal with t.Cleanup.
func Start(t testing.TB, opts Options) *Sandbox {
	t.Helper()
	var rnd [4]byte
	rand.Read(rnd[:])
	id := hex.EncodeToString(rnd[:])
	dir := t.TempDir()
	s := &Sandbox{
		Name:      "hot-test-" + id,
		Rootfs:    filepath.Join(dir, "rootfs"),
		NetnsPath: filepath.Join(dir, "netns"),
		HostIP:    fmt.Sprintf("10.231.%d.%d", rnd[0], rnd[1]&0xfc|1),
		IP:        fmt.Sprintf("10.231.%d.%d", rnd[0], rnd[1]&0xfc|2),
	}
	if err := os.MkdirAll(s.Rootfs, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := copyFile(opts.App, filepath.Join(s.Rootfs, "app"), 0o755); err != nil {
		t.Fatalf("copy app into sandbox root: %v", err)
	}
	cg, err := cgroups.Create(context.Background(), "hot-test/"+id, cgroups.Resources{})
	if err != nil {
		t.Fatal(err)
	}
	s.Cgroup = cg
	t.Cleanup(func() { s.destroy(t) })

	initLog, err := os.Create(filepath.Join(dir, "init.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer initLog.Close()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self, append([]string{s.Rootfs, "/app"}, opts.Args...)...)
	cmd.Env = []string{initEnv + "=1"}
	cmd.Stdout, cmd.Stderr = initLog, initLog
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setsid:     true,
		Cloneflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWPID | syscall.CLONE_NEWUTS | syscall.CLONE_NEWIPC | syscall.CLONE_NEWNET,
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start sandbox init: %v", err)
	}
	s.cmd, s.PID = cmd, cmd.Process.Pid
	if err := cg.AddProc(s.PID); err != nil {
		t.Fatal(err)
	}
	if err := s.setupNetwork(id); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *Sandbox) setupNetwork(id string) error {
	f, err := os.Create(s.NetnsPath)
	if err != nil {
		return err
	}
	f.Close()
	if err := unix.Mount(fmt.Sprintf("/proc/%d/ns/net", s.PID), s.NetnsPath, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind-mount netns: %w", err)
	}
	host := "hv" + id
	steps := [][]string{
		{"ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", strconv.Itoa(s.PID)},
		{"ip", "addr", "add", s.HostIP + "/30", "dev", host},
		{"ip", "link", "set", host, "up"},
		{"nsenter", "--net=" + s.NetnsPath, "ip", "link", "set", "lo", "up"},
		{"nsenter", "--net=" + s.NetnsPath, "ip", "addr", "add", s.IP + "/30", "dev", "eth0"},
		{"nsenter", "--net=" + s.NetnsPath, "ip", "link", "set", "eth0", "up"},
	}
	for _, st := range steps {
		if out, err := exec.Command(st[0], st[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %w: %s", strings.Join(st, " "), err, out)
		}
	}
	return nil
}

// SetPID records the sandbox's new PID 1 after a restore.
func (s *Sandbox) SetPID(pid int) { s.PID = pid; s.cmd = nil }

// Addr returns the sandbox's address with port.
func (s *Sandbox) Addr(port int) string { return fmt.Sprintf("%s:%d", s.IP, port) }

// Reap waits for (or collects) the exit of the sandbox's current PID 1 if it is a child of
// this process, ignoring errors.
func (s *Sandbox) reap() {
	if s.cmd != nil {
		s.cmd.Wait()
		return
	}
	var ws unix.WaitStatus
	unix.Wait4(s.PID, &ws, 0, nil)
}

// Kill kills the sandbox's processes (the PID namespace goes with its PID 1) and reaps PID 1.
func (s *Sandbox) Kill() {
	if s.PID > 0 {
		unix.Kill(s.PID, unix.SIGKILL)
		s.reap()
		s.PID = 0
	}
}

func (s *Sandbox) destroy(t testing.TB) {
	s.Cgroup.Thaw(context.Background())
	s.Kill()
	if err := unix.Unmount(s.NetnsPath, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		t.Logf("unmount netns %s: %v", s.NetnsPath, err)
	}
	if err := s.Cgroup.Destroy(context.Background()); err != nil {
		t.Logf("remove freezer cgroup: %v", err)
	}
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// WaitListening waits until a TCP connection to addr succeeds.
func WaitListening(ctx context.Context, addr string) error {
	for {
		d := net.Dialer{Timeout: 500 * time.Millisecond}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w (last: %v)", addr, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
