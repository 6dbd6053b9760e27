package criubin

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// CRIU run as root reads its kernel-feature cache ("kdat") from KdatCachePath but writes it
// only when that directory is a tmpfs (so that a reboot, perhaps into another kernel, drops
// it). Where /run is a disk file system CRIU re-probes the kernel on every call (~40 ms each,
// 2–3 calls inside an update's pause). EnsureKdatCache keeps the cache there itself, bound by
// a marker file to the boot (kernel boot id) and the CRIU version that wrote it.
const (
	// KdatCachePath is CRIU's kernel-feature cache (KDAT_RUNDIR "/criu.kdat" in kerndat.c).
	KdatCachePath = "/run/criu.kdat"
	// KdatMarkerPath records which boot and CRIU the cache hot wrote belongs to.
	KdatMarkerPath = KdatCachePath + ".hot"

	bootIDPath = "/proc/sys/kernel/random/boot_id"
	// kdatMagic1 is KDAT_MAGIC (criu/include/magic.h), the first 4 bytes of a kdat cache;
	// the next 4 are the build time of the CRIU that wrote it, which CRIU itself checks.
	kdatMagic1 = 0x57023458
)

// KdatState says whether CRIU will find a kernel-feature cache it may trust.
type KdatState string

// Cache states.
const (
	KdatOnTmpfs KdatState = "tmpfs"   // /run is a tmpfs: CRIU keeps the cache itself
	KdatCurrent KdatState = "current" // hot's cache, written in this boot for this CRIU version
	KdatAbsent  KdatState = "absent"  // no cache: CRIU probes the kernel on every call
	KdatStale   KdatState = "stale"   // from another boot or CRIU version, or not written by hot
	KdatNotRoot KdatState = "nonroot" // not root: CRIU run by this user does not read /run
)

// KdatStatus is what KdatCacheStatus found.
type KdatStatus struct {
	State  KdatState `json:"state"`
	BootID string    `json:"bootId,omitempty"`
	Reason string    `json:"reason,omitempty"` // why the cache is stale
}

// kdatMarker is the content of KdatMarkerPath.
type kdatMarker struct {
	BootID      string // /proc/sys/kernel/random/boot_id when the cache was written
	CRIUVersion string // Binary.Version of the CRIU that wrote it
	Size        int64  // size of the cache file written with it
}

// String is the marker file's text: "key=value" lines.
func (m kdatMarker) String() string {
	return fmt.Sprintf("# written by hot: %s was made in this boot by this CRIU (see hot's docs/checkpoint.md)\nboot_id=%s\ncriu_version=%s\nkdat_size=%d\n",
		KdatCachePath, m.BootID, m.CRIUVersion, m.Size)
}

// parseKdatMarker reads a marker written by kdatMarker.String. Unknown keys are ignored
// (a later hot may add some); missing ones are an error.
func parseKdatMarker(text string) (kdatMarker, error) {
	var m kdatMarker
	seen := map[string]bool{}
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return kdatMarker{}, fmt.Errorf("parse kdat marker: line %q is not key=value", line)
		}
		switch k {
		case "boot_id":
			m.BootID = v
		case "criu_version":
			m.CRIUVersion = v
		case "kdat_size":
			if _, err := fmt.Sscan(v, &m.Size); err != nil || m.Size <= 0 {
				return kdatMarker{}, fmt.Errorf("parse kdat marker: kdat_size %q is not a positive number", v)
			}
		default:
			continue
		}
		seen[k] = true
	}
	for _, k := range []string{"boot_id", "criu_version", "kdat_size"} {
		if !seen[k] {
			return kdatMarker{}, fmt.Errorf("parse kdat marker: no %s", k)
		}
	}
	return m, nil
}

// staleReason says why a cache of size cacheSize described by marker m cannot be used by
// CRIU version version in boot bootID; "" means it can.
func (m kdatMarker) staleReason(bootID, version string, cacheSize int64) string {
	switch {
	case m.BootID != bootID:
		return fmt.Sprintf("written in another boot (boot id %s, now %s)", m.BootID, bootID)
	case m.CRIUVersion != version:
		return fmt.Sprintf("written by CRIU %s, now %s", m.CRIUVersion, version)
	case m.Size != cacheSize:
		return fmt.Sprintf("changed since hot wrote it (%d bytes, marker says %d)", cacheSize, m.Size)
	}
	return ""
}

// checkKdat says whether data looks like a kdat cache (CRIU checks the rest when loading it).
func checkKdat(data []byte) error {
	if len(data) < 8 {
		return fmt.Errorf("kdat cache is %d bytes, too short", len(data))
	}
	if m := binary.NativeEndian.Uint32(data); m != kdatMagic1 {
		return fmt.Errorf("kdat cache starts with %#x, not CRIU's kdat magic %#x", m, kdatMagic1)
	}
	return nil
}

// KdatCacheStatus reports whether CRIU will load a cache it may trust, without changing
// anything. It costs a statfs, a stat and two small reads.
func (b Binary) KdatCacheStatus() (KdatStatus, error) {
	var sfs unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(KdatCachePath), &sfs); err != nil {
		return KdatStatus{}, fmt.Errorf("kdat cache: statfs %s: %w", filepath.Dir(KdatCachePath), err)
	}
	if sfs.Type == unix.TMPFS_MAGIC {
		return KdatStatus{State: KdatOnTmpfs}, nil
	}
	if os.Geteuid() != 0 {
		return KdatStatus{State: KdatNotRoot}, nil
	}
	boot, err := os.ReadFile(bootIDPath)
	if err != nil {
		return KdatStatus{}, fmt.Errorf("kdat cache: read boot id: %w", err)
	}
	st := KdatStatus{BootID: strings.TrimSpace(string(boot))}
	fi, err := os.Stat(KdatCachePath)
	if errors.Is(err, os.ErrNotExist) {
		st.State = KdatAbsent
		return st, nil
	}
	if err != nil {
		return KdatStatus{}, fmt.Errorf("kdat cache: %w", err)
	}
	text, err := os.ReadFile(KdatMarkerPath)
	if errors.Is(err, os.ErrNotExist) {
		st.State, st.Reason = KdatStale, "not written by hot (no "+KdatMarkerPath+")"
		return st, nil
	}
	if err != nil {
		return KdatStatus{}, fmt.Errorf("kdat cache: %w", err)
	}
	m, err := parseKdatMarker(string(text))
	if err != nil {
		st.State, st.Reason = KdatStale, err.Error()
		return st, nil
	}
	if r := m.staleReason(st.BootID, b.Version.String(), fi.Size()); r != "" {
		st.State, st.Reason = KdatStale, r
		return st, nil
	}
	st.State = KdatCurrent
	return st, nil
}

// EnsureKdatCache makes sure CRIU finds a kernel-feature cache for this boot in
// KdatCachePath when /run is not a tmpfs (on a tmpfs CRIU keeps it itself). When hot's cache
// is current it only checks (microseconds); otherwise it removes a stale one and has CRIU
// write a new one (`criu check` in a private mount namespace with a tmpfs on /run, ~100 ms,
// once per boot and CRIU version). Concurrent callers are safe: files are replaced by rename.
//
// A failure is logged as a warning and returned, but it only means CRIU probes the kernel
// itself: callers go on with their dump or restore.
func (b Binary) EnsureKdatCache(ctx context.Context, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	err := b.ensureKdatCache(ctx, log)
	if err != nil {
		log.Warn("CRIU will probe the kernel on every call (~40 ms each)", "error", err)
	}
	return err
}

func (b Binary) ensureKdatCache(ctx context.Context, log *slog.Logger) error {
	st, err := b.KdatCacheStatus()
	if err != nil {
		return err
	}
	switch st.State {
	case KdatOnTmpfs, KdatCurrent, KdatNotRoot:
		return nil
	case KdatStale:
		// Gone first, marker before cache: whatever happens next, CRIU reads no cache of
		// another boot, and no marker vouches for a cache hot did not write.
		log.Debug("removing CRIU's kernel-feature cache", "path", KdatCachePath, "reason", st.Reason)
		for _, p := range []string{KdatMarkerPath, KdatCachePath} {
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("kdat cache: remove stale %s: %w", p, err)
			}
		}
	}
	start := time.Now()
	data, err := b.generateKdat(ctx)
	if err != nil {
		return err
	}
	if err := replaceFile(KdatCachePath, data); err != nil {
		return fmt.Errorf("kdat cache: %w", err)
	}
	m := kdatMarker{BootID: st.BootID, CRIUVersion: b.Version.String(), Size: int64(len(data))}
	if err := replaceFile(KdatMarkerPath, []byte(m.String())); err != nil {
		return fmt.Errorf("kdat cache: %w", err)
	}
	log.Debug("wrote CRIU's kernel-feature cache", "path", KdatCachePath, "bootId", st.BootID, "criu", b.Version, "took", time.Since(start))
	return nil
}

// generateKdat runs `criu check` with a fresh tmpfs on /run, where CRIU saves its cache, and
// returns the cache. The tmpfs is mounted in a mount namespace of one OS thread: the process's
// own mounts are untouched, and the thread ends with the goroutine (never unlocked), so the
// Go runtime does not reuse it.
func (b Binary) generateKdat(ctx context.Context) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	type result struct {
		data []byte
		err  error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		data, err := b.kdatInPrivateRun(ctx)
		done <- result{data, err}
	}()
	r := <-done
	if r.err != nil {
		return nil, fmt.Errorf("kdat cache: generate with %s: %w", b.Path, r.err)
	}
	return r.data, nil
}

// kdatInPrivateRun must run on a locked OS thread that is thrown away afterwards.
func (b Binary) kdatInPrivateRun(ctx context.Context) ([]byte, error) {
	dir := filepath.Dir(KdatCachePath)
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return nil, fmt.Errorf("unshare mount namespace: %w", err)
	}
	// Private first: on a shared / the tmpfs would otherwise appear on the host's /run.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return nil, fmt.Errorf("make mounts private: %w", err)
	}
	if err := unix.Mount("hot-kdat", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0755,size=4m"); err != nil {
		return nil, fmt.Errorf("mount tmpfs on %s: %w", dir, err)
	}
	out, cerr := exec.CommandContext(ctx, b.Path, "check").CombinedOutput()
	data, err := os.ReadFile(KdatCachePath)
	if err != nil {
		// CRIU saves the cache at start-up (kerndat_init), before any check, so a failed check
		// still leaves one; no cache means CRIU did not get that far.
		return nil, fmt.Errorf("criu check wrote no %s (check: %v): %s", KdatCachePath, cerr, FirstError(string(out)))
	}
	if err := checkKdat(data); err != nil {
		return nil, err
	}
	return data, nil
}

// replaceFile writes data to path through a temporary file and a rename, so that readers
// (CRIU, other hot processes) see the old file or the new one, never a partial one. No
// fsync: after a crash the boot id changes and the cache is written anew anyway.
func replaceFile(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp-hot-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	_, werr := f.Write(data)
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(f.Name(), path)
	}
	if werr != nil {
		os.Remove(f.Name())
		return fmt.Errorf("write %s: %w", path, werr)
	}
	return nil
}
