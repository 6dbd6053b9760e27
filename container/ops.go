package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"github.com/hotctl/hot/cgroups"
	"github.com/hotctl/hot/cowfs"
	"github.com/hotctl/hot/network"
	"github.com/hotctl/hot/sockets"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

func (c *Container) active() bool { return c.Status == StatusRunning || c.Status == StatusPaused }

func notRunning(c *Container) error {
	if c.Status == StatusUnknown {
		return fmt.Errorf("container %s is in an unknown state: %s", c.Name, c.Reason)
	}
	return fmt.Errorf("container %s is %s: start a new one with 'hot run'", c.Name, c.Status)
}

// Signal sends sig to the container's init through its monitor.
func (m *Manager) Signal(ctx context.Context, ref string, sig syscall.Signal) error {
	st, lk, err := m.lock(ctx, ref)
	if err != nil {
		return err
	}
	defer lk.Unlock()
	c := m.view(st, true)
	if !c.active() {
		return notRunning(c)
	}
	if _, err := callMonitor(ctx, m.p.socket(st.ID), Request{Op: OpSignal, Signal: int(sig)}); err != nil {
		return fmt.Errorf("signal %s: %w", st.Name, err)
	}
	if c.Status == StatusPaused && (sig == unix.SIGKILL || sig == unix.SIGTERM) {
		// A frozen task cannot act on a signal; thaw so that it takes effect.
		if err := m.thaw(ctx, st); err != nil {
			return err
		}
	}
	return nil
}

// Stop sends SIGTERM, waits up to timeout for the init to exit, then SIGKILLs the container's
// whole cgroup. Stopping a stopped container is not an error.
func (m *Manager) Stop(ctx context.Context, ref string, timeout time.Duration) (*Container, error) {
	st, lk, err := m.lock(ctx, ref)
	if err != nil {
		return nil, err
	}
	defer lk.Unlock()
	c := m.view(st, true)
	if c.Status == StatusExited {
		return c, nil
	}
	if !c.active() {
		return nil, notRunning(c)
	}
	sock := m.p.socket(st.ID)
	if _, err := callMonitor(ctx, sock, Request{Op: OpSignal, Signal: int(unix.SIGTERM)}); err != nil {
		return nil, fmt.Errorf("stop %s: %w", st.Name, err)
	}
	if c.Status == StatusPaused {
		if err := m.thaw(ctx, st); err != nil {
			return nil, err
		}
	}
	if m.waitExit(ctx, sock, timeout) {
		return m.view(st, true), nil
	}
	m.log.Info("container did not stop in time, killing", "name", st.Name, "timeout", timeout)
	if cg, err := cgroups.Load(st.Cgroup); err == nil {
		if err := cg.Kill(ctx); err != nil {
			return nil, fmt.Errorf("kill cgroup of %s: %w", st.Name, err)
		}
	} else {
		callMonitor(ctx, sock, Request{Op: OpSignal, Signal: int(unix.SIGKILL)})
	}
	if !m.waitExit(ctx, sock, 10*time.Second) && !waitGone(st.Pid, st.PidStart, 10*time.Second) {
		// (waitExit also fails at once when the monitor died meanwhile: then the init itself
		// is the judge.)
		return nil, fmt.Errorf("stop %s: init %d did not exit 10s after SIGKILL", st.Name, st.Pid)
	}
	return m.view(st, true), nil
}

func (m *Manager) waitExit(ctx context.Context, sock string, d time.Duration) bool {
	wctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	_, err := callMonitor(wctx, sock, Request{Op: OpWait})
	return err == nil
}

// Wait blocks until the container's init exits and returns its final view.
func (m *Manager) Wait(ctx context.Context, ref string) (*Container, error) {
	st, err := m.find(ref)
	if err != nil {
		return nil, err
	}
	if c := m.view(st, false); c.Status == StatusExited {
		return c, nil
	}
	// Also when the view says unknown: the init may have just ended with the monitor about
	// to record it. A monitor that is gone refuses the connection.
	if _, err := callMonitor(ctx, m.p.socket(st.ID), Request{Op: OpWait}); err != nil && ctx.Err() != nil {
		return nil, fmt.Errorf("wait for %s: %w", st.Name, err)
	}
	return m.view(st, false), nil
}

// Pause freezes the container's cgroup; it returns once every task is frozen.
func (m *Manager) Pause(ctx context.Context, ref string) error {
	st, lk, err := m.lock(ctx, ref)
	if err != nil {
		return err
	}
	defer lk.Unlock()
	c := m.view(st, true)
	if c.Status == StatusPaused {
		return fmt.Errorf("container %s is already paused: resume it with 'hot resume %s'", st.Name, st.Name)
	}
	if c.Status != StatusRunning {
		return notRunning(c)
	}
	cg, err := cgroups.Load(st.Cgroup)
	if err != nil {
		return fmt.Errorf("pause %s: %w", st.Name, err)
	}
	if err := cg.Freeze(ctx); err != nil {
		return fmt.Errorf("pause %s: %w", st.Name, err)
	}
	st.Status = StatusPaused
	return m.p.saveState(st)
}

// Resume thaws a paused container.
func (m *Manager) Resume(ctx context.Context, ref string) error {
	st, lk, err := m.lock(ctx, ref)
	if err != nil {
		return err
	}
	defer lk.Unlock()
	c := m.view(st, true)
	if c.Status != StatusPaused {
		if c.Status == StatusRunning {
			return fmt.Errorf("container %s is not paused", st.Name)
		}
		return notRunning(c)
	}
	if st.Status == StatusRunning {
		// Frozen, but not by 'hot pause': a checkpoint or update was interrupted (killed)
		// while the container was frozen. A CRIU that outlived its caller still holds the
		// tasks: it fails at its next message to the caller and puts them back; wait for that.
		for deadline := time.Now().Add(60 * time.Second); ProcTracer(st.Pid) != 0; {
			if time.Now().After(deadline) {
				return fmt.Errorf("resume %s: process %d still traces its init after 60s: a checkpoint still runs?", st.Name, ProcTracer(st.Pid))
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(20 * time.Millisecond):
			}
		}
		// What a killed CRIU may have left must go before the thaw: sockets in TCP repair mode
		// (they would fail the app's reads) and the network lock in its namespace (it drops the
		// container's traffic).
		if cg, err := cgroups.Load(st.Cgroup); err == nil {
			if pids, err := cg.Procs(); err == nil {
				for _, pid := range pids {
					if _, err := sockets.SetTCPRepair(pid, false); err != nil {
						m.log.Warn("take sockets out of TCP repair mode", "pid", pid, "err", err)
					}
				}
			}
		}
		if st.Network.NetnsPath != "" {
			if err := sockets.CleanupCRIULock(ctx, st.Network.NetnsPath); err != nil {
				return fmt.Errorf("resume %s: %w", st.Name, err)
			}
		}
	}
	return m.thaw(ctx, st)
}

func (m *Manager) thaw(ctx context.Context, st *State) error {
	cg, err := cgroups.Load(st.Cgroup)
	if err != nil {
		return fmt.Errorf("resume %s: %w", st.Name, err)
	}
	if err := cg.Thaw(ctx); err != nil {
		return fmt.Errorf("resume %s: %w", st.Name, err)
	}
	if st.Status == StatusPaused {
		st.Status = StatusRunning
		return m.p.saveState(st)
	}
	return nil
}

// Remove deletes a container. A running (or unknown) container needs force, which kills
// it first. Every step tolerates leftovers of crashed or interrupted commands, so
// `hot rm -f` cleans whatever a crash left.
func (m *Manager) Remove(ctx context.Context, ref string, force bool) error {
	st, lk, err := m.lock(ctx, ref)
	if err != nil {
		return err
	}
	defer lk.Unlock()
	c := m.view(st, true)
	if !force && c.Status != StatusExited && c.Status != StatusCheckpointed {
		if c.Status == StatusUnknown {
			return fmt.Errorf("container %s is in an unknown state (%s): remove it with 'hot rm -f %s'", st.Name, c.Reason, st.Name)
		}
		return fmt.Errorf("container %s is %s: stop it first ('hot stop %s') or use 'hot rm -f %s'", st.Name, c.Status, st.Name, st.Name)
	}
	return m.cleanup(ctx, st)
}

// cleanup removes everything a container may have on the host, in reverse order of creation.
// Each step is idempotent; errors are collected and the state directory is kept when any step
// fails, so that a retry can finish the job.
func (m *Manager) cleanup(ctx context.Context, st *State) error {
	var errs []error
	cg, cgErr := cgroups.Load(st.Cgroup)
	if cgErr == nil {
		if err := cg.Kill(ctx); err != nil {
			errs = append(errs, fmt.Errorf("kill processes of %s: %w", st.Name, err))
		}
	} else if !errors.Is(cgErr, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("find cgroup of %s: %w", st.Name, cgErr))
	}
	if st.MonitorPid != 0 && procAlive(st.MonitorPid, st.MonitorStart) {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := callMonitor(sctx, m.p.socket(st.ID), Request{Op: OpShutdown, Force: true})
		cancel()
		if err != nil || !waitGone(st.MonitorPid, st.MonitorStart, 5*time.Second) {
			killPid(st.MonitorPid, unix.SIGKILL)
			waitGone(st.MonitorPid, st.MonitorStart, 5*time.Second)
		}
	}
	if st.Pid != 0 && procAlive(st.Pid, st.PidStart) {
		// Only when its cgroup was gone: an init that escaped it.
		killPid(st.Pid, unix.SIGKILL)
		waitGone(st.Pid, st.PidStart, 5*time.Second)
	}
	failpoint("rm-before-unmount")
	if err := cowfs.Unmount(st.Rootfs); err != nil {
		errs = append(errs, err)
	}
	if st.Network.Mode == "bridge" {
		n, err := network.New(m.networkConfig(st))
		if err == nil {
			err = n.Detach(ctx, st.ID)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("detach %s from network: %w", st.Name, err))
		}
	}
	if cgErr == nil {
		if err := m.destroyCgroup(ctx, cg, st.Cgroup); err != nil {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", st.Cgroup, err))
		}
	}
	if store, err := cowfs.Open(m.p.root); err != nil {
		errs = append(errs, fmt.Errorf("open image store: %w", err))
	} else {
		for _, g := range st.Generations {
			if err := store.Release(ctx, g.ImageID, st.ID); err != nil {
				errs = append(errs, fmt.Errorf("release image %s: %w", g.Image, err))
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("remove %s: %w (retry with 'hot rm -f %s')", st.Name, errors.Join(errs...), st.Name)
	}
	if err := os.RemoveAll(m.p.runDir(st.ID)); err != nil {
		return fmt.Errorf("remove %s: %w", m.p.runDir(st.ID), err)
	}
	if err := os.RemoveAll(m.p.dir(st.ID)); err != nil {
		return fmt.Errorf("remove %s: %w", m.p.dir(st.ID), err)
	}
	return nil
}

func waitGone(pid int, start uint64, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for procAlive(pid, start) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// ExecOptions describe a process to run inside a running container.
type ExecOptions struct {
	Args    []string
	Env     []string // added to the container's environment
	Workdir string   // default: the container's working directory
	User    string   // UID[:GID]; default: the container's user
}

// Exec replaces the calling process with opts.Args running inside the container: it moves the
// caller into the container's cgroup, then execs nsenter(1), which joins the container's
// mount, uts, ipc, net and pid namespaces and its root, forks (so the command is in the pid
// namespace) and execs `hot __exec` (this binary, through an inherited descriptor, since it is
// not inside the container's root). That drops privileges exactly as the container init did
// (capabilities, no_new_privs, seccomp from config.json; see ExecMain) and execs the command.
// The command's exit status becomes the caller's.
//
// Why nsenter: a Go process is multithreaded from its start, and the kernel refuses
// setns(CLONE_NEWNS) to multithreaded processes; runc solves this with C code that runs
// before the Go runtime (cgo), which our static CGO_ENABLED=0 binary does not have. nsenter
// from util-linux is single-threaded C and does exactly the setns/fork/exec sequence.
// Exec returns only on failure.
func (m *Manager) Exec(ctx context.Context, ref string, o ExecOptions) error {
	if len(o.Args) == 0 {
		return fmt.Errorf("exec: give a command to run")
	}
	if err := ValidateEnv(o.Env); err != nil {
		return err
	}
	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		return fmt.Errorf("exec needs nsenter from util-linux: install it (apt-get install util-linux): %w", err)
	}
	st, err := m.find(ref)
	if err != nil {
		return err
	}
	c := m.view(st, false)
	if c.Status == StatusPaused {
		return fmt.Errorf("container %s is paused: resume it first with 'hot resume %s'", st.Name, st.Name)
	}
	if c.Status != StatusRunning {
		return notRunning(c)
	}
	var spec specs.Spec
	if err := readJSON(m.p.config(st.ID), &spec); err != nil {
		return fmt.Errorf("exec in %s: read config: %w", st.Name, err)
	}
	uid, gid := spec.Process.User.UID, spec.Process.User.GID
	if o.User != "" {
		if uid, gid, err = ParseUser(o.User); err != nil {
			return err
		}
	}
	cwd := spec.Process.Cwd
	if o.Workdir != "" {
		cwd = o.Workdir
	}
	cg, err := cgroups.Load(st.Cgroup)
	if err != nil {
		return fmt.Errorf("exec in %s: %w", st.Name, err)
	}
	if err := cg.AddProc(os.Getpid()); err != nil {
		return fmt.Errorf("exec in %s: join cgroup: %w", st.Name, err)
	}
	env := mergeEnv(spec.Process.Env, o.Env)
	// Nothing the caller inherited may reach the container; the helper's fds below are opened
	// afterwards, without CLOEXEC, on purpose.
	if err := closeExecFrom(3); err != nil {
		return fmt.Errorf("exec in %s: %w", st.Name, err)
	}
	p := *spec.Process
	p.Args, p.Env, p.Cwd = o.Args, env, cwd
	p.User = specs.User{UID: uid, GID: gid}
	if uid != spec.Process.User.UID || gid != spec.Process.User.GID {
		p.User.AdditionalGids = nil
	}
	selfFd, specFd, err := execHelperFds(&specs.Spec{Process: &p, Linux: &specs.Linux{Seccomp: spec.Linux.Seccomp}})
	if err != nil {
		return fmt.Errorf("exec in %s: %w", st.Name, err)
	}
	argv := []string{"nsenter", "--target", strconv.Itoa(st.Pid), "--mount", "--uts", "--ipc", "--net", "--pid",
		"--root", "--wdns=" + cwd, "--", "/proc/self/fd/" + strconv.Itoa(selfFd), ExecCommand, strconv.Itoa(specFd)}
	if err := unix.Exec(nsenter, argv, env); err != nil {
		return fmt.Errorf("exec nsenter: %w", err)
	}
	return nil
}

// execHelperFds opens this binary and a memfd holding spec, both inherited across exec (no
// CLOEXEC), for `hot __exec` inside the container.
func execHelperFds(spec *specs.Spec) (selfFd, specFd int, err error) {
	self, err := os.Executable()
	if err != nil {
		return 0, 0, fmt.Errorf("locate the hot binary: %w", err)
	}
	if selfFd, err = unix.Open(self, unix.O_PATH, 0); err != nil {
		return 0, 0, fmt.Errorf("open %s: %w", self, err)
	}
	data, err := json.Marshal(spec)
	if err != nil {
		return 0, 0, err
	}
	if specFd, err = unix.MemfdCreate("hot-exec-spec", 0); err != nil {
		return 0, 0, fmt.Errorf("memfd for the exec spec: %w", err)
	}
	if _, err := unix.Pwrite(specFd, data, 0); err != nil {
		return 0, 0, fmt.Errorf("write the exec spec: %w", err)
	}
	return selfFd, specFd, nil
}

// Logs copies the container's output to w; with follow it keeps copying until the container
// exits or ctx ends.
func (m *Manager) Logs(ctx context.Context, ref string, w io.Writer, follow bool) error {
	st, err := m.find(ref)
	if err != nil {
		return err
	}
	f, err := os.Open(m.p.log(st.ID))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) && !follow {
			return nil
		}
		return fmt.Errorf("open log of %s: %w", st.Name, err)
	}
	defer f.Close()
	for {
		if _, err := io.Copy(w, f); err != nil {
			return fmt.Errorf("read log of %s: %w", st.Name, err)
		}
		if !follow {
			return nil
		}
		// Stop once the exit is recorded (the monitor writes exit.json only after the output
		// pipe drained), or when no monitor is left to write more.
		if cur, err := m.p.loadState(st.ID); err == nil {
			st = cur
		}
		if c := m.view(st, false); c.Status == StatusExited ||
			c.Status == StatusUnknown && !procAlive(st.MonitorPid, st.MonitorStart) {
			_, err := io.Copy(w, f)
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// destroyCgroup removes the container's cgroup and checks, with a freshly read layout, that no
// hierarchy still has it: a Destroy that saw only part of the hierarchies (once seen in the
// end-to-end tests while other work on the machine mounted and unmounted things) is repeated.
func (m *Manager) destroyCgroup(ctx context.Context, cg *cgroups.Cgroup, name string) error {
	for attempt := 0; ; attempt++ {
		if err := cg.Destroy(ctx); err != nil {
			return err
		}
		again, err := cgroups.Load(name)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		var left []string
		for _, p := range again.Paths() {
			if _, err := os.Stat(p); err == nil {
				left = append(left, p)
			}
		}
		if len(left) == 0 {
			return nil
		}
		if attempt == 2 {
			return fmt.Errorf("still present after removal: %v", left)
		}
		m.log.Warn("cgroup directories survived Destroy, removing again", "cgroup", name, "left", left,
			"destroyed", cg.Paths())
		cg = again
	}
}
