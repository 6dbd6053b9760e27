package checkpoint

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/checkpoint-restore/go-criu/v8/crit"
	"github.com/hotctl/hot/container"
)

// completedWithin is how close CRIU's final stats file and the init's recorded exit must be
// for the exit to be the dump's (CRIU kills the tree, then writes stats-dump).
const completedWithin = 5 * time.Second

// Recover finds containers whose `hot checkpoint` was killed after CRIU had completed the
// dump: CRIU killed the processes (the monitor recorded that as the init's exit) and wrote
// every image, but hot died before recording the container as checkpointed, so it shows as
// exited and a `hot rm` would throw the checkpoint away. Such a container is recorded as
// checkpointed, so `hot restore` brings it back. It returns the names it recovered.
func Recover(ctx context.Context, mgr *container.Manager) ([]string, error) {
	list, err := mgr.List(ctx, true)
	if err != nil {
		return nil, err
	}
	var names []string
	var errs []error
	for _, c := range list {
		if c.Status != container.StatusExited || c.State.Status != container.StatusRunning || c.Exit == nil {
			continue
		}
		rec, err := LoadRecord(c.Dir)
		if err != nil || rec.LeaveRunning || !dumpCompletedAt(rec, c.Exit.Finished) {
			continue
		}
		err = mgr.WithLock(ctx, c.ID, func(st *container.State) error {
			if st.Status != container.StatusRunning {
				return nil // changed meanwhile
			}
			st.Status, st.Pid, st.PidStart = container.StatusCheckpointed, 0, 0
			return nil
		})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		names = append(names, c.Name)
	}
	return names, errors.Join(errs...)
}

// dumpCompletedAt reports whether rec's images are a completed dump that ended at about exited:
// the inventory and CRIU's final stats exist, and the stats were written when the init died.
func dumpCompletedAt(rec *Record, exited time.Time) bool {
	if _, err := os.Stat(filepath.Join(rec.ImagesDir, "inventory.img")); err != nil {
		return false
	}
	st, err := os.Stat(filepath.Join(rec.ImagesDir, crit.StatsDump))
	if err != nil || exited.Before(rec.Created) {
		return false
	}
	d := st.ModTime().Sub(exited)
	return d > -completedWithin && d < completedWithin
}
