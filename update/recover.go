package update

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hotctl/hot/cgroups"
	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/cowfs"
	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/restore"
	"github.com/hotctl/hot/sockets"
)

// Pending reports whether ref has an update journal, and whether the hot process that wrote
// it is still alive (then the update is in progress, not interrupted).
func Pending(ctx context.Context, mgr *container.Manager, ref string) (pending, alive bool, owner int, err error) {
	c, err := mgr.Get(ctx, ref)
	if err != nil {
		return false, false, 0, err
	}
	jr, err := loadJournal(c.Dir)
	if err != nil || jr == nil {
		return false, false, 0, err
	}
	return true, ownerAlive(jr), jr.Owner, nil
}

func ownerAlive(j *journal) bool {
	if j.Owner == os.Getpid() {
		return false // our own leftover from a failed attempt in this process
	}
	start, err := container.ProcStartTime(j.Owner)
	return err == nil && start == j.OwnerStart
}

// Recover finishes an update of ref that a killed hot left behind, by rolling it back: the
// container ends up running the generation it ran before, with its processes' state (from
// the pre-update images when they were already dumped). It returns an error matching ErrBusy
// while another hot process is updating the container, and nil when there is nothing to do.
func Recover(ctx context.Context, mgr *container.Manager, store *cowfs.Store, ref string, criu criubin.Binary, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c, err := mgr.Get(ctx, ref)
	if err != nil {
		return err
	}
	j, err := loadJournal(c.Dir)
	if err != nil || j == nil {
		return err
	}
	if ownerAlive(j) {
		return fmt.Errorf("container %s: %w: hot (pid %d) is running an %s to %s since %s; wait for it to finish",
			c.Name, ErrBusy, j.Owner, j.Op, j.Image, j.Started.Local().Format(time.TimeOnly))
	}
	if criu.Path == "" {
		if criu, err = criubin.Find(ctx, ""); err != nil {
			return fmt.Errorf("recover the interrupted %s of %s: %w", j.Op, c.Name, err)
		}
	}
	lockCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return mgr.WithLock(lockCtx, ref, func(st *container.State) error {
		j, err := loadJournal(c.Dir) // another hot may have recovered it meanwhile
		if err != nil || j == nil {
			return err
		}
		log.Warn("recovering an interrupted update", "container", st.Name, "op", j.Op, "phase", j.Phase, "pid", j.Owner)
		if err := recoverLocked(ctx, mgr, store, st, j, criu, log); err != nil {
			return fmt.Errorf("recover the interrupted %s of %s (phase %s): %w", j.Op, st.Name, j.Phase, err)
		}
		return nil
	})
}

func recoverLocked(ctx context.Context, mgr *container.Manager, store *cowfs.Store, st *container.State, j *journal, criu criubin.Binary, log *slog.Logger) error {
	if j.Lazy && j.Phase != phasePrepared {
		return recoverPostCopy(ctx, mgr, store, st, j, log)
	}
	// A CRIU started by the dead hot may still be finishing (it dumps, then kills the tasks,
	// or gives up and releases them): wait until nobody holds the images directory.
	waitImagesReleased(ctx, j.ImagesDir, 30*time.Second)
	cg, err := cgroups.Load(st.Cgroup)
	if err != nil {
		return err
	}
	pids, err := cg.Procs()
	if err != nil {
		return err
	}
	originalsAlive := len(pids) > 0 && st.Current == j.From && (j.Phase == phasePrepared || j.Phase == phaseDumping)
	if !originalsAlive && j.Phase != phasePrepared {
		return rollbackTo(ctx, mgr, store, st, j, criu, false, log)
	}
	// Nothing was dumped (or the dump was abandoned): the original processes run, maybe frozen.
	if frozen, _ := cg.Frozen(); frozen {
		if err := cg.Thaw(ctx); err != nil {
			return err
		}
	}
	if st.Network.NetnsPath != "" {
		if err := sockets.Cleanup(ctx, st.Network.NetnsPath); err != nil {
			return err
		}
		if err := sockets.CleanupCRIULock(ctx, st.Network.NetnsPath); err != nil {
			return err
		}
	}
	st.Status = container.StatusRunning
	os.RemoveAll(j.GenDir)
	os.RemoveAll(j.ImagesDir)
	if !usesImage(st, j.ImageID) {
		store.Release(ctx, j.ImageID, st.ID)
	}
	return removeJournal(mgr.Dir(st.ID))
}

// RecoverAll recovers every interrupted update under mgr (those whose hot process is gone).
// hot runs it before commands that act on containers. Errors are joined; busy containers
// are skipped.
func RecoverAll(ctx context.Context, mgr *container.Manager, store *cowfs.Store, criu criubin.Binary, log *slog.Logger) error {
	list, err := mgr.List(ctx, true)
	if err != nil {
		return err
	}
	var errs []error
	for _, c := range list {
		if _, err := os.Stat(journalPath(c.Dir)); err != nil {
			continue
		}
		if err := Recover(ctx, mgr, store, c.ID, criu, log); err != nil && !errors.Is(err, ErrBusy) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// waitImagesReleased waits until no process has dir (or a file in it) open.
func waitImagesReleased(ctx context.Context, dir string, limit time.Duration) {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) && ctx.Err() == nil && imagesInUse(dir) {
		time.Sleep(50 * time.Millisecond)
	}
}

func imagesInUse(dir string) bool {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return false
	}
	self := strconv.Itoa(os.Getpid())
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err != nil || p.Name() == self {
			continue
		}
		fds, err := os.ReadDir(filepath.Join("/proc", p.Name(), "fd"))
		if err != nil {
			continue
		}
		for _, fd := range fds {
			t, err := os.Readlink(filepath.Join("/proc", p.Name(), "fd", fd.Name()))
			if err == nil && (t == dir || strings.HasPrefix(t, dir+"/")) {
				return true
			}
		}
	}
	return false
}

// recoverPostCopy finishes a post-copy update whose hot died. Its page gate died with it, so
// CRIU's transfer was reset: CRIU resumed the originals (their sockets still sidelined) and
// the copy, if restored, lost its page source. Before phaseCommitting the originals are
// what runs on: the copy goes quietly, the originals get their sockets and the old root
// back. From phaseCommitting on every page was in the copy: it is the container.
func recoverPostCopy(ctx context.Context, mgr *container.Manager, store *cowfs.Store, st *container.State, j *journal, log *slog.Logger) error {
	cg, err := cgroups.Load(st.Cgroup)
	if err != nil {
		return err
	}
	defer func() {
		if err := checkpoint.RestorePipeMaxSize(j.PipeMaxBefore); err != nil {
			log.Warn("put fs.pipe-max-size back", "error", err)
		}
	}()
	// CRIU holds the originals (ptrace) until it ends; the page gate in the container's
	// monitor kept the transfer open when hot died, so the copy's page faults wait (they are
	// not filled with zeros). When CRIU ends it puts the freezer back as it found it (frozen).
	criuPid := container.ProcTracer(j.OrigInit)
	if j.Phase == phaseCommitting {
		// Every page is in the copy: the close goes through, CRIU ends the dump and kills the
		// originals.
		if err := restore.GateStep(ctx, mgr, st.ID, "commit"); err != nil {
			log.Warn("commit the page transfer", "error", err)
		}
	} else {
		// A restore still staged at the monitor ends first (before anything is frozen: its
		// helper may have joined the cgroup). The copy (if restored) goes quietly, with its
		// lazy-pages daemon, while its page source still stands; then the transfer fails and
		// CRIU resumes the originals.
		if err := restore.CancelStaged(ctx, mgr, st.ID); err != nil {
			log.Warn("cancel the staged restore", "error", err)
		}
		if len(j.Originals) > 0 {
			if err := giveBackInit(ctx, mgr, st.ID, j.OrigInit); err != nil {
				log.Warn("give the container back to its original init", "error", err)
			}
			if err := discardCopy(ctx, cg, j.Originals); err != nil {
				return err
			}
		}
		killLazyDaemons(j.ImagesDir)
		if err := restore.GateStep(ctx, mgr, st.ID, "abort"); err != nil {
			if !errors.Is(err, restore.ErrNoGate) {
				log.Warn("abort the page transfer", "error", err)
			}
			if j.PageServer != "" {
				if err := checkpoint.AbortPageServer(j.PageServer); err != nil {
					log.Warn("abort the page server", "error", err)
				}
			}
		}
	}
	if criuPid > 0 {
		deadline := time.Now().Add(30 * time.Second)
		for syscall.Kill(criuPid, 0) == nil && !isZombie(criuPid) && time.Now().Before(deadline) {
			time.Sleep(2 * time.Millisecond)
		}
	}
	origAlive := j.OrigInit > 0 && syscall.Kill(j.OrigInit, 0) == nil && !isZombie(j.OrigInit)
	if j.Phase == phaseCommitting || !origAlive {
		if j.Phase != phaseCommitting {
			log.Error("post-copy update: the original processes are gone before the commit; keeping the copy", "container", st.Name)
		}
		// Originals CRIU resumed instead of killing (if the commit could not go through) go
		// quietly, before anything runs again.
		if err := discardPids(ctx, cg, livingOriginals(j)); err != nil {
			return err
		}
		if frozen, _ := cg.Frozen(); frozen {
			if err := cg.Thaw(ctx); err != nil {
				return err
			}
		}
		waitImagesReleased(ctx, j.ImagesDir, 30*time.Second)
		return finishPostCopy(ctx, mgr, store, st, j)
	}
	if frozen, _ := cg.Frozen(); frozen {
		if err := cg.Thaw(ctx); err != nil {
			return err
		}
	}
	waitImagesReleased(ctx, j.ImagesDir, 30*time.Second)
	if _, err := sockets.UnsidelineAll(j.Originals); err != nil {
		return err
	}
	for _, p := range j.Originals {
		sockets.SetTCPRepair(p, false)
	}
	if frozen, _ := cg.Frozen(); frozen {
		if err := cg.Thaw(ctx); err != nil {
			return err
		}
	}
	if st.Current != j.From {
		old := generation(st, j.From)
		if old == nil {
			return fmt.Errorf("generation %d is missing from the state", j.From)
		}
		if err := cowfs.Unmount(st.Rootfs); err != nil {
			return err
		}
		// The originals still use their own mount of this stack; this one is the host's view.
		if err := cowfs.MountOverlay(st.Rootfs, old.LowerDirs, old.Upper, old.Work); err != nil {
			return fmt.Errorf("mount generation %d: %w", j.From, err)
		}
		if len(j.Stashed) > 0 {
			if err := unstashCopies(old.Upper, j.Stashed, filepath.Join(j.GenDir, "stashed")); err != nil {
				return err
			}
			old.Published = j.Stashed
		}
		st.Generations = slices.DeleteFunc(st.Generations, func(g container.Generation) bool { return g.N == j.To })
		st.Current = j.From
	}
	st.Status, st.Pid = container.StatusRunning, j.OrigInit
	st.PidStart, _ = container.ProcStartTime(j.OrigInit)
	if err := mgr.Save(st); err != nil {
		return err
	}
	if st.Network.NetnsPath != "" {
		if err := sockets.Cleanup(ctx, st.Network.NetnsPath); err != nil {
			return err
		}
	}
	os.RemoveAll(j.GenDir)
	os.RemoveAll(j.ImagesDir)
	os.Remove(filepath.Join(mgr.Dir(st.ID), checkpoint.RecordFile))
	if !usesImage(st, j.ImageID) {
		store.Release(ctx, j.ImageID, st.ID)
	}
	return removeJournal(mgr.Dir(st.ID))
}

// finishPostCopy commits a post-copy update whose copy has all its memory: the state
// already points at the new generation and the copy's init (saved after the restore).
func finishPostCopy(ctx context.Context, mgr *container.Manager, store *cowfs.Store, st *container.State, j *journal) error {
	if st.Current != j.To || st.Pid == 0 || st.Pid == j.OrigInit {
		return fmt.Errorf("the original processes are gone and no restored copy is recorded (phase %s): the container's processes are lost", j.Phase)
	}
	st.Status = container.StatusRunning
	st.Image, st.ImageID = j.Image, j.ImageID
	if err := mgr.Save(st); err != nil {
		return err
	}
	if st.Network.NetnsPath != "" {
		if err := sockets.Cleanup(ctx, st.Network.NetnsPath); err != nil {
			return err
		}
	}
	os.RemoveAll(j.ImagesDir)
	os.RemoveAll(filepath.Join(j.GenDir, "stashed"))
	os.Remove(filepath.Join(mgr.Dir(st.ID), checkpoint.RecordFile))
	return removeJournal(mgr.Dir(st.ID))
}

// livingOriginals returns the journal's original processes that still exist (same pid and
// start time).
func livingOriginals(j *journal) []int {
	var out []int
	for i, p := range j.Originals {
		if i >= len(j.OriginalStarts) {
			break
		}
		if st, err := container.ProcStartTime(p); err == nil && st == j.OriginalStarts[i] && !isZombie(p) {
			out = append(out, p)
		}
	}
	return out
}

func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	return err != nil || zombie(b)
}
