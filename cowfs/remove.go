package cowfs

import (
	"archive/tar"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
)

// Removed reports what Remove did.
type Removed struct {
	Untagged []string        `json:"untagged"` // names removed
	Deleted  []digest.Digest `json:"deleted"`  // manifest digests of images removed
	Blobs    int             `json:"blobs"`    // blobs freed
	Layers   int             `json:"layers"`   // unpacked layers freed
}

// Remove removes ref. A name whose image has other names only loses that name; otherwise the
// image goes, with its blobs and unpacked layers that no other image uses. An image a
// container holds is never removed (ErrInUse names the holders).
func (s *Store) Remove(ctx context.Context, ref string) (*Removed, error) {
	// Exclusive against imports, which rely on blobs and layers they found in the store.
	unlock, err := s.lockFile(ctx, "gc.lock", unix.LOCK_EX)
	if err != nil {
		return nil, err
	}
	defer unlock()
	out := &Removed{}
	err = s.update(ctx, func(ix *index) error {
		name, md, err := ix.lookup(ref)
		if err != nil {
			return err
		}
		rec := ix.Images[md]
		if name != "" {
			others := 0
			for n, d := range ix.Tags {
				if d == md && n != name {
					others++
				}
			}
			if others > 0 {
				delete(ix.Tags, name)
				out.Untagged = append(out.Untagged, name)
				return nil
			}
		}
		if holders := ix.Holds[rec.ID]; len(holders) > 0 {
			var hs []string
			for h := range holders {
				hs = append(hs, h)
			}
			sort.Strings(hs)
			return fmt.Errorf("remove image %q: %w by container(s) %s: remove them first (`hot rm`)", ref, ErrInUse, strings.Join(hs, ", "))
		}
		for n, d := range ix.Tags {
			if d == md {
				delete(ix.Tags, n)
				out.Untagged = append(out.Untagged, n)
			}
		}
		sort.Strings(out.Untagged)
		delete(ix.Images, md)
		out.Deleted = append(out.Deleted, md)
		return s.collect(ix, out)
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// collect deletes blobs and layers no image in ix uses, and stale import staging. The caller
// holds gc.lock exclusively, so no import is running.
func (s *Store) collect(ix *index, out *Removed) error {
	keepBlobs := map[string]bool{}
	keepLayers := map[string]bool{}
	keepMeta := map[string]bool{}
	for md := range ix.Images {
		keepBlobs[md.Encoded()] = true
		var m ocispec.Manifest
		if err := s.readJSONBlob(md, &m); err != nil {
			return fmt.Errorf("garbage collection: %w", err)
		}
		keepBlobs[m.Config.Digest.Encoded()] = true
		for _, l := range m.Layers {
			keepBlobs[l.Digest.Encoded()] = true
		}
		var cfg ocispec.Image
		if err := s.readJSONBlob(m.Config.Digest, &cfg); err != nil {
			return fmt.Errorf("garbage collection: %w", err)
		}
		for _, d := range cfg.RootFS.DiffIDs {
			keepLayers[d.Encoded()] = true
			keepMeta[d.Encoded()+".json"] = true
		}
	}
	var err error
	if out.Blobs, err = sweep(s.blobDir(), keepBlobs); err != nil {
		return err
	}
	if out.Layers, err = sweep(s.layersDir(), keepLayers); err != nil {
		return err
	}
	if _, err = sweep(s.layerMetaDir(), keepMeta); err != nil {
		return err
	}
	s.removeStaleStaging()
	return nil
}

// sweep removes the entries of dir not in keep and returns how many it removed.
func sweep(dir string, keep map[string]bool) (int, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, fmt.Errorf("garbage collection: %w", err)
	}
	n := 0
	for _, e := range entries {
		if keep[e.Name()] {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return n, fmt.Errorf("garbage collection: %w", err)
		}
		n++
	}
	return n, nil
}

// Export writes ref as an OCI archive (tar of an OCI image layout) to w. The blobs are the
// stored ones, byte for byte, so importing the archive gives the same digests. The index
// carries the name as org.opencontainers.image.ref.name when ref was a name.
func (s *Store) Export(ctx context.Context, ref string, w io.Writer) error {
	img, err := s.Resolve(ctx, ref)
	if err != nil {
		return err
	}
	mdata, err := s.readBlob(img.ManifestDigest)
	if err != nil {
		return err
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(mdata, &m); err != nil {
		return fmt.Errorf("export %s: decode manifest %s: %w", ref, img.ManifestDigest, err)
	}
	mt := m.MediaType
	if mt == "" {
		mt = ocispec.MediaTypeImageManifest
	}
	desc := ocispec.Descriptor{MediaType: mt, Digest: img.ManifestDigest, Size: int64(len(mdata)),
		Platform: &ocispec.Platform{OS: img.Config.OS, Architecture: img.Config.Architecture, Variant: img.Config.Variant}}
	if img.Name != "" {
		desc.Annotations = map[string]string{ocispec.AnnotationRefName: img.Name}
	}
	idx := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{desc}}
	idx.SchemaVersion = 2
	idxData, err := json.Marshal(idx)
	if err != nil {
		return err
	}
	layoutData, err := json.Marshal(ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
	if err != nil {
		return err
	}

	tw := tar.NewWriter(w)
	now := time.Unix(0, 0)
	file := func(name string, size int64) error {
		return tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: size, ModTime: now, Format: tar.FormatPAX})
	}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: now, Format: tar.FormatPAX}); err != nil {
			return fmt.Errorf("export %s: %w", ref, err)
		}
	}
	for _, f := range []struct {
		name string
		data []byte
	}{{"oci-layout", layoutData}, {"index.json", idxData}} {
		if err := file(f.name, int64(len(f.data))); err != nil {
			return fmt.Errorf("export %s: %w", ref, err)
		}
		if _, err := tw.Write(f.data); err != nil {
			return fmt.Errorf("export %s: %w", ref, err)
		}
	}
	blobs := []ocispec.Descriptor{{Digest: img.ManifestDigest, Size: int64(len(mdata))}, m.Config}
	blobs = append(blobs, m.Layers...)
	seen := map[digest.Digest]bool{}
	for _, b := range blobs {
		if seen[b.Digest] {
			continue
		}
		seen[b.Digest] = true
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err := s.copyStoredBlob(tw, b.Digest, file); err != nil {
			return fmt.Errorf("export %s: %w", ref, err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("export %s: %w", ref, err)
	}
	return nil
}

// copyStoredBlob writes a stored blob into the archive, re-checking its digest on the way.
func (s *Store) copyStoredBlob(tw *tar.Writer, d digest.Digest, header func(string, int64) error) error {
	f, err := os.Open(s.BlobPath(d))
	if err != nil {
		return fmt.Errorf("blob %s: %w", d, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if err := header(blobName(d), fi.Size()); err != nil {
		return err
	}
	v := d.Verifier()
	if _, err := io.Copy(io.MultiWriter(tw, v), f); err != nil {
		return fmt.Errorf("blob %s: %w", d, err)
	}
	if !v.Verified() {
		return fmt.Errorf("blob %s in the store is corrupt", d)
	}
	return nil
}

// ExportFile exports ref as an OCI archive to path; the file appears only when complete.
func (s *Store) ExportFile(ctx context.Context, ref, path string) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return fmt.Errorf("export %s to %s: %w", ref, path, err)
	}
	defer os.Remove(f.Name())
	if err := s.Export(ctx, ref, f); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("export %s to %s: %w", ref, path, err)
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		return fmt.Errorf("export %s to %s: %w", ref, path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("export %s to %s: %w", ref, path, err)
	}
	return nil
}
