package cowfs

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// entry is one tar entry of a test layer.
type entry struct {
	name, link, body string
	typ              byte
	mode             int64
}

func file(name, body string) entry {
	return entry{name: name, body: body, typ: tar.TypeReg, mode: 0o644}
}
func dir(name string) entry { return entry{name: name, typ: tar.TypeDir, mode: 0o755} }
func symlink(name, target string) entry {
	return entry{name: name, link: target, typ: tar.TypeSymlink, mode: 0o777}
}
func hardlink(name, target string) entry {
	return entry{name: name, link: target, typ: tar.TypeLink, mode: 0o644}
}

// layerTar builds an uncompressed layer tar. Names are written as given, hostile ones too.
func layerTar(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		hdr := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: e.mode, Size: int64(len(e.body)), Format: tar.FormatPAX}
		if e.typ != tar.TypeReg {
			hdr.Size = 0
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if hdr.Size > 0 {
			if _, err := tw.Write([]byte(e.body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func compress(t testing.TB, kind string, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	switch kind {
	case "gzip":
		zw := gzip.NewWriter(&buf)
		zw.Write(data)
		must(t, zw.Close())
	case "zstd":
		zw, err := zstd.NewWriter(&buf)
		must(t, err)
		zw.Write(data)
		must(t, zw.Close())
	default:
		return data
	}
	return buf.Bytes()
}

// testLayout describes an OCI layout to write; the hooks let tests corrupt it.
type testLayout struct {
	layers      [][]byte // uncompressed layer tars, bottom first
	compression []string // per layer: "", "gzip", "zstd"
	refName     string
	// corrupt runs after every blob is written, with the digests of the layer blobs.
	corrupt func(dir string, layerBlobs []digest.Digest)
}

// writeOCILayout writes the image as an OCI layout directory and returns its manifest digest.
func writeOCILayout(t *testing.T, dir string, l testLayout) (manifest, config digest.Digest) {
	t.Helper()
	must(t, os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755))
	put := func(data []byte) digest.Digest {
		d := digest.FromBytes(data)
		must(t, os.WriteFile(filepath.Join(dir, "blobs", "sha256", d.Encoded()), data, 0o644))
		return d
	}
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH}, RootFS: ocispec.RootFS{Type: "layers"}}
	cfg.Config.Cmd = []string{"/bin/true"}
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest}
	m.SchemaVersion = 2
	var blobs []digest.Digest
	for i, layer := range l.layers {
		kind := ""
		if i < len(l.compression) {
			kind = l.compression[i]
		}
		mt := map[string]string{"": ocispec.MediaTypeImageLayer, "gzip": ocispec.MediaTypeImageLayerGzip, "zstd": ocispec.MediaTypeImageLayerZstd}[kind]
		blob := compress(t, kind, layer)
		d := put(blob)
		blobs = append(blobs, d)
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, digest.FromBytes(layer))
		m.Layers = append(m.Layers, ocispec.Descriptor{MediaType: mt, Digest: d, Size: int64(len(blob))})
	}
	cfgData, _ := json.Marshal(cfg)
	m.Config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: put(cfgData), Size: int64(len(cfgData))}
	mData, _ := json.Marshal(m)
	md := put(mData)
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: md, Size: int64(len(mData))}
	if l.refName != "" {
		desc.Annotations = map[string]string{ocispec.AnnotationRefName: l.refName}
	}
	idx := ocispec.Index{Manifests: []ocispec.Descriptor{desc}, MediaType: ocispec.MediaTypeImageIndex}
	idx.SchemaVersion = 2
	idxData, _ := json.Marshal(idx)
	must(t, os.WriteFile(filepath.Join(dir, "index.json"), idxData, 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644))
	if l.corrupt != nil {
		l.corrupt(dir, blobs)
	}
	return md, m.Config.Digest
}

// tarDir packs a directory (an OCI layout) into a tar archive at out.
func tarDir(t *testing.T, dir, out string) {
	t.Helper()
	f, err := os.Create(out)
	must(t, err)
	defer f.Close()
	tw := tar.NewWriter(f)
	must(t, filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		hdr, err := tar.FileInfoHeader(fi, "")
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if fi.Mode().IsRegular() {
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			_, err = tw.Write(data)
			return err
		}
		return nil
	}))
	must(t, tw.Close())
}
