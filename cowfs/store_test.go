package cowfs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hotctl/hot/internal/testutil"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

func TestNormalizeName(t *testing.T) {
	good := map[string]string{
		"app":                    "app:latest",
		"app:v1":                 "app:v1",
		"localhost/app:v1":       "localhost/app:v1",
		"localhost:5000/a/b:1.0": "localhost:5000/a/b:1.0",
		"docker.io/library/x":    "docker.io/library/x:latest",
	}
	for in, want := range good {
		got, err := NormalizeName(in)
		if err != nil || got != want {
			t.Errorf("NormalizeName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "App", "app:", "app:-x", "a//b", "app@sha256:00", "../x", "a b"} {
		if got, err := NormalizeName(bad); err == nil {
			t.Errorf("NormalizeName(%q) = %q, want an error", bad, got)
		}
	}
}

func TestCleanEntryName(t *testing.T) {
	for in, want := range map[string]string{"a/b": "a/b", "./a/b/": "a/b", "./": ".", "a//b": "a/b"} {
		got, err := cleanEntryName(in)
		if err != nil || got != want {
			t.Errorf("cleanEntryName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"/etc/passwd", "../x", "a/../../x", "a/.."} {
		if _, err := cleanEntryName(bad); err == nil {
			t.Errorf("cleanEntryName(%q): want an error", bad)
		}
	}
}

// makeRootfs builds a small root filesystem with the file kinds an image carries.
func makeRootfs(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "rootfs")
	must(t, os.MkdirAll(filepath.Join(dir, "etc"), 0o755))
	must(t, os.MkdirAll(filepath.Join(dir, "tmp"), 0o1777))
	must(t, unix.Chmod(filepath.Join(dir, "tmp"), 0o1777))
	must(t, os.WriteFile(filepath.Join(dir, "etc", "hello"), []byte("hello\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "suid"), []byte("x"), 0o755))
	must(t, os.Chown(filepath.Join(dir, "suid"), 123, 456))
	must(t, unix.Chmod(filepath.Join(dir, "suid"), 0o4755))
	must(t, os.Link(filepath.Join(dir, "etc", "hello"), filepath.Join(dir, "etc", "hello-link")))
	must(t, os.Symlink("/etc/hello", filepath.Join(dir, "abs-link")))
	must(t, unix.Mknod(filepath.Join(dir, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(t, unix.Mkfifo(filepath.Join(dir, "fifo"), 0o600))
	must(t, unix.Setxattr(filepath.Join(dir, "etc", "hello"), "trusted.hot-test", []byte("v"), 0))
	return dir
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestImportRootfsResolveHold(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	s, err := Open(filepath.Join(t.TempDir(), "store"))
	must(t, err)
	src := makeRootfs(t)
	im, err := s.ImportRootfs(ctx, src, RootfsOptions{Tag: "base:1", Cmd: []string{"/bin/sh"}, Env: []string{"A=b"}, WorkingDir: "/etc"})
	must(t, err)

	for _, ref := range []string{"base:1", string(im.ID), im.ID.Encoded()[:12], string(im.ManifestDigest)} {
		img, err := s.Resolve(ctx, ref)
		if err != nil {
			t.Fatalf("Resolve(%q): %v", ref, err)
		}
		if img.ID != im.ID || len(img.LayerDirs) != 1 {
			t.Fatalf("Resolve(%q) = %+v", ref, img)
		}
	}
	img, err := s.Resolve(ctx, "base:1")
	must(t, err)
	if img.Name != "base:1" || img.Config.Config.WorkingDir != "/etc" || strings.Join(img.Config.Config.Cmd, " ") != "/bin/sh" {
		t.Fatalf("config not kept: %+v", img.Config.Config)
	}
	if _, err := s.Resolve(ctx, "nope:1"); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "hot image ls") || !strings.Contains(err.Error(), "nope:1") {
		t.Fatalf("Resolve unknown: %v", err)
	}

	// The unpacked layer keeps owners, modes, hardlinks, devices, fifos, symlinks and xattrs.
	l := img.LayerDirs[0]
	var st unix.Stat_t
	must(t, unix.Lstat(filepath.Join(l, "suid"), &st))
	if st.Uid != 123 || st.Gid != 456 || st.Mode&0o7777 != 0o4755 {
		t.Errorf("suid: uid %d gid %d mode %o", st.Uid, st.Gid, st.Mode&0o7777)
	}
	must(t, unix.Lstat(filepath.Join(l, "tmp"), &st))
	if st.Mode&0o7777 != 0o1777 {
		t.Errorf("tmp mode %o", st.Mode&0o7777)
	}
	var a, b unix.Stat_t
	must(t, unix.Lstat(filepath.Join(l, "etc", "hello"), &a))
	must(t, unix.Lstat(filepath.Join(l, "etc", "hello-link"), &b))
	if a.Ino != b.Ino {
		t.Errorf("hardlink lost: inodes %d and %d", a.Ino, b.Ino)
	}
	must(t, unix.Lstat(filepath.Join(l, "null"), &st))
	if st.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(st.Rdev) != 1 || unix.Minor(st.Rdev) != 3 {
		t.Errorf("device node: mode %o rdev %d:%d", st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	must(t, unix.Lstat(filepath.Join(l, "fifo"), &st))
	if st.Mode&unix.S_IFMT != unix.S_IFIFO {
		t.Errorf("fifo: mode %o", st.Mode)
	}
	if target, err := os.Readlink(filepath.Join(l, "abs-link")); err != nil || target != "/etc/hello" {
		t.Errorf("symlink: %q %v", target, err)
	}
	buf := make([]byte, 8)
	if n, err := unix.Lgetxattr(filepath.Join(l, "etc", "hello"), "trusted.hot-test", buf); err != nil || string(buf[:n]) != "v" {
		t.Errorf("xattr: %q %v", buf[:n], err)
	}

	// Re-importing the same tree reuses the layer.
	im2, err := s.ImportRootfs(ctx, src, RootfsOptions{Tag: "base:2"})
	must(t, err)
	if im2.NewLayers != 0 {
		t.Errorf("second import unpacked %d layers, want 0 (same diffID)", im2.NewLayers)
	}

	// Hold / Release.
	must(t, s.Hold(ctx, im.ID, "c1"))
	must(t, s.Hold(ctx, im.ID, "c1"))
	list, err := s.List(ctx)
	must(t, err)
	if len(list) != 2 {
		t.Fatalf("List: %d images, want 2", len(list))
	}
	found := false
	for _, sum := range list {
		if sum.ID == im.ID {
			found = len(sum.Holders) == 1 && sum.Holders[0] == "c1"
		}
	}
	if !found {
		t.Errorf("holder c1 not listed: %+v", list)
	}
	must(t, s.Release(ctx, im.ID, "c1"))
	must(t, s.Release(ctx, im.ID, "c1"))
	if err := s.Hold(ctx, digest.Digest("sha256:"+strings.Repeat("0", 64)), "c1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Hold of unknown image: %v", err)
	}
	if entries, _ := os.ReadDir(s.tmpDir()); len(entries) != 0 {
		t.Errorf("staging left behind: %v", entries)
	}
}

func TestMountOverlay(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	base := t.TempDir()
	s, err := Open(filepath.Join(base, "store"))
	must(t, err)
	src := makeRootfs(t)
	im, err := s.ImportRootfs(ctx, src, RootfsOptions{Tag: "base:1"})
	must(t, err)
	// A second layer made by hand: overrides etc/hello.
	top := filepath.Join(base, "top")
	must(t, os.MkdirAll(filepath.Join(top, "etc"), 0o755))
	must(t, os.WriteFile(filepath.Join(top, "etc", "hello"), []byte("top\n"), 0o644))
	img, err := s.Resolve(ctx, string(im.ID))
	must(t, err)

	// Read-only stack.
	ro := filepath.Join(base, "ro")
	must(t, os.Mkdir(ro, 0o755))
	must(t, MountOverlay(ro, append(img.LayerDirs, top), "", ""))
	t.Cleanup(func() { unix.Unmount(ro, unix.MNT_DETACH) })
	if got, _ := os.ReadFile(filepath.Join(ro, "etc", "hello")); string(got) != "top\n" {
		t.Errorf("top layer does not win: %q", got)
	}
	if _, err := os.Stat(filepath.Join(ro, "null")); err != nil {
		t.Errorf("bottom layer not visible: %v", err)
	}
	if err := os.WriteFile(filepath.Join(ro, "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write to read-only stack: %v, want EROFS", err)
	}

	// Writable stack: writes land in upper, layers stay untouched.
	rw, upper, work := filepath.Join(base, "rw"), filepath.Join(base, "upper"), filepath.Join(base, "work")
	for _, d := range []string{rw, upper, work} {
		must(t, os.Mkdir(d, 0o755))
	}
	must(t, MountOverlay(rw, img.LayerDirs, upper, work))
	t.Cleanup(func() { unix.Unmount(rw, unix.MNT_DETACH) })
	must(t, os.WriteFile(filepath.Join(rw, "etc", "hello"), []byte("changed\n"), 0o644))
	if got, _ := os.ReadFile(filepath.Join(img.LayerDirs[0], "etc", "hello")); string(got) != "hello\n" {
		t.Errorf("layer modified through the mount: %q", got)
	}
	if got, _ := os.ReadFile(filepath.Join(upper, "etc", "hello")); string(got) != "changed\n" {
		t.Errorf("upper: %q", got)
	}

	// Many layers under long paths: more than one page of lowerdir option.
	var many []string
	long := filepath.Join(base, strings.Repeat("l", 200))
	for i := 0; i < 40; i++ {
		d := filepath.Join(long, strings.Repeat("d", 50)+string(rune('a'+i%26))+string(rune('a'+i/26)))
		must(t, os.MkdirAll(d, 0o755))
		must(t, os.WriteFile(filepath.Join(d, "f"), []byte{byte(i)}, 0o644))
		many = append(many, d)
	}
	mnt := filepath.Join(base, "many")
	must(t, os.Mkdir(mnt, 0o755))
	must(t, MountOverlay(mnt, many, "", ""))
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	if got, _ := os.ReadFile(filepath.Join(mnt, "f")); len(got) != 1 || got[0] != 39 {
		t.Errorf("many layers: top file %v, want [39]", got)
	}
}
