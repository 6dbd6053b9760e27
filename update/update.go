package update

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
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
	"github.com/hotctl/hot/events"
	"github.com/hotctl/hot/restore"
	"github.com/hotctl/hot/sockets"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// Options configure an update.
type Options struct {
	CRIU criubin.Binary
	// ReloadSignal is sent to the container's init after the restore, so an application that
	// re-executes itself (nginx-style) picks up the new binary. 0 sends nothing.
	ReloadSignal syscall.Signal
	// ReloadWait is how long to let the reload settle before the health probe; default 200 ms
	// when a reload signal is sent.
	ReloadWait time.Duration
	Health     Health
	// DiscardChanges starts the new generation from the pristine image instead of carrying
	// the files the container wrote; memory state is kept either way.
	DiscardChanges bool
	// NoHold uses CRIU's network lock (packets dropped, clients retransmit) instead of holding
	// packets in an NFQUEUE.
	NoHold bool
	// Lazy is a post-copy update (see postcopy.go): CRIU dumps everything but the memory
	// pages, the processes are restored onto the new root at once and pull their pages from
	// the frozen originals through CRIU's page server, so neither the dump nor the restore
	// copies memory inside the pause. The originals stay frozen, whole, until every page is
	// in: a failure until then resumes them.
	Lazy bool
	// Failpoint is for tests: "kill:PHASE" SIGKILLs this process once PHASE is journaled,
	// "restore" makes the restore onto the new root fail.
	Failpoint string
	Events    *events.Recorder
	Logger    *slog.Logger
}

// Summary is what an update did; it is printed at the end and kept in the event log.
type Summary struct {
	Container string `json:"container"`
	Op        string `json:"op"`
	Outcome   string `json:"outcome"` // updated, rolled-back
	Reason    string `json:"reason,omitempty"`
	FromImage string `json:"fromImage"`
	ToImage   string `json:"toImage"`
	FromGen   int    `json:"fromGeneration"`
	ToGen     int    `json:"toGeneration"`
	// FreezeWindow: from the freeze until the processes ran again (the service pause).
	FreezeWindowMS float64 `json:"freezeWindowMs"`
	// ClientPauseMS: from holding client packets until releasing them (includes verification).
	ClientPauseMS float64 `json:"clientPauseMs"`
	DumpMS        float64 `json:"dumpMs"`
	RestoreMS     float64 `json:"restoreMs"`
	// MemoryInMS (with Lazy): from the restore's start until all memory was in.
	MemoryInMS   float64 `json:"memoryInMs,omitempty"`
	DumpBytes    uint64  `json:"dumpBytes"`
	FilesCarried int     `json:"filesCarried"`
	// Replaced are held files whose content changed: the processes keep the running content,
	// the new content is at the path.
	Replaced     []string       `json:"replaced,omitempty"`
	OldCode      []OldCode      `json:"processesOnOldCode,omitempty"`
	TCPBefore    int            `json:"tcpEstablishedBefore"`
	TCPAfter     int            `json:"tcpEstablishedAfter"`
	Holding      string         `json:"holding"` // nfqueue, or criu-lock with the reason
	HeldPackets  int            `json:"heldPackets"`
	HealthProbes int            `json:"healthProbes,omitempty"`
	Events       []events.Event `json:"-"`
}

// OldCode is a process that still maps files the update replaced.
type OldCode struct {
	PID   int      `json:"pid"`
	Comm  string   `json:"comm"`
	Files []string `json:"files"`
}

// ErrBusy is matched by the error for a container that another hot process is updating.
var ErrBusy = errors.New("container busy")

// target is what the new generation is made of.
type target struct {
	image   string
	imageID digest.Digest
	lowers  []string // bottom first
}

// Update hot-updates the running container ref to image: its processes keep their memory and
// TCP connections and continue on a root made of the new image's layers topped by what the
// container wrote (unless DiscardChanges). On any failure after the freeze the pre-update
// processes are restored onto the old generation: the container keeps running as before.
func Update(ctx context.Context, mgr *container.Manager, store *cowfs.Store, ref, image string, o Options) (*Summary, error) {
	img, err := store.Resolve(ctx, image)
	if err != nil {
		return nil, err
	}
	return run(ctx, mgr, store, ref, "update", o, func(st *container.State, cur *container.Generation) (*target, error) {
		if img.ID == cur.ImageID {
			return nil, fmt.Errorf("container %s already runs image %s (%s): nothing to update", st.Name, image, shortID(img.ID))
		}
		t := &target{image: image, imageID: img.ID, lowers: slices.Clone(img.LayerDirs)}
		if !o.DiscardChanges {
			t.lowers = append(t.lowers, carriedLayers(cur)...)
		}
		return t, nil
	})
}

// carriedLayers are what the container wrote up to now, bottom first: the uppers earlier
// updates carried (the generation's lowers inside the container's generations directory)
// and the running upper.
func carriedLayers(cur *container.Generation) []string {
	gens := filepath.Dir(filepath.Dir(cur.Upper)) + string(filepath.Separator)
	var out []string
	for _, d := range cur.LowerDirs {
		if strings.HasPrefix(d, gens) {
			out = append(out, d)
		}
	}
	return append(out, cur.Upper)
}

// Rollback goes back to the previous generation's image the same way: the processes keep
// their memory and connections; the root is the previous generation's image and files, plus
// (unless DiscardChanges) the files written since the update.
func Rollback(ctx context.Context, mgr *container.Manager, store *cowfs.Store, ref string, o Options) (*Summary, error) {
	return run(ctx, mgr, store, ref, "rollback", o, func(st *container.State, cur *container.Generation) (*target, error) {
		prev := previousGeneration(st)
		if prev == nil {
			return nil, fmt.Errorf("container %s has no earlier generation to roll back to ('hot history %s')", st.Name, st.Name)
		}
		t := &target{image: prev.Image, imageID: prev.ImageID, lowers: append(slices.Clone(prev.LowerDirs), prev.Upper)}
		if !o.DiscardChanges {
			t.lowers = append(t.lowers, cur.Upper)
		}
		return t, nil
	})
}

// previousGeneration is the generation the current one was created from.
func previousGeneration(st *container.State) *container.Generation {
	var prev *container.Generation
	for i := range st.Generations {
		g := &st.Generations[i]
		if g.N < st.Current && (prev == nil || g.N > prev.N) && g.ImageID != st.CurrentGeneration().ImageID {
			prev = g
		}
	}
	return prev
}

// updater carries one update through its phases.
type updater struct {
	mgr   *container.Manager
	store *cowfs.Store
	o     Options
	log   *slog.Logger
	rec   *events.Recorder
	st    *container.State
	cur   *container.Generation
	gen   container.Generation
	t     *target
	j     journal
	cg    *cgroups.Cgroup
	hold  *sockets.Holder
	sum   Summary
	chg   []Change

	holdStart time.Time
	stashed   []string // paths stashCopies moved out of the old upper (post-copy)
	inPause   bool     // clients are held: records are written without fsync (see save)
}

// stashDir is where a post-copy update keeps the copies it took out of the old upper.
func (u *updater) stashDir() string { return filepath.Join(u.j.GenDir, "stashed") }

func run(ctx context.Context, mgr *container.Manager, store *cowfs.Store, ref, op string, o Options, pick func(*container.State, *container.Generation) (*target, error)) (*Summary, error) {
	if err := Recover(ctx, mgr, store, ref, o.CRIU, o.Logger); err != nil {
		return nil, err
	}
	u := &updater{mgr: mgr, store: store, o: o, log: o.Logger, rec: o.Events}
	if u.log == nil {
		u.log = slog.New(slog.DiscardHandler)
	}
	var sum *Summary
	err := mgr.WithLock(ctx, ref, func(st *container.State) error {
		u.st = st
		if u.rec == nil {
			u.rec = events.NewRecorder(op, st.Name)
		}
		var err error
		sum, err = u.run(ctx, op, pick)
		return err
	})
	if sum != nil {
		sum.Events = u.rec.Events()
	}
	return sum, err
}

// run is the whole update, top to bottom. Every step after the freeze either moves forward or
// hands over to rollback; the journal says how far it got in case this process dies.
func (u *updater) run(ctx context.Context, op string, pick func(*container.State, *container.Generation) (*target, error)) (*Summary, error) {
	st := u.st
	// ── preflight: nothing is touched ──
	span := u.rec.Start("preflight")
	if err := u.preflight(ctx, pick); err != nil {
		return nil, span.End(err, nil)
	}
	span.End(nil, map[string]any{"image": u.t.image, "replaced": len(u.chg), "tcp": u.sum.TCPBefore})
	u.sum.Op, u.sum.Container, u.sum.FromImage, u.sum.ToImage = op, st.Name, u.cur.Image, u.t.image

	// ── prepare the new generation beside the running one ──
	span = u.rec.Start("prepare")
	if err := u.prepare(ctx, op); err != nil {
		u.discardGeneration(ctx)
		return nil, span.End(err, nil)
	}
	span.End(nil, map[string]any{"generation": u.gen.N, "carried": u.sum.FilesCarried, "holding": u.sum.Holding})
	u.failpoint(phasePrepared)
	if u.o.Lazy {
		return u.postCopy(ctx)
	}

	// ── freeze + dump (checkpoint freezes the cgroup itself once CRIU has started, and waits
	// for FROZEN; packets are held from right before the freeze) ──
	if err := u.journal(phaseDumping); err != nil {
		u.releaseHold()
		u.discardGeneration(ctx)
		return nil, err
	}
	u.failpoint(phaseDumping)
	span = u.rec.Start("dump")
	dres, err := checkpoint.ContainerLocked(ctx, u.mgr, st, checkpoint.ContainerOptions{
		CRIU: u.o.CRIU, ImagesDir: u.j.ImagesDir, NetworkLock: u.networkLock(), Logger: u.log,
		BeforeFreeze: u.startHold,
	})
	if err != nil {
		// Dump thawed the processes and removed CRIU's lock: the container runs as before.
		span.End(err, nil)
		u.releaseHold()
		u.discardGeneration(ctx)
		return nil, fmt.Errorf("%s %s: dump failed, container still running the old generation: %w", op, st.Name, err)
	}
	u.sum.DumpMS, u.sum.DumpBytes = ms(dres.Stats.Total), dres.Stats.BytesWritten
	span.End(nil, map[string]any{"freezeMs": ms(dres.Stats.Freeze), "bytes": dres.Stats.BytesWritten, "pages": dres.Stats.PagesWritten,
		"criuFrozenMs": ms(dres.Stats.CRIUFrozen), "memDumpMs": ms(dres.Stats.MemDump), "memWriteMs": ms(dres.Stats.MemWrite)})
	if err := u.save(phaseDumped); err != nil {
		return u.rollback(ctx, err)
	}
	u.failpoint(phaseDumped)

	// ── swap the root to the new generation ──
	span = u.rec.Start("swap")
	if err := u.swap(ctx); err != nil {
		span.End(err, nil)
		return u.rollback(ctx, err)
	}
	span.End(nil, map[string]any{"generation": u.gen.N})
	u.failpoint(phaseSwapped)

	// ── restore in place, under the container's monitor ──
	span = u.rec.Start("restore")
	rres, err := u.restore(ctx)
	if err != nil {
		span.End(err, nil)
		return u.rollback(ctx, err)
	}
	u.sum.RestoreMS = ms(rres.Running)
	u.sum.FreezeWindowMS = ms(time.Since(dres.Stats.FrozenAt))
	span.End(nil, map[string]any{"pid": rres.PID, "freezeWindowMs": u.sum.FreezeWindowMS,
		"criuRestoreMs": ms(rres.Stats.Restore), "criuForkingMs": ms(rres.Stats.Forking)})
	// ── publish the new content, verify: alive, reloaded, healthy (packets still held) ──
	if err := u.settle(ctx, nil); err != nil {
		return u.rollback(ctx, err)
	}

	// ── commit ──
	span = u.rec.Start("commit")
	u.commit(ctx)
	span.End(nil, map[string]any{"clientPauseMs": u.sum.ClientPauseMS, "heldPackets": u.sum.HeldPackets, "tcpAfter": u.sum.TCPAfter})
	u.sum.Outcome = "updated"
	return &u.sum, nil
}

func (u *updater) preflight(ctx context.Context, pick func(*container.State, *container.Generation) (*target, error)) error {
	st := u.st
	c := u.mgr.Reconciled(st)
	if c.Status != container.StatusRunning {
		reason := ""
		if c.Reason != "" {
			reason = " (" + c.Reason + ")"
		}
		return fmt.Errorf("container %s is %s%s: only a running container can be hot-updated", st.Name, c.Status, reason)
	}
	u.cur = st.CurrentGeneration()
	if u.cur == nil {
		return fmt.Errorf("container %s has no current generation in its state", st.Name)
	}
	t, err := pick(st, u.cur)
	if err != nil {
		return err
	}
	u.t = t
	if u.o.CRIU.Path == "" {
		return errors.New("no CRIU binary given")
	}
	if u.cg, err = cgroups.Load(st.Cgroup); err != nil {
		return fmt.Errorf("container %s: %w", st.Name, err)
	}
	pids, err := u.cg.Procs()
	if err != nil {
		return fmt.Errorf("container %s: list processes: %w", st.Name, err)
	}
	held, err := heldFiles(pids)
	if err != nil {
		return fmt.Errorf("container %s: list open and mapped files: %w", st.Name, err)
	}
	oldStack := append(slices.Clone(u.cur.LowerDirs), u.cur.Upper)
	// Copies an earlier update put into the running upper on the image's behalf are dropped
	// when that upper becomes a lower (swap); the new view must not see them.
	var hidden map[string]map[string]bool
	if slices.Contains(t.lowers, u.cur.Upper) {
		red, err := redundantCopies(u.cur)
		if err != nil {
			return fmt.Errorf("container %s: %w", st.Name, err)
		}
		hidden = map[string]map[string]bool{u.cur.Upper: red}
	}
	if u.chg, err = diffHeld(held, oldStack, t.lowers, hidden); err != nil {
		return fmt.Errorf("container %s: compare held files with the new generation: %w", st.Name, err)
	}
	for _, c := range u.chg {
		u.sum.Replaced = append(u.sum.Replaced, c.Path)
	}
	if st.Network.NetnsPath != "" {
		if n, err := sockets.CountEstablished(ctx, st.Network.NetnsPath); err == nil {
			u.sum.TCPBefore = n
		}
	}
	return nil
}

func (u *updater) prepare(ctx context.Context, op string) error {
	st := u.st
	next := 0
	for _, g := range st.Generations {
		next = max(next, g.N)
	}
	next++
	dir := filepath.Join(u.mgr.Dir(st.ID), "generations", strconv.Itoa(next))
	u.gen = container.Generation{N: next, Image: u.t.image, ImageID: u.t.imageID, LowerDirs: u.t.lowers,
		Upper: filepath.Join(dir, "upper"), Work: filepath.Join(dir, "work")}
	u.sum.FromGen, u.sum.ToGen = u.cur.N, next
	u.j = journal{Owner: os.Getpid(), Op: op, From: u.cur.N, To: next, GenDir: dir, Image: u.t.image, ImageID: u.t.imageID,
		ImagesDir: filepath.Join(u.mgr.RunDir(st.ID), "update-images"), Started: time.Now().UTC()}
	u.j.OwnerStart, _ = container.ProcStartTime(os.Getpid())
	if err := os.RemoveAll(u.j.ImagesDir); err != nil {
		return fmt.Errorf("clear images dir: %w", err)
	}
	if err := u.journal(phasePrepared); err != nil {
		return err
	}
	for _, d := range []string{u.gen.Upper, u.gen.Work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create generation %d: %w", next, err)
		}
	}
	if err := u.store.Hold(ctx, u.t.imageID, st.ID); err != nil {
		return err
	}
	if err := stageOld(u.chg, u.gen.Upper, u.gen.LowerDirs); err != nil {
		return err
	}
	if !u.o.DiscardChanges || op == "rollback" {
		u.sum.FilesCarried = countEntries(u.cur.Upper)
	}
	u.sum.Holding = "criu-lock"
	if u.o.NoHold {
		u.sum.Holding += " (--no-hold)"
	} else if st.Network.NetnsPath != "" {
		h, err := sockets.NewHolder(ctx, st.Network.NetnsPath, sockets.HoldOptions{Logger: u.log})
		if err != nil {
			u.sum.Holding += " (holding impossible: " + err.Error() + ")"
			u.log.Warn("packets will be dropped during the pause, not held", "error", err)
		} else {
			u.hold, u.sum.Holding = h, "nfqueue"
		}
	}
	return nil
}

func (u *updater) networkLock() string {
	if u.hold != nil {
		return "skip"
	}
	return ""
}

// swap mounts the new generation at the container's rootfs and records it as current.
func (u *updater) swap(ctx context.Context) error {
	st := u.st
	if err := cowfs.Unmount(st.Rootfs); err != nil {
		return err
	}
	if slices.Contains(u.gen.LowerDirs, u.cur.Upper) {
		red, err := redundantCopies(u.cur)
		if err == nil && u.o.Lazy {
			// The originals may still be resumed on the old upper: keep the copies aside.
			u.stashed = slices.Clone(u.cur.Published)
			u.j.Stashed = u.stashed
			err = stashCopies(u.cur.Upper, red, u.stashDir())
		} else if err == nil {
			err = dropCopies(u.cur.Upper, red)
		}
		if err != nil {
			u.log.Warn("keep earlier update's copies", "error", err)
		}
		if g := generation(st, u.cur.N); g != nil {
			g.Published = nil
		}
	}
	if err := cowfs.MountOverlay(st.Rootfs, u.gen.LowerDirs, u.gen.Upper, u.gen.Work); err != nil {
		// Put the old root back so rollback finds it.
		if merr := cowfs.MountOverlay(st.Rootfs, u.cur.LowerDirs, u.cur.Upper, u.cur.Work); merr != nil {
			u.log.Error("remount old generation", "error", merr)
		}
		return fmt.Errorf("mount generation %d: %w", u.gen.N, err)
	}
	st.Generations = append(st.Generations, u.gen)
	st.Current = u.gen.N
	u.cur = generation(st, u.j.From) // the slice may have moved
	return u.save(phaseSwapped)
}

func (u *updater) restore(ctx context.Context) (*restore.Result, error) {
	if u.o.Failpoint == "restore" {
		return nil, errors.New("injected restore failure (failpoint)")
	}
	r, err := restore.ContainerLocked(ctx, u.mgr, u.st, restore.ContainerOptions{CRIU: u.o.CRIU, Logger: u.log})
	if err != nil {
		return nil, err
	}
	return &r.Result, nil
}

// settle follows a successful restore: the new content goes to the changed paths (pre is what
// a post-copy update copied ahead, or nil), the journal records the restore, and the
// restored processes are verified while client packets are still held.
func (u *updater) settle(ctx context.Context, pre *publishing) error {
	if err := publishNew(u.chg, u.st.Rootfs, pre); err != nil {
		return err
	}
	if err := u.save(phaseRestored); err != nil {
		return err
	}
	u.failpoint(phaseRestored)
	span := u.rec.Start("verify")
	if err := u.verify(ctx); err != nil {
		return span.End(err, nil)
	}
	span.End(nil, map[string]any{"probes": u.sum.HealthProbes, "health": u.o.Health.String()})
	return nil
}

func (u *updater) verify(ctx context.Context) error {
	st := u.st
	if err := syscall.Kill(st.Pid, 0); err != nil {
		return fmt.Errorf("restored init (pid %d) is not running: %w", st.Pid, err)
	}
	if u.o.ReloadSignal != 0 {
		if err := syscall.Kill(st.Pid, u.o.ReloadSignal); err != nil {
			return fmt.Errorf("send %s to pid %d: %w", u.o.ReloadSignal, st.Pid, err)
		}
		wait := u.o.ReloadWait
		if wait == 0 {
			wait = 200 * time.Millisecond
		}
		if !u.o.Health.Enabled() {
			waitReload(st.Pid, wait)
		}
	}
	n, err := u.o.Health.wait(ctx, st.Network.NetnsPath, st.Network.IP)
	u.sum.HealthProbes = n
	if err != nil {
		return err
	}
	if err := syscall.Kill(st.Pid, 0); err != nil {
		return fmt.Errorf("container init (pid %d) died after the restore: %w", st.Pid, err)
	}
	return nil
}

func (u *updater) commit(ctx context.Context) {
	st := u.st
	u.releaseHold()
	st.Image, st.ImageID = u.t.image, u.t.imageID
	if g := generation(st, u.gen.N); g != nil {
		for _, c := range u.chg {
			if !c.Removed() {
				g.Published = append(g.Published, c.Path)
			}
		}
	}
	if err := u.mgr.Save(st); err != nil {
		u.log.Error("record committed state", "error", err)
	}
	if err := removeJournal(u.mgr.Dir(st.ID)); err != nil {
		u.log.Error("commit", "error", err)
	}
	os.RemoveAll(u.j.ImagesDir)
	os.RemoveAll(u.stashDir())
	os.Remove(filepath.Join(u.mgr.Dir(st.ID), checkpoint.RecordFile))
	if st.Network.NetnsPath != "" {
		if n, err := sockets.CountEstablished(ctx, st.Network.NetnsPath); err == nil {
			u.sum.TCPAfter = n
		}
	}
	if pids, err := u.cg.Procs(); err == nil {
		u.sum.OldCode = oldCode(pids, u.chg)
	}
}

// rollback restores the pre-update processes onto the old generation. It is used for every
// failure after the dump: the images hold the processes as they were when frozen.
func (u *updater) rollback(ctx context.Context, cause error) (*Summary, error) {
	span := u.rec.Start("rollback")
	err := rollbackTo(ctx, u.mgr, u.store, u.st, &u.j, u.o.CRIU, u.hold != nil, u.log)
	u.releaseHold()
	u.sum.Outcome, u.sum.Reason = "rolled-back", cause.Error()
	if err != nil {
		span.End(err, nil)
		return &u.sum, fmt.Errorf("%s %s failed (%v) and the rollback failed too: %w", u.j.Op, u.st.Name, cause, err)
	}
	span.End(nil, map[string]any{"generation": u.j.From})
	return &u.sum, fmt.Errorf("%s %s rolled back, the container runs generation %d as before: %w", u.j.Op, u.st.Name, u.j.From, cause)
}

// rollbackTo puts the container back on generation j.From with the processes from the
// images in j.ImagesDir. It works from the journal and the state alone, so Recover uses it too.
//
// Client packets must not reach the namespace while no process owns the connections (the
// kernel would answer them with RST): unless the caller holds them already (holding), a
// Holder holds them until the restore is done; if none can be installed, they are dropped by
// the orphaned rules of a crashed hot or, failing that, meet no socket briefly.
func rollbackTo(ctx context.Context, mgr *container.Manager, store *cowfs.Store, st *container.State, j *journal, criu criubin.Binary, holding bool, log *slog.Logger) error {
	if _, err := os.Stat(filepath.Join(j.ImagesDir, "inventory.img")); err != nil {
		return fmt.Errorf("no complete pre-update images in %s: %w", j.ImagesDir, err)
	}
	if !holding && st.Network.NetnsPath != "" {
		// Our rules go on top of any a crashed hot left (those drop packets); once the
		// processes are back, the held packets go through and every hold rule goes.
		h, err := sockets.NewHolder(ctx, st.Network.NetnsPath, sockets.HoldOptions{StartHolding: true, Logger: log})
		if err != nil {
			log.Warn("rollback without holding packets", "error", err)
		}
		defer func() {
			if h != nil {
				h.Release()
			}
			sockets.Cleanup(ctx, st.Network.NetnsPath)
			if h != nil {
				h.Close()
			}
		}()
	}
	cg, err := cgroups.Load(st.Cgroup)
	if err != nil {
		return err
	}
	// Processes restored onto the new generation (if any) go: the images are the truth. Their
	// TCP sockets are closed in repair mode, so the clients see no FIN or RST and the
	// connections are restored from the images.
	if pids, _ := cg.Procs(); len(pids) > 0 {
		if err := discardQuietly(ctx, cg, pids, log); err != nil {
			return fmt.Errorf("stop the processes restored onto generation %d: %w", j.To, err)
		}
	}
	if frozen, _ := cg.Frozen(); frozen {
		cg.Thaw(ctx)
	}
	old := generation(st, j.From)
	if old == nil {
		return fmt.Errorf("generation %d is missing from the state", j.From)
	}
	if st.Current != j.From || !isMounted(st.Rootfs) {
		if err := cowfs.Unmount(st.Rootfs); err != nil {
			return err
		}
		if err := cowfs.MountOverlay(st.Rootfs, old.LowerDirs, old.Upper, old.Work); err != nil {
			return fmt.Errorf("mount generation %d: %w", j.From, err)
		}
	}
	st.Generations = slices.DeleteFunc(st.Generations, func(g container.Generation) bool { return g.N == j.To })
	st.Current = j.From
	st.Status, st.Pid, st.PidStart = container.StatusCheckpointed, 0, 0
	if err := mgr.Save(st); err != nil {
		return err
	}
	if _, err := restore.ContainerLocked(ctx, mgr, st, restore.ContainerOptions{CRIU: criu, Logger: log}); err != nil {
		return fmt.Errorf("restore the pre-update processes onto generation %d (images kept in %s; retry with 'hot restore %s'): %w", j.From, j.ImagesDir, st.Name, err)
	}
	if err := mgr.Save(st); err != nil {
		return err
	}
	os.RemoveAll(j.GenDir)
	os.RemoveAll(j.ImagesDir)
	os.Remove(filepath.Join(mgr.Dir(st.ID), checkpoint.RecordFile))
	if j.ImageID != st.ImageID && !usesImage(st, j.ImageID) {
		store.Release(ctx, j.ImageID, st.ID)
	}
	return removeJournal(mgr.Dir(st.ID))
}

// waitReload gives a reload signal time to act, up to limit: it returns as soon as the init's
// executable is no longer a deleted file (it re-executed the new binary at its path). An init
// whose binary was not replaced shows no such change, and the full limit passes.
func waitReload(pid int, limit time.Duration) {
	exe := fmt.Sprintf("/proc/%d/exe", pid)
	if t, err := os.Readlink(exe); err != nil || !strings.HasSuffix(t, " (deleted)") {
		time.Sleep(limit) // nothing observable to wait for
		return
	}
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if t, err := os.Readlink(exe); err == nil && !strings.HasSuffix(t, " (deleted)") {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// discardQuietly kills the processes of cg without their TCP peers noticing: frozen, every
// TCP socket switched to repair mode, then SIGKILL.
func discardQuietly(ctx context.Context, cg *cgroups.Cgroup, pids []int, log *slog.Logger) error {
	if err := cg.Freeze(ctx); err != nil {
		return err
	}
	n := 0
	for _, pid := range pids {
		k, err := sockets.SetTCPRepair(pid, true)
		if err != nil {
			return err
		}
		n += k
	}
	log.Debug("discarding restored processes quietly", "pids", pids, "socketsInRepair", n)
	return cg.Kill(ctx)
}

// discardGeneration undoes prepare when nothing was stopped yet.
func (u *updater) discardGeneration(ctx context.Context) {
	if u.j.GenDir != "" {
		os.RemoveAll(u.j.GenDir)
	}
	if u.t != nil && !usesImage(u.st, u.t.imageID) {
		u.store.Release(ctx, u.t.imageID, u.st.ID)
	}
	if u.hold != nil {
		u.hold.Close()
		u.hold = nil
	}
	if err := removeJournal(u.mgr.Dir(u.st.ID)); err != nil {
		u.log.Error("discard update", "error", err)
	}
}

// startHold starts holding the container's packets (called right before the freeze).
func (u *updater) startHold() {
	if u.hold == nil {
		return
	}
	u.holdStart = time.Now()
	if err := u.hold.Hold(); err != nil {
		u.log.Warn("hold packets", "error", err)
	}
}

func (u *updater) releaseHold() {
	if u.hold == nil {
		return
	}
	stats, err := u.hold.Release()
	if err != nil {
		u.log.Warn("release held packets", "error", err)
	}
	if !u.holdStart.IsZero() {
		u.sum.ClientPauseMS = ms(time.Since(u.holdStart))
	}
	u.sum.HeldPackets = stats.Packets
	u.hold.Close()
	u.hold = nil
}

func (u *updater) journal(phase string) error {
	u.j.Phase = phase
	if u.inPause {
		return container.WriteJSONAtomicNoSync(journalPath(u.mgr.Dir(u.st.ID)), u.j)
	}
	return container.WriteJSONAtomic(journalPath(u.mgr.Dir(u.st.ID)), u.j)
}

// save records the state and the journal phase, state first: a crash in between leaves a
// journal one phase behind, which Recover handles the same way. Inside the pause (inPause)
// the writes are atomic but not fsynced: a killed hot loses nothing, a power loss ends the
// processes anyway, and the commit saves durably.
func (u *updater) save(phase string) error {
	save := u.mgr.Save
	if u.inPause {
		save = u.mgr.SaveNoSync
	}
	if err := save(u.st); err != nil {
		return err
	}
	return u.journal(phase)
}

func (u *updater) failpoint(phase string) {
	if u.o.Failpoint == "kill:"+phase {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
}

func generation(st *container.State, n int) *container.Generation {
	for i := range st.Generations {
		if st.Generations[i].N == n {
			return &st.Generations[i]
		}
	}
	return nil
}

func usesImage(st *container.State, id digest.Digest) bool {
	for _, g := range st.Generations {
		if g.ImageID == id {
			return true
		}
	}
	return false
}

func isMounted(path string) bool {
	var st, parent unix.Stat_t
	if unix.Stat(path, &st) != nil || unix.Stat(filepath.Dir(path), &parent) != nil {
		return false
	}
	return st.Dev != parent.Dev
}

func countEntries(dir string) int {
	n := 0
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && p != dir {
			n++
		}
		return nil
	})
	return n
}

// oldCode lists processes that still map a replaced file (the old inode, now deleted).
func oldCode(pids []int, changes []Change) []OldCode {
	if len(changes) == 0 {
		return nil
	}
	var out []OldCode
	for _, pid := range pids {
		maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
		if err != nil {
			continue
		}
		var files []string
		for _, c := range changes {
			if strings.Contains(string(maps), c.Path+" (deleted)") {
				files = append(files, c.Path)
			}
		}
		if len(files) > 0 {
			comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			out = append(out, OldCode{PID: pid, Comm: strings.TrimSpace(string(comm)), Files: files})
		}
	}
	return out
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func shortID(d digest.Digest) string {
	e := d.Encoded()
	if len(e) > 12 {
		e = e[:12]
	}
	return e
}
