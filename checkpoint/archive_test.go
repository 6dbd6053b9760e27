package checkpoint

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// fakeCheckpoint makes an images dir, a config.json and an upper dir like a real checkpoint's.
func fakeCheckpoint(t *testing.T) ArchiveInput {
	t.Helper()
	dir := t.TempDir()
	in := ArchiveInput{ImagesDir: filepath.Join(dir, "images"), Config: filepath.Join(dir, "config.json"), UpperDir: filepath.Join(dir, "upper")}
	for _, d := range []string{in.ImagesDir, filepath.Join(in.UpperDir, "etc")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string]string{
		filepath.Join(in.ImagesDir, "inventory.img"): "inventory",
		filepath.Join(in.ImagesDir, "core-1.img"):    "core of pid 1",
		filepath.Join(in.ImagesDir, "pages-1.img"):   strings.Repeat("page data ", 5000),
		in.Config: `{"ociVersion":"1.2.0"}`,
		filepath.Join(in.UpperDir, "etc", "app.conf"): "changed=1\n",
	}
	for p, c := range files {
		if err := os.WriteFile(p, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("app.conf", filepath.Join(in.UpperDir, "etc", "link")); err != nil {
		t.Fatal(err)
	}
	in.Manifest = Manifest{CRIUVersion: "4.2.1", Container: ContainerInfo{Name: "web", ImageID: digest.Digest("sha256:" + strings.Repeat("ab", 32))}}
	return in
}

func TestArchiveRoundTrip(t *testing.T) {
	for _, zstd := range []bool{false, true} {
		in := fakeCheckpoint(t)
		in.Zstd = zstd
		file := filepath.Join(t.TempDir(), "web.ckpt")
		m, err := WriteArchive(context.Background(), file, in)
		if err != nil {
			t.Fatal(err)
		}
		if len(m.Members) != 5 || m.Kernel == "" || len(m.CPUFlags) == 0 || m.HotVersion == "" {
			t.Fatalf("manifest incomplete: %+v", m)
		}
		out := t.TempDir()
		got, err := ReadArchive(context.Background(), file, out)
		if err != nil {
			t.Fatalf("zstd=%v: %v", zstd, err)
		}
		if got.Container.ImageID != in.Manifest.Container.ImageID {
			t.Errorf("image id %q", got.Container.ImageID)
		}
		b, _ := os.ReadFile(filepath.Join(out, "images", "pages-1.img"))
		if string(b) != strings.Repeat("page data ", 5000) {
			t.Errorf("pages-1.img content changed")
		}
		upper := t.TempDir()
		f, err := os.Open(filepath.Join(out, UpperMember))
		if err != nil {
			t.Fatal(err)
		}
		err = ExtractDirTar(f, upper)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(filepath.Join(upper, "etc", "link")); string(b) != "changed=1\n" {
			t.Errorf("upper layer not restored: %q", b)
		}
	}
}

// rewrite copies the tar at file through fn, which may drop or alter members.
func rewrite(t *testing.T, file string, fn func(hdr *tar.Header, data []byte) []byte) {
	t.Helper()
	src, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	tr := tar.NewReader(bytes.NewReader(src))
	tw := tar.NewWriter(&out)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(tr)
		data = fn(hdr, data)
		if data == nil {
			continue
		}
		hdr.Size = int64(len(data))
		tw.WriteHeader(hdr)
		tw.Write(data)
	}
	tw.Close()
	if err := os.WriteFile(file, out.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestArchiveCorruptionIsRefusedNamingTheMember(t *testing.T) {
	for _, tc := range []struct {
		name, member, reason string
		corrupt              func(t *testing.T, file string)
	}{
		{"flipped byte", "images/pages-1.img", "sha256", func(t *testing.T, file string) {
			rewrite(t, file, func(h *tar.Header, d []byte) []byte {
				if h.Name == "images/pages-1.img" {
					d[1234] ^= 0x01
				}
				return d
			})
		}},
		{"missing member", "images/core-1.img", "missing", func(t *testing.T, file string) {
			rewrite(t, file, func(h *tar.Header, d []byte) []byte {
				if h.Name == "images/core-1.img" {
					return nil
				}
				return d
			})
		}},
		{"truncated", "", "truncated", func(t *testing.T, file string) {
			fi, _ := os.Stat(file)
			if err := os.Truncate(file, fi.Size()/2); err != nil {
				t.Fatal(err)
			}
		}},
		{"extra member", "images/evil.img", "not listed", func(t *testing.T, file string) {
			rewrite(t, file, func(h *tar.Header, d []byte) []byte {
				if h.Name == "images/core-1.img" {
					h.Name = "images/evil.img"
				}
				return d
			})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := fakeCheckpoint(t)
			file := filepath.Join(t.TempDir(), "web.ckpt")
			if _, err := WriteArchive(context.Background(), file, in); err != nil {
				t.Fatal(err)
			}
			tc.corrupt(t, file)
			_, err := ReadArchive(context.Background(), file, t.TempDir())
			var ae *ArchiveError
			if !errors.As(err, &ae) || !errors.Is(err, ErrBadArchive) {
				t.Fatalf("want an *ArchiveError, got %v", err)
			}
			if !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("error %q does not say %q", err, tc.reason)
			}
			if tc.member != "" && ae.Member != tc.member {
				t.Errorf("error names member %q, want %q: %v", ae.Member, tc.member, err)
			}
			if tc.name == "truncated" && ae.Member == "" && !strings.Contains(err.Error(), "members") {
				t.Errorf("truncation error should say where: %v", err)
			}
			t.Log(err)
		})
	}
}

func TestExtractDirTarRefusesEscapes(t *testing.T) {
	for _, tc := range []struct {
		name string
		hdrs []*tar.Header
	}{
		{"dotdot", []*tar.Header{{Name: "../evil", Typeflag: tar.TypeReg, Mode: 0o644}}},
		{"absolute", []*tar.Header{{Name: "/etc/evil", Typeflag: tar.TypeReg, Mode: 0o644}}},
		{"through symlink", []*tar.Header{{Name: "d", Typeflag: tar.TypeSymlink, Linkname: "/"}, {Name: "d/evil", Typeflag: tar.TypeReg, Mode: 0o644}}},
		{"device", []*tar.Header{{Name: "sda", Typeflag: tar.TypeBlock, Devmajor: 8}}},
		{"char device", []*tar.Header{{Name: "mem", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 1}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			tw := tar.NewWriter(&buf)
			for _, h := range tc.hdrs {
				tw.WriteHeader(h)
			}
			tw.Close()
			dir := t.TempDir()
			if err := ExtractDirTar(&buf, dir); err == nil {
				t.Fatal("accepted")
			} else {
				t.Log(err)
			}
		})
	}
}

// An archive streamed with a MAC key is accepted with that key only, and a manifest edited
// on the way (here: a member's checksum, as an attacker replacing the member would) is
// refused before any member is written.
func TestArchiveStreamMAC(t *testing.T) {
	in := fakeCheckpoint(t)
	in.TmpDir, in.MACKey = t.TempDir(), []byte("0123456789abcdef")
	var buf bytes.Buffer
	m, err := WriteArchiveTo(context.Background(), &buf, in)
	if err != nil {
		t.Fatal(err)
	}
	if m.MAC == "" || m.MAC != ManifestMAC(in.MACKey, *m) {
		t.Fatalf("manifest MAC %q", m.MAC)
	}
	if _, err := ReadArchiveFrom(context.Background(), bytes.NewReader(buf.Bytes()), "stream", t.TempDir(), in.MACKey); err != nil {
		t.Fatalf("intact stream refused: %v", err)
	}
	_, err = ReadArchiveFrom(context.Background(), bytes.NewReader(buf.Bytes()), "stream", t.TempDir(), []byte("another key, 16+"))
	if !errors.Is(err, ErrBadArchive) || !strings.Contains(err.Error(), "MAC") {
		t.Errorf("stream read with another key: %v", err)
	}
	file := filepath.Join(t.TempDir(), "s.tar")
	os.WriteFile(file, buf.Bytes(), 0o600)
	rewrite(t, file, func(hdr *tar.Header, data []byte) []byte {
		if hdr.Name == ManifestMember {
			return bytes.Replace(data, []byte(m.Members[2].SHA256), []byte(strings.Repeat("0", 64)), 1)
		}
		return data
	})
	out := t.TempDir()
	f, _ := os.Open(file)
	defer f.Close()
	_, err = ReadArchiveFrom(context.Background(), f, "stream", out, in.MACKey)
	if !errors.Is(err, ErrBadArchive) || !strings.Contains(err.Error(), "MAC") {
		t.Errorf("edited manifest: %v", err)
	}
	if ents, _ := os.ReadDir(out); len(ents) > 0 {
		t.Errorf("refused stream wrote %d entries", len(ents))
	}
}
