package update

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hotctl/hot/cgroups"
	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/cowfs"
	"github.com/hotctl/hot/criubin"
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
