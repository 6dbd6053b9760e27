package restore

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hotctl/hot/cgroups"
	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/network"
	"github.com/hotctl/hot/sockets"
	"golang.org/x/sys/unix"
)

// MonitorOp is the name of the monitor operation that restores a checkpointed container.
const MonitorOp = "restore"

// HelperCommand is the hidden hot subcommand the monitor runs for a restore (see HelperMain).
const HelperCommand = "__restore"

// helperArgs is what the monitor op passes to the helper (JSON on its stdin).
type helperArgs struct {
	CRIU       criubin.Binary `json:"criu"`
	ImagesDir  string         `json:"imagesDir"`
	Root       string         `json:"root"`
	NetnsPath  string         `json:"netnsPath,omitempty"`
	NetnsKey   string         `json:"netnsKey,omitempty"`
	Lazy       bool           `json:"lazy,omitempty"`
	Cgroup     string         `json:"cgroup,omitempty"`
	Failpoint  string         `json:"failpoint,omitempty"`
	PageServer string         `json:"pageServer,omitempty"`
	Early      bool           `json:"early,omitempty"`
	Replace    int            `json:"replace,omitempty"`
	// Staged: the helper starts CRIU and answers {"ready":true}, then waits for the lines
	// "images" (join the cgroup, start the lazy-pages daemon) and "go" (restore) on stdin.
	Staged bool `json:"staged,omitempty"`
	// Step is the monitor op's step for a staged restore: stage, images, go or cancel.
	Step      string                    `json:"step,omitempty"`
	Externals []checkpoint.ExternalFile `json:"externals,omitempty"`
	// RemoveImages: the images are the default directory's, only for this restore: the
	// monitor removes them in the background once an eager restore is done (freeing a large
	// tmpfs takes ~0.15 s per GB, which the restoring command need not wait for).
	RemoveImages bool `json:"removeImages,omitempty"`
}

// helperResult is what the helper writes to fd 3.
type helperResult struct {
	Ready  bool    `json:"ready,omitempty"` // a staged helper is waiting for "go"
	Result *Result `json:"result,omitempty"`
	Error  string  `json:"error,omitempty"`
}

// ContainerOptions configure Container.
type ContainerOptions struct {
	CRIU      criubin.Binary
	Lazy      bool
	Failpoint string // tests only: FailAfterRestore
	// PageServer pulls the pages from a remote page server (with Lazy; see Options.PageServer).
	PageServer string
	// ReturnWhenRunning, with Lazy, returns as soon as the tree runs (Result.MemoryPending):
	// memory keeps coming in from the images in the background, so the caller must keep the
	// images until WaitMemoryIn returns. Checkpoints in the default directory (removed after
	// the restore) are waited for anyway.
	ReturnWhenRunning bool
	// Replace restores a copy of a tree whose original still runs with this init pid (frozen
	// under a lazy dump that serves its pages, its sockets sidelined): the container must be
	// running with that init, and the restored init replaces it at the monitor
	// (container.Monitor.ReplaceInit).
	Replace int
	Logger  *slog.Logger
}

// MemoryInFile is written into the images directory by a restore that returned early
// (ContainerOptions.ReturnWhenRunning) once all memory is in, or the copy failed.
const MemoryInFile = "memory-in.json"

// memoryIn is the content of MemoryInFile.
type memoryIn struct {
	MemoryIn time.Duration `json:"memoryInNs"`
	Error    string        `json:"error,omitempty"`
}

// WaitMemoryIn waits until the lazy restore from imagesDir that returned early has copied all
// memory into the restored tree, and returns the time that took from the restore's start.
func WaitMemoryIn(ctx context.Context, imagesDir string, timeout time.Duration) (time.Duration, error) {
	deadline := time.Now().Add(timeout)
	path := filepath.Join(imagesDir, MemoryInFile)
	for {
		b, err := os.ReadFile(path)
		if err == nil {
			var m memoryIn
			if err := json.Unmarshal(b, &m); err != nil {
				return 0, fmt.Errorf("lazy restore: read %s: %w", path, err)
			}
			if m.Error != "" {
				return m.MemoryIn, fmt.Errorf("lazy restore: copying memory into the restored tree failed: %s", m.Error)
			}
			return m.MemoryIn, nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("lazy restore: memory not all in after %s (no %s; log: %s)", timeout, path, filepath.Join(imagesDir, LazyPagesLog))
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// ContainerResult is what Container did.
type ContainerResult struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	Result
}

// ErrNotCheckpointed is matched by the error for a container that has nothing to restore
// (e.g. it is running).
var ErrNotCheckpointed = errors.New("container not checkpointed")

// Container restores a checkpointed container of mgr in place: its monitor runs the restore
// (HelperMain in a child process), so the restored tree becomes the monitor's child, in the
// container's kept network namespace (same IP, TCP connections resumed), root file system
// and cgroup. A failed restore leaves the container checkpointed and its images in place, so
// it can be retried.
func Container(ctx context.Context, mgr *container.Manager, ref string, o ContainerOptions) (*ContainerResult, error) {
	var res *ContainerResult
	err := mgr.WithLock(ctx, ref, func(st *container.State) error {
		var err error
		res, err = ContainerLocked(ctx, mgr, st, o)
		return err
	})
	return res, err
}

// ContainerLocked is Container for a caller that holds the container's lock
// (container.Manager.WithLock) and saves st afterwards, e.g. the hot update.
func ContainerLocked(ctx context.Context, mgr *container.Manager, st *container.State, o ContainerOptions) (*ContainerResult, error) {
	var res *ContainerResult
	restored := false
	err := func() error {
		c := mgr.Reconciled(st)
		switch {
		case o.Replace != 0:
			// Paused: the originals are held by CRIU (ptrace), as expected.
			if (c.Status != container.StatusRunning && c.Status != container.StatusPaused) || c.Pid != o.Replace {
				return fmt.Errorf("restore %s: %w: a restore replacing init %d needs it running, but the container is %s with init %d", c.Name, ErrNotCheckpointed, o.Replace, c.Status, c.Pid)
			}
		case c.Status == container.StatusCheckpointed:
		case c.Status == container.StatusRunning, c.Status == container.StatusPaused:
			return fmt.Errorf("restore %s: %w: it is %s, and restoring would run it twice; checkpoint it first ('hot checkpoint %s')", c.Name, ErrNotCheckpointed, c.Status, c.Name)
		default:
			return fmt.Errorf("restore %s: %w: it is %s", c.Name, ErrNotCheckpointed, c.Status)
		}
		if c.Reason != "" && o.Replace == 0 { // the monitor is gone (e.g. killed): start a new one without an init
			if err := mgr.StartMonitor(ctx, st); err != nil {
				return fmt.Errorf("restore %s: %w", c.Name, err)
			}
		}
		// Until CRIU has restored the sockets, a client packet reaching the namespace meets
		// no socket (a namespace made by import) or CRIU's dropping lock: hold them instead,
		// unless the caller (update, migration) holds them already.
		if c.Network.NetnsPath != "" {
			if rules, err := sockets.HoldRules(ctx, c.Network.NetnsPath); err == nil && len(rules) == 0 {
				h, err := sockets.NewHolder(ctx, c.Network.NetnsPath, sockets.HoldOptions{StartHolding: true, Logger: o.Logger})
				if err != nil {
					if o.Logger != nil {
						o.Logger.Warn("restore without holding packets", "error", err)
					}
				} else {
					defer func() {
						if restored {
							h.Release() // in order, to the restored sockets
						}
						h.Close() // after a failed restore the held packets are dropped: clients retransmit
					}()
				}
			}
		}
		if c.Network.HostVeth != "" && o.Replace == 0 {
			// A migration takes the container off the bridge after its dump (the target
			// claims the address), and an import creates it off the bridge; a restore here,
			// e.g. after `hot migrate` was killed, puts it back.
			if err := network.SetHostLink(c.Network.HostVeth, true); err != nil {
				return fmt.Errorf("restore %s: %w", c.Name, err)
			}
		}
		rec, err := checkpoint.LoadRecord(mgr.Dir(c.ID))
		if err != nil {
			return fmt.Errorf("restore %s: no checkpoint record: %w", c.Name, err)
		}
		if _, err := os.Stat(filepath.Join(rec.ImagesDir, "inventory.img")); err != nil {
			return fmt.Errorf("restore %s: checkpoint images missing in %s: %w", c.Name, rec.ImagesDir, err)
		}
		args := helperArgs{CRIU: o.CRIU, ImagesDir: rec.ImagesDir, Root: c.Rootfs, Lazy: o.Lazy, Externals: rec.Externals,
			Cgroup: c.Cgroup, Failpoint: o.Failpoint, PageServer: o.PageServer, Early: o.Lazy && o.ReturnWhenRunning, Replace: o.Replace,
			RemoveImages: rec.DefaultDir}
		os.Remove(filepath.Join(rec.ImagesDir, MemoryInFile))
		if c.Network.NetnsPath != "" && rec.NetnsKey != "" {
			args.NetnsPath, args.NetnsKey = c.Network.NetnsPath, rec.NetnsKey
		}
		r, err := callRestoreOp(ctx, mgr, c.ID, c.Name, args)
		if err != nil {
			return err
		}
		if err := adoptResult(ctx, st, c.Name, rec, r, o.Logger); err != nil {
			return err
		}
		res, restored = &ContainerResult{ID: c.ID, Name: c.Name, Result: *r}, true
		return nil
	}()
	return res, err
}

// callRestoreOp sends args to the container's monitor and returns the restore's result.
func callRestoreOp(ctx context.Context, mgr *container.Manager, id, name string, args helperArgs) (*Result, error) {
	raw, err := json.Marshal(args)
	if err != nil {
		return nil, err
	}
	resp, err := mgr.CallMonitor(ctx, id, container.Request{Op: MonitorOp, Args: raw})
	if err != nil {
		return nil, fmt.Errorf("restore %s: %w", name, err)
	}
	if args.Step == stepStage || args.Step == stepImages || args.Step == stepCancel {
		return nil, nil
	}
	var r Result
	if err := json.Unmarshal(resp.Data, &r); err != nil {
		return nil, fmt.Errorf("restore %s: read monitor answer: %w", name, err)
	}
	return &r, nil
}

// adoptResult records a finished restore in st (and frees default-dir images once all memory
// is in).
func adoptResult(ctx context.Context, st *container.State, name string, rec *checkpoint.Record, r *Result, log *slog.Logger) error {
	start, err := container.ProcStartTime(r.PID)
	if err != nil {
		return fmt.Errorf("restore %s: restored init %d: %w", name, r.PID, err)
	}
	st.Status, st.Pid, st.PidStart = container.StatusRunning, r.PID, start
	if rec.DefaultDir && r.MemoryPending {
		if _, err := WaitMemoryIn(ctx, rec.ImagesDir, 10*time.Minute); err != nil {
			return fmt.Errorf("restore %s: %w", name, err)
		}
		// The images held the container's memory (on tmpfs): free it. (After an eager
		// restore the monitor does, helperArgs.RemoveImages.)
		if err := os.RemoveAll(rec.ImagesDir); err != nil && log != nil {
			log.Warn("remove checkpoint images", "dir", rec.ImagesDir, "error", err)
		}
	}
	return nil
}

// Steps of a staged restore (helperArgs.Step).
const (
	stepStage  = "stage"
	stepImages = "images"
	stepGo     = "go"
	stepCancel = "cancel"
)

// StagedContainer is a restore of a copy of a running container's tree (ContainerOptions
// .Replace) whose helper and CRIU were started before the dump ended, so that the restore
// starts at once when told to (a post-copy update stages it as the dump begins).
type StagedContainer struct {
	mgr  *container.Manager
	id   string
	name string
	args helperArgs
	rec  *checkpoint.Record
	o    ContainerOptions
	done bool
}

// StageLocked starts the restore helper of the container st (a copy of its state is fine:
// only its identity, root, cgroup and network are read) for a restore with o, which must
// set Replace. The checkpoint record must exist (checkpoint writes it before CRIU starts);
// the images need not. Cancel it unless Go is called.
func StageLocked(ctx context.Context, mgr *container.Manager, st container.State, o ContainerOptions) (*StagedContainer, error) {
	if o.Replace == 0 {
		return nil, errors.New("restore: a staged restore replaces a running init (ContainerOptions.Replace)")
	}
	rec, err := checkpoint.LoadRecord(mgr.Dir(st.ID))
	if err != nil {
		return nil, fmt.Errorf("restore %s: no checkpoint record: %w", st.Name, err)
	}
	args := helperArgs{CRIU: o.CRIU, ImagesDir: rec.ImagesDir, Root: st.Rootfs, Lazy: o.Lazy, Externals: rec.Externals,
		Cgroup: st.Cgroup, Failpoint: o.Failpoint, PageServer: o.PageServer, Early: o.Lazy && o.ReturnWhenRunning,
		Replace: o.Replace, Staged: true, Step: stepStage}
	if st.Network.NetnsPath != "" && rec.NetnsKey != "" {
		args.NetnsPath, args.NetnsKey = st.Network.NetnsPath, rec.NetnsKey
	}
	if _, err := callRestoreOp(ctx, mgr, st.ID, st.Name, args); err != nil {
		return nil, err
	}
	return &StagedContainer{mgr: mgr, id: st.ID, name: st.Name, args: args, rec: rec, o: o}, nil
}

// ImagesReady tells the helper the images are written and the container's cgroup is thawed:
// it joins the cgroup and starts the lazy-pages daemon.
func (s *StagedContainer) ImagesReady(ctx context.Context) error {
	a := s.args
	a.Step = stepImages
	_, err := callRestoreOp(ctx, s.mgr, s.id, s.name, a)
	return err
}

// Go restores, with st the caller's (locked) state of the container, which records the
// restored init.
func (s *StagedContainer) Go(ctx context.Context, st *container.State) (*ContainerResult, error) {
	s.done = true
	a := s.args
	a.Step = stepGo
	os.Remove(filepath.Join(s.rec.ImagesDir, MemoryInFile))
	r, err := callRestoreOp(ctx, s.mgr, s.id, s.name, a)
	if err != nil {
		return nil, err
	}
	if err := adoptResult(ctx, st, s.name, s.rec, r, s.o.Logger); err != nil {
		return nil, err
	}
	return &ContainerResult{ID: s.id, Name: s.name, Result: *r}, nil
}

// CancelStaged ends a staged restore left at the monitor of container id by a process that
// died (no staged restore is not an error).
func CancelStaged(ctx context.Context, mgr *container.Manager, id string) error {
	raw, _ := json.Marshal(helperArgs{Step: stepCancel})
	_, err := mgr.CallMonitor(ctx, id, container.Request{Op: MonitorOp, Args: raw})
	if err != nil && strings.Contains(err.Error(), "no staged restore") {
		return nil
	}
	return err
}

// Cancel ends a staged restore that will not run (nothing was restored).
func (s *StagedContainer) Cancel(ctx context.Context) {
	if s.done {
		return
	}
	s.done = true
	a := s.args
	a.Step = stepCancel
	callRestoreOp(ctx, s.mgr, s.id, s.name, a)
}

// NewMonitorOp returns the monitor operation MonitorOp: it runs `hot __restore` as the
// monitor's child (the monitor reaps every child itself, so CRIU cannot run inside the
// monitor process), reads its result and adopts the restored init. The restored tree is the
// helper's child until the helper exits, then falls to the monitor, its subreaper. A staged
// restore (helperArgs.Staged) takes several calls: stage, images, go (or cancel).
func NewMonitorOp() container.OpFunc {
	op := &restoreOp{}
	return op.handle
}

// restoreOp is the monitor's restore operation; it keeps a staged helper between calls.
type restoreOp struct {
	mu     sync.Mutex
	staged *helperProc
}

// helperProc is a running restore helper.
type helperProc struct {
	args   helperArgs
	in     *os.File      // its stdin
	out    *bufio.Reader // its fd 3
	outF   *os.File
	exited <-chan container.ExitStatus
}

func fail(format string, a ...any) container.Response {
	return container.Response{Error: fmt.Sprintf(format, a...)}
}

func (op *restoreOp) handle(ctx context.Context, m *container.Monitor, req container.Request) container.Response {
	var a helperArgs
	if err := json.Unmarshal(req.Args, &a); err != nil {
		return fail("restore: bad arguments: %v", err)
	}
	op.mu.Lock()
	defer op.mu.Unlock()
	switch a.Step {
	case stepImages, stepGo, stepCancel:
		h := op.staged
		if h == nil {
			return fail("restore: no staged restore to %s", a.Step)
		}
		switch a.Step {
		case stepImages:
			if _, err := h.in.Write([]byte(stepImages + "\n")); err != nil {
				return fail("restore: tell the staged helper: %v", err)
			}
			return container.Response{}
		case stepCancel:
			op.staged = nil
			h.in.Close()
			h.outF.Close()
			select {
			case <-h.exited:
			case <-time.After(10 * time.Second):
			}
			return container.Response{}
		}
		op.staged = nil
		if st := m.Status(); st.Running && (h.args.Replace == 0 || st.Pid != h.args.Replace) {
			h.in.Close()
			return fail("container is running (pid %d): refusing to restore over it", st.Pid)
		}
		h.in.Write([]byte(stepGo + "\n"))
		h.in.Close()
		return h.finish(m)
	}
	if op.staged != nil {
		return fail("restore: a staged restore is pending")
	}
	if st := m.Status(); st.Running && (a.Replace == 0 || st.Pid != a.Replace) {
		return fail("container is running (pid %d): refusing to restore over it", st.Pid)
	}
	h, err := startHelper(m, a)
	if err != nil {
		return fail("%v", err)
	}
	if !a.Staged {
		h.in.Close()
		return h.finish(m)
	}
	line, err := h.out.ReadBytes('\n')
	var hr helperResult
	if err == nil {
		err = json.Unmarshal(line, &hr)
	}
	if err != nil || !hr.Ready {
		h.in.Close()
		h.outF.Close()
		ex := <-h.exited
		if hr.Error != "" {
			return fail("%s", hr.Error)
		}
		return fail("restore helper exited with code %d before it was ready", ex.Code)
	}
	op.staged = h
	return container.Response{}
}

// startHelper starts `hot __restore` with a's arguments on its stdin (left open).
func startHelper(m *container.Monitor, a helperArgs) (*helperProc, error) {
	argsR, argsW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	resR, resW, err := os.Pipe()
	if err != nil {
		argsR.Close()
		argsW.Close()
		return nil, err
	}
	// The container's stdout/stderr: a new pipe into the log, handed to CRIU for the old one.
	output, err := m.NewOutputPipe()
	if err != nil {
		argsR.Close()
		argsW.Close()
		resR.Close()
		resW.Close()
		return nil, err
	}
	_, exited, err := m.StartProcess("/proc/self/exe", []string{"hot", HelperCommand}, &os.ProcAttr{
		Files: []*os.File{argsR, os.Stderr, os.Stderr, resW, output},
	})
	argsR.Close()
	resW.Close()
	output.Close()
	if err != nil {
		argsW.Close()
		resR.Close()
		return nil, fmt.Errorf("start restore helper: %w", err)
	}
	raw, _ := json.Marshal(a)
	argsW.Write(append(raw, '\n'))
	return &helperProc{args: a, in: argsW, out: bufio.NewReader(resR), outF: resR, exited: exited}, nil
}

// finish reads the helper's result and adopts the restored init.
func (h *helperProc) finish(m *container.Monitor) container.Response {
	out, _ := io.ReadAll(h.out)
	h.outF.Close()
	var hr helperResult
	if err := json.Unmarshal(out, &hr); err != nil {
		ex := <-h.exited
		return fail("restore helper exited with code %d without a result", ex.Code)
	}
	if hr.Result == nil || !hr.Result.MemoryPending {
		<-h.exited
	} // else the helper stays until the memory is in (its exit is reaped by the monitor)
	if hr.Error != "" {
		return container.Response{Error: hr.Error}
	}
	if h.args.RemoveImages && !hr.Result.MemoryPending {
		go os.RemoveAll(h.args.ImagesDir)
	}
	adopt := func() error { return m.AdoptInit(hr.Result.PID) }
	if h.args.Replace != 0 {
		adopt = func() error { return m.ReplaceInit(h.args.Replace, hr.Result.PID) }
	}
	if err := adopt(); err != nil {
		return container.Response{Error: err.Error()}
	}
	data, _ := json.Marshal(hr.Result)
	st := m.Status()
	return container.Response{Status: &st, Data: data}
}

// HelperMain is `hot __restore`: it reads the restore arguments (one JSON line) from stdin,
// restores, and writes the result as JSON to fd 3. Fd 4 is the write end of the monitor's new
// output pipe.
//
// With helperArgs.Early (a lazy restore that returns when running) the result goes to fd 3 as
// soon as the tree runs, and fd 3 is closed; the helper stays until all memory is in and then
// writes MemoryInFile into the images directory. With helperArgs.Staged it first starts CRIU,
// answers {"ready":true} and waits for "images" and "go" lines.
func HelperMain(ctx context.Context) error {
	out := os.NewFile(3, "result")
	if out == nil {
		return errors.New("restore helper: no result descriptor (fd 3)")
	}
	// CRIU and the lazy-pages daemon must not inherit it: the monitor reads to end of file.
	unix.CloseOnExec(3)
	in := bufio.NewReader(os.Stdin)
	var a helperArgs
	line, err := in.ReadBytes('\n')
	if err == nil || (errors.Is(err, io.EOF) && len(line) > 0) {
		err = json.Unmarshal(line, &a)
	}
	if err != nil {
		err = fmt.Errorf("restore helper: read arguments: %w", err)
		json.NewEncoder(out).Encode(helperResult{Error: err.Error()})
		out.Close()
		return err
	}
	sent := false
	send := func(r *Result, err error) error {
		if sent {
			return nil
		}
		sent = true
		defer out.Close()
		hr := helperResult{Result: r}
		if err != nil {
			hr.Error = err.Error()
		}
		return json.NewEncoder(out).Encode(hr)
	}
	var onRunning func(*Result)
	if a.Early && a.Lazy {
		onRunning = func(r *Result) { send(r, nil) }
	}
	r, err := helperMain(ctx, a, in, out, onRunning)
	if onRunning != nil && sent {
		m := memoryIn{}
		if r != nil {
			m.MemoryIn = r.MemoryIn
		}
		if err != nil {
			m.Error = err.Error()
		}
		if werr := container.WriteJSONAtomic(filepath.Join(a.ImagesDir, MemoryInFile), m); werr != nil {
			err = errors.Join(err, werr)
		}
		return err
	}
	if werr := send(r, err); werr != nil {
		return errors.Join(err, werr)
	}
	return err
}

func helperMain(ctx context.Context, a helperArgs, in *bufio.Reader, out *os.File, onRunning func(*Result)) (*Result, error) {
	inherit := map[string]*os.File{}
	output := os.NewFile(4, "output")
	if output != nil {
		defer output.Close()
	}
	for _, x := range a.Externals {
		if x.Kind == checkpoint.ExternalOutputPipe {
			if output == nil {
				return nil, errors.New("restore helper: no output pipe (fd 4)")
			}
			inherit[x.Key] = output
			continue
		}
		f, err := os.OpenFile(x.Path, x.Flags, 0)
		if err != nil {
			return nil, fmt.Errorf("restore: reopen %s (held open by the container, outside its root): %w", x.Path, err)
		}
		defer f.Close()
		inherit[x.Key] = f
	}
	opts := Options{CRIU: a.CRIU, ImagesDir: a.ImagesDir, Root: a.Root, Lazy: a.Lazy, InheritFds: inherit, Failpoint: a.Failpoint, PageServer: a.PageServer, OnRunning: onRunning}
	var cg *cgroups.Cgroup
	if a.Cgroup != "" {
		// CRIU and the tree it restores inherit the helper's cgroups: the container's.
		var err error
		if cg, err = cgroups.Load(a.Cgroup); err != nil {
			return nil, fmt.Errorf("restore: %w", err)
		}
		opts.CallerCgroups = true
	}
	if a.NetnsPath != "" {
		opts.Netns = &checkpoint.ExternalNetns{Path: a.NetnsPath, Key: a.NetnsKey}
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	if !a.Staged {
		if cg != nil {
			if err := cg.AddProc(os.Getpid()); err != nil {
				return nil, fmt.Errorf("restore: join cgroup %s: %w", a.Cgroup, err)
			}
		}
		return Restore(ctx, opts)
	}
	// Staged: CRIU starts now, outside the container's cgroup (the dump is freezing it);
	// both join it at "go", before the restore.
	st, err := Stage(opts)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	criuPid := st.CRIUPid()
	if err := json.NewEncoder(out).Encode(helperResult{Ready: true}); err != nil {
		return nil, fmt.Errorf("restore helper: report ready: %w", err)
	}
	joined := false
	join := func() error {
		if cg == nil || joined {
			return nil
		}
		joined = true
		for _, p := range []int{os.Getpid(), criuPid} {
			if p == 0 {
				continue
			}
			if err := cg.AddProc(p); err != nil {
				return fmt.Errorf("restore: join cgroup %s: %w", a.Cgroup, err)
			}
		}
		return nil
	}
	var readyErr error
	for {
		line, err := in.ReadString('\n')
		switch strings.TrimSpace(line) {
		case stepImages:
			// The dump is done and the cgroup thawed: join it now (and start the lazy-pages
			// daemon in it), so that only the restore itself remains for "go".
			if readyErr = join(); readyErr == nil {
				readyErr = st.StartLazy(ctx)
			}
			continue
		case stepGo:
		default:
			return nil, fmt.Errorf("restore helper: cancelled (%v)", err)
		}
		break
	}
	if readyErr != nil {
		return nil, readyErr
	}
	if err := join(); err != nil {
		return nil, err
	}
	return st.Run(ctx)
}
