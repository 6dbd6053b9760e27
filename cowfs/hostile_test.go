package cowfs

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hotctl/hot/internal/testutil"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
)

// assertStoreEmpty checks that a refused import left nothing in the store.
func assertStoreEmpty(t *testing.T, s *Store) {
	t.Helper()
	for _, d := range []string{s.blobDir(), s.layersDir(), s.tmpDir()} {
		if entries, err := os.ReadDir(d); err != nil || len(entries) != 0 {
			t.Errorf("%s not empty after a refused import: %v %v", d, entries, err)
		}
	}
	if list, err := s.List(context.Background()); err != nil || len(list) != 0 {
		t.Errorf("images listed after a refused import: %v %v", list, err)
	}
}

// assertUntouched checks the directory outside the store still holds only its bait file.
func assertUntouched(t *testing.T, outside string) {
	t.Helper()
	entries, err := os.ReadDir(outside)
	if err != nil || len(entries) != 1 || entries[0].Name() != "target" {
		t.Errorf("directory outside the store changed: %v %v", entries, err)
	}
	if data, err := os.ReadFile(filepath.Join(outside, "target")); err != nil || string(data) != "precious" {
		t.Errorf("file outside the store changed: %q %v", data, err)
	}
}

func TestImportRefusesHostileArchives(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	base := t.TempDir()
	outside := filepath.Join(base, "outside")
	must(t, os.Mkdir(outside, 0o755))
	must(t, os.WriteFile(filepath.Join(outside, "target"), []byte("precious"), 0o644))

	L := func(e ...entry) [][]byte { return [][]byte{layerTar(t, e...)} }
	ok := layerTar(t, dir("etc/"), file("etc/ok", "ok"))
	cases := []struct {
		name   string
		layout testLayout
		want   []string
	}{
		{"dotdot", testLayout{layers: L(file("../../../../outside/evil", "x"))}, []string{`"../../../../outside/evil"`, "escape"}},
		{"dotdot-inside", testLayout{layers: L(dir("a/"), file("a/../../evil", "x"))}, []string{`"a/../../evil"`, "escape"}},
		{"absolute", testLayout{layers: L(file(outside+"/evil", "x"))}, []string{`"OUTSIDE/evil"`, "absolute path"}},
		{"symlink-then-write", testLayout{layers: L(symlink("lnk", outside), file("lnk/evil", "x"))}, []string{`"lnk/evil"`, `"lnk" is a symlink in this layer`}},
		{"relative-symlink-then-write", testLayout{layers: L(symlink("up", "../../../../../.."), file("up/outside/evil", "x"))}, []string{`"up/outside/evil"`, `"up" is a symlink in this layer`}},
		{"symlink-then-overwrite", testLayout{layers: L(symlink("lnk", outside), file("lnk/target", "pwned"))}, []string{`"lnk/target"`, `"lnk" is a symlink in this layer`}},
		{"hardlink-dotdot", testLayout{layers: L(hardlink("hl", "../../../../outside/target"))}, []string{`"hl"`, "hardlink target", "escape"}},
		{"hardlink-absolute", testLayout{layers: L(hardlink("hl", outside+"/target"))}, []string{`"hl"`, `hardlink target "OUTSIDE/target": absolute path`}},
		{"hardlink-through-symlink", testLayout{layers: L(symlink("lnk", outside), hardlink("hl", "lnk/target"))}, []string{`"hl"`, `"lnk" is a symlink in this layer`}},
		{"lower-symlink-then-write", testLayout{layers: [][]byte{layerTar(t, symlink("lnk", outside)), layerTar(t, file("lnk/evil", "x"))}}, []string{`"lnk/evil"`, `"lnk" is a symlink in lower layer 1`}},
		{"lower-symlink-then-whiteout", testLayout{layers: [][]byte{layerTar(t, symlink("lnk", outside)), layerTar(t, file("lnk/.wh.target", ""))}}, []string{`"lnk/.wh.target"`, `"lnk" is a symlink in lower layer 1`}},
		{"lower-symlink-deep", testLayout{layers: [][]byte{ok, layerTar(t, dir("etc/"), symlink("etc/lnk", outside)), layerTar(t, file("etc/lnk/evil", "x"))}}, []string{`"etc/lnk/evil"`, `"etc/lnk" is a symlink in lower layer 2`}},
		{"digest-mismatch", testLayout{layers: [][]byte{ok}, corrupt: func(dir string, blobs []digest.Digest) {
			p := filepath.Join(dir, "blobs", "sha256", blobs[0].Encoded())
			data, _ := os.ReadFile(p)
			data[len(data)-1] ^= 0xff
			os.WriteFile(p, data, 0o644)
		}}, []string{"layer blob sha256:", "digest mismatch"}},
		{"truncated", testLayout{layers: [][]byte{ok}, compression: []string{"gzip"}, corrupt: func(dir string, blobs []digest.Digest) {
			p := filepath.Join(dir, "blobs", "sha256", blobs[0].Encoded())
			data, _ := os.ReadFile(p)
			os.WriteFile(p, data[:len(data)/2], 0o644)
		}}, []string{"layer blob sha256:", "truncated"}},
		{"missing-blob", testLayout{layers: [][]byte{ok, ok}, corrupt: func(dir string, blobs []digest.Digest) {
			os.Remove(filepath.Join(dir, "blobs", "sha256", blobs[0].Encoded()))
		}}, []string{"layer blob sha256:", "missing"}},
	}
	for _, tc := range cases {
		for _, form := range []string{"dir", "archive"} {
			t.Run(tc.name+"/"+form, func(t *testing.T) {
				work := t.TempDir()
				layout := filepath.Join(work, "layout")
				writeOCILayout(t, layout, tc.layout)
				src := layout
				if form == "archive" {
					src = filepath.Join(work, "image.tar")
					tarDir(t, layout, src)
				}
				s, err := Open(filepath.Join(work, "store"))
				must(t, err)
				_, err = s.Import(ctx, src, ImportOptions{Tag: "evil:1"})
				if err == nil {
					t.Fatal("hostile image imported")
				}
				// Judge the message without the test's own paths, which contain the case name.
				msg := strings.ReplaceAll(strings.ReplaceAll(err.Error(), work, "WORK"), outside, "OUTSIDE")
				t.Logf("refused: %s", msg)
				for _, w := range tc.want {
					if !strings.Contains(msg, w) {
						t.Errorf("error %q does not say %q", err, w)
					}
				}
				if strings.Contains(tc.name, "digest") || strings.Contains(tc.name, "truncated") || strings.Contains(tc.name, "missing") {
					var be *BlobError
					if !errors.As(err, &be) || be.Digest == "" || !strings.Contains(err.Error(), string(be.Digest)) {
						t.Errorf("error does not name the blob: %v", err)
					}
				}
				assertStoreEmpty(t, s)
				assertUntouched(t, outside)
				if _, err := os.Stat(filepath.Join(work, "evil")); err == nil {
					t.Error("file written next to the store")
				}
			})
		}
	}
}

func TestImportWhiteoutsCompressionAndMount(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	work := t.TempDir()
	layout := filepath.Join(work, "layout")
	l1 := layerTar(t, dir("etc/"), file("etc/a", "a"), file("etc/b", "b"), dir("data/"), dir("data/keep/"), file("data/keep/x", "x"), file("data/old", "old"), dir("var/"), file("var/gone", "g"))
	l2 := layerTar(t, file("etc/.wh.a", ""), dir("data/"), file("data/.wh..wh..opq", ""), file("data/new", "new"), file(".wh.var", ""))
	l3 := layerTar(t, dir("var/"), file("var/again", "again"))
	_, cfg := writeOCILayout(t, layout, testLayout{layers: [][]byte{l1, l2, l3}, compression: []string{"gzip", "zstd", ""}, refName: "localhost/wh:1"})
	s, err := Open(filepath.Join(work, "store"))
	must(t, err)
	ims, err := s.Import(ctx, layout, ImportOptions{})
	must(t, err)
	if len(ims) != 1 || ims[0].ID != cfg || len(ims[0].Names) != 1 || ims[0].Names[0] != "localhost/wh:1" {
		t.Fatalf("imported %+v, want ID %s named localhost/wh:1", ims, cfg)
	}
	img, err := s.Resolve(ctx, "localhost/wh:1")
	must(t, err)
	var st unix.Stat_t
	must(t, unix.Lstat(filepath.Join(img.LayerDirs[1], "etc", "a"), &st))
	if st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
		t.Errorf("whiteout is not char 0/0: mode %o rdev %d", st.Mode, st.Rdev)
	}
	buf := make([]byte, 2)
	if n, err := unix.Lgetxattr(filepath.Join(img.LayerDirs[1], "data"), xattrOpaque, buf); err != nil || string(buf[:n]) != "y" {
		t.Errorf("data not opaque: %q %v", buf[:n], err)
	}

	mnt := filepath.Join(work, "mnt")
	must(t, os.Mkdir(mnt, 0o755))
	must(t, MountOverlay(mnt, img.LayerDirs, "", ""))
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	want := map[string]string{"etc/b": "b", "data/new": "new", "var/again": "again"}
	for p, body := range want {
		if got, err := os.ReadFile(filepath.Join(mnt, p)); err != nil || string(got) != body {
			t.Errorf("%s: %q %v, want %q", p, got, err, body)
		}
	}
	for _, p := range []string{"etc/a", "data/keep", "data/old", "var/gone"} {
		if _, err := os.Lstat(filepath.Join(mnt, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s visible in the union (err %v), but an upper layer deleted it", p, err)
		}
	}
}

func TestConcurrentImportsShareLayers(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	work := t.TempDir()
	var shared []entry
	for i := 0; i < 300; i++ {
		shared = append(shared, file(fmt.Sprintf("shared/f%03d", i), strings.Repeat("s", i)))
	}
	common := layerTar(t, shared...)
	a, b := filepath.Join(work, "a"), filepath.Join(work, "b")
	writeOCILayout(t, a, testLayout{layers: [][]byte{common, layerTar(t, file("a", "a"))}, compression: []string{"gzip", ""}})
	writeOCILayout(t, b, testLayout{layers: [][]byte{common, layerTar(t, file("b", "b"))}, compression: []string{"gzip", ""}})
	for round := 0; round < 3; round++ {
		s, err := Open(filepath.Join(work, fmt.Sprintf("store%d", round)))
		must(t, err)
		var wg sync.WaitGroup
		errs := make([]error, 4)
		for i := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				src, tag := a, "a:1"
				if i%2 == 1 {
					src, tag = b, "b:1"
				}
				// Separate Store values, as separate hot processes would have.
				s2, err := Open(s.Root())
				if err == nil {
					_, err = s2.Import(ctx, src, ImportOptions{Tag: tag})
				}
				errs[i] = err
			}()
		}
		wg.Wait()
		for _, err := range errs {
			must(t, err)
		}
		for _, ref := range []string{"a:1", "b:1"} {
			img, err := s.Resolve(ctx, ref)
			must(t, err)
			entries, err := os.ReadDir(filepath.Join(img.LayerDirs[0], "shared"))
			if err != nil || len(entries) != 300 {
				t.Fatalf("%s: shared layer has %d entries (%v), want 300", ref, len(entries), err)
			}
		}
		if layers, _ := os.ReadDir(s.layersDir()); len(layers) != 3 {
			t.Errorf("round %d: %d layer dirs, want 3 (shared one unpacked once)", round, len(layers))
		}
		if tmp, _ := os.ReadDir(s.tmpDir()); len(tmp) != 0 {
			t.Errorf("round %d: staging left behind: %v", round, tmp)
		}
	}
}

func TestRemoveAndExport(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	work := t.TempDir()
	layout := filepath.Join(work, "layout")
	shared := layerTar(t, file("s", "s"))
	md, id := writeOCILayout(t, layout, testLayout{layers: [][]byte{shared, layerTar(t, file("x", "x"))}, compression: []string{"zstd", "gzip"}})
	other := filepath.Join(work, "other")
	writeOCILayout(t, other, testLayout{layers: [][]byte{shared}})
	s, err := Open(filepath.Join(work, "store"))
	must(t, err)
	_, err = s.Import(ctx, layout, ImportOptions{Tag: "app:v1"})
	must(t, err)
	_, err = s.Import(ctx, other, ImportOptions{Tag: "other:1"})
	must(t, err)

	// Export, re-import elsewhere: same digests.
	archive := filepath.Join(work, "app.tar")
	must(t, s.ExportFile(ctx, "app:v1", archive))
	s2, err := Open(filepath.Join(work, "store2"))
	must(t, err)
	ims, err := s2.Import(ctx, archive, ImportOptions{})
	must(t, err)
	if len(ims) != 1 || ims[0].ManifestDigest != md || ims[0].ID != id || len(ims[0].Names) != 1 || ims[0].Names[0] != "app:v1" {
		t.Fatalf("re-import of export: %+v, want manifest %s id %s name app:v1", ims, md, id)
	}

	// A second name only untags; a held image is refused, naming the holder.
	_, err = s.Import(ctx, layout, ImportOptions{Tag: "app:alias"})
	must(t, err)
	r, err := s.Remove(ctx, "app:alias")
	must(t, err)
	if len(r.Untagged) != 1 || len(r.Deleted) != 0 {
		t.Errorf("rm of a second name: %+v", r)
	}
	must(t, s.Hold(ctx, id, "web-1"))
	if _, err := s.Remove(ctx, "app:v1"); !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "web-1") {
		t.Fatalf("rm of a held image: %v", err)
	}
	must(t, s.Release(ctx, id, "web-1"))
	r, err = s.Remove(ctx, "app:v1")
	must(t, err)
	if len(r.Deleted) != 1 || r.Layers != 1 || r.Blobs != 4 {
		t.Errorf("rm: %+v, want 1 image, 1 layer (the other is shared), 4 blobs (manifest, config, both layer blobs: the shared layer is compressed differently in other:1)", r)
	}
	if _, err := s.Resolve(ctx, "other:1"); err != nil {
		t.Errorf("image sharing a layer broken by rm: %v", err)
	}
	if _, err := s.Resolve(ctx, "app:v1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("removed image still resolves: %v", err)
	}
}

// A layer unpacked for one image is re-checked when another image reuses it on a different
// lower stack: there it would write through a lower symlink.
func TestReusedLayerRecheckedOnNewLowers(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	work := t.TempDir()
	outside := filepath.Join(work, "outside")
	must(t, os.Mkdir(outside, 0o755))
	must(t, os.WriteFile(filepath.Join(outside, "target"), []byte("precious"), 0o644))
	upper := layerTar(t, file("etc/passwd", "root:x:0:0::/root:/bin/sh\n"))
	good, bad := filepath.Join(work, "good"), filepath.Join(work, "bad")
	writeOCILayout(t, good, testLayout{layers: [][]byte{layerTar(t, dir("etc/")), upper}})
	writeOCILayout(t, bad, testLayout{layers: [][]byte{layerTar(t, symlink("etc", outside)), upper}})
	s, err := Open(filepath.Join(work, "store"))
	must(t, err)
	_, err = s.Import(ctx, good, ImportOptions{Tag: "good:1"})
	must(t, err)
	before, _ := os.ReadDir(s.blobDir())
	_, err = s.Import(ctx, bad, ImportOptions{Tag: "bad:1"})
	if err == nil || !strings.Contains(err.Error(), `"etc" is a symlink in lower layer 1`) || !strings.Contains(err.Error(), "already unpacked") {
		t.Fatalf("reused layer over a lower symlink: %v", err)
	}
	after, _ := os.ReadDir(s.blobDir())
	if len(after) != len(before) {
		t.Errorf("refused import added blobs: %d → %d", len(before), len(after))
	}
	if _, err := s.Resolve(ctx, "good:1"); err != nil {
		t.Errorf("good image broken: %v", err)
	}
	assertUntouched(t, outside)
}

// writeDockerArchive writes a docker-archive tar with one image: config and layers named as
// given (name → content).
func writeDockerArchive(t *testing.T, out string, cfgName string, cfg []byte, layerNames []string, layers [][]byte, repoTags []string) {
	t.Helper()
	dir := t.TempDir()
	files := map[string][]byte{cfgName: cfg}
	for i, n := range layerNames {
		files[n] = layers[i]
	}
	m, _ := json.Marshal([]dockerManifestEntry{{Config: cfgName, RepoTags: repoTags, Layers: layerNames}})
	files["manifest.json"] = m
	for n, data := range files {
		must(t, os.MkdirAll(filepath.Dir(filepath.Join(dir, n)), 0o755))
		must(t, os.WriteFile(filepath.Join(dir, n), data, 0o644))
	}
	tarDir(t, dir, out)
}

func TestDockerArchiveVerification(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	work := t.TempDir()
	layer := layerTar(t, file("hello", "hello"))
	diffID := digest.FromBytes(layer)
	cfg, _ := json.Marshal(ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{diffID}}})
	cfgName := digest.FromBytes(cfg).Encoded() + ".json"
	tampered := layerTar(t, file("hello", "HELLO"))

	good := filepath.Join(work, "good.tar")
	writeDockerArchive(t, good, cfgName, cfg, []string{diffID.Encoded() + ".tar"}, [][]byte{layer}, []string{"localhost/d:1"})
	s, err := Open(filepath.Join(work, "store"))
	must(t, err)
	ims, err := s.Import(ctx, good, ImportOptions{})
	must(t, err)
	if len(ims) != 1 || ims[0].ID != digest.FromBytes(cfg) || len(ims[0].Names) != 1 || ims[0].Names[0] != "localhost/d:1" {
		t.Fatalf("docker-archive import: %+v", ims)
	}

	cases := map[string]struct {
		cfgName, layerName string
		cfg, layer         []byte
		want               string
	}{
		"layer named by digest, content changed":  {cfgName, diffID.Encoded() + ".tar", cfg, tampered, "digest mismatch"},
		"legacy layer.tar, content changed":       {cfgName, "abc/layer.tar", cfg, tampered, "but the image config says diffID " + string(diffID)},
		"config named by digest, content changed": {cfgName, "abc/layer.tar", append(cfg, ' '), layer, "config blob " + digest.FromBytes(cfg).String() + ": digest mismatch"},
		"missing layer": {cfgName, "abc/layer.tar", cfg, nil, "missing"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "bad.tar")
			layerNames, layers := []string{tc.layerName}, [][]byte{tc.layer}
			if tc.layer == nil {
				m, _ := json.Marshal([]dockerManifestEntry{{Config: tc.cfgName, Layers: layerNames}})
				d := t.TempDir()
				must(t, os.WriteFile(filepath.Join(d, "manifest.json"), m, 0o644))
				must(t, os.WriteFile(filepath.Join(d, tc.cfgName), tc.cfg, 0o644))
				tarDir(t, d, p)
			} else {
				writeDockerArchive(t, p, tc.cfgName, tc.cfg, layerNames, layers, nil)
			}
			s, err := Open(filepath.Join(t.TempDir(), "store"))
			must(t, err)
			_, err = s.Import(ctx, p, ImportOptions{Tag: "bad:1"})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to say %q", err, tc.want)
			}
			assertStoreEmpty(t, s)
		})
	}
}

// A directory replaced by a symlink after its subdirectories were written: setting the
// subdirectories' times at the end must not follow the symlink out of the layer.
func TestExtractDirTimesDoNotFollowLaterSymlink(t *testing.T) {
	testutil.RequireRoot(t)
	outside := t.TempDir()
	must(t, os.Mkdir(filepath.Join(outside, "etc"), 0o755))
	var before unix.Stat_t
	must(t, unix.Stat(filepath.Join(outside, "etc"), &before))
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range []*tar.Header{
		{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "d/etc/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: time.Unix(1, 0)},
		{Name: "d", Typeflag: tar.TypeSymlink, Linkname: outside},
	} {
		must(t, tw.WriteHeader(h))
	}
	must(t, tw.Close())
	dir := filepath.Join(t.TempDir(), "layer")
	must(t, os.Mkdir(dir, 0o755))
	if _, _, err := extractLayer(context.Background(), &buf, dir, nil); err != nil {
		t.Fatal(err)
	}
	var after unix.Stat_t
	must(t, unix.Stat(filepath.Join(outside, "etc"), &after))
	if after.Mtim != before.Mtim {
		t.Errorf("mtime of a directory outside the layer changed: %v → %v", before.Mtim, after.Mtim)
	}
}

// Later entries of a layer replace earlier ones; xattrs land on symlinks themselves.
func TestExtractReplaceAndSymlinkXattr(t *testing.T) {
	testutil.RequireRoot(t)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range []*tar.Header{
		{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "d/f", Typeflag: tar.TypeReg, Mode: 0o644},
		{Name: "d", Typeflag: tar.TypeReg, Mode: 0o600},
		{Name: "l", Typeflag: tar.TypeSymlink, Linkname: "/etc/passwd", PAXRecords: map[string]string{"SCHILY.xattr.trusted.t": "sym"}},
		{Name: "x", Typeflag: tar.TypeReg, Mode: 0o644, PAXRecords: map[string]string{"SCHILY.xattr.trusted.overlay.opaque": "y", "SCHILY.xattr.user.u": "kept"}},
	} {
		h.Format = tar.FormatPAX
		must(t, tw.WriteHeader(h))
	}
	must(t, tw.Close())
	dir := filepath.Join(t.TempDir(), "layer")
	must(t, os.Mkdir(dir, 0o755))
	if _, _, err := extractLayer(context.Background(), &buf, dir, nil); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	must(t, unix.Lstat(filepath.Join(dir, "d"), &st))
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&0o777 != 0o600 {
		t.Errorf("d: mode %o, want a regular file 0600 replacing the directory", st.Mode)
	}
	val := make([]byte, 8)
	if n, err := unix.Lgetxattr(filepath.Join(dir, "l"), "trusted.t", val); err != nil || string(val[:n]) != "sym" {
		t.Errorf("xattr on symlink: %q %v", val[:n], err)
	}
	if _, err := unix.Lgetxattr("/etc/passwd", "trusted.t", val); err == nil {
		t.Error("xattr went through the symlink to /etc/passwd")
	}
	if _, err := unix.Lgetxattr(filepath.Join(dir, "x"), xattrOpaque, val); err == nil {
		t.Error("trusted.overlay.* xattr from the tar applied")
	}
	if n, err := unix.Lgetxattr(filepath.Join(dir, "x"), "user.u", val); err != nil || string(val[:n]) != "kept" {
		t.Errorf("user xattr: %q %v", val[:n], err)
	}
}
