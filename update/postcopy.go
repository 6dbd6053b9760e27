package update

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hotctl/hot/cgroups"
	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/cowfs"
	"github.com/hotctl/hot/restore"
	"github.com/hotctl/hot/sockets"
	"golang.org/x/sys/unix"
)

// Post-copy update (Options.Lazy). The memory never goes through image files:
//
//	freeze → CRIU lazy dump: every image but the pages; the pages stay in CRIU's page pipes
//	(vmspliced, not copied) and the original processes stay frozen under CRIU, whole
//	→ sideline the originals' sockets (sockets.Sideline) so their copy can take the same
//	addresses in the same network namespace → swap the root → restore the copy onto the new
//	root; its `criu lazy-pages` pulls the pages from the page server through a PageGate
//	→ verify → release the clients → all pages in → Commit the gate: CRIU ends the dump and
//	the originals go.
//
// Until the commit the originals are intact: any failure drops the copy quietly, aborts the
// transfer (CRIU then resumes the originals), unsidelines their sockets and moves the old
// root mount back. The pause no longer grows with memory except for CRIU's vmsplice of the
// pages (a page-table walk, no copy).

// postCopy is run's tail for Options.Lazy, from the dump on.
func (u *updater) postCopy(ctx context.Context) (*Summary, error) {
	st := u.st
	op := u.j.Op
	// The value before, for a recovery if this process dies before putting it back.
	u.j.PipeMaxBefore, _ = checkpoint.PipeMaxSize()
	undo, note, err := checkpoint.RaisePipeMaxSize()
	if err != nil {
		u.releaseHold()
		u.discardGeneration(ctx)
		return nil, fmt.Errorf("%s %s: %w", op, st.Name, err)
	}
	defer undo()
	if note != "" {
		u.log.Info(note)
	}
	addr, err := checkpoint.FreePort("127.0.0.1")
	if err != nil {
		u.releaseHold()
		u.discardGeneration(ctx)
		return nil, err
	}
	u.j.Lazy, u.j.OrigInit, u.j.PageServer = true, st.Pid, addr
	if err := u.journal(phaseDumping); err != nil {
		u.releaseHold()
		u.discardGeneration(ctx)
		return nil, err
	}
	u.failpoint(phaseDumping)

	// The gate runs in the container's monitor, so it outlives this process (see
	// restore.GateOp): the copy never runs without its page source.
	gate, err := restore.StartGate(ctx, u.mgr, st.ID, addr)
	if err != nil {
		u.releaseHold()
		u.discardGeneration(ctx)
		return nil, err
	}
	pc := &postCopyRun{u: u, gate: gate, staged: make(chan stagedRestore, 1)}
	// The restore's helper and CRIU start while the dump runs (from the freeze on: the
	// checkpoint record they need is written by then), so the restore starts at once later.
	stCopy := *st
	beforeFreeze := func() {
		u.startHold()
		go func() {
			sc, err := restore.StageLocked(ctx, u.mgr, stCopy, restore.ContainerOptions{CRIU: u.o.CRIU, Lazy: true, ReturnWhenRunning: true,
				PageServer: gate.Addr, Replace: u.j.OrigInit, Logger: u.log})
			pc.staged <- stagedRestore{sc, err}
		}()
	}

	span := u.rec.Start("dump")
	d := checkpoint.StartLazyDump(ctx, u.mgr, st, checkpoint.ContainerOptions{
		CRIU: u.o.CRIU, ImagesDir: u.j.ImagesDir, NetworkLock: u.networkLock(), PageServer: addr,
		BeforeFreeze: beforeFreeze, Logger: u.log,
	})
	pc.dump = d
	if err := d.WaitImages(ctx, 2*time.Minute); err != nil {
		gate.Abort(context.WithoutCancel(ctx))
		if _, derr := d.Abort(); derr == nil {
			u.log.Error("lazy dump completed after its page server was abandoned", "container", st.Name)
		}
		pc.cancelStaged(ctx)
		span.End(err, nil)
		u.releaseHold()
		u.discardGeneration(ctx)
		return nil, fmt.Errorf("%s %s: dump failed, container still running the old generation: %w", op, st.Name, err)
	}
	u.sum.DumpMS = ms(time.Since(u.holdStart))
	u.inPause = true
	// Only the originals are in the cgroup now, all held by CRIU.
	if pc.originals, err = u.cg.Procs(); err != nil {
		return pc.rollback(ctx, fmt.Errorf("list the frozen processes: %w", err))
	}
	// One journal write for this step, before the sockets change: a recovery needs the
	// originals to unsideline them. (The state is untouched: the dump worked on a copy.)
	u.j.Originals, u.j.OriginalStarts = pc.originals, startTimes(pc.originals)
	if err := u.journal(phaseDumped); err != nil {
		return pc.rollback(ctx, err)
	}
	if pc.socks, err = sockets.Sideline(pc.originals); err != nil {
		return pc.rollback(ctx, err)
	}
	// CRIU keeps the freezer frozen while it serves the pages; the copy is restored into the
	// same cgroup and must not start frozen. The originals stay stopped: CRIU holds them
	// (ptrace), thawed or not.
	if err := u.cg.Thaw(ctx); err != nil {
		return pc.rollback(ctx, err)
	}
	// The staged helper joins the (thawed) cgroup and starts its lazy-pages daemon meanwhile.
	pc.imagesTold = make(chan struct{})
	go func() { pc.imagesReady(ctx); close(pc.imagesTold) }()
	span.End(nil, map[string]any{"pageServer": addr, "sidelinedSockets": len(pc.socks), "untilImagesMs": u.sum.DumpMS})
	u.failpoint(phaseDumped)

	span = u.rec.Start("swap")
	// A detached copy of the old root mount: a rollback moves it back, so the host sees the
	// same overlay the originals still use (a second mount of the same upper would not be safe).
	oldRoot, err := unix.OpenTree(unix.AT_FDCWD, st.Rootfs, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		span.End(err, nil)
		return pc.rollback(ctx, fmt.Errorf("keep the old root mount %s: %w", st.Rootfs, err))
	}
	pc.oldRoot = oldRoot
	defer func() {
		if pc.oldRoot >= 0 {
			unix.Close(pc.oldRoot)
		}
	}()
	if err := u.swap(ctx); err != nil {
		span.End(err, nil)
		return pc.rollback(ctx, err)
	}
	span.End(nil, map[string]any{"generation": u.gen.N})
	u.failpoint(phaseSwapped)
	// The new content of changed files is copied beside them while CRIU restores.
	pub := preparePublish(u.chg, st.Rootfs)
	pc.pub = pub

	span = u.rec.Start("restore")
	var rres *restore.Result
	if u.o.Failpoint == "restore" {
		err = errors.New("injected restore failure (failpoint)")
	} else {
		var r *restore.ContainerResult
		<-pc.imagesTold // the helper must hear "images" before "go"
		if sc := pc.stagedRestore(); sc != nil {
			pc.sc = nil // Go consumes it
			r, err = sc.Go(ctx, st)
		} else {
			r, err = restore.ContainerLocked(ctx, u.mgr, st, restore.ContainerOptions{CRIU: u.o.CRIU, Lazy: true, ReturnWhenRunning: true,
				PageServer: pc.gate.Addr, Replace: u.j.OrigInit, Logger: u.log})
		}
		if r != nil {
			rres = &r.Result
		}
	}
	if err != nil {
		span.End(err, nil)
		return pc.rollback(ctx, err)
	}
	u.sum.RestoreMS = ms(rres.Running)
	u.sum.FreezeWindowMS = ms(time.Since(u.holdStart))
	span.End(nil, map[string]any{"pid": rres.PID, "freezeWindowMs": u.sum.FreezeWindowMS})
	if err := u.settle(ctx, pub); err != nil {
		return pc.rollback(ctx, err)
	}
	// Clients go on while the rest of the memory comes in; the originals stay until it is.
	u.releaseHold()
	u.inPause = false

	span = u.rec.Start("memory-in")
	restoreStart := time.Now().Add(-rres.Running)
	allIn := make(chan error, 1)
	go func() { allIn <- pc.gate.WaitAllIn(ctx) }()
	select {
	case err := <-allIn:
		if err != nil {
			span.End(err, nil)
			return pc.rollback(ctx, err)
		}
	case <-ctx.Done():
		span.End(ctx.Err(), nil)
		return pc.rollback(ctx, ctx.Err())
	case <-time.After(10 * time.Minute):
		err := errors.New("the restored processes did not pull all their memory within 10 minutes")
		span.End(err, nil)
		return pc.rollback(ctx, err)
	}
	u.sum.MemoryInMS = ms(time.Since(restoreStart))
	if err := syscall.Kill(st.Pid, 0); err != nil {
		err = fmt.Errorf("container init (pid %d) died while its memory came in: %w", st.Pid, err)
		span.End(err, nil)
		return pc.rollback(ctx, err)
	}
	// The point of no return: CRIU ends the dump, the originals go.
	if err := u.journal(phaseCommitting); err != nil {
		return pc.rollback(ctx, err)
	}
	u.failpoint(phaseCommitting)
	if err := pc.gate.Commit(context.WithoutCancel(ctx)); err != nil {
		u.log.Warn("close the page transfer", "error", err)
	}
	if _, err := d.Wait(time.Minute); err != nil {
		u.log.Warn("lazy dump reported a failure after every page was pulled", "error", err)
	}
	if _, err := restore.WaitMemoryIn(ctx, u.j.ImagesDir, time.Minute); err != nil {
		u.log.Warn("lazy restore", "error", err)
	}
	span.End(nil, map[string]any{"memoryInMs": u.sum.MemoryInMS})

	span = u.rec.Start("commit")
	u.commit(ctx)
	span.End(nil, map[string]any{"clientPauseMs": u.sum.ClientPauseMS, "heldPackets": u.sum.HeldPackets, "tcpAfter": u.sum.TCPAfter})
	u.sum.Outcome = "updated"
	return &u.sum, nil
}

// postCopyRun is what a post-copy update holds until it commits.
type postCopyRun struct {
	u          *updater
	dump       *checkpoint.LazyDump
	gate       *restore.MonitorGate
	originals  []int
	socks      []sockets.SidelinedSocket
	oldRoot    int
	pub        *publishing
	staged     chan stagedRestore // the staging's outcome, once
	sc         *restore.StagedContainer
	stageErr   error
	stageOnce  sync.Once
	imagesTold chan struct{} // closed once the staged helper was told the images are there
}

type stagedRestore struct {
	sc  *restore.StagedContainer
	err error
}

// stagedRestore waits for the restore staged at the freeze; nil if staging failed (the
// restore then starts from scratch).
func (pc *postCopyRun) stagedRestore() *restore.StagedContainer {
	pc.stageOnce.Do(func() {
		select {
		case r := <-pc.staged:
			pc.sc, pc.stageErr = r.sc, r.err
		case <-time.After(30 * time.Second):
			pc.stageErr = errors.New("staging the restore took more than 30s")
		}
		if pc.stageErr != nil {
			pc.u.log.Warn("restore not staged; starting it now", "error", pc.stageErr)
		}
	})
	return pc.sc
}

// imagesReady lets the staged restore start its lazy-pages daemon.
func (pc *postCopyRun) imagesReady(ctx context.Context) {
	if sc := pc.stagedRestore(); sc != nil {
		if err := sc.ImagesReady(ctx); err != nil {
			pc.u.log.Warn("staged restore", "error", err)
		}
	}
}

// cancelStaged ends a staged restore that will not run.
func (pc *postCopyRun) cancelStaged(ctx context.Context) {
	if pc.imagesTold != nil {
		<-pc.imagesTold
	}
	if sc := pc.stagedRestore(); sc != nil {
		sc.Cancel(ctx)
		pc.sc = nil
	}
}

// rollback brings the originals back: the copy (if any) goes quietly, the transfer is
// aborted so CRIU resumes the originals, their sockets are unsidelined, the old root mount
// is moved back and the state points at the old generation again.
func (pc *postCopyRun) rollback(ctx context.Context, cause error) (*Summary, error) {
	u := pc.u
	st := u.st
	span := u.rec.Start("rollback")
	ctx = context.WithoutCancel(ctx)
	err := pc.backToOriginals(ctx)
	u.releaseHold()
	u.sum.Outcome, u.sum.Reason = "rolled-back", cause.Error()
	if err != nil {
		span.End(err, nil)
		return &u.sum, fmt.Errorf("%s %s failed (%v) and the rollback failed too: %w", u.j.Op, st.Name, cause, err)
	}
	span.End(nil, map[string]any{"generation": u.j.From})
	return &u.sum, fmt.Errorf("%s %s rolled back, the original processes run on generation %d as before: %w", u.j.Op, st.Name, u.j.From, cause)
}

func (pc *postCopyRun) backToOriginals(ctx context.Context) error {
	u := pc.u
	st := u.st
	var errs []error
	pc.cancelStaged(ctx)
	// First the copy (if any) goes, quietly, while its page source still stands (a copy
	// whose transfer failed would run on with zero-filled pages); then the transfer fails
	// and CRIU resumes the originals. Before the originals are known no copy exists.
	if pc.originals != nil {
		if err := giveBackInit(ctx, u.mgr, st.ID, u.j.OrigInit); err != nil {
			errs = append(errs, err)
		}
		if err := discardCopy(ctx, u.cg, pc.originals); err != nil {
			errs = append(errs, err)
		}
	}
	killLazyDaemons(u.j.ImagesDir)
	if pc.gate != nil {
		if err := pc.gate.Abort(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if _, err := pc.dump.Abort(); err == nil {
		return errors.Join(append(errs, errors.New("CRIU completed the dump although the transfer was aborted: the original processes are gone"))...)
	}
	// CRIU resumed the originals (and took their connections out of repair mode).
	if err := sockets.Unsideline(pc.socks); err != nil {
		errs = append(errs, err)
	}
	if frozen, _ := u.cg.Frozen(); frozen {
		if err := u.cg.Thaw(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if pc.pub != nil {
		<-pc.pub.done // no copy may still write into the new root
	}
	if st.Current != u.j.From {
		if err := cowfs.Unmount(st.Rootfs); err != nil {
			errs = append(errs, err)
		} else if pc.oldRoot >= 0 {
			if err := unix.MoveMount(pc.oldRoot, "", unix.AT_FDCWD, st.Rootfs, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
				errs = append(errs, fmt.Errorf("move the old root mount back to %s: %w", st.Rootfs, err))
			} else {
				unix.Close(pc.oldRoot)
				pc.oldRoot = -1
			}
		}
		st.Generations = slices.DeleteFunc(st.Generations, func(g container.Generation) bool { return g.N == u.j.To })
		st.Current = u.j.From
		if old := generation(st, u.j.From); old != nil && len(u.stashed) > 0 {
			if err := unstashCopies(old.Upper, u.stashed, u.stashDir()); err != nil {
				errs = append(errs, err)
			}
			old.Published = u.stashed
		}
	}
	st.Status, st.Pid = container.StatusRunning, u.j.OrigInit
	st.PidStart, _ = container.ProcStartTime(st.Pid)
	if err := u.mgr.Save(st); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	os.RemoveAll(u.j.GenDir)
	os.RemoveAll(u.j.ImagesDir)
	os.Remove(filepath.Join(u.mgr.Dir(st.ID), checkpoint.RecordFile))
	if !usesImage(st, u.j.ImageID) {
		u.store.Release(ctx, u.j.ImageID, st.ID)
	}
	return removeJournal(u.mgr.Dir(st.ID))
}

// giveBackInit makes the original init the container's init again at its monitor if the
// copy's init replaced it (then the copy can go without its exit being the container's).
func giveBackInit(ctx context.Context, mgr *container.Manager, id string, orig int) error {
	resp, err := mgr.CallMonitor(ctx, id, container.Request{Op: container.OpStatus})
	if err != nil {
		return fmt.Errorf("ask the monitor for the init: %w", err)
	}
	if resp.Status == nil || !resp.Status.Running || resp.Status.Pid == orig {
		return nil
	}
	if _, err := mgr.CallMonitor(ctx, id, container.Request{Op: container.OpReplaceInit, Old: resp.Status.Pid, Pid: orig}); err != nil {
		return fmt.Errorf("give the container back to init %d: %w", orig, err)
	}
	return nil
}

// killLazyDaemons kills the `criu lazy-pages` daemons working on imagesDir: once the copy is
// gone (or its page source), such a daemon waits forever. It is not in the container's
// cgroup (a staged restore starts it before joining), so discardCopy does not see it.
func killLazyDaemons(imagesDir string) {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid <= 0 {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmd, []byte("lazy-pages\x00")) || !bytes.Contains(cmd, []byte(imagesDir+"\x00")) {
			continue
		}
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// startTimes returns the start time of each pid (0 for one that is gone).
func startTimes(pids []int) []uint64 {
	out := make([]uint64, len(pids))
	for i, p := range pids {
		out[i], _ = container.ProcStartTime(p)
	}
	return out
}

// discardCopy kills every process of the container's cgroup that is not one of the
// originals (the restored copy, its restore helper and lazy-pages daemon) without their TCP
// peers noticing: frozen, sockets in repair mode, SIGKILL, thawed.
func discardCopy(ctx context.Context, cg *cgroups.Cgroup, originals []int) error {
	pids, err := cg.Procs()
	if err != nil {
		return err
	}
	var copyPids []int
	for _, p := range pids {
		if !slices.Contains(originals, p) {
			copyPids = append(copyPids, p)
		}
	}
	return discardPids(ctx, cg, copyPids)
}

// discardPids kills the processes pids of cg quietly (frozen, TCP sockets in repair mode,
// SIGKILL, thawed) and waits until they are reaped.
func discardPids(ctx context.Context, cg *cgroups.Cgroup, copyPids []int) error {
	if len(copyPids) == 0 {
		return nil
	}
	if err := cg.Freeze(ctx); err != nil {
		return err
	}
	var errs []error
	for _, p := range copyPids {
		if _, err := sockets.SetTCPRepair(p, true); err != nil {
			errs = append(errs, err)
		}
		if p > 0 {
			syscall.Kill(p, syscall.SIGKILL)
		}
	}
	if err := cg.Thaw(ctx); err != nil {
		errs = append(errs, err)
	}
	// Wait until they are gone (reaped by the monitor), so their addresses are free for the
	// originals and no zombie is left in the cgroup.
	deadline := time.Now().Add(5 * time.Second)
	for _, p := range copyPids {
		for syscall.Kill(p, 0) == nil && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}
	return errors.Join(errs...)
}

// zombie reports whether a /proc/PID/stat line is a zombie's.
func zombie(stat []byte) bool {
	i := bytes.LastIndexByte(stat, ')') // the command may hold ')'
	return i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z'
}
