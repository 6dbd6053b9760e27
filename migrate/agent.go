package migrate

import (
	"archive/tar"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
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
	AdoptMS   float64 `json:"adoptMs"`   // container record, root, netns, cgroup, monitor
	RestoreMS float64 `json:"restoreMs"` // CRIU restore until the processes ran
	MemoryMS  float64 `json:"memoryMs"`  // until all memory was in (lazy: pages pulled)
	Held      int     `json:"heldPackets"`
	Holding   string  `json:"holding"`
}

// staging directories of incoming streams.
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
	if err := json.NewDecoder(io.LimitReader(r.Body, maxStateSize)).Decode(&req); err != nil {
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
	if miss := missingFlags(source.CPUFlags, target.CPUFlags); len(miss) > 0 {
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

// hashingReader counts and hashes what passes.
type hashingReader struct {
	r io.Reader
	h hash.Hash
	n int64
}

func (h *hashingReader) Read(b []byte) (int, error) {
	n, err := h.r.Read(b)
	h.h.Write(b[:n])
	h.n += int64(n)
	return n, err
}

// countingReader fails the stream (for tests) after limit bytes.
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

// receive reads and verifies the whole stream into staging, then creates and restores the
// container. cleanup removes the container again (used when the answer cannot be delivered).
func (a *Agent) receive(ctx context.Context, body io.Reader) (*Result, func(), error) {
	start := time.Now()
	var sb [8]byte
	rand.Read(sb[:])
	tag := hex.EncodeToString(sb[:])
	stage := filepath.Join(a.Root, "migrate-in", tag)       // upper and lowers: same fs as the state root
	runStage := filepath.Join(a.RunRoot, "migrate-in", tag) // CRIU images: same fs as the run root
	defer os.RemoveAll(stage)
	defer os.RemoveAll(runStage)
	imagesDir := filepath.Join(runStage, "images")
	for _, d := range []string{stage, imagesDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, nil, fmt.Errorf("create staging %s: %w", d, err)
		}
	}
	st, uppers, n, err := a.readStream(ctx, body, stage, imagesDir)
	if err != nil {
		return nil, nil, fmt.Errorf("migration stream refused, nothing was changed: %w", err)
	}
	var lowers []string
	for i := 0; i < st.ExtraLowers; i++ {
		lowers = append(lowers, uppers[fmt.Sprintf(memberLower, i)])
	}
	res := &Result{Name: st.Name, Bytes: n, VerifyMS: ms(time.Since(start))}
	a.log().Info("migration stream verified", "name", st.Name, "bytes", n)

	adoptStart := time.Now()
	c, err := a.Manager.Adopt(ctx, container.AdoptOptions{Name: st.Name, Image: st.Image, ImageID: st.ImageID, Generation: st.Generation,
		UpperDir: uppers[memberUpper], ExtraLowers: lowers, Spec: st.Spec, Network: st.Network, Resources: st.Resources},
		func(cs *container.State) error {
			res.AdoptMS = ms(time.Since(adoptStart))
			rs, err := a.restoreAdopted(ctx, cs, st, imagesDir, res)
			if err != nil {
				return err
			}
			res.RestoreMS, res.MemoryMS = ms(rs.Running), ms(rs.MemoryIn)
			return nil
		})
	if err != nil {
		return nil, nil, fmt.Errorf("recreate %s on the target: %w", st.Name, err)
	}
	res.ID, res.PID = c.ID, c.Pid
	if c.Network.IP.IsValid() {
		res.IP = c.Network.IP.String()
	}
	cleanup := func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := a.Manager.Remove(cctx, c.ID, true); err != nil {
			a.log().Error("remove unconfirmed container", "id", c.ID, "error", err)
		}
	}
	return res, cleanup, nil
}

// readStream reads the migration stream into staging (CRIU images into imagesDir, layers
// extracted under stage) and verifies every member against the authenticated manifest.
// Nothing outside the staging directories is touched.
func (a *Agent) readStream(ctx context.Context, body io.Reader, stage, imagesDir string) (*State, map[string]string, int64, error) {
	cr := &countingReader{r: body}
	if n, ok := strings.CutPrefix(a.Failpoint, "exit-after-bytes:"); ok {
		cr.limit, _ = strconv.ParseInt(n, 10, 64)
	}
	var (
		got      []Member
		man      *Manifest
		stateRaw []byte
		uppers   = map[string]string{} // member → staged directory
	)
	tr := tar.NewReader(cr)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, nil, 0, fmt.Errorf("read migration stream: %w", err)
		}
		if man != nil {
			return nil, nil, 0, fmt.Errorf("migration stream: member %q after the manifest", hdr.Name)
		}
		if hdr.Typeflag != tar.TypeReg {
			return nil, nil, 0, fmt.Errorf("migration stream: member %q is not a regular file", hdr.Name)
		}
		hr := &hashingReader{r: tr, h: sha256.New()}
		switch name := hdr.Name; {
		case name == memberManifest:
			b, err := io.ReadAll(io.LimitReader(tr, maxStateSize))
			if err != nil {
				return nil, nil, 0, fmt.Errorf("read manifest: %w", err)
			}
			man = &Manifest{}
			if err := json.Unmarshal(b, man); err != nil {
				return nil, nil, 0, fmt.Errorf("decode manifest: %w", err)
			}
			continue
		case name == memberState:
			if stateRaw, err = io.ReadAll(io.LimitReader(hr, maxStateSize)); err != nil {
				return nil, nil, 0, fmt.Errorf("read %s: %w", name, err)
			}
		case strings.HasPrefix(name, memberImages):
			base := strings.TrimPrefix(name, memberImages)
			if !imageFileName.MatchString(base) {
				return nil, nil, 0, fmt.Errorf("migration stream: refusing image file name %q", name)
			}
			f, err := os.OpenFile(filepath.Join(imagesDir, base), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return nil, nil, 0, fmt.Errorf("stage %s: %w", name, err)
			}
			_, err = io.Copy(f, hr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return nil, nil, 0, fmt.Errorf("stage %s: %w", name, err)
			}
		case name == memberUpper || isLowerMember(name):
			if _, dup := uppers[name]; dup {
				return nil, nil, 0, fmt.Errorf("migration stream: member %q twice", name)
			}
			dir := filepath.Join(stage, strings.TrimSuffix(name, ".tar"))
			// The layer checks of an image import apply (nothing outside dir is written);
			// the digest is compared with the manifest below, before dir is used.
			if _, err := cowfs.ExtractUpper(ctx, hr, dir); err != nil {
				return nil, nil, 0, err
			}
			if _, err := io.Copy(io.Discard, hr); err != nil {
				return nil, nil, 0, fmt.Errorf("read %s: %w", name, err)
			}
			uppers[name] = dir
		default:
			return nil, nil, 0, fmt.Errorf("migration stream: unknown member %q", name)
		}
		got = append(got, Member{Name: hdr.Name, Size: hr.n, SHA256: hex.EncodeToString(hr.h.Sum(nil))})
	}
	if man == nil {
		return nil, nil, 0, errors.New("migration stream ended without a manifest (sender interrupted?)")
	}
	if err := man.verify(a.Token, got); err != nil {
		return nil, nil, 0, err
	}
	st := &State{}
	if err := json.Unmarshal(stateRaw, st); err != nil {
		return nil, nil, 0, fmt.Errorf("decode %s: %w", memberState, err)
	}
	if _, ok := uppers[memberUpper]; !ok {
		return nil, nil, 0, fmt.Errorf("migration stream has no %s", memberUpper)
	}
	for i := 0; i < st.ExtraLowers; i++ {
		if _, ok := uppers[fmt.Sprintf(memberLower, i)]; !ok {
			return nil, nil, 0, fmt.Errorf("migration stream lacks "+memberLower, i)
		}
	}
	return st, uppers, cr.n, nil
}

func isLowerMember(name string) bool {
	var i int
	_, err := fmt.Sscanf(name, memberLower, &i)
	return err == nil && i >= 0 && name == fmt.Sprintf(memberLower, i)
}

// restoreAdopted restores the processes into the adopted container cs (lock held), holding
// client packets in its new namespace until they run, then announces the address.
func (a *Agent) restoreAdopted(ctx context.Context, cs *container.State, st *State, imagesDir string, res *Result) (*restore.Result, error) {
	// Packets that reach the new namespace before the sockets are restored would meet no
	// socket and reset the connections: hold them from the first one.
	var hold *sockets.Holder
	res.Holding = "none"
	if cs.Network.NetnsPath != "" {
		h, err := sockets.NewHolder(ctx, cs.Network.NetnsPath, sockets.HoldOptions{StartHolding: true, Logger: a.log()})
		if err != nil {
			a.log().Warn("packets reaching the target before the restore will be reset, not held", "error", err)
			res.Holding = "impossible: " + err.Error()
		} else {
			hold, res.Holding = h, "nfqueue"
			defer func() {
				if hold != nil {
					hold.Close()
				}
			}()
		}
	}
	dst := filepath.Join(a.Manager.RunDir(cs.ID), "checkpoint")
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return nil, err
	}
	if err := os.Rename(imagesDir, dst); err != nil {
		return nil, fmt.Errorf("move images into %s: %w", dst, err)
	}
	rec := checkpoint.Record{ImagesDir: dst, DefaultDir: true, Created: time.Now().UTC(), CRIUVersion: st.CRIUVersion,
		NetnsKey: st.NetnsKey, Externals: st.Externals}
	if err := container.WriteJSONAtomic(filepath.Join(a.Manager.Dir(cs.ID), checkpoint.RecordFile), rec); err != nil {
		return nil, err
	}
	rr, err := restore.ContainerLocked(ctx, a.Manager, cs, restore.ContainerOptions{CRIU: a.CRIU, Lazy: st.Lazy,
		PageServer: st.PageServer, Logger: a.log()})
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
	if cs.Network.NetnsPath != "" && cs.Network.IP.IsValid() {
		if err := network.Announce(cs.Network.NetnsPath, cs.Network.IP, 3, 50*time.Millisecond); err != nil {
			a.log().Warn("gratuitous ARP", "error", err)
		}
	}
	return &rr.Result, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
