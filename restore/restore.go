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
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if _, err := os.Stat(filepath.Join(opts.ImagesDir, "inventory.img")); err != nil {
		return nil, fmt.Errorf("restore: %s holds no checkpoint (no inventory.img): %w", opts.ImagesDir, err)
	}
	// A restore writes restore.log and stats-restore into the images directory; remove the
	// leftovers of an earlier attempt so that a retry reports its own numbers.
	for _, f := range []string{checkpoint.RestoreLog, crit.StatsRestore, LazyPagesLog} {
		os.Remove(filepath.Join(opts.ImagesDir, f))
	}
	// Before the clock starts: where /run is not a tmpfs CRIU keeps no kernel-feature cache
	// itself, and both CRIU calls (restore, lazy-pages) would probe the kernel (~40 ms each).
	// A failure is logged and only costs that time.
	_ = opts.CRIU.EnsureKdatCache(ctx, log)
	dir, err := os.Open(opts.ImagesDir)
	if err != nil {
		return nil, fmt.Errorf("restore: open images dir: %w", err)
	}
	defer dir.Close()

	c := criu.MakeCriu()
	c.SetCriuPath(opts.CRIU.Path)
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
	var netns *os.File
	if opts.Netns != nil {
		netns, err = os.Open(opts.Netns.Path)
		if err != nil {
			return nil, fmt.Errorf("restore: open network namespace %s: %w", opts.Netns.Path, err)
		}
		defer netns.Close()
		key := opts.Netns.Key
		if key == "" {
			key = checkpoint.DefaultNetnsKey
		}
		c.AddInheritFd(key, netns)
	}
	for k, f := range opts.InheritFds {
		c.AddInheritFd(k, f)
	}

	start := time.Now()
	var lazy *lazyDaemon
	if opts.Lazy {
		lazy, err = startLazyPages(ctx, opts.CRIU, opts.ImagesDir, opts.PageServer)
		if err != nil {
			return nil, err
		}
		defer lazy.stop()
	}
	nfy := &restoreNotify{failpoint: opts.Failpoint}
	logPath := filepath.Join(opts.ImagesDir, checkpoint.RestoreLog)
	if err := c.Restore(copts, nfy); err != nil {
		return nil, checkpoint.NewCRIUError("restore", logPath, err)
	}
	res := &Result{PID: int(nfy.pid), Running: time.Since(start), LogPath: logPath}
	res.MemoryIn = res.Running
	if res.PID == 0 {
		return res, fmt.Errorf("restore: CRIU did not report the restored PID (log: %s)", logPath)
	}
	if lazy != nil {
		if opts.OnRunning != nil {
			early := *res
			early.MemoryPending = true
			opts.OnRunning(&early)
		}
		// The daemon exits once every page has been copied into the restored tree.
		if err := lazy.wait(ctx); err != nil {
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
		log.Warn("read restore stats", "dir", opts.ImagesDir, "error", err)
	}
	return res, nil
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
