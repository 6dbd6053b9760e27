package restore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	criu "github.com/checkpoint-restore/go-criu/v8"
	"github.com/checkpoint-restore/go-criu/v8/crit"
	"github.com/checkpoint-restore/go-criu/v8/rpc"
	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/criubin"
)

// LazyPagesLog is the log of the lazy-pages daemon, next to restore.log.
const LazyPagesLog = "lazy-pages.log"

// Options describe one restore.
type Options struct {
	CRIU      criubin.Binary
	ImagesDir string // a directory written by checkpoint.Dump
	// Root is where the container's root filesystem is mounted; required when the dumped
	// tree had its own mount namespace.
	Root  string
	Netns *checkpoint.ExternalNetns // the namespace the dump recorded as external
	// Lazy restores memory on demand through userfaultfd (post-copy from local images).
	Lazy bool
	// OnRunning, with Lazy, is called as soon as the tree runs, while its memory is still
	// being copied in (Restore returns only once it is all in).
	OnRunning func(*Result)
	// CallerCgroups restores the tree into the caller's cgroups (CRIU
	// --manage-cgroups=ignore) instead of those recorded at dump time. The container restore
	// moves its helper into the container's cgroup first: a container recreated from an
	// archive has a new cgroup, and CRIU recreating the old one would bring back its frozen
	// state and fail on controllers the container has no group in (cpuset).
	CallerCgroups bool
	// Failpoint (tests only): FailAfterRestore makes CRIU fail once the tree is restored but
	// before it resumes (its post-restore notification answers an error; CRIU kills the tree).
	Failpoint string
	// PageServer (host:port), with Lazy, makes the lazy-pages daemon pull the pages from a
	// CRIU page server there (a `criu dump --lazy-pages` on another host) instead of reading
	// them from ImagesDir: post-copy migration.
	PageServer string
	// InheritFds passes further files to CRIU (key → file), e.g. the container's stdio.
	InheritFds map[string]*os.File
	Logger     *slog.Logger
}

// Result describes a finished restore.
type Result struct {
	PID int `json:"pid"` // host PID of the restored root process, a child of the caller
	// Running is the time from the start of the restore until the tree runs again.
	Running time.Duration `json:"runningNs"`
	// MemoryIn is the time until all memory was in place (equal to Running unless Lazy).
	MemoryIn time.Duration `json:"memoryInNs"`
	// MemoryPending is set in a result handed out while memory is still being copied in
	// (Options.OnRunning): the images must stay until WaitMemoryIn returns.
	MemoryPending bool   `json:"memoryPending,omitempty"`
	LogPath       string `json:"logPath"`
	Stats         Stats  `json:"stats"`
}

// Stats are CRIU's restore numbers (stats-restore image).
type Stats struct {
	PagesCompared  uint64        `json:"pagesCompared"`
	PagesSkipedCOW uint64        `json:"pagesSkippedCow"`
	PagesRestored  uint64        `json:"pagesRestored"`
	Forking        time.Duration `json:"forkingNs"`
	Restore        time.Duration `json:"restoreNs"`
}

// Restore restores the tree in opts.ImagesDir. The images are left in place (a failed
// restore can be retried; the caller removes them after success).
func Restore(ctx context.Context, opts Options) (*Result, error) {
	// Before the clock starts: where /run is not a tmpfs CRIU keeps no kernel-feature cache
	// itself, and both CRIU calls (restore, lazy-pages) would probe the kernel (~40 ms each).
	// A failure is logged and only costs that time.
	_ = opts.CRIU.EnsureKdatCache(ctx, opts.Logger)
	t0 := time.Now()
	s, err := Stage(opts)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	s.clockFrom = t0 // CRIU's start-up is part of this restore's time
	return s.Run(ctx)
}

// Staged is a restore whose CRIU (swrk) already runs, waiting for the request: what can be
// done before the images exist is done, so the restore itself starts at once (a post-copy
// update stages its restore while the dump runs).
type Staged struct {
	opts  Options
	c     *criu.Criu
	files []*os.File
	lazy  *lazyDaemon
	log   *slog.Logger
	// clockFrom is when the restore's time (Result.Running) starts; zero: when Run starts.
	clockFrom time.Time
}

// Stage starts CRIU for a restore with opts; the images need not exist yet. Close it.
func Stage(opts Options) (*Staged, error) {
	s := &Staged{opts: opts, log: opts.Logger}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.c = criu.MakeCriu()
	s.c.SetCriuPath(opts.CRIU.Path)
	if opts.Netns != nil {
		netns, err := os.Open(opts.Netns.Path)
		if err != nil {
			return nil, fmt.Errorf("restore: open network namespace %s: %w", opts.Netns.Path, err)
		}
		s.files = append(s.files, netns)
		key := opts.Netns.Key
		if key == "" {
			key = checkpoint.DefaultNetnsKey
		}
		s.c.AddInheritFd(key, netns)
	}
	for k, f := range opts.InheritFds {
		s.c.AddInheritFd(k, f)
	}
	if err := s.c.Prepare(); err != nil {
		s.Close()
		return nil, fmt.Errorf("restore: start criu swrk: %w", err)
	}
	return s, nil
}

// CRIUPid is the pid of the staged CRIU (to move it into a cgroup before Run).
func (s *Staged) CRIUPid() int {
	for _, p := range childPids() {
		return p
	}
	return 0
}

// StartLazy starts the lazy-pages daemon (Options.Lazy) once the images exist; Run does it
// if it was not done before.
func (s *Staged) StartLazy(ctx context.Context) error {
	if !s.opts.Lazy || s.lazy != nil {
		return nil
	}
	if _, err := os.Stat(filepath.Join(s.opts.ImagesDir, "inventory.img")); err != nil {
		return fmt.Errorf("restore: %s holds no checkpoint (no inventory.img): %w", s.opts.ImagesDir, err)
	}
	os.Remove(filepath.Join(s.opts.ImagesDir, LazyPagesLog))
	_ = s.opts.CRIU.EnsureKdatCache(ctx, s.log)
	d, err := startLazyPages(ctx, s.opts.CRIU, s.opts.ImagesDir, s.opts.PageServer)
	if err != nil {
		return err
	}
	s.lazy = d
	return nil
}

// Run restores the tree.
func (s *Staged) Run(ctx context.Context) (*Result, error) {
	opts := s.opts
	if _, err := os.Stat(filepath.Join(opts.ImagesDir, "inventory.img")); err != nil {
		return nil, fmt.Errorf("restore: %s holds no checkpoint (no inventory.img): %w", opts.ImagesDir, err)
	}
	// A restore writes restore.log and stats-restore into the images directory; remove the
	// leftovers of an earlier attempt so that a retry reports its own numbers.
	for _, f := range []string{checkpoint.RestoreLog, crit.StatsRestore} {
		os.Remove(filepath.Join(opts.ImagesDir, f))
	}
	dir, err := os.Open(opts.ImagesDir)
	if err != nil {
		return nil, fmt.Errorf("restore: open images dir: %w", err)
	}
	defer dir.Close()
	copts := &rpc.CriuOpts{
		ImagesDirFd:    ptr(int32(dir.Fd())),
		LogFile:        ptr(checkpoint.RestoreLog),
		LogLevel:       ptr[int32](4),
		TcpEstablished: ptr(true),
		RstSibling:     ptr(true),
		FileLocks:      ptr(true),
		ManageCgroups:  ptr(true),
		LazyPages:      ptr(opts.Lazy),
	}
	if opts.Root != "" {
		copts.Root = ptr(opts.Root)
	}
	if opts.CallerCgroups {
		copts.ManageCgroups = ptr(false)
		copts.ManageCgroupsMode = rpc.CriuCgMode_IGNORE.Enum()
	}

	start := time.Now()
	if !s.clockFrom.IsZero() {
		start = s.clockFrom
	}
	if err := s.StartLazy(ctx); err != nil {
		return nil, err
	}
	nfy := &restoreNotify{failpoint: opts.Failpoint}
	logPath := filepath.Join(opts.ImagesDir, checkpoint.RestoreLog)
	if err := s.c.Restore(copts, nfy); err != nil {
		return nil, checkpoint.NewCRIUError("restore", logPath, err)
	}
	res := &Result{PID: int(nfy.pid), Running: time.Since(start), LogPath: logPath}
	res.MemoryIn = res.Running
	if res.PID == 0 {
		return res, fmt.Errorf("restore: CRIU did not report the restored PID (log: %s)", logPath)
	}
	if s.lazy != nil {
		if opts.OnRunning != nil {
			early := *res
			early.MemoryPending = true
			opts.OnRunning(&early)
		}
		// The daemon exits once every page has been copied into the restored tree.
		if err := s.lazy.wait(ctx); err != nil {
			return res, checkpoint.NewCRIUError("lazy-pages", filepath.Join(opts.ImagesDir, LazyPagesLog), err)
		}
		res.MemoryIn = time.Since(start)
	}
	if st, err := crit.GetRestoreStats(opts.ImagesDir); err == nil {
		res.Stats = Stats{
			PagesCompared:  st.GetPagesCompared(),
			PagesSkipedCOW: st.GetPagesSkippedCow(),
			PagesRestored:  st.GetPagesRestored(),
			Forking:        time.Duration(st.GetForkingTime()) * time.Microsecond,
			Restore:        time.Duration(st.GetRestoreTime()) * time.Microsecond,
		}
	} else {
		s.log.Warn("read restore stats", "dir", opts.ImagesDir, "error", err)
	}
	return res, nil
}

// Close stops what Stage and Run started (the lazy-pages daemon if still running, CRIU).
func (s *Staged) Close() {
	if s.lazy != nil {
		s.lazy.stop()
	}
	if s.c != nil {
		s.c.Cleanup()
	}
	for _, f := range s.files {
		f.Close()
	}
}

// childPids lists this process's children.
func childPids() []int {
	var out []int
	tasks, _ := os.ReadDir("/proc/self/task")
	for _, t := range tasks {
		b, err := os.ReadFile(filepath.Join("/proc/self/task", t.Name(), "children"))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if p, err := strconv.Atoi(f); err == nil {
				out = append(out, p)
			}
		}
	}
	return out
}

type restoreNotify struct {
	criu.NoNotify
	pid       int32
	failpoint string
}

// FailAfterRestore is the restore failpoint (see Options.Failpoint).
const FailAfterRestore = "post-restore"

func (n *restoreNotify) PostRestore(pid int32) error {
	if n.failpoint == FailAfterRestore {
		return errors.New("failpoint " + FailAfterRestore)
	}
	n.pid = pid
	return nil
}

// lazyDaemon is a running `criu lazy-pages`.
type lazyDaemon struct {
	cmd    *exec.Cmd
	exited chan error // receives Wait's result once
	err    error
	done   bool
}

func (d *lazyDaemon) wait(ctx context.Context) error {
	if d.done {
		return d.err
	}
	select {
	case d.err = <-d.exited:
		d.done = true
		return d.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (d *lazyDaemon) stop() {
	if !d.done {
		d.cmd.Process.Kill()
		d.err = <-d.exited
		d.done = true
	}
}

// startLazyPages starts `criu lazy-pages` on the images and waits until its socket exists.
// Restore has made sure of CRIU's kernel-feature cache (criubin.Binary.EnsureKdatCache) before.
func startLazyPages(ctx context.Context, b criubin.Binary, imagesDir, pageServer string) (*lazyDaemon, error) {
	args := []string{"lazy-pages", "--images-dir", imagesDir, "--work-dir", imagesDir, "--log-file", LazyPagesLog, "-v4"}
	if pageServer != "" {
		host, port, err := net.SplitHostPort(pageServer)
		if err != nil {
			return nil, fmt.Errorf("restore: page server %q: %w", pageServer, err)
		}
		args = append(args, "--page-server", "--address", host, "--port", port)
	}
	cmd := exec.Command(b.Path, args...)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("restore: start criu lazy-pages: %w", err)
	}
	d := &lazyDaemon{cmd: cmd, exited: make(chan error, 1)}
	go func() { d.exited <- cmd.Wait() }()
	sock := filepath.Join(imagesDir, "lazy-pages.socket")
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return d, nil
		}
		select {
		case err := <-d.exited:
			d.err, d.done = err, true
			return nil, checkpoint.NewCRIUError("lazy-pages", filepath.Join(imagesDir, LazyPagesLog), errors.Join(errors.New("exited before serving pages"), err))
		case <-ctx.Done():
			d.stop()
			return nil, ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			d.stop()
			return nil, fmt.Errorf("restore: criu lazy-pages did not create %s within 10s (log: %s)", sock, filepath.Join(imagesDir, LazyPagesLog))
		}
	}
}

func ptr[T any](v T) *T { return &v }
