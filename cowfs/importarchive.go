package cowfs

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"regexp"
	"runtime"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Media types of Docker's v2 schema 2, which OCI layouts written from docker sources carry.
const (
	mediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	annotationContainerdName    = "io.containerd.image.name"
)

// ImportOptions tune Import.
type ImportOptions struct {
	Tag      string            // name:tag for the image; only when the source holds exactly one image
	Progress func(ImportEvent) // called at the start of each long step; may be nil
}

// Import imports every image of an OCI image layout directory, an OCI archive tar or a
// docker-archive tar. Names come from opts.Tag, else from the source (OCI ref.name annotations
// that are full references, docker-archive RepoTags); images without one are stored untagged.
func (s *Store) Import(ctx context.Context, p string, opts ImportOptions) ([]Imported, error) {
	var tag string
	if opts.Tag != "" {
		n, err := NormalizeName(opts.Tag)
		if err != nil {
			return nil, err
		}
		tag = n
	}
	src, format, err := openSource(p)
	if err != nil {
		return nil, err
	}
	defer src.Close()

	st, err := s.newStaging(ctx)
	if err != nil {
		return nil, err
	}
	defer st.cleanup()
	st.progress = opts.Progress

	var n int
	if format == "oci" {
		n, err = st.importOCI(ctx, src, tag)
	} else {
		n, err = st.importDockerArchive(ctx, src, tag)
	}
	if err != nil {
		return nil, fmt.Errorf("import %s (%s): %w", p, format, err)
	}
	if n == 0 {
		return nil, fmt.Errorf("import %s (%s): no image for linux/%s in it", p, format, runtime.GOARCH)
	}
	return st.commit(ctx)
}

// copyBlob copies the blob d (of size, -1 if unknown) from the source into staging, verified.
func (st *staging) copyBlob(src source, name string, d digest.Digest, size int64, what string) (digest.Digest, int64, error) {
	if d != "" {
		if err := d.Validate(); err != nil {
			return "", 0, &BlobError{d, what, fmt.Sprintf("bad digest: %v", err)}
		}
	}
	r, err := src.open(name)
	if errors.Is(err, fs.ErrNotExist) {
		return "", 0, &BlobError{d, what, fmt.Sprintf("missing: %s is not in the source", name)}
	}
	if err != nil {
		return "", 0, &BlobError{d, what, fmt.Sprintf("open %s: %v", name, err)}
	}
	defer r.Close()
	st.report(ImportEvent{Step: "verify", What: what, Digest: d, Size: size})
	return st.addBlob(r, d, size, what)
}

// importOCI walks index.json (following nested indexes to the manifests for this platform).
func (st *staging) importOCI(ctx context.Context, src source, tag string) (int, error) {
	var layout ocispec.ImageLayout
	if err := readSourceJSON(src, "oci-layout", &layout); err != nil {
		return 0, err
	}
	if layout.Version != ocispec.ImageLayoutVersion {
		return 0, fmt.Errorf("oci-layout version %q, want %q", layout.Version, ocispec.ImageLayoutVersion)
	}
	var idx ocispec.Index
	if err := readSourceJSON(src, "index.json", &idx); err != nil {
		return 0, err
	}
	type found struct {
		desc  ocispec.Descriptor
		names []string
	}
	var manifests []found
	var walk func(descs []ocispec.Descriptor, names []string, depth int) error
	walk = func(descs []ocispec.Descriptor, inherited []string, depth int) error {
		if depth > 4 {
			return errors.New("image indexes nested deeper than 4 levels")
		}
		for _, d := range descs {
			if d.Platform != nil && (d.Platform.OS != "linux" || d.Platform.Architecture != runtime.GOARCH) {
				continue
			}
			names := inherited
			if depth == 0 {
				names = refNames(d.Annotations)
			}
			switch d.MediaType {
			case ocispec.MediaTypeImageManifest, mediaTypeDockerManifest:
				manifests = append(manifests, found{d, names})
			case ocispec.MediaTypeImageIndex, mediaTypeDockerManifestList:
				if _, _, err := st.copyBlob(src, blobName(d.Digest), d.Digest, d.Size, "index"); err != nil {
					return err
				}
				var sub ocispec.Index
				if err := readJSONFile(st.blobPath(d.Digest), &sub); err != nil {
					return &BlobError{d.Digest, "index", err.Error()}
				}
				if err := walk(sub.Manifests, names, depth+1); err != nil {
					return err
				}
			default:
				// Signatures, attestations and other artifacts are not images.
			}
		}
		return nil
	}
	if err := walk(idx.Manifests, nil, 0); err != nil {
		return 0, err
	}
	if tag != "" && len(manifests) > 1 {
		return 0, fmt.Errorf("--tag names one image, but the source holds %d for linux/%s", len(manifests), runtime.GOARCH)
	}
	for _, m := range manifests {
		names := m.names
		if tag != "" {
			names = []string{tag}
		}
		if err := st.importManifest(ctx, src, m.desc, names); err != nil {
			return 0, err
		}
	}
	return len(manifests), nil
}

// refNames turns a top-level descriptor's annotations into image names. A bare ref.name
// ("v1", "latest") is only a tag and names no image; a full reference does.
func refNames(ann map[string]string) []string {
	for _, key := range []string{annotationContainerdName, ocispec.AnnotationRefName} {
		if n, err := NormalizeName(ann[key]); err == nil && (strings.Contains(ann[key], ":") || strings.Contains(ann[key], "/")) {
			return []string{n}
		}
	}
	return nil
}

// importManifest copies and verifies a manifest, its config and its layers, and unpacks the
// layers.
func (st *staging) importManifest(ctx context.Context, src source, desc ocispec.Descriptor, names []string) error {
	if _, _, err := st.copyBlob(src, blobName(desc.Digest), desc.Digest, desc.Size, "manifest"); err != nil {
		return err
	}
	var m ocispec.Manifest
	if err := readJSONFile(st.blobPath(desc.Digest), &m); err != nil {
		return &BlobError{desc.Digest, "manifest", err.Error()}
	}
	if m.Config.Digest == "" {
		return &BlobError{desc.Digest, "manifest", "names no config blob"}
	}
	if _, _, err := st.copyBlob(src, blobName(m.Config.Digest), m.Config.Digest, m.Config.Size, "config"); err != nil {
		return fmt.Errorf("manifest %s: %w", desc.Digest, err)
	}
	for _, l := range m.Layers {
		if _, _, err := st.copyBlob(src, blobName(l.Digest), l.Digest, l.Size, "layer"); err != nil {
			return fmt.Errorf("manifest %s: %w", desc.Digest, err)
		}
	}
	return st.addImage(ctx, desc.Digest, names)
}

// dockerManifestEntry is one image of a docker-archive's manifest.json (the format of
// `docker save` / `podman save --format docker-archive`; no spec package declares it).
type dockerManifestEntry struct {
	Config   string
	RepoTags []string
	Layers   []string
}

// digestName matches archive file names that carry a sha256 digest: "<hex>.json",
// "<hex>.tar", "blobs/sha256/<hex>".
var digestName = regexp.MustCompile(`^(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json|\.tar)?$`)

func digestFromName(name string) digest.Digest {
	if m := digestName.FindStringSubmatch(name); m != nil {
		return digest.NewDigestFromEncoded(digest.SHA256, m[1])
	}
	return ""
}

// importDockerArchive imports each image of manifest.json, building an OCI manifest for it.
// Configs and layers named by digest are checked against that digest; every layer is checked
// against the config's diffIDs when it is unpacked.
func (st *staging) importDockerArchive(ctx context.Context, src source, tag string) (int, error) {
	var entries []dockerManifestEntry
	if err := readSourceJSON(src, "manifest.json", &entries); err != nil {
		return 0, err
	}
	if tag != "" && len(entries) > 1 {
		return 0, fmt.Errorf("--tag names one image, but the archive holds %d", len(entries))
	}
	for _, e := range entries {
		if e.Config == "" {
			return 0, errors.New("manifest.json: an image names no config file")
		}
		cfgDigest, cfgSize, err := st.copyBlob(src, e.Config, digestFromName(e.Config), -1, "config")
		if err != nil {
			return 0, fmt.Errorf("config %s: %w", e.Config, err)
		}
		var cfg ocispec.Image
		if err := readJSONFile(st.blobPath(cfgDigest), &cfg); err != nil {
			return 0, &BlobError{cfgDigest, "config", err.Error()}
		}
		m := ocispec.Manifest{
			MediaType: ocispec.MediaTypeImageManifest,
			Config:    ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: cfgDigest, Size: cfgSize},
		}
		m.SchemaVersion = 2
		for _, l := range e.Layers {
			want := digestFromName(l)
			if strings.HasSuffix(l, "/layer.tar") {
				want = "" // docker's legacy "<v1 id>/layer.tar": the directory is not a digest
			}
			d, size, err := st.copyBlob(src, l, want, -1, "layer")
			if err != nil {
				return 0, fmt.Errorf("layer %s: %w", l, err)
			}
			mt, err := layerMediaType(st.blobPath(d))
			if err != nil {
				return 0, err
			}
			m.Layers = append(m.Layers, ocispec.Descriptor{MediaType: mt, Digest: d, Size: size})
		}
		desc, _, err := st.addJSON(m, ocispec.MediaTypeImageManifest)
		if err != nil {
			return 0, err
		}
		var names []string
		if tag != "" {
			names = []string{tag}
		} else {
			for _, rt := range e.RepoTags {
				if n, err := NormalizeName(rt); err == nil {
					names = append(names, n)
				}
			}
		}
		if err := st.addImage(ctx, desc.Digest, names); err != nil {
			return 0, err
		}
	}
	return len(entries), nil
}

// layerMediaType names the OCI layer media type for the compression of the blob at p.
func layerMediaType(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	magic, _ := bufio.NewReader(f).Peek(4)
	switch {
	case len(magic) >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		return ocispec.MediaTypeImageLayerGzip, nil
	case len(magic) == 4 && magic[0] == 0x28 && magic[1] == 0xb5 && magic[2] == 0x2f && magic[3] == 0xfd:
		return ocispec.MediaTypeImageLayerZstd, nil
	}
	return ocispec.MediaTypeImageLayer, nil
}

func readSourceJSON(src source, name string, v any) error {
	r, err := src.open(name)
	if err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	defer r.Close()
	// Index files are small; a huge one is an attack or a mistake.
	data, err := io.ReadAll(io.LimitReader(r, 16<<20))
	if err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	return nil
}
