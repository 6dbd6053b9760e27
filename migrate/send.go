package migrate

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/cowfs"
	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/events"
	"github.com/hotctl/hot/network"
	"github.com/hotctl/hot/restore"
)

// Options configure a migration.
type Options struct {
	To    string // the target agent, host:port
	Token []byte
	TLS   TLSFiles
	CRIU  criubin.Binary
	Lazy  bool
	// Progress is called while data is sent (at most every 100 ms and once at the end of
	// each transfer) with the transfer's name, bytes sent and bytes in total.
	Progress func(what string, sent, total int64, elapsed time.Duration)
	// Failpoint is for tests: "tamper" flips a byte of the stream after it was hashed,
	// "kill-after-dump" SIGKILLs this process once the container is dumped and off the bridge.
	Failpoint string
	Events    *events.Recorder
	Logger    *slog.Logger
}

// Summary is what a migration did.
type Summary struct {
	Container string `json:"container"`
	To        string `json:"to"`
	Outcome   string `json:"outcome"` // migrated, restored-locally
	Reason    string `json:"reason,omitempty"`
	Mode      string `json:"mode"` // stop-and-copy, lazy
	ImagePush int64  `json:"imagePushBytes"`
	// StreamBytes is the migration stream (CRIU images, upper layer, state) as sent.
	StreamBytes int64   `json:"streamBytes"`
	StreamMBps  float64 `json:"streamMBps"`
	DumpMS      float64 `json:"dumpMs"`
	// DowntimeMS: from the freeze until the target reported the processes running again.
	DowntimeMS float64 `json:"downtimeMs"`
	TotalMS    float64 `json:"totalMs"`
	Target     *Result `json:"target,omitempty"`
	// Notes say what was adjusted or is unavailable on this host (fs.pipe-max-size, pre-copy).
	Notes []string `json:"notes,omitempty"`
}

// Migrate moves the running container ref to the agent at o.To: preflight, push the image
// if the target lacks it, freeze and dump, stream, and let the target restore. The local copy
// is removed only after the target confirmed that the processes run there; on any failure
// before that, the container is restored here from its images (nothing is lost) and the
// error says so.
func Migrate(ctx context.Context, mgr *container.Manager, store *cowfs.Store, ref string, o Options) (*Summary, error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	rec := o.Events
	if rec == nil {
		rec = events.NewRecorder("migrate", ref)
	}
	cl, err := newClient(o)
	if err != nil {
		return nil, err
	}
	s := &sender{mgr: mgr, store: store, o: o, log: log, rec: rec, cl: cl, start: time.Now()}
	s.sum.To, s.sum.Mode = o.To, "stop-and-copy"
	if o.Lazy {
		s.sum.Mode = "lazy"
	}
	var migrated bool
	err = mgr.WithLock(ctx, ref, func(st *container.State) error {
		s.st = st
		s.sum.Container = st.Name
		var err error
		migrated, err = s.run(ctx)
		return err
	})
	s.sum.TotalMS = ms(time.Since(s.start))
	if err != nil {
		return &s.sum, err
	}
	if migrated {
		// The target runs the container: the local copy (checkpointed, off the segment) goes.
		span := rec.Start("cleanup")
		if err := mgr.Remove(context.WithoutCancel(ctx), s.st.ID, true); err != nil {
			span.End(err, nil)
			return &s.sum, fmt.Errorf("%s runs on %s, but removing the local copy failed (remove it with 'hot rm -f %s'): %w", s.st.Name, o.To, s.st.Name, err)
		}
		span.End(nil, nil)
		s.sum.TotalMS = ms(time.Since(s.start))
	}
	return &s.sum, nil
}

type sender struct {
	mgr   *container.Manager
	store *cowfs.Store
	o     Options
	log   *slog.Logger
	rec   *events.Recorder
	cl    *client
	st    *container.State
	gen   *container.Generation
	imgs  string // CRIU images dir
	start time.Time
	sum   Summary
}

// run is the migration, top to bottom. It reports whether the target confirmed.
func (s *sender) run(ctx context.Context) (bool, error) {
	st := s.st
	// ── preflight: nothing is touched ──
	span := s.rec.Start("preflight")
	pre, err := s.preflight(ctx)
	if err != nil {
		return false, span.End(err, nil)
	}
	span.End(nil, map[string]any{"target": pre.Target.Kernel, "criu": pre.Target.CRIUVersion, "haveImage": pre.HaveImage})

	// ── push the image before anything stops ──
	if !pre.HaveImage {
		span = s.rec.Start("push-image")
		n, err := s.pushImage(ctx)
		if err != nil {
			return false, span.End(err, nil)
		}
		s.sum.ImagePush = n
		span.End(nil, map[string]any{"bytes": n})
	}

	// ── freeze + dump; from here on, any failure restores the container here ──
	freezeStart := time.Now()
	s.imgs = filepath.Join(s.mgr.RunDir(st.ID), "migrate-out")
	if err := os.RemoveAll(s.imgs); err != nil {
		return false, err
	}
	if s.o.Lazy {
		return s.runLazy(ctx, freezeStart)
	}
	span = s.rec.Start("dump")
	dres, err := checkpoint.ContainerLocked(ctx, s.mgr, st, checkpoint.ContainerOptions{CRIU: s.o.CRIU, ImagesDir: s.imgs, Logger: s.log})
	if err != nil {
		// Dump thawed the processes and removed CRIU's lock: the container runs as before.
		os.RemoveAll(s.imgs)
		return false, span.End(fmt.Errorf("migrate %s: dump failed, the container keeps running here: %w", st.Name, err), nil)
	}
	s.sum.DumpMS = ms(dres.Stats.Total)
	span.End(nil, map[string]any{"bytes": dres.Stats.BytesWritten, "freezeMs": ms(dres.Stats.Freeze)})
	if err := s.mgr.Save(st); err != nil {
		return false, s.restoreHere(ctx, err)
	}
	// The address leaves this host's segment: the target claims it.
	if err := s.leaveSegment(); err != nil {
		return false, s.restoreHere(ctx, err)
	}
	if s.o.Failpoint == "kill-after-dump" {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}

	// ── stream; the target verifies everything, then restores ──
	span = s.rec.Start("transfer")
	res, err := s.stream(ctx, "")
	if err != nil {
		span.End(err, nil)
		return false, s.restoreHere(ctx, err)
	}
	s.sum.DowntimeMS = ms(time.Since(freezeStart))
	s.sum.Target = res
	span.End(nil, map[string]any{"bytes": s.sum.StreamBytes, "MBps": s.sum.StreamMBps, "restoreMs": res.RestoreMS, "heldPackets": res.Held})
	s.rec.Note("confirmed", map[string]any{"target": s.o.To, "id": res.ID, "pid": res.PID, "downtimeMs": s.sum.DowntimeMS})
	s.sum.Outcome = "migrated"
	os.RemoveAll(s.imgs)
	return true, nil
}

func (s *sender) preflight(ctx context.Context) (*PreflightResponse, error) {
	st := s.st
	c := s.mgr.Reconciled(st)
	if c.Status != container.StatusRunning {
		reason := ""
		if c.Reason != "" {
			reason = " (" + c.Reason + ")"
		}
		return nil, fmt.Errorf("container %s is %s%s: only a running container can be migrated", st.Name, c.Status, reason)
	}
	if s.o.CRIU.Path == "" {
		return nil, errors.New("no CRIU binary given")
	}
	if s.gen = st.CurrentGeneration(); s.gen == nil {
		return nil, fmt.Errorf("container %s has no current generation in its state", st.Name)
	}
	img, err := s.store.Resolve(ctx, s.gen.ImageID.String())
	if err != nil {
		return nil, fmt.Errorf("container %s: its image: %w", st.Name, err)
	}
	if !slices.Equal(s.gen.LowerDirs, img.LayerDirs) {
		// After a hot update the root also stacks earlier generations' uppers, which the
		// archive format does not carry (it has one upper layer).
		return nil, fmt.Errorf("container %s: its root stacks %d layers of its own below its upper (it was hot-updated): migrating such a container is not supported yet", st.Name, len(s.gen.LowerDirs)-len(img.LayerDirs))
	}
	facts, err := LocalFacts(s.o.CRIU.Version.String())
	if err != nil {
		return nil, err
	}
	req := PreflightRequest{Name: st.Name, Image: s.gen.Image, ImageID: img.ID, DiffIDs: img.Config.RootFS.DiffIDs,
		IP: st.Network.IP, Bridge: st.Network.Bridge, Subnet: st.Network.Subnet, Lazy: s.o.Lazy, Source: facts}
	var resp PreflightResponse
	if err := s.cl.postJSON(ctx, PathPreflight, req, &resp); err != nil {
		return nil, fmt.Errorf("preflight with %s: %w", s.o.To, err)
	}
	if len(resp.Problems) > 0 {
		return nil, fmt.Errorf("preflight: %s refuses %s: %s", s.o.To, st.Name, joinProblems(resp.Problems))
	}
	return &resp, nil
}

func joinProblems(p []string) string {
	var b bytes.Buffer
	for i, x := range p {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(x)
	}
	return b.String()
}

// pushImage sends the container's image as an OCI archive; the target imports it with the
// store's verification (every blob against its digest).
func (s *sender) pushImage(ctx context.Context) (int64, error) {
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(s.store.Export(ctx, s.gen.ImageID.String(), pw)) }()
	body := s.progressReader("image", pr, -1)
	var resp ImageResponse
	err := s.cl.post(ctx, PathImage+"?id="+s.gen.ImageID.String(), "application/x-tar", body, -1, &resp)
	pr.CloseWithError(io.ErrClosedPipe)
	if err != nil {
		return 0, fmt.Errorf("push image %s to %s: %w", s.gen.Image, s.o.To, err)
	}
	return body.n.Load(), nil
}

// restoreHere brings the container back on this host after a failure past the dump.
func (s *sender) restoreHere(ctx context.Context, cause error) error {
	st := s.st
	span := s.rec.Start("restore-here")
	ctx = context.WithoutCancel(ctx)
	s.rejoinSegment()
	_, err := restore.ContainerLocked(ctx, s.mgr, st, restore.ContainerOptions{CRIU: s.o.CRIU, Logger: s.log})
	if err == nil {
		// The caller returns an error, so WithLock will not save the state: do it here.
		err = s.mgr.Save(st)
	}
	s.sum.Outcome, s.sum.Reason = "restored-locally", cause.Error()
	if err != nil {
		span.End(err, nil)
		return fmt.Errorf("migrate %s failed (%v) and restoring it here failed too (images kept in %s; retry with 'hot restore %s'): %w", st.Name, cause, s.imgs, st.Name, err)
	}
	s.announce()
	span.End(nil, nil)
	return fmt.Errorf("migrate %s to %s failed, the container runs here again with its connections: %w", st.Name, s.o.To, cause)
}

// leaveSegment takes the container's veth down: its address stops answering here.
func (s *sender) leaveSegment() error {
	if s.st.Network.HostVeth == "" {
		return nil
	}
	return network.SetHostLink(s.st.Network.HostVeth, false)
}

// rejoinSegment puts the container back on the bridge after a failure.
func (s *sender) rejoinSegment() {
	if s.st.Network.HostVeth != "" {
		if err := network.SetHostLink(s.st.Network.HostVeth, true); err != nil {
			s.log.Error("put the container back on the bridge", "error", err)
		}
	}
}

// announce claims the address again (the target may have announced it already).
func (s *sender) announce() {
	st := s.st
	if st.Network.NetnsPath != "" && st.Network.IP.IsValid() {
		if err := network.Announce(st.Network.NetnsPath, st.Network.IP, 3, 50*time.Millisecond); err != nil {
			s.log.Warn("gratuitous ARP", "error", err)
		}
	}
}

// runLazy is the rest of run for --lazy (post-copy): dump without memory pages, stream, let
// the target restore and pull the pages from this host's page server.
func (s *sender) runLazy(ctx context.Context, freezeStart time.Time) (bool, error) {
	st := s.st
	undo, note, err := checkpoint.RaisePipeMaxSize()
	if err != nil {
		return false, err
	}
	defer undo()
	if note != "" {
		s.sum.Notes = append(s.sum.Notes, note)
		s.rec.Note("pipe-max-size", map[string]any{"note": note})
	}
	if note := precopyNote(ctx, s.o.CRIU.Path); note != "" {
		s.sum.Notes = append(s.sum.Notes, note)
	}
	addr, err := pageServerAddr(s.o.To)
	if err != nil {
		return false, err
	}
	span := s.rec.Start("dump")
	// CRIU's dump returns when the pages are gone; it works on a copy of the state, which is
	// taken over afterwards.
	d := checkpoint.StartLazyDump(ctx, s.mgr, st, checkpoint.ContainerOptions{CRIU: s.o.CRIU, ImagesDir: s.imgs, PageServer: addr, Logger: s.log})
	if err := d.WaitServing(ctx, 2*time.Minute); err != nil {
		if _, derr := d.Abort(); derr != nil {
			// The dump failed: CRIU resumed the processes, the container runs as before.
			os.RemoveAll(s.imgs)
			return false, span.End(fmt.Errorf("migrate %s: lazy dump failed, the container keeps running here: %w", st.Name, err), nil)
		}
		return false, span.End(fmt.Errorf("migrate %s: lazy dump: %w", st.Name, err), nil)
	}
	s.sum.DumpMS = ms(time.Since(freezeStart))
	span.End(nil, map[string]any{"pageServer": addr})
	if err := s.leaveSegment(); err != nil {
		return false, s.abortLazy(ctx, d, err)
	}

	span = s.rec.Start("transfer")
	res, err := s.stream(ctx, addr)
	if err != nil {
		span.End(err, nil)
		return false, s.abortLazy(ctx, d, err)
	}
	s.sum.DowntimeMS = s.sum.DumpMS + res.VerifyMS + res.SetupMS + res.RestoreMS // until running; pages follow
	s.sum.Target = res
	span.End(nil, map[string]any{"bytes": s.sum.StreamBytes, "MBps": s.sum.StreamMBps, "restoreMs": res.RestoreMS, "memoryMs": res.MemoryMS})
	if _, err := d.Wait(time.Minute); err != nil {
		return false, fmt.Errorf("%s runs on %s, but the local lazy dump reported a failure afterwards (check that it does not run here too): %w", st.Name, s.o.To, err)
	}
	st.Status, st.Pid, st.PidStart = d.State.Status, d.State.Pid, d.State.PidStart
	s.rec.Note("confirmed", map[string]any{"target": s.o.To, "id": res.ID, "pid": res.PID})
	s.sum.Outcome = "migrated"
	os.RemoveAll(s.imgs)
	return true, nil
}

// abortLazy handles a failure after a lazy dump started serving: the page server is ended,
// CRIU resumes the processes (a failed transfer is a failed dump), and the container is put
// back on the segment.
func (s *sender) abortLazy(ctx context.Context, d *checkpoint.LazyDump, cause error) error {
	st := s.st
	span := s.rec.Start("resume-here")
	_, derr := d.Abort()
	s.sum.Outcome, s.sum.Reason = "resumed-locally", cause.Error()
	s.rejoinSegment()
	os.RemoveAll(s.imgs)
	if derr == nil {
		// Every page went to the target, whose restore then failed: the memory is gone.
		err := fmt.Errorf("migrate %s to %s failed after the target had pulled all memory pages; the processes are lost (the dump completed): %w", st.Name, s.o.To, cause)
		span.End(err, nil)
		return err
	}
	s.announce()
	span.End(nil, nil)
	return fmt.Errorf("migrate %s to %s failed, the container runs here again with its connections: %w", st.Name, s.o.To, cause)
}

// stream sends the migration stream, a checkpoint archive (checkpoint.WriteArchiveTo) whose
// manifest is authenticated with the token, and waits for the target's answer.
func (s *sender) stream(ctx context.Context, pageServer string) (*Result, error) {
	st := s.st
	rec, err := checkpoint.LoadRecord(s.mgr.Dir(st.ID))
	if err != nil {
		return nil, fmt.Errorf("read checkpoint record: %w", err)
	}
	in := checkpoint.ArchiveInput{
		Manifest: checkpoint.Manifest{CRIUVersion: s.o.CRIU.Version.String(), Container: checkpoint.InfoOf(st), Record: *rec,
			PageServer: pageServer},
		ImagesDir: s.imgs, Config: filepath.Join(s.mgr.Dir(st.ID), "config.json"), UpperDir: s.gen.Upper,
		TmpDir: s.mgr.RunDir(st.ID), MACKey: s.o.Token,
	}
	pr, pw := io.Pipe()
	var w io.Writer = pw
	if s.o.Failpoint == "tamper" {
		w = &tamperWriter{w: pw, at: 64 << 10}
	}
	go func() {
		_, err := checkpoint.WriteArchiveTo(ctx, w, in)
		pw.CloseWithError(err)
	}()
	body := s.progressReader("stream", pr, -1)
	start := time.Now()
	var res Result
	err = s.cl.post(ctx, PathMigration, "application/x-tar", body, -1, &res)
	pr.CloseWithError(io.ErrClosedPipe)
	s.sum.StreamBytes = body.n.Load()
	if d := body.duration(start).Seconds(); d > 0 {
		s.sum.StreamMBps = float64(s.sum.StreamBytes) / 1e6 / d
	}
	if err != nil {
		return nil, fmt.Errorf("send %s to %s: %w", st.Name, s.o.To, err)
	}
	return &res, nil
}

// tamperWriter (failpoint) alters the byte at offset at, like a corrupting link or a man in
// the middle would.
type tamperWriter struct {
	w   io.Writer
	at  int64
	off int64
}

func (t *tamperWriter) Write(b []byte) (int, error) {
	if i := t.at - t.off; i >= 0 && i < int64(len(b)) {
		b = slices.Clone(b)
		b[i] ^= 0xff
	}
	t.off += int64(len(b))
	return t.w.Write(b)
}

// progress counts bytes read through it and reports them.
type progress struct {
	r     io.Reader
	n     atomic.Int64
	end   atomic.Pointer[time.Time] // when the body hit EOF
	what  string
	total int64
	start time.Time
	last  time.Time
	fn    func(string, int64, int64, time.Duration)
}

func (s *sender) progressReader(what string, r io.Reader, total int64) *progress {
	return &progress{r: r, what: what, total: total, start: time.Now(), fn: s.o.Progress}
}

// duration is the time from start until the body was read to its end (or until now).
func (p *progress) duration(start time.Time) time.Duration {
	if end := p.end.Load(); end != nil {
		return end.Sub(start)
	}
	return time.Since(start)
}

func (p *progress) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if err == io.EOF {
		now := time.Now()
		p.end.Store(&now)
	}
	v := p.n.Add(int64(n))
	if p.fn != nil {
		if now := time.Now(); err != nil || now.Sub(p.last) >= 100*time.Millisecond {
			p.last = now
			p.fn(p.what, v, p.total, now.Sub(p.start))
		}
	}
	return n, err
}

// client talks to an agent.
type client struct {
	base  string
	token []byte
	hc    *http.Client
}

func newClient(o Options) (*client, error) {
	if o.To == "" {
		return nil, errors.New("no target agent given: use --to HOST:PORT")
	}
	if len(o.Token) == 0 {
		return nil, errors.New("no token given: use --token-file (the same token as the agent's)")
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil // agents are reached directly
	scheme := "http"
	if o.TLS.enabled() {
		cfg, err := o.TLS.config(false)
		if err != nil {
			return nil, err
		}
		tr.TLSClientConfig, scheme = cfg, "https"
	}
	return &client{base: scheme + "://" + o.To, token: o.Token, hc: &http.Client{Transport: tr}}, nil
}

func (c *client) postJSON(ctx context.Context, path string, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	return c.post(ctx, path, "application/json", bytes.NewReader(b), int64(len(b)), out)
}

func (c *client) post(ctx context.Context, path, ctype string, body io.Reader, size int64, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+path, body)
	if err != nil {
		return err
	}
	if size >= 0 {
		req.ContentLength = size
	}
	req.Header.Set("Content-Type", ctype)
	req.Header.Set("Authorization", "Bearer "+string(c.token))
	resp, err := c.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswerSize))
	if err != nil {
		return fmt.Errorf("read answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		var e ErrorResponse
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return fmt.Errorf("agent answered %s: %s", resp.Status, e.Error)
		}
		return fmt.Errorf("agent answered %s", resp.Status)
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("decode answer: %w", err)
	}
	return nil
}
