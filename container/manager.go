package container

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hotctl/hot/cgroups"
	"github.com/hotctl/hot/cowfs"
	"github.com/hotctl/hot/isolation"
	"github.com/hotctl/hot/network"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Manager runs and inspects the containers under one state root and run root. It holds no
// state of its own beyond paths: every call reads the files and the host, so several hot
// processes can use the same root (per-container flocks serialize them).
type Manager struct {
	p   paths
	log *slog.Logger
}

// Container is the reconciled view of a container: its persisted State with Status replaced by
// what the host shows (a dead monitor makes a "running" container "unknown", with Reason).
type Container struct {
	State
	Status      Status            `json:"status"`
	Reason      string            `json:"reason,omitempty"`
	Exit        *ExitStatus       `json:"exit,omitempty"`
	CgroupPaths map[string]string `json:"cgroupPaths,omitempty"`
	LogPath     string            `json:"logPath"`
	ConfigPath  string            `json:"configPath"`
	Dir         string            `json:"dir"`           // <root>/containers/<id>
	RunDir      string            `json:"runDir"`        // <run-root>/<id>
	MonitorSock string            `json:"monitorSocket"` // <run-root>/<id>/monitor.sock
}

// NewManager returns a Manager for root (e.g. /var/lib/hot) and runRoot (e.g. /run/hot).
func NewManager(root, runRoot string, log *slog.Logger) (*Manager, error) {
	if log == nil {
		log = slog.Default()
	}
	for _, d := range []string{filepath.Join(root, "containers"), runRoot} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	return &Manager{p: paths{root, runRoot}, log: log}, nil
}

func newID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (m *Manager) networkConfig(st *State) network.Config {
	return network.Config{Bridge: st.Network.Bridge, Subnet: st.Network.Subnet,
		StateDir: filepath.Join(m.p.root, "network"), RunRoot: m.p.runRoot}
}

// Run creates and starts a container. On any failure everything created so far is undone in
// reverse order, and the error says what to fix.
func (m *Manager) Run(ctx context.Context, o RunOptions) (*Container, error) {
	if o.Name != "" {
		if err := ValidateName(o.Name); err != nil {
			return nil, err
		}
	}
	if err := ValidateEnv(o.Env); err != nil {
		return nil, err
	}
	if o.User != "" {
		if _, _, err := ParseUser(o.User); err != nil {
			return nil, err
		}
	}
	if o.NetworkMode == "" {
		o.NetworkMode = "bridge"
	}
	if o.NetworkMode != "bridge" && o.NetworkMode != "none" {
		return nil, fmt.Errorf("network %q: want bridge or none", o.NetworkMode)
	}
	if o.NetworkMode == "none" && (o.IP.IsValid() || len(o.Ports) > 0) {
		return nil, fmt.Errorf("--ip and -p need a network: drop them or use --network bridge")
	}
	store, err := cowfs.Open(m.p.root)
	if err != nil {
		return nil, fmt.Errorf("open image store: %w", err)
	}
	img, err := store.Resolve(ctx, o.Image)
	if err != nil {
		return nil, err
	}
	id := newID()
	name := o.Name
	if name == "" {
		name = id[:12]
	}
	hostname := o.Hostname
	if hostname == "" {
		hostname = id[:12]
	}
	cgName := "hot/" + id
	var spec *specs.Spec
	if o.Spec != nil {
		spec = o.Spec
		if spec.Root == nil || spec.Linux == nil || spec.Process == nil {
			return nil, errors.New("container config: root, linux and process sections are required")
		}
		spec.Root.Path, spec.Linux.CgroupsPath = m.p.rootfs(id), cgName
	} else {
		spec, err = buildSpec(img.Config.Config, o, specInput{Rootfs: m.p.rootfs(id), Hostname: hostname,
			Cgroup: cgName, Resources: o.Resources})
		if err != nil {
			return nil, err
		}
		if err := isolation.Apply(spec, o.Isolation); err != nil {
			return nil, err
		}
	}
	gen := Generation{N: 1, Image: o.Image, ImageID: img.ID, LowerDirs: img.LayerDirs,
		Upper: filepath.Join(m.p.genDir(id, 1), "upper"), Work: filepath.Join(m.p.genDir(id, 1), "work")}
	st := &State{ID: id, Name: name, Image: o.Image, ImageID: img.ID, Status: StatusCreating,
		Created: time.Now().UTC(), Current: 1, Generations: []Generation{gen}, Rootfs: m.p.rootfs(id),
		Cgroup: cgName, Resources: o.Resources,
		Network: NetworkState{Mode: o.NetworkMode, Bridge: o.Bridge, Subnet: o.Subnet}}

	// Reserve the name: the global lock covers the uniqueness check and the first state write.
	glock, err := lockFile(ctx, m.p.globalLock())
	if err != nil {
		return nil, err
	}
	if other := m.findByName(name); other != nil {
		glock.Unlock()
		return nil, fmt.Errorf("name %q is already used by container %s: choose another --name or remove it with 'hot rm -f %s'", name, other.ID[:12], name)
	}
	if err := os.MkdirAll(m.p.dir(id), 0o700); err != nil {
		glock.Unlock()
		return nil, fmt.Errorf("create container dir: %w", err)
	}
	lk, err := lockFile(ctx, m.p.lock(id))
	if err == nil {
		err = m.p.saveState(st)
	}
	glock.Unlock()
	if err != nil {
		os.RemoveAll(m.p.dir(id))
		return nil, err
	}
	defer lk.Unlock()

	if err := m.create(ctx, st, img, spec, o); err != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if cerr := m.cleanup(cctx, st); cerr != nil {
			m.log.Error("undo failed container creation", "id", id, "err", cerr)
			return nil, fmt.Errorf("%w (cleaning up also failed: %v; retry with 'hot rm -f %s')", err, cerr, name)
		}
		return nil, err
	}
	return m.view(st, true), nil
}

// create does the steps of Run after the state exists; cleanup undoes any prefix of them.
func (m *Manager) create(ctx context.Context, st *State, img *cowfs.Image, spec *specs.Spec, o RunOptions) error {
	id := st.ID
	store, err := cowfs.Open(m.p.root)
	if err != nil {
		return fmt.Errorf("open image store: %w", err)
	}
	if err := store.Hold(ctx, img.ID, id); err != nil {
		return fmt.Errorf("hold image %s for %s: %w", o.Image, id[:12], err)
	}
	gen := st.CurrentGeneration()
	for _, d := range []string{gen.Upper, gen.Work, st.Rootfs} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	if o.PrepareUpper != nil {
		if err := o.PrepareUpper(gen.Upper); err != nil {
			return fmt.Errorf("prepare upper layer of %s: %w", id[:12], err)
		}
	}
	if err := cowfs.MountOverlay(st.Rootfs, gen.LowerDirs, gen.Upper, gen.Work); err != nil {
		return fmt.Errorf("mount root file system of %s: %w", id[:12], err)
	}
	failpoint("run-after-mount")
	if st.Network.Mode == "bridge" {
		n, err := network.New(m.networkConfig(st))
		if err != nil {
			return fmt.Errorf("network: %w", err)
		}
		// A container created without an init (NoStart: import, migration target) stays off
		// the bridge until its processes are restored (restore brings the link up).
		att, err := n.Attach(ctx, id, network.AttachRequest{IP: o.IP, Ports: o.Ports, HostLinkDown: o.NoStart})
		if err != nil {
			return fmt.Errorf("attach %s to network %s: %w", id[:12], st.Network.Bridge, err)
		}
		st.Network.IP, st.Network.Gateway, st.Network.HostVeth = att.IP, att.Gateway, att.HostVeth
		st.Network.NetnsPath, st.Network.Ports = att.NetnsPath, att.Ports
		if att.Prefix.IsValid() {
			st.Network.Subnet = att.Prefix.Masked()
		}
		setNetnsPath(spec, att.NetnsPath)
		failpoint("run-after-network")
	}
	if err := m.p.saveState(st); err != nil {
		return err
	}
	if _, err := cgroups.Create(ctx, st.Cgroup, cgroups.Resources{MemoryBytes: st.Resources.MemoryBytes, PidsMax: st.Resources.PidsMax}); err != nil {
		return fmt.Errorf("create cgroup %s: %w", st.Cgroup, err)
	}
	failpoint("run-after-cgroup")
	if err := writeJSONAtomic(m.p.config(id), spec); err != nil {
		return err
	}
	if err := m.startMonitor(ctx, st, o.NoStart); err != nil {
		return err
	}
	if o.NoStart {
		st.Status = StatusCheckpointed
		return m.p.saveState(st)
	}
	return nil
}

// startMonitor starts `hot __monitor ID` detached (own session, output to monitor.log) and
// waits until it reports the container's entrypoint running, or the error that prevented it.
func (m *Manager) startMonitor(ctx context.Context, st *State, noStart bool) error {
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("locate the hot binary: %w", err)
	}
	monlog, err := os.OpenFile(m.p.monLog(st.ID), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return fmt.Errorf("open monitor log: %w", err)
	}
	defer monlog.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("pipe: %w", err)
	}
	defer r.Close()
	args := []string{"__monitor", "--root", m.p.root, "--run-root", m.p.runRoot, "--log-level", "info", st.ID}
	if noStart {
		args = append(args, "--no-start")
	}
	cmd := exec.Command(self, args...)
	cmd.Stdout, cmd.Stderr = monlog, monlog
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("start monitor: %w", err)
	}
	w.Close()
	st.MonitorPid = cmd.Process.Pid
	st.MonitorStart, _ = procStartTime(st.MonitorPid)
	// The monitor is not our child to wait for: it outlives this command.
	go cmd.Wait()
	if err := m.p.saveState(st); err != nil {
		return err
	}
	failpoint("run-after-monitor-start")
	type readyMsg struct {
		Pid   int    `json:"pid"`
		Error string `json:"error"`
	}
	ch := make(chan readyMsg, 1)
	go func() {
		var msg readyMsg
		line, err := bufio.NewReader(r).ReadBytes('\n')
		if err != nil && len(line) == 0 {
			msg.Error = "monitor exited before starting the container (see " + m.p.monLog(st.ID) + ")"
		} else if jerr := json.Unmarshal(line, &msg); jerr != nil {
			msg.Error = "monitor sent " + strings.TrimSpace(string(line))
		}
		ch <- msg
	}()
	var msg readyMsg
	select {
	case msg = <-ch:
	case <-ctx.Done():
		return fmt.Errorf("start container %s: %w", st.ID[:12], ctx.Err())
	case <-time.After(60 * time.Second):
		return fmt.Errorf("start container %s: monitor did not answer within 60s (see %s)", st.ID[:12], m.p.monLog(st.ID))
	}
	if msg.Error != "" {
		return fmt.Errorf("start container %s: %s", st.ID[:12], msg.Error)
	}
	if noStart {
		return m.p.saveState(st)
	}
	st.Pid = msg.Pid
	st.PidStart, _ = procStartTime(msg.Pid)
	st.Status = StatusRunning
	st.Started = time.Now().UTC()
	return m.p.saveState(st)
}

// findByName returns the container whose name is name, or nil.
func (m *Manager) findByName(name string) *State {
	sts, _ := m.states()
	for _, st := range sts {
		if st.Name == name {
			return st
		}
	}
	return nil
}

func (m *Manager) states() ([]*State, error) {
	ents, err := os.ReadDir(m.p.containersDir())
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("list containers: %w", err)
	}
	var out []*State
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		st, err := m.p.loadState(e.Name())
		if err != nil {
			m.log.Debug("skip container dir without state", "dir", e.Name(), "err", err)
			continue
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, nil
}

// ErrNotFound is returned (wrapped) when no container matches a name or id.
var ErrNotFound = errors.New("no such container")

// find resolves a name, a full id or a unique id prefix.
func (m *Manager) find(ref string) (*State, error) {
	sts, err := m.states()
	if err != nil {
		return nil, err
	}
	var byPrefix []*State
	for _, st := range sts {
		if st.Name == ref || st.ID == ref {
			return st, nil
		}
		if len(ref) >= 4 && strings.HasPrefix(st.ID, ref) {
			byPrefix = append(byPrefix, st)
		}
	}
	switch len(byPrefix) {
	case 1:
		return byPrefix[0], nil
	case 0:
		return nil, fmt.Errorf("%w %q: list containers with 'hot ps -a'", ErrNotFound, ref)
	}
	return nil, fmt.Errorf("id prefix %q matches %d containers: give more of the id", ref, len(byPrefix))
}

// lock finds a container and takes its lock; the state is re-read under the lock.
func (m *Manager) lock(ctx context.Context, ref string) (*State, *fileLock, error) {
	st, err := m.find(ref)
	if err != nil {
		return nil, nil, err
	}
	lk, err := lockFile(ctx, m.p.lock(st.ID))
	if err != nil {
		if _, serr := os.Stat(m.p.state(st.ID)); errors.Is(serr, os.ErrNotExist) {
			return nil, nil, fmt.Errorf("%w %q: it was removed meanwhile", ErrNotFound, ref)
		}
		return nil, nil, fmt.Errorf("container %s is busy: %w", ref, err)
	}
	st, err = m.p.loadState(st.ID)
	if err != nil {
		lk.Unlock()
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil, fmt.Errorf("%w %q: it was removed meanwhile", ErrNotFound, ref)
		}
		return nil, nil, err
	}
	return st, lk, nil
}

// Get returns the reconciled view of one container.
func (m *Manager) Get(ctx context.Context, ref string) (*Container, error) {
	st, err := m.find(ref)
	if err != nil {
		return nil, err
	}
	return m.view(st, false), nil
}

// List returns all containers (all=true) or those not exited (including unknown ones, which
// may still hold processes and host resources).
func (m *Manager) List(ctx context.Context, all bool) ([]*Container, error) {
	sts, err := m.states()
	if err != nil {
		return nil, err
	}
	out := []*Container{}
	for _, st := range sts {
		c := m.view(st, false)
		if all || c.Status != StatusExited {
			out = append(out, c)
		}
	}
	return out, nil
}

// view reconciles the persisted state with the host. locked says whether the caller holds the
// container's lock (then a "creating" state can only be a leftover of an interrupted run).
func (m *Manager) view(st *State, locked bool) *Container {
	c := &Container{State: *st, Status: st.Status, LogPath: m.p.log(st.ID), ConfigPath: m.p.config(st.ID),
		Dir: m.p.dir(st.ID), RunDir: m.p.runDir(st.ID), MonitorSock: m.p.socket(st.ID)}
	if cg, err := cgroups.Load(st.Cgroup); err == nil {
		c.CgroupPaths = cg.Paths()
	}
	ex, err := m.p.loadExit(st.ID)
	if err != nil {
		c.Status, c.Reason = StatusUnknown, err.Error()
		return c
	}
	c.Exit = ex
	monAlive := st.MonitorPid != 0 && procAlive(st.MonitorPid, st.MonitorStart)
	switch {
	case st.Status == StatusCheckpointed:
		// The dump ended the init (exit.json records that); the container lives on in images.
		c.Exit = nil
		if !monAlive {
			c.Reason = fmt.Sprintf("its monitor (pid %d) is gone: 'hot restore' needs it", st.MonitorPid)
		}
	case ex != nil:
		c.Status = StatusExited
	case st.Status == StatusCreating:
		if locked || !isLocked(m.p.lock(st.ID)) {
			c.Status = StatusUnknown
			c.Reason = "'hot run' was interrupted before the container started; remove the leftovers with 'hot rm -f " + st.Name + "'"
		}
	case !monAlive:
		c.Status = StatusUnknown
		if st.Pid != 0 && procAlive(st.Pid, st.PidStart) {
			c.Reason = fmt.Sprintf("its monitor (pid %d) is gone: the container still runs but nothing records its exit; 'hot rm -f %s' cleans up", st.MonitorPid, st.Name)
		} else {
			c.Reason = fmt.Sprintf("its monitor (pid %d) is gone and the container ended without a recorded exit status; 'hot rm -f %s' cleans up", st.MonitorPid, st.Name)
		}
	case st.Pid == 0 || !procAlive(st.Pid, st.PidStart):
		// The monitor lives but the init does not and no exit is recorded yet: either the
		// monitor is about to write it, or the init was restored elsewhere.
		c.Status = StatusUnknown
		c.Reason = fmt.Sprintf("the container's init (pid %d) is gone and its monitor has not recorded an exit status", st.Pid)
	}
	if c.Status == StatusRunning && c.CgroupPaths != nil {
		// Frozen although not paused: a checkpoint or update holds it frozen right now, or
		// was killed while it did. 'hot resume' thaws it (and cleans what CRIU left).
		if cg, err := cgroups.Load(st.Cgroup); err == nil {
			if frozen, err := cg.Frozen(); err == nil && frozen {
				c.Status = StatusPaused
				c.Reason = "frozen, but not by 'hot pause' (a checkpoint or update in progress, or one that was interrupted): 'hot resume " + st.Name + "' thaws it"
			}
		}
		// CRIU thaws the freezer once it holds the tasks with ptrace: still stopped.
		if tracer := ProcTracer(st.Pid); c.Status == StatusRunning && tracer != 0 {
			c.Status = StatusPaused
			c.Reason = fmt.Sprintf("held by process %d (CRIU: a checkpoint or update in progress, or one that was interrupted): 'hot resume %s' waits for it and thaws", tracer, st.Name)
		}
	}
	return c
}

// procStartTime returns the start time (field 22 of /proc/PID/stat, clock ticks since boot).
func procStartTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); field 22 is f[19].
	if len(f) < 20 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	if f[0] == "Z" || f[0] == "X" {
		return 0, fmt.Errorf("process %d is a zombie", pid)
	}
	var v uint64
	_, err = fmt.Sscan(f[19], &v)
	return v, err
}

// procAlive reports whether pid runs and is the process that started at start (0: any).
func procAlive(pid int, start uint64) bool {
	if pid <= 0 {
		return false
	}
	got, err := procStartTime(pid)
	if err != nil {
		return false
	}
	return start == 0 || got == start
}

// failpoint kills the calling process with SIGKILL when $HOT_FAILPOINT names this point. Tests
// use it to interrupt `hot run` at awkward moments and check that `hot ps` and `hot rm -f` cope.
func failpoint(name string) {
	if os.Getenv("HOT_FAILPOINT") == name {
		unix.Kill(os.Getpid(), unix.SIGKILL)
	}
}

// WithLock runs fn with the container's lock held and its state freshly loaded, and saves the
// state if fn returns nil. It is for multi-step operations of other packages (checkpoint,
// update) that must not interleave with other commands on the container. fn must not call
// Manager methods that take the same lock (Stop, Pause, Remove, ...): flock would block.
func (m *Manager) WithLock(ctx context.Context, ref string, fn func(st *State) error) error {
	st, lk, err := m.lock(ctx, ref)
	if err != nil {
		return err
	}
	defer lk.Unlock()
	if err := fn(st); err != nil {
		return err
	}
	return m.p.saveState(st)
}

// StartMonitor starts a new monitor for a container whose monitor is gone, without an init
// (`hot __monitor --no-start`): an op on its socket (e.g. a CRIU restore) then adopts one.
// The caller holds the lock (WithLock) and st is saved with the new monitor pid.
func (m *Manager) StartMonitor(ctx context.Context, st *State) error {
	if st.MonitorPid != 0 && procAlive(st.MonitorPid, st.MonitorStart) {
		return fmt.Errorf("container %s already has a monitor (pid %d)", st.Name, st.MonitorPid)
	}
	return m.startMonitor(ctx, st, true)
}

// CallMonitor sends one request to the container's monitor and returns its answer; an answer
// with Error set is returned as an error too.
func (m *Manager) CallMonitor(ctx context.Context, ref string, req Request) (*Response, error) {
	st, err := m.find(ref)
	if err != nil {
		return nil, err
	}
	return callMonitor(ctx, m.p.socket(st.ID), req)
}

// Reconciled returns the reconciled view of st for a caller that holds the container's lock
// (inside WithLock): Status as the host shows it (e.g. "checkpointed", "unknown").
func (m *Manager) Reconciled(st *State) *Container { return m.view(st, true) }

// Dir is a container's state directory (<root>/containers/<id>).
func (m *Manager) Dir(id string) string { return m.p.dir(id) }

// RunDir is a container's runtime directory (<run-root>/<id>).
func (m *Manager) RunDir(id string) string { return m.p.runDir(id) }

// ProcStartTime returns a process's start time (field 22 of /proc/PID/stat), which State
// records next to each pid to detect pid reuse.
func ProcStartTime(pid int) (uint64, error) { return procStartTime(pid) }

// Save writes st to disk atomically before WithLock would, for multi-step operations that
// must leave a truthful state file at every step (the hot update). The caller holds the lock.
func (m *Manager) Save(st *State) error { return m.p.saveState(st) }

// SaveNoSync is Save without the fsyncs (see WriteJSONAtomicNoSync): for a caller that saves
// inside a container's pause and saves durably once it is over.
func (m *Manager) SaveNoSync(st *State) error { return WriteJSONAtomicNoSync(m.p.state(st.ID), st) }

// ProcTracer returns the pid tracing pid (ptrace; CRIU holding it), or 0.
func ProcTracer(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "TracerPid:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}
