package migrate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/cowfs"
	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/network"
	"github.com/hotctl/hot/restore"
	"github.com/hotctl/hot/sockets"
)

// Agent receives containers: `hot agent` serves it over HTTP (optionally mutual TLS).
type Agent struct {
	Manager *container.Manager
	Store   *cowfs.Store
	CRIU    criubin.Binary
	Token   []byte
	// Root and RunRoot are hot's --root and --run-root: staging for incoming streams lives
	// in <Root>/migrate-in and <RunRoot>/migrate-in, nothing is written elsewhere.
	Root, RunRoot string
	Logger        *slog.Logger
	// Failpoint is for tests: "exit-after-bytes:N" makes the agent exit (as if killed) once
	// N bytes of a migration stream were received.
	Failpoint string

	mu sync.Mutex // one incoming migration at a time
}

// Result is the target's answer to a migration stream: the container runs there.
type Result struct {
	ID        string  `json:"id"`
	Name      string  `json:"name"`
	PID       int     `json:"pid"`
	IP        string  `json:"ip,omitempty"`
	Bytes     int64   `json:"bytes"`
	VerifyMS  float64 `json:"verifyMs"`  // receiving and checking the stream
	SetupMS   float64 `json:"setupMs"`   // container record, root, netns, cgroup, monitor
	RestoreMS float64 `json:"restoreMs"` // CRIU restore until the processes ran
	MemoryMS  float64 `json:"memoryMs"`  // until all memory was in (lazy: pages pulled)
	Held      int     `json:"heldPackets"`
	Holding   string  `json:"holding"`
}

// staging directories of incoming streams and images.
func (a *Agent) stagingDirs() []string {
	return []string{filepath.Join(a.Root, "migrate-in"), filepath.Join(a.RunRoot, "migrate-in")}
}

// CleanStaging removes what interrupted receptions left (an agent killed mid-transfer).
func (a *Agent) CleanStaging() error {
	for _, d := range a.stagingDirs() {
		if err := os.RemoveAll(d); err != nil {
			return fmt.Errorf("remove leftover staging %s: %w", d, err)
		}
	}
	return nil
}

// Handler is the agent's HTTP API; every request must carry the token.
func (a *Agent) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+PathPreflight, a.preflight)
	mux.HandleFunc("POST "+PathImage, a.image)
	mux.HandleFunc("POST "+PathMigration, a.migration)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || !tokenEqual([]byte(tok), a.Token) {
			a.log().Warn("refused request: wrong or missing token", "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path)
			writeJSON(w, http.StatusUnauthorized, ErrorResponse{Error: "wrong or missing token: give the agent's token with --token-file"})
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// Serve listens on addr until ctx ends.
func (a *Agent) Serve(ctx context.Context, addr string, tlsFiles TLSFiles, ready func(net.Addr)) error {
	if err := a.CleanStaging(); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("agent: listen on %s: %w", addr, err)
	}
	srv := &http.Server{Handler: a.Handler(), ReadHeaderTimeout: 30 * time.Second,
		ErrorLog: slog.NewLogLogger(a.log().Handler(), slog.LevelWarn)}
	if tlsFiles.enabled() {
		if srv.TLSConfig, err = tlsFiles.config(true); err != nil {
			ln.Close()
			return err
		}
	}
	if ready != nil {
		ready(ln.Addr())
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	if srv.TLSConfig != nil {
		err = srv.ServeTLS(ln, "", "")
	} else {
		err = srv.Serve(ln)
	}
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

func (a *Agent) log() *slog.Logger {
	if a.Logger == nil {
		return slog.Default()
	}
	return a.Logger
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func (a *Agent) fail(w http.ResponseWriter, r *http.Request, code int, err error) {
	a.log().Warn("request failed", "remote", r.RemoteAddr, "path", r.URL.Path, "error", err)
	writeJSON(w, code, ErrorResponse{Error: err.Error()})
}

func (a *Agent) preflight(w http.ResponseWriter, r *http.Request) {
	var req PreflightRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, maxAnswerSize)).Decode(&req); err != nil {
		a.fail(w, r, http.StatusBadRequest, fmt.Errorf("decode preflight request: %w", err))
		return
	}
	facts, err := LocalFacts(a.CRIU.Version.String())
	if err != nil {
		a.fail(w, r, http.StatusInternalServerError, err)
		return
	}
	resp := PreflightResponse{Target: facts}
	resp.Problems = compareHosts(req.Source, facts)
	if err := container.ValidateName(req.Name); err != nil {
		resp.Problems = append(resp.Problems, err.Error())
	} else if c, err := a.Manager.Get(r.Context(), req.Name); err == nil {
		resp.Problems = append(resp.Problems, fmt.Sprintf("a container named %s already exists on the target (id %s, %s): remove it there first", req.Name, c.ID[:12], c.Status))
	}
	if _, err := a.Store.Resolve(r.Context(), req.ImageID.String()); err == nil {
		resp.HaveImage = true
	}
	for _, d := range req.DiffIDs {
		if _, err := os.Stat(a.Store.LayerDir(d)); err != nil {
			resp.MissingLayers = append(resp.MissingLayers, d)
		}
	}
	writeJSON(w, http.StatusOK, resp)
}

// compareHosts lists why a process dumped on source could not run on target.
func compareHosts(source, target HostFacts) []string {
	var out []string
	if source.Arch != target.Arch {
		out = append(out, fmt.Sprintf("architecture differs: source %s, target %s", source.Arch, target.Arch))
	}
	sv, err1 := criubin.ParseVersion("Version: " + source.CRIUVersion)
	tv, err2 := criubin.ParseVersion("Version: " + target.CRIUVersion)
	switch {
	case err1 != nil || err2 != nil:
		out = append(out, fmt.Sprintf("cannot compare CRIU versions %q (source) and %q (target)", source.CRIUVersion, target.CRIUVersion))
	case tv.Less(sv):
		out = append(out, fmt.Sprintf("the target's CRIU %s is older than the source's %s: images may not restore; upgrade CRIU on the target", tv, sv))
	}
	if miss := checkpoint.MissingFlags(source.CPUFlags, target.CPUFlags); len(miss) > 0 {
		out = append(out, fmt.Sprintf("the target CPU lacks flags the source has (a restored process could die of SIGILL): %s", strings.Join(miss, " ")))
	}
	return out
}

func (a *Agent) image(w http.ResponseWriter, r *http.Request) {
	want := r.URL.Query().Get("id")
	dir := filepath.Join(a.Root, "migrate-in")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		a.fail(w, r, http.StatusInternalServerError, err)
		return
	}
	f, err := os.CreateTemp(dir, "image-*.tar")
	if err != nil {
		a.fail(w, r, http.StatusInternalServerError, err)
		return
	}
	defer os.Remove(f.Name())
	n, err := io.Copy(f, r.Body)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		a.fail(w, r, http.StatusBadRequest, fmt.Errorf("receive image archive: %w", err))
		return
	}
	// Import verifies every blob against its digest and refuses the archive otherwise.
	if _, err := a.Store.Import(r.Context(), f.Name(), cowfs.ImportOptions{}); err != nil {
		a.fail(w, r, http.StatusUnprocessableEntity, fmt.Errorf("import pushed image: %w", err))
		return
	}
	img, err := a.Store.Resolve(r.Context(), want)
	if err != nil {
		a.fail(w, r, http.StatusUnprocessableEntity, fmt.Errorf("the pushed archive does not hold image %s: %w", want, err))
		return
	}
	a.log().Info("image received", "image", img.ID, "bytes", n)
	writeJSON(w, http.StatusOK, ImageResponse{ImageID: img.ID, Bytes: n})
}

func (a *Agent) migration(w http.ResponseWriter, r *http.Request) {
	if !a.mu.TryLock() {
		a.fail(w, r, http.StatusConflict, errors.New("another migration is being received: retry later"))
		return
	}
	defer a.mu.Unlock()
	res, cleanup, err := a.receive(r.Context(), r.Body)
	if err != nil {
		a.fail(w, r, http.StatusUnprocessableEntity, err)
		return
	}
	// The source removes its copy once it has this answer; if it cannot be delivered, the
	// source restores its own copy, so this one must go.
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	werr := json.NewEncoder(w).Encode(res)
	if werr == nil {
		werr = http.NewResponseController(w).Flush()
	}
	if werr != nil {
		a.log().Error("could not confirm the migration to the source: removing the container here", "name", res.Name, "error", werr)
		cleanup()
		return
	}
	a.log().Info("container migrated in", "name", res.Name, "id", res.ID, "pid", res.PID, "bytes", res.Bytes, "restoreMs", res.RestoreMS)
}

// countingReader counts what passes; for tests it ends the agent (like a kill) after limit
// bytes.
type countingReader struct {
	r     io.Reader
	n     int64
	limit int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += int64(n)
	if c.limit > 0 && c.n >= c.limit {
		os.Exit(137) // failpoint: behave like a killed agent
	}
	return n, err
}

// receive reads the migration stream (a checkpoint archive whose manifest is authenticated
// with the token) into staging, verifying every member, and only then recreates the container
// with its name and address, restores it with client packets held, and announces the address.
// cleanup removes the container again (used when the answer cannot be delivered).
func (a *Agent) receive(ctx context.Context, body io.Reader) (*Result, func(), error) {
	start := time.Now()
	if err := os.MkdirAll(filepath.Join(a.RunRoot, "migrate-in"), 0o700); err != nil {
		return nil, nil, err
	}
	staging, err := os.MkdirTemp(filepath.Join(a.RunRoot, "migrate-in"), "stream-")
	if err != nil {
		return nil, nil, fmt.Errorf("create staging: %w", err)
	}
	defer os.RemoveAll(staging)
	cr := &countingReader{r: body}
	if n, ok := strings.CutPrefix(a.Failpoint, "exit-after-bytes:"); ok {
		cr.limit, _ = strconv.ParseInt(n, 10, 64)
	}
	m, err := checkpoint.ReadArchiveFrom(ctx, cr, "migration stream", staging, a.Token)
	if err != nil {
		return nil, nil, fmt.Errorf("migration stream refused, nothing was changed: %w", err)
	}
	if miss := m.CheckHost(); len(miss) > 0 {
		return nil, nil, fmt.Errorf("migration refused: this CPU lacks flags the processes may use: %s", strings.Join(miss, " "))
	}
	res := &Result{Name: m.Container.Name, Bytes: cr.n, VerifyMS: ms(time.Since(start))}
	a.log().Info("migration stream verified", "name", m.Container.Name, "bytes", cr.n, "members", len(m.Members))

	setup := time.Now()
	c, err := restore.Recreate(ctx, a.Manager, m, staging, restore.ImportOptions{CRIU: a.CRIU, Root: a.Root, RunRoot: a.RunRoot, Logger: a.log()})
	if err != nil {
		return nil, nil, fmt.Errorf("recreate %s on the target: %w", m.Container.Name, err)
	}
	res.ID = c.ID
	cleanup := func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := a.Manager.Remove(cctx, c.ID, true); err != nil {
			a.log().Error("remove the container again", "id", c.ID, "error", err)
		}
	}
	res.SetupMS = ms(time.Since(setup))
	rr, err := a.restore(ctx, c, m, res)
	if err != nil {
		cleanup()
		return nil, nil, fmt.Errorf("restore %s on the target: %w", m.Container.Name, err)
	}
	res.PID = rr.PID
	res.RestoreMS, res.MemoryMS = ms(rr.Running), ms(rr.MemoryIn)
	if c.Network.IP.IsValid() {
		res.IP = c.Network.IP.String()
	}
	return res, cleanup, nil
}

// restore restores the recreated container c, holding client packets in its new namespace
// until the processes run, then announces the address.
func (a *Agent) restore(ctx context.Context, c *container.Container, m *checkpoint.Manifest, res *Result) (*restore.Result, error) {
	// Packets that reach the new namespace before the sockets are restored would meet no
	// socket and reset the connections: hold them from the first one.
	var hold *sockets.Holder
	res.Holding = "none"
	if c.Network.NetnsPath != "" {
		h, err := sockets.NewHolder(ctx, c.Network.NetnsPath, sockets.HoldOptions{StartHolding: true, Logger: a.log()})
		if err != nil {
			a.log().Warn("packets reaching the target before the restore will be reset, not held", "error", err)
			res.Holding = "impossible: " + err.Error()
		} else {
			hold, res.Holding = h, "nfqueue"
			defer hold.Close()
		}
	}
	if m.PageServer != "" {
		undo, note, err := checkpoint.RaisePipeMaxSize()
		if err != nil {
			return nil, err
		}
		defer undo()
		if note != "" {
			a.log().Info("post-copy migration", "note", note)
		}
	}
	rr, err := restore.Container(ctx, a.Manager, c.ID, restore.ContainerOptions{CRIU: a.CRIU, Lazy: m.PageServer != "",
		PageServer: m.PageServer, Logger: a.log()})
	if err != nil {
		return nil, err
	}
	if hold != nil {
		stats, err := hold.Release()
		if err != nil {
			a.log().Warn("release held packets", "error", err)
		}
		res.Held = stats.Packets
	}
	if c.Network.NetnsPath != "" && c.Network.IP.IsValid() {
		if err := network.Announce(c.Network.NetnsPath, c.Network.IP, 3, 50*time.Millisecond); err != nil {
			a.log().Warn("gratuitous ARP", "error", err)
		}
	}
	return &rr.Result, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
