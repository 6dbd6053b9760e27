package checkpoint

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	criu "github.com/checkpoint-restore/go-criu/v8"
	"github.com/checkpoint-restore/go-criu/v8/rpc"
	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/sockets"
)

// DefaultNetnsKey is the inherit-fd key under which a dump records the external network
// namespace; restore passes the namespace under the same key.
const DefaultNetnsKey = "extRootNetNS"

// DefaultGhostLimit is the largest deleted-but-open file CRIU saves into the images.
const DefaultGhostLimit = 64 << 20

// Log file names CRIU writes into the images directory.
const (
	DumpLog    = "dump.log"
	RestoreLog = "restore.log"
)

// Freezer stops and resumes every process of the tree. Freeze returns only once every process
// is frozen (e.g. cgroups.Cgroup).
type Freezer interface {
	Freeze(ctx context.Context) error
	Thaw(ctx context.Context) error
}

// ExternalNetns is a network namespace that outlives the processes (bind-mounted at Path):
// CRIU records it as external under Key instead of dumping it, so the container keeps its
// interfaces and IP and the restore rejoins it.
type ExternalNetns struct {
	Path string
	Key  string // default DefaultNetnsKey
}

func (n *ExternalNetns) key() string {
	if n.Key == "" {
		return DefaultNetnsKey
	}
	return n.Key
}

// Failpoints for tests: DumpOptions.Failpoint makes a dump fail at a chosen moment.
const (
	// FailAfterMemoryDump fails the dump after CRIU wrote every image, with the network
	// locked and the processes still seized (CRIU's post-dump notification answers an error).
	FailAfterMemoryDump = "post-dump"
	// FailKillCRIU SIGKILLs CRIU at the same moment, as an OOM kill or a crash would: CRIU
	// cannot clean up, the network lock stays in the namespace until Dump removes it.
	FailKillCRIU = "kill-criu"
	// FailKillSelf SIGKILLs this process at the same moment (hot killed while CRIU holds the
	// tree with every image written): CRIU's next message to us fails and it gives up.
	FailKillSelf = "kill-self"
	// FailKillSelfAfterDump (ContainerOptions) SIGKILLs this process once the dump completed,
	// before the container is recorded as checkpointed (see Recover).
	FailKillSelfAfterDump = "kill-self-after-dump"
)

// DumpOptions describe one dump.
type DumpOptions struct {
	CRIU      criubin.Binary
	PID       int    // root of the process tree (host PID)
	ImagesDir string // created if missing; must not hold an earlier dump
	// LeaveRunning keeps the processes running after the dump (a copy, not a move).
	LeaveRunning bool
	Netns        *ExternalNetns // nil: CRIU dumps the tree's netns itself (or shares the host's)
	// NetworkLock is "nftables" (default), "iptables" or "skip": how CRIU stops traffic of the
	// dumped connections between dump and restore.
	NetworkLock string
	// Freezer freezes the tree once CRIU has started (its pre-dump notification); FreezerCgroup is its freezer directory (v1
	// freezer or cgroup2 group) given to CRIU, which then finds it frozen and does not poll.
	Freezer       Freezer
	FreezerCgroup string
	// BeforeFreeze is called right before the tree is frozen (e.g. to start holding its
	// packets): from CRIU's pre-dump notification, once CRIU has started.
	BeforeFreeze func()
	// AfterDump is called from CRIU's post-dump notification: every image is written (with
	// PageServer: every image but the pages, and the page server is about to listen).
	AfterDump  func()
	GhostLimit int64 // default DefaultGhostLimit
	// SkipCgroups leaves cgroups out of the images (CRIU --manage-cgroups=ignore): for
	// restores that put the tree into a cgroup themselves (restore.Options.CallerCgroups).
	SkipCgroups bool
	External    []string // further --external resources
	// PageServer ("ADDR:PORT") makes a lazy dump (post-copy): the images get no memory
	// pages; CRIU keeps them and serves them from a page server listening there, and Dump
	// returns only once a `criu lazy-pages --page-server` (the restore side) took them all.
	// The processes stay frozen meanwhile and are gone afterwards.
	PageServer string
	Failpoint  string // tests only: see FailAfterMemoryDump
	Logger     *slog.Logger
}

// DumpResult describes a finished dump.
type DumpResult struct {
	ImagesDir string    `json:"imagesDir"`
	LogPath   string    `json:"logPath"`
	Stats     DumpStats `json:"stats"`
}

// DumpStats are the phase times (ours and CRIU's) and the memory written.
type DumpStats struct {
	Freeze       time.Duration `json:"freezeNs"`       // our freezer, until every task was frozen
	FrozenAt     time.Time     `json:"frozenAt"`       // when the freeze started (the pause's start)
	Dump         time.Duration `json:"dumpNs"`         // the CRIU call
	CRIUFreezing time.Duration `json:"criuFreezingNs"` // CRIU's own freezing (seize)
	CRIUFrozen   time.Duration `json:"criuFrozenNs"`   // CRIU: tasks frozen until dump done
	MemDump      time.Duration `json:"memDumpNs"`      // CRIU: collecting pages
	MemWrite     time.Duration `json:"memWriteNs"`     // CRIU: writing pages
	Total        time.Duration `json:"totalNs"`        // freeze + dump + thaw
	PagesScanned uint64        `json:"pagesScanned"`
	PagesWritten uint64        `json:"pagesWritten"`
	PagesLazy    uint64        `json:"pagesLazy,omitempty"`
	BytesWritten uint64        `json:"bytesWritten"` // pages written × page size
	ImagesBytes  int64         `json:"imagesBytes"`  // size of the image directory
}

// Dump checkpoints the tree rooted at opts.PID into opts.ImagesDir. On failure the tree is
// thawed and the network lock removed, so it keeps running and reachable; the error is a
// *CRIUError when CRIU failed.
func Dump(ctx context.Context, opts DumpOptions) (res *DumpResult, err error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.PID <= 0 {
		return nil, fmt.Errorf("dump: no process to dump (pid %d)", opts.PID)
	}
	if err := prepareImagesDir(opts.ImagesDir); err != nil {
		return nil, err
	}
	// Where /run is not a tmpfs CRIU keeps no kernel-feature cache itself; without one each
	// CRIU call probes the kernel (~40 ms). A failure is logged and only costs that time.
	_ = opts.CRIU.EnsureKdatCache(ctx, log)
	dir, err := os.Open(opts.ImagesDir)
	if err != nil {
		return nil, fmt.Errorf("dump: open images dir: %w", err)
	}
	defer dir.Close()

	copts := &rpc.CriuOpts{
		ImagesDirFd:    ptr[int32](int32(dir.Fd())),
		Pid:            ptr[int32](int32(opts.PID)),
		LogFile:        ptr(DumpLog),
		LogLevel:       ptr[int32](4),
		LeaveRunning:   ptr(opts.LeaveRunning),
		TcpEstablished: ptr(true),
		LinkRemap:      ptr(true),
		FileLocks:      ptr(true),
		ManageCgroups:  ptr(true),
		External:       append([]string(nil), opts.External...),
	}
	ghost := opts.GhostLimit
	if ghost == 0 {
		ghost = DefaultGhostLimit
	}
	copts.GhostLimit = ptr[uint32](uint32(ghost))
	switch opts.NetworkLock {
	case "", "nftables":
		copts.NetworkLock = rpc.CriuNetworkLockMethod_NFTABLES.Enum()
	case "iptables":
		copts.NetworkLock = rpc.CriuNetworkLockMethod_IPTABLES.Enum()
	case "skip":
		copts.NetworkLock = rpc.CriuNetworkLockMethod_SKIP.Enum()
	default:
		return nil, fmt.Errorf("dump: network lock %q: want nftables, iptables or skip", opts.NetworkLock)
	}
	if opts.Netns != nil {
		var st syscall.Stat_t
		if err := syscall.Stat(opts.Netns.Path, &st); err != nil {
			return nil, fmt.Errorf("dump: network namespace %s: %w", opts.Netns.Path, err)
		}
		copts.External = append(copts.External, fmt.Sprintf("net[%d]:%s", st.Ino, opts.Netns.key()))
	}
	if opts.SkipCgroups {
		copts.ManageCgroups = ptr(false)
		copts.ManageCgroupsMode = rpc.CriuCgMode_IGNORE.Enum()
	}
	if opts.FreezerCgroup != "" {
		copts.FreezeCgroup = ptr(opts.FreezerCgroup)
	}
	if opts.PageServer != "" {
		host, port, err := net.SplitHostPort(opts.PageServer)
		if err != nil {
			return nil, fmt.Errorf("dump: page server %q: %w", opts.PageServer, err)
		}
		p, err := strconv.Atoi(port)
		if err != nil {
			return nil, fmt.Errorf("dump: page server port %q: %w", port, err)
		}
		copts.LazyPages = ptr(true)
		copts.Ps = &rpc.CriuPageServerInfo{Address: ptr(host), Port: ptr(int32(p))}
	}

	start := time.Now()
	var stats DumpStats
	// The tree is frozen from CRIU's pre-dump notification, i.e. once CRIU has started and
	// probed the kernel (tens of ms, more without a kdat cache), and right
	// before it collects the tree: that start-up is not part of the pause.
	frozen := false
	freeze := func() error {
		if opts.BeforeFreeze != nil {
			opts.BeforeFreeze()
		}
		t := time.Now()
		stats.FrozenAt = t
		if opts.Freezer == nil {
			return nil
		}
		frozen = true // a partial freeze is thawed too
		if err := opts.Freezer.Freeze(ctx); err != nil {
			return fmt.Errorf("dump: freeze: %w", err)
		}
		stats.Freeze = time.Since(t)
		return nil
	}
	// Whatever happens, the tree must not stay frozen: after a failure CRIU leaves the tasks in
	// the freezer's state, after success (without --leave-running) the cgroup is empty but
	// frozen, and a restore into a frozen cgroup would freeze the restored tasks.
	defer func() {
		if !frozen {
			return
		}
		if terr := opts.Freezer.Thaw(context.WithoutCancel(ctx)); terr != nil {
			err = errors.Join(err, fmt.Errorf("dump: thaw: %w", terr))
		}
	}()

	c := criu.MakeCriu()
	c.SetCriuPath(opts.CRIU.Path)
	logPath := filepath.Join(opts.ImagesDir, DumpLog)
	t0 := time.Now()
	nfy := &dumpNotify{failpoint: opts.Failpoint, freeze: freeze, afterDump: opts.AfterDump}
	derr := c.Dump(copts, nfy)
	stats.Dump = time.Since(t0)
	if derr == nil && !nfy.froze {
		derr = errors.New("CRIU dumped without its pre-dump notification, so the tree was never frozen by us")
	}
	if derr != nil {
		cerr := NewCRIUError("dump", logPath, derr)
		log.Warn("dump failed", "pid", opts.PID, "error", cerr)
		if n, rerr := releaseTCPRepair(opts.PID); rerr != nil {
			log.Warn("take sockets out of TCP repair mode", "pid", opts.PID, "error", rerr)
		} else if n > 0 {
			log.Info("took sockets out of TCP repair mode", "pid", opts.PID, "sockets", n)
		}
		if opts.Netns != nil && copts.GetNetworkLock() != rpc.CriuNetworkLockMethod_SKIP {
			lctx := context.WithoutCancel(ctx)
			if locks, lerr := sockets.CRIULocks(lctx, opts.Netns.Path); lerr == nil && len(locks) > 0 {
				log.Info("removing network lock left by failed dump", "netns", opts.Netns.Path, "objects", locks)
			}
			if lerr := sockets.CleanupCRIULock(lctx, opts.Netns.Path); lerr != nil {
				return nil, errors.Join(cerr, fmt.Errorf("dump: remove network lock: %w", lerr))
			}
		}
		return nil, cerr
	}
	if frozen {
		if terr := opts.Freezer.Thaw(context.WithoutCancel(ctx)); terr != nil {
			return nil, fmt.Errorf("dump: thaw after dump: %w", terr)
		}
		frozen = false
	}
	stats.Total = time.Since(start)
	if err := readDumpStats(opts.ImagesDir, &stats); err != nil {
		log.Warn("read dump stats", "dir", opts.ImagesDir, "error", err)
	}
	return &DumpResult{ImagesDir: opts.ImagesDir, LogPath: logPath, Stats: stats}, nil
}

type dumpNotify struct {
	criu.NoNotify
	failpoint string
	freeze    func() error
	afterDump func()
	froze     bool
}

// PreDump is CRIU's "pre-dump" notification: CRIU has started and is about to collect and
// seize the tree. That is when the tree is frozen (our freezer returns once every task is
// FROZEN, so CRIU's own --freeze-cgroup finds it frozen and does not poll).
func (n *dumpNotify) PreDump() error {
	if n.froze {
		return nil
	}
	n.froze = true
	return n.freeze()
}

func (n *dumpNotify) PostDump() error {
	switch n.failpoint {
	case FailAfterMemoryDump:
		return errors.New("failpoint " + FailAfterMemoryDump)
	case FailKillCRIU:
		if err := killCRIUChildren(); err != nil {
			return err
		}
		return errors.New("failpoint " + FailKillCRIU)
	case FailKillSelf:
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
	if n.afterDump != nil {
		n.afterDump()
	}
	return nil
}

// killCRIUChildren SIGKILLs this process's CRIU children (the failpoint FailKillCRIU).
func killCRIUChildren() error {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	self := strconv.Itoa(os.Getpid())
	killed := 0
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// stat: "PID (COMM) STATE PPID ..."; COMM may hold spaces, so cut at the last ')'.
		rest := string(stat[bytes.LastIndexByte(stat, ')')+1:])
		f := strings.Fields(rest)
		if len(f) < 2 || f[1] != self {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		// CRIU rewrites its title to "criu: dump --rpc -t PID".
		if bytes.Contains(cmdline, []byte("criu: dump --rpc")) {
			syscall.Kill(pid, syscall.SIGKILL)
			killed++
		}
	}
	if killed == 0 {
		return errors.New("failpoint " + FailKillCRIU + ": no criu child found")
	}
	return nil
}

// prepareImagesDir creates dir (0700) and refuses one that holds an earlier dump.
func prepareImagesDir(dir string) error {
	if dir == "" {
		return errors.New("dump: no images directory given")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("dump: create images dir: %w", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "inventory.img")); err == nil {
		return fmt.Errorf("dump: %s already holds a checkpoint; remove it or pick another directory", dir)
	}
	return nil
}

func ptr[T any](v T) *T { return &v }
