package cowfs_test

import (
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/cowfs"
	"github.com/hotctl/hot/internal/testutil"
	"golang.org/x/sys/unix"
)

// podman runs podman with storage private to the test, never the machine's own.
type podman struct {
	t    *testing.T
	args []string
}

func newPodman(t *testing.T) *podman {
	testutil.RequireCommand(t, "podman")
	dir := t.TempDir()
	p := &podman{t: t, args: []string{
		"--root", filepath.Join(dir, "root"), "--runroot", filepath.Join(dir, "runroot"),
		"--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none",
		"--tmpdir", filepath.Join(dir, "tmp"),
	}}
	t.Cleanup(func() {
		// vfs storage is plain directories, but podman may leave mounts of its runroot.
		exec.Command("umount", "-R", filepath.Join(dir, "runroot")).Run()
	})
	return p
}

func (p *podman) run(args ...string) string {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "podman", append(append([]string{}, p.args...), args...)...)
	cmd.Env = append(os.Environ(), "TMPDIR="+p.t.TempDir())
	out, err := cmd.CombinedOutput()
	if err != nil {
		p.t.Fatalf("podman %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// staticBusybox returns the path of a statically linked busybox, or skips.
func staticBusybox(t *testing.T) string {
	p, err := exec.LookPath("busybox")
	if err != nil {
		t.Skip("requires a static busybox (Debian busybox-static, installed by `make deps`) to run build steps in the image")
	}
	f, err := elf.Open(p)
	if err != nil {
		t.Skipf("requires a static busybox (busybox-static); cannot read %s: %v", p, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			t.Skipf("requires a static busybox: %s is dynamically linked (install busybox-static)", p)
		}
	}
	return p
}

// TestPodmanImagesImport builds a two-layer image with podman (layer 2 deletes a file and a
// directory of layer 1 and adds a file), saves it as OCI archive and docker-archive and
// copies it to an OCI layout directory with skopeo, imports each, and checks that hot reports
// podman's image ID and that the overlay mount of the layers shows what the image means.
func TestPodmanImagesImport(t *testing.T) {
	testutil.RequireRoot(t)
	busybox := staticBusybox(t)
	pm := newPodman(t)
	work := t.TempDir()

	rootfs := filepath.Join(work, "rootfs")
	for _, d := range []string{"etc", "data/keep", "bin"} {
		must(t, os.MkdirAll(filepath.Join(rootfs, d), 0o755))
	}
	for p, body := range map[string]string{"etc/a": "one\n", "etc/b": "two\n", "data/keep/x": "x\n", "data/old": "old\n"} {
		must(t, os.WriteFile(filepath.Join(rootfs, p), []byte(body), 0o644))
	}
	bb, err := os.ReadFile(busybox)
	must(t, err)
	must(t, os.WriteFile(filepath.Join(rootfs, "bin", "busybox"), bb, 0o755))
	rootTar := filepath.Join(work, "rootfs.tar")
	if out, err := exec.Command("tar", "-C", rootfs, "-cf", rootTar, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v %s", err, out)
	}
	pm.run("import", rootTar, "localhost/base:1")

	buildCtx := filepath.Join(work, "ctx")
	must(t, os.Mkdir(buildCtx, 0o755))
	must(t, os.WriteFile(filepath.Join(buildCtx, "new"), []byte("new\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(buildCtx, "Containerfile"), []byte(`FROM localhost/base:1
RUN ["/bin/busybox", "rm", "/etc/a"]
RUN ["/bin/busybox", "rm", "-r", "/data"]
RUN ["/bin/busybox", "mkdir", "/data"]
COPY new /data/new
`), 0o644))
	// chroot isolation: no OCI runtime or network needed; --layers=false squashes the build
	// steps into one layer on top of the base.
	pm.run("build", "--isolation", "chroot", "--layers=false", "-t", "localhost/two:1", buildCtx)
	podmanID := pm.run("image", "inspect", "--format", "{{.Id}}", "localhost/two:1")

	ociArchive := filepath.Join(work, "two-oci.tar")
	dockerArchive := filepath.Join(work, "two-docker.tar")
	pm.run("save", "--format", "oci-archive", "-o", ociArchive, "localhost/two:1")
	pm.run("save", "--format", "docker-archive", "-o", dockerArchive, "localhost/two:1")
	sources := map[string]string{"oci-archive": ociArchive, "docker-archive": dockerArchive}
	if _, err := exec.LookPath("skopeo"); err == nil {
		layoutDir := filepath.Join(work, "two-layout")
		cmd := exec.Command("skopeo", "copy", "oci-archive:"+ociArchive, "oci:"+layoutDir+":two")
		cmd.Env = append(os.Environ(), "TMPDIR="+t.TempDir())
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("skopeo copy: %v\n%s", err, out)
		}
		sources["oci-layout (skopeo)"] = layoutDir
	}

	for kind, src := range sources {
		t.Run(kind, func(t *testing.T) {
			root := filepath.Join(t.TempDir(), "root")
			hot(t, root, 0, "image", "import", src, "--tag", "two:1")
			var list []cowfs.Summary
			must(t, json.Unmarshal([]byte(hot(t, root, 0, "image", "ls", "--json").Stdout), &list))
			if len(list) != 1 || list[0].ID.Encoded() != podmanID {
				t.Fatalf("hot image ls: %+v, want image ID %s (podman's)", list, podmanID)
			}
			if table := hot(t, root, 0, "image", "ls", "--no-trunc").Stdout; !strings.Contains(table, podmanID) {
				t.Errorf("ls table does not show podman's ID %s:\n%s", podmanID, table)
			}
			s, err := cowfs.Open(root)
			must(t, err)
			img, err := s.Resolve(context.Background(), "two:1")
			must(t, err)
			if len(img.LayerDirs) != 2 {
				t.Fatalf("%d layers, want 2", len(img.LayerDirs))
			}
			mnt := filepath.Join(t.TempDir(), "mnt")
			must(t, os.Mkdir(mnt, 0o755))
			must(t, cowfs.MountOverlay(mnt, img.LayerDirs, "", ""))
			defer unix.Unmount(mnt, unix.MNT_DETACH)
			for p, body := range map[string]string{"etc/b": "two\n", "data/new": "new\n"} {
				if got, err := os.ReadFile(filepath.Join(mnt, p)); err != nil || string(got) != body {
					t.Errorf("/%s: %q %v, want %q", p, got, err, body)
				}
			}
			if fi, err := os.Stat(filepath.Join(mnt, "bin", "busybox")); err != nil || fi.Mode()&0o111 == 0 {
				t.Errorf("/bin/busybox: %v %v", fi, err)
			}
			for _, p := range []string{"etc/a", "data/keep", "data/old"} {
				if _, err := os.Lstat(filepath.Join(mnt, p)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("/%s visible (err %v), but layer 2 deleted it", p, err)
				}
			}
		})
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestUmociLayoutImport builds a two-layer OCI layout with umoci (layer 2 deletes a file and
// replaces a directory), imports the layout directory, and checks the digests umoci wrote and
// the union of the layers.
func TestUmociLayoutImport(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireCommand(t, "umoci")
	work := t.TempDir()
	layout := filepath.Join(work, "layout")
	umoci := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("umoci", args...).CombinedOutput(); err != nil {
			t.Fatalf("umoci %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	umoci("init", "--layout", layout)
	umoci("new", "--image", layout+":t")
	b1 := filepath.Join(work, "b1")
	umoci("unpack", "--image", layout+":t", b1)
	for p, body := range map[string]string{"etc/a": "a\n", "etc/b": "b\n", "data/keep/x": "x\n"} {
		must(t, os.MkdirAll(filepath.Dir(filepath.Join(b1, "rootfs", p)), 0o755))
		must(t, os.WriteFile(filepath.Join(b1, "rootfs", p), []byte(body), 0o644))
	}
	umoci("repack", "--image", layout+":t", b1)
	b2 := filepath.Join(work, "b2")
	umoci("unpack", "--image", layout+":t", b2)
	must(t, os.Remove(filepath.Join(b2, "rootfs", "etc", "a")))
	must(t, os.RemoveAll(filepath.Join(b2, "rootfs", "data")))
	must(t, os.MkdirAll(filepath.Join(b2, "rootfs", "data"), 0o755))
	must(t, os.WriteFile(filepath.Join(b2, "rootfs", "data", "new"), []byte("new\n"), 0o644))
	umoci("repack", "--image", layout+":t", b2)
	umoci("config", "--image", layout+":t", "--config.cmd", "/bin/app")

	// What umoci wrote: the manifest digest in index.json, the config digest in the manifest.
	var idx struct{ Manifests []struct{ Digest string } }
	data, err := os.ReadFile(filepath.Join(layout, "index.json"))
	must(t, err)
	must(t, json.Unmarshal(data, &idx))
	if len(idx.Manifests) != 1 {
		t.Fatalf("umoci index.json: %s", data)
	}
	var man struct{ Config struct{ Digest string } }
	data, err = os.ReadFile(filepath.Join(layout, "blobs", "sha256", strings.TrimPrefix(idx.Manifests[0].Digest, "sha256:")))
	must(t, err)
	must(t, json.Unmarshal(data, &man))

	root := filepath.Join(work, "root")
	hot(t, root, 0, "image", "import", layout, "--tag", "um:1")
	s, err := cowfs.Open(root)
	must(t, err)
	img, err := s.Resolve(context.Background(), "um:1")
	must(t, err)
	if string(img.ManifestDigest) != idx.Manifests[0].Digest || string(img.ID) != man.Config.Digest {
		t.Fatalf("hot: manifest %s id %s; umoci: manifest %s config %s", img.ManifestDigest, img.ID, idx.Manifests[0].Digest, man.Config.Digest)
	}
	if strings.Join(img.Config.Config.Cmd, " ") != "/bin/app" {
		t.Errorf("cmd %v, want /bin/app", img.Config.Config.Cmd)
	}
	mnt := filepath.Join(work, "mnt")
	must(t, os.Mkdir(mnt, 0o755))
	must(t, cowfs.MountOverlay(mnt, img.LayerDirs, "", ""))
	defer unix.Unmount(mnt, unix.MNT_DETACH)
	for p, body := range map[string]string{"etc/b": "b\n", "data/new": "new\n"} {
		if got, err := os.ReadFile(filepath.Join(mnt, p)); err != nil || string(got) != body {
			t.Errorf("/%s: %q %v, want %q", p, got, err, body)
		}
	}
	for _, p := range []string{"etc/a", "data/keep"} {
		if _, err := os.Lstat(filepath.Join(mnt, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("/%s visible (err %v), but layer 2 deleted it", p, err)
		}
	}
}
