package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/hotctl/hot/cgroups"
	"golang.org/x/sys/unix"
)

// Monitor protocol: one JSON Request per connection on <run-root>/<id>/monitor.sock, answered
// by one JSON Response; then the monitor closes the connection.
const (
	OpStatus   = "status"   // report the init pid and, once it ended, its exit status
	OpSignal   = "signal"   // send Request.Signal to the container's init
	OpWait     = "wait"     // answer when the init has exited (at once if it already has)
	OpShutdown = "shutdown" // end the monitor; refused while the init runs unless Force
	// OpReplaceInit makes Request.Pid the init in place of Request.Old (see ReplaceInit).
	OpReplaceInit = "replace-init"
)

// Request is a message to the monitor. Ops registered through MonitorOptions.Ops may carry
// their own arguments in Args.
type Request struct {
	Op     string          `json:"op"`
	Signal int             `json:"signal,omitempty"`
	Force  bool            `json:"force,omitempty"`
	Pid    int             `json:"pid,omitempty"` // OpReplaceInit: the new init
	Old    int             `json:"old,omitempty"` // OpReplaceInit: the init it replaces
	Args   json.RawMessage `json:"args,omitempty"`
}

// Response is the monitor's answer. Error is empty on success.
type Response struct {
	Error  string          `json:"error,omitempty"`
	Status *MonitorStatus  `json:"status,omitempty"`
	Data   json.RawMessage `json:"data,omitempty"`
}

// MonitorStatus is what the monitor knows about its container.
type MonitorStatus struct {
	MonitorPid int         `json:"monitorPid"`
	Pid        int         `json:"pid,omitempty"` // current init (0 before start)
	Running    bool        `json:"running"`
	Exit       *ExitStatus `json:"exit,omitempty"`
}

// OpFunc handles one request on the monitor. It runs in its own goroutine.
type OpFunc func(ctx context.Context, m *Monitor, req Request) Response

// MonitorOptions configure RunMonitor.
type MonitorOptions struct {
	Root, RunRoot, ID string
	Logger            *slog.Logger
	// Ready receives one JSON line for `hot run`: {"pid":N} once the init exec'ed the
	// entrypoint, or {"error":"..."}; then it is closed. May be nil.
	Ready *os.File
	// NoStart leaves the monitor without an init (an op such as a CRIU restore adopts one
	// with AdoptInit).
	NoStart bool
	// Ops adds operations to the protocol (e.g. "restore" from the checkpoint code).
	Ops map[string]OpFunc
}

// Monitor is the per-container parent process (`hot __monitor ID`): a child subreaper that
// starts the container init, reaps it and every orphan of the container that falls to it,
// records the init's exit status in exit.json and answers on a unix socket.
type Monitor struct {
	opts MonitorOptions
	p    paths
	log  *slog.Logger

	mu        sync.Mutex
	initPid   int
	exit      *ExitStatus
	exitCh    chan struct{}  // closed when the current init exits
	copiers   sync.WaitGroup // goroutines copying container output into the log
	holds     int            // HoldReaper calls not yet released
	kick      chan struct{}  // makes the reaper look again
	children  map[int]chan ExitStatus
	unclaimed map[int]ExitStatus // reaped pids nobody waited for yet (recent only)
	stop      context.CancelFunc
}

// RunMonitor runs the monitor until it is told to shut down (or ctx ends).
func RunMonitor(ctx context.Context, o MonitorOptions) error {
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	m := &Monitor{opts: o, p: paths{o.Root, o.RunRoot}, log: log.With("container", o.ID),
		exitCh: make(chan struct{}), kick: make(chan struct{}, 1), children: map[int]chan ExitStatus{}, unclaimed: map[int]ExitStatus{}}
	ready := func(v map[string]any) {
		if o.Ready == nil {
			return
		}
		json.NewEncoder(o.Ready).Encode(v)
		o.Ready.Close()
		o.Ready = nil
	}
	fail := func(err error) error {
		ready(map[string]any{"error": err.Error()})
		return err
	}
	if err := closeExecFrom(3); err != nil {
		return fail(fmt.Errorf("monitor: %w", err))
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fail(fmt.Errorf("monitor: become child subreaper: %w", err))
	}
	// Not signal.Ignore: ignored dispositions survive execve into the container's process.
	hush := make(chan os.Signal, 4)
	signal.Notify(hush, syscall.SIGHUP, syscall.SIGINT, syscall.SIGPIPE)
	defer signal.Stop(hush)
	go func() {
		for range hush {
		}
	}()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	m.stop = cancel

	sigch := make(chan os.Signal, 16)
	signal.Notify(sigch, syscall.SIGCHLD)
	defer signal.Stop(sigch)
	go func() {
		for {
			m.reap()
			select {
			case <-ctx.Done():
				return
			case <-sigch:
			case <-m.kick:
			case <-time.After(time.Second): // belt and braces against a lost SIGCHLD
			}
		}
	}()

	if err := os.MkdirAll(m.p.runDir(o.ID), 0o700); err != nil {
		return fail(fmt.Errorf("monitor: create run dir: %w", err))
	}
	sock := m.p.socket(o.ID)
	os.Remove(sock)
	addr, done, err := sockAddr(sock)
	if err != nil {
		return fail(fmt.Errorf("monitor: %w", err))
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: addr, Net: "unix"})
	done()
	if ln != nil {
		ln.SetUnlinkOnClose(false) // removed by path below; the short alias is gone by then
	}
	if err != nil {
		return fail(fmt.Errorf("monitor: listen on %s: %w", sock, err))
	}
	defer func() {
		ln.Close()
		os.Remove(sock)
	}()
	if !o.NoStart {
		pid, err := m.startInit()
		if err != nil {
			return fail(err)
		}
		ready(map[string]any{"pid": pid})
		m.log.Info("container started", "pid", pid)
	} else {
		ready(map[string]any{"pid": 0})
	}
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	for {
		conn, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("monitor: accept: %w", err)
		}
		go m.serve(ctx, conn)
	}
}

// startInit starts `hot __init` in new namespaces, places it in the cgroup, lets it build the
// root and exec, and returns its pid once the entrypoint runs (or the init's own error).
func (m *Monitor) startInit() (int, error) {
	id := m.opts.ID
	st, err := m.p.loadState(id)
	if err != nil {
		return 0, fmt.Errorf("monitor: load state: %w", err)
	}
	outW, err := m.NewOutputPipe()
	if err != nil {
		return 0, err
	}
	defer outW.Close()
	null, err := os.Open(os.DevNull)
	if err != nil {
		return 0, fmt.Errorf("monitor: open %s: %w", os.DevNull, err)
	}
	defer null.Close()
	syncR, syncW, err := os.Pipe()
	if err != nil {
		return 0, fmt.Errorf("monitor: pipe: %w", err)
	}
	defer syncW.Close()
	repR, repW, err := os.Pipe()
	if err != nil {
		syncR.Close()
		return 0, fmt.Errorf("monitor: pipe: %w", err)
	}
	defer repR.Close()
	flags := uintptr(unix.CLONE_NEWNS | unix.CLONE_NEWPID | unix.CLONE_NEWUTS | unix.CLONE_NEWIPC)
	if st.Network.Mode == "none" {
		flags |= unix.CLONE_NEWNET
	}
	m.mu.Lock()
	proc, err := os.StartProcess("/proc/self/exe", []string{"hot", "__init", m.p.config(id)}, &os.ProcAttr{
		Files: []*os.File{null, outW, outW, syncR, repW},
		Sys:   &syscall.SysProcAttr{Cloneflags: flags, Setsid: true},
	})
	pid := 0
	if err == nil {
		pid = proc.Pid
		m.initPid, m.exit, m.exitCh = pid, nil, make(chan struct{})
		proc.Release() // the reaper waits for it, not os.Process
	}
	m.mu.Unlock()
	syncR.Close()
	repW.Close()
	if err != nil {
		return 0, fmt.Errorf("monitor: start container init: %w", err)
	}
	cg, err := cgroups.Load(st.Cgroup)
	if err == nil {
		err = cg.AddProc(pid)
	}
	if err != nil {
		killPid(pid, unix.SIGKILL)
		return 0, fmt.Errorf("monitor: place init %d in cgroup %s: %w", pid, st.Cgroup, err)
	}
	failpoint("monitor-before-release")
	if _, err := syncW.Write([]byte{1}); err != nil {
		killPid(pid, unix.SIGKILL)
		return 0, fmt.Errorf("monitor: release container init: %w", err)
	}
	msg, _ := io.ReadAll(repR)
	if len(msg) > 0 {
		return 0, errors.New(string(msg))
	}
	return pid, nil
}

// reap collects every exited child (the init, helpers, reparented orphans). While the reaper
// is held (HoldReaper), it only waits for the pids it knows, so that code waiting for its own
// children (go-criu waits for `criu swrk`) gets their status.
func (m *Monitor) reap() {
	for {
		m.mu.Lock()
		var pids []int
		if m.holds > 0 {
			if m.initPid != 0 {
				pids = append(pids, m.initPid)
			}
			for p := range m.children {
				pids = append(pids, p)
			}
		}
		held := m.holds > 0
		m.mu.Unlock()
		if !held {
			pids = []int{-1}
		}
		reaped := false
		for _, want := range pids {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(want, &ws, unix.WNOHANG, nil)
			for err == unix.EINTR {
				pid, err = unix.Wait4(want, &ws, unix.WNOHANG, nil)
			}
			if pid <= 0 || err != nil {
				continue
			}
			reaped = true
			m.handleExit(pid, ws)
		}
		if !reaped {
			return
		}
	}
}

func (m *Monitor) handleExit(pid int, ws unix.WaitStatus) {
	ex := ExitStatus{Code: ws.ExitStatus(), Finished: time.Now().UTC()}
	if ws.Signaled() {
		ex.Code = 128 + int(ws.Signal())
		ex.Signal = ws.Signal().String()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if pid == m.initPid && pid != 0 {
		// Let the output the init wrote reach the log before its exit is announced.
		m.mu.Unlock()
		m.waitOutput(500 * time.Millisecond)
		m.mu.Lock()
	}
	switch {
	case pid == m.initPid:
		m.recordExitLocked(ex)
	case m.children[pid] != nil:
		m.children[pid] <- ex
		delete(m.children, pid)
	default:
		if len(m.unclaimed) > 1024 {
			clear(m.unclaimed)
		}
		m.unclaimed[pid] = ex
	}
}

// HoldReaper makes the monitor wait only for the pids it knows (the init, StartProcess
// children) until release is called. Wrap code that starts and waits for its own children
// with os/exec, such as a go-criu restore (it waits for `criu swrk`): the monitor would
// otherwise reap them first and their Wait would fail with ECHILD. Orphans that die meanwhile
// stay zombies until release.
func (m *Monitor) HoldReaper() (release func()) {
	m.mu.Lock()
	m.holds++
	m.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			m.mu.Lock()
			m.holds--
			m.mu.Unlock()
			select {
			case m.kick <- struct{}{}:
			default:
			}
		})
	}
}

func (m *Monitor) recordExitLocked(ex ExitStatus) {
	m.log.Info("container init exited", "pid", m.initPid, "code", ex.Code, "signal", ex.Signal)
	if err := writeJSONAtomic(m.p.exit(m.opts.ID), ex); err != nil {
		m.log.Error("record exit status", "err", err)
	}
	m.exit = &ex
	m.initPid = 0
	close(m.exitCh)
}

// StartProcess starts a helper child of the monitor (e.g. `criu restore`) and returns a channel
// that receives its exit status: the monitor reaps every child itself, so callers must not
// wait for it any other way.
func (m *Monitor) StartProcess(path string, argv []string, attr *os.ProcAttr) (int, <-chan ExitStatus, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p, err := os.StartProcess(path, argv, attr)
	if err != nil {
		return 0, nil, err
	}
	pid := p.Pid
	ch := make(chan ExitStatus, 1)
	m.children[pid] = ch
	p.Release()
	return pid, ch, nil
}

// AdoptInit makes pid (e.g. a tree restored by CRIU and reparented to the monitor, its
// subreaper) the container's init: exit.json is removed and its exit will be recorded. It
// fails if the process already ended.
func (m *Monitor) AdoptInit(pid int) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.initPid != 0 {
		return fmt.Errorf("monitor: init %d still runs; cannot adopt %d", m.initPid, pid)
	}
	if ex, ok := m.unclaimed[pid]; ok {
		delete(m.unclaimed, pid)
		return fmt.Errorf("monitor: adopt %d: it already exited with code %d", pid, ex.Code)
	}
	if err := os.Remove(m.p.exit(m.opts.ID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("monitor: clear exit status: %w", err)
	}
	m.initPid, m.exit, m.exitCh = pid, nil, make(chan struct{})
	return nil
}

// ReplaceInit makes pid (a restored copy of the tree, reparented to the monitor) the
// container's init in place of old, which still runs for now: a lazy in-place update keeps
// the original tree frozen under CRIU until the copy has pulled its memory. From then on
// old's exit is not the container's. ReplaceInit(pid, old) swaps back (a rollback to the
// originals).
func (m *Monitor) ReplaceInit(old, pid int) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.initPid != old || old == 0 {
		return fmt.Errorf("monitor: cannot replace init %d: the init is %d", old, m.initPid)
	}
	if ex, ok := m.unclaimed[pid]; ok {
		delete(m.unclaimed, pid)
		return fmt.Errorf("monitor: replace init by %d: it already exited with code %d", pid, ex.Code)
	}
	if err := unix.Kill(pid, 0); err != nil {
		return fmt.Errorf("monitor: replace init by %d: %w", pid, err)
	}
	m.initPid = pid
	return nil
}

// Status returns what the monitor knows now.
func (m *Monitor) Status() MonitorStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	return MonitorStatus{MonitorPid: os.Getpid(), Pid: m.initPid, Running: m.initPid != 0, Exit: m.exit}
}

// ID is the container's id; Paths give its state and run directories.
func (m *Monitor) ID() string { return m.opts.ID }

// Dir is the container's state directory (<root>/containers/<id>).
func (m *Monitor) Dir() string { return m.p.dir(m.opts.ID) }

// RunDir is the container's run directory (<run-root>/<id>).
func (m *Monitor) RunDir() string { return m.p.runDir(m.opts.ID) }

func (m *Monitor) serve(ctx context.Context, conn *net.UnixConn) {
	defer conn.Close()
	var req Request
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if err := json.NewDecoder(conn).Decode(&req); err != nil {
		json.NewEncoder(conn).Encode(Response{Error: "bad request: " + err.Error()})
		return
	}
	conn.SetReadDeadline(time.Time{})
	resp := m.handle(ctx, req)
	json.NewEncoder(conn).Encode(resp)
}

func (m *Monitor) handle(ctx context.Context, req Request) Response {
	switch req.Op {
	case OpStatus:
		s := m.Status()
		return Response{Status: &s}
	case OpSignal:
		m.mu.Lock()
		pid := m.initPid
		m.mu.Unlock()
		if pid == 0 {
			return Response{Error: "container is not running"}
		}
		if err := killPid(pid, unix.Signal(req.Signal)); err != nil {
			return Response{Error: fmt.Sprintf("signal %d to init %d: %v", req.Signal, pid, err)}
		}
		s := m.Status()
		return Response{Status: &s}
	case OpWait:
		m.mu.Lock()
		ch := m.exitCh
		m.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return Response{Error: "monitor shutting down"}
		}
		s := m.Status()
		return Response{Status: &s}
	case OpShutdown:
		s := m.Status()
		if s.Running && !req.Force {
			return Response{Error: "container is running: stop it first"}
		}
		if s.Running {
			killPid(s.Pid, unix.SIGKILL)
		}
		time.AfterFunc(50*time.Millisecond, m.stop)
		return Response{Status: &s}
	}
	if req.Op == OpReplaceInit {
		if err := m.ReplaceInit(req.Old, req.Pid); err != nil {
			return Response{Error: err.Error()}
		}
		s := m.Status()
		return Response{Status: &s}
	}
	if f, ok := m.opts.Ops[req.Op]; ok {
		return f(ctx, m, req)
	}
	return Response{Error: fmt.Sprintf("unknown op %q", req.Op)}
}

// callMonitor sends one request to a container's monitor.
func callMonitor(ctx context.Context, sock string, req Request) (*Response, error) {
	var d net.Dialer
	addr, done, err := sockAddr(sock)
	if err != nil {
		return nil, err
	}
	conn, err := d.DialContext(ctx, "unix", addr)
	done()
	if err != nil {
		return nil, fmt.Errorf("reach monitor at %s: %w", sock, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	if err := json.NewEncoder(conn).Encode(req); err != nil {
		return nil, fmt.Errorf("send %s to monitor: %w", req.Op, err)
	}
	var resp Response
	if err := json.NewDecoder(conn).Decode(&resp); err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("monitor %s: %w", req.Op, ctx.Err())
		}
		return nil, fmt.Errorf("read monitor answer to %s: %w", req.Op, err)
	}
	if resp.Error != "" {
		return &resp, fmt.Errorf("monitor %s: %s", req.Op, resp.Error)
	}
	return &resp, nil
}

// NewOutputPipe returns the write end of a new pipe whose output the monitor appends to the
// container's log until every writer has closed it. The container's stdout and stderr are
// such a pipe (not the log file itself: CRIU can dump and restore a pipe, but not a file on a
// host mount the container's mount namespace does not see). A restore gives the restored
// tree a new one with `criu restore --inherit-fd fd[N]:pipe:[INODE]`, INODE being the one
// /proc/<pid>/fd/1 showed at dump time. The caller closes its copy of the write end once the
// process that needs it has it.
func (m *Monitor) NewOutputPipe() (*os.File, error) {
	logf, err := os.OpenFile(m.p.log(m.opts.ID), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("monitor: open container log: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		logf.Close()
		return nil, fmt.Errorf("monitor: output pipe: %w", err)
	}
	m.copiers.Add(1)
	go func() {
		defer m.copiers.Done()
		defer logf.Close()
		defer r.Close()
		if _, err := io.Copy(logf, r); err != nil {
			m.log.Warn("copy container output to log", "err", err)
		}
	}()
	return w, nil
}

// waitOutput waits (up to d) until every output pipe has reached EOF, i.e. no process of the
// container holds it any more.
func (m *Monitor) waitOutput(d time.Duration) {
	done := make(chan struct{})
	go func() {
		m.copiers.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(d):
	}
}

// sockAddr returns an address for the unix socket at path that fits sun_path (108 bytes): the
// path itself, or /proc/self/fd/N/NAME through a descriptor of its directory when a deep
// --run-root makes it too long. Call done once bound or connected.
func sockAddr(path string) (addr string, done func(), err error) {
	if len(path) < 100 {
		return path, func() {}, nil
	}
	fd, err := unix.Open(filepath.Dir(path), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, fmt.Errorf("open socket dir of %s: %w", path, err)
	}
	return fmt.Sprintf("/proc/self/fd/%d/%s", fd, filepath.Base(path)), func() { unix.Close(fd) }, nil
}
