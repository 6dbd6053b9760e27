package criubin_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/internal/testutil"
	"golang.org/x/sys/unix"
)

// requireKdatHost skips unless hot has to keep CRIU's cache itself here: root, a CRIU,
// and a /run that is not a tmpfs.
func requireKdatHost(t testing.TB) criubin.Binary {
	t.Helper()
	testutil.RequireRoot(t)
	b, err := criubin.Find(context.Background(), "")
	if err != nil {
		t.Skipf("requires CRIU (`make deps`): %v", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs("/run", &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		t.Skip("requires /run not on a tmpfs: on a tmpfs CRIU keeps /run/criu.kdat itself and hot leaves it alone")
	}
	return b
}

// TestEnsureKdatCache: with no cache, two concurrent EnsureKdatCache calls have CRIU write
// one that a plain `criu check` then loads; a second call keeps it as it is; a cache from another boot is
// replaced.
func TestEnsureKdatCache(t *testing.T) {
	b := requireKdatHost(t)
	ctx := context.Background()
	log := testutil.Logger(t)
	// Leave a cache behind as the other tests and hot itself expect one.
	t.Cleanup(func() { b.EnsureKdatCache(context.Background(), nil) })

	for _, p := range []string{criubin.KdatCachePath, criubin.KdatMarkerPath} {
		if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
	}
	if st, err := b.KdatCacheStatus(); err != nil || st.State != criubin.KdatAbsent {
		t.Fatalf("status without a cache = %+v, %v; want absent", st, err)
	}
	// Two at once, as two hot processes may: each writes a whole cache and renames it.
	errs := make(chan error, 2)
	for range 2 {
		go func() { errs <- b.EnsureKdatCache(ctx, log) }()
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatalf("EnsureKdatCache: %v", err)
		}
	}
	if leftovers, _ := filepath.Glob(criubin.KdatCachePath + "*.tmp-hot-*"); len(leftovers) > 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}
	cache1 := statFile(t, criubin.KdatCachePath)
	marker1, err := os.ReadFile(criubin.KdatMarkerPath)
	if err != nil {
		t.Fatalf("no marker after EnsureKdatCache: %v", err)
	}
	boot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if !strings.Contains(string(marker1), "boot_id="+strings.TrimSpace(string(boot))) {
		t.Errorf("marker does not name this boot:\n%s", marker1)
	}
	if st, err := b.KdatCacheStatus(); err != nil || st.State != criubin.KdatCurrent {
		t.Errorf("status after EnsureKdatCache = %+v, %v; want current", st, err)
	}

	// CRIU, run as hot runs it, loads the cache instead of probing the kernel.
	out, err := exec.Command(b.Path, "check", "-v4").CombinedOutput()
	if err != nil {
		t.Fatalf("criu check: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "Loaded kdat cache from "+criubin.KdatCachePath) {
		t.Fatalf("criu check did not load the cache:\n%s", out)
	}

	// Second call: a stat and a read, nothing written.
	time.Sleep(10 * time.Millisecond) // a rewrite would get a later mtime
	if err := b.EnsureKdatCache(ctx, log); err != nil {
		t.Fatalf("second EnsureKdatCache: %v", err)
	}
	cache2 := statFile(t, criubin.KdatCachePath)
	marker2, _ := os.ReadFile(criubin.KdatMarkerPath)
	if !os.SameFile(cache1, cache2) || !cache1.ModTime().Equal(cache2.ModTime()) || string(marker1) != string(marker2) {
		t.Errorf("second call rewrote the cache: inode/mtime %v → %v, marker changed: %v",
			cache1.ModTime(), cache2.ModTime(), string(marker1) != string(marker2))
	}

	// A cache from another boot (as after a reboot on a disk /run) is replaced.
	stale := strings.Replace(string(marker2), "boot_id=", "boot_id=0", 1)
	if err := os.WriteFile(criubin.KdatMarkerPath, []byte(stale), 0o600); err != nil {
		t.Fatal(err)
	}
	if st, err := b.KdatCacheStatus(); err != nil || st.State != criubin.KdatStale || !strings.Contains(st.Reason, "another boot") {
		t.Errorf("status with another boot's marker = %+v, %v; want stale (another boot)", st, err)
	}
	if err := b.EnsureKdatCache(ctx, log); err != nil {
		t.Fatalf("EnsureKdatCache over a stale cache: %v", err)
	}
	cache3 := statFile(t, criubin.KdatCachePath)
	if !cache3.ModTime().After(cache2.ModTime()) {
		t.Errorf("a cache from another boot was kept (mtime %v, before %v)", cache3.ModTime(), cache2.ModTime())
	}
	if marker3, _ := os.ReadFile(criubin.KdatMarkerPath); string(marker3) != string(marker2) {
		t.Errorf("marker after regenerating:\n%s\nwant:\n%s", marker3, marker2)
	}
}

// BenchmarkEnsureKdatCacheCurrent measures the check every dump and restore pays.
func BenchmarkEnsureKdatCacheCurrent(b *testing.B) {
	bin := requireKdatHost(b)
	ctx := context.Background()
	if err := bin.EnsureKdatCache(ctx, nil); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if err := bin.EnsureKdatCache(ctx, nil); err != nil {
			b.Fatal(err)
		}
	}
}

func statFile(t *testing.T, path string) os.FileInfo {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return fi
}
