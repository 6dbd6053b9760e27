package cowfs

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
)

// Imported describes one image an import added or re-tagged.
type Imported struct {
	Names          []string      `json:"names"`
	ManifestDigest digest.Digest `json:"manifestDigest"`
	ID             digest.Digest `json:"id"`
	Layers         int           `json:"layers"`
	NewLayers      int           `json:"newLayers"` // layers unpacked by this import (others were in the store)
}

// staging is one import's private area under tmp/. Nothing in it is visible in the store until
// commit renames it into place; cleanup removes whatever is left.
type staging struct {
	s         *Store
	dir       string
	blobs     map[digest.Digest]string // digest → staged file ("" when the store already has it)
	layers    map[digest.Digest]string // diffID → staged dir ("" when the store already has it)
	implicit  map[digest.Digest][]string
	images    []stagedImage
	unlockGC  func()
	newLayers int
	progress  func(ImportEvent)
}

// ImportEvent is one long step of an import, for progress displays.
type ImportEvent struct {
	Step   string        `json:"step"` // "archive" (a root filesystem), "verify" (copy and hash a blob), "unpack" (extract a layer)
	What   string        `json:"what"` // "manifest", "config", "layer", ...
	Digest digest.Digest `json:"digest,omitempty"`
	Size   int64         `json:"size"` // bytes; -1 when unknown
}

func (st *staging) report(e ImportEvent) {
	if st.progress != nil {
		st.progress(e)
	}
}

type stagedImage struct {
	names    []string
	manifest digest.Digest
	id       digest.Digest
	size     int64
	created  *time.Time
	layers   int
	fresh    int
}

func (s *Store) newStaging(ctx context.Context) (*staging, error) {
	// When no import or removal runs, whatever is under tmp/ was left by a crashed import.
	if unlockEx, err := s.tryLockFile("gc.lock", unix.LOCK_EX); err == nil && unlockEx != nil {
		s.removeStaleStaging()
		unlockEx()
	}
	unlock, err := s.lockFile(ctx, "gc.lock", unix.LOCK_SH)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(s.tmpDir(), "import-")
	if err != nil {
		unlock()
		return nil, fmt.Errorf("create import staging dir: %w", err)
	}
	return &staging{s: s, dir: dir, blobs: map[digest.Digest]string{}, layers: map[digest.Digest]string{}, implicit: map[digest.Digest][]string{}, unlockGC: unlock}, nil
}

// removeStaleStaging empties tmp/. The caller holds gc.lock exclusively.
func (s *Store) removeStaleStaging() {
	entries, _ := os.ReadDir(s.tmpDir())
	for _, e := range entries {
		os.RemoveAll(filepath.Join(s.tmpDir(), e.Name()))
	}
}

func (st *staging) cleanup() {
	os.RemoveAll(st.dir)
	st.unlockGC()
}

// BlobError is returned when a blob from outside the store is missing, truncated or does not
// match its digest.
type BlobError struct {
	Digest digest.Digest // the digest the blob is named by ("" when unknown)
	What   string        // "layer", "config", "manifest" ...
	Reason string
}

func (e *BlobError) Error() string {
	if e.Digest == "" {
		return fmt.Sprintf("%s blob: %s", e.What, e.Reason)
	}
	return fmt.Sprintf("%s blob %s: %s", e.What, e.Digest, e.Reason)
}

// addBlob copies r into the staging area while hashing it. When want is set, the content must
// hash to want; when size >= 0 it must be exactly size bytes. It returns the content's digest.
func (st *staging) addBlob(r io.Reader, want digest.Digest, size int64, what string) (digest.Digest, int64, error) {
	if want != "" {
		if err := want.Validate(); err != nil {
			return "", 0, &BlobError{want, what, fmt.Sprintf("bad digest: %v", err)}
		}
		if want.Algorithm() != digest.SHA256 {
			return "", 0, &BlobError{want, what, "only sha256 digests are supported"}
		}
	}
	f, err := os.CreateTemp(st.dir, "blob-")
	if err != nil {
		return "", 0, fmt.Errorf("stage %s blob: %w", what, err)
	}
	defer f.Close()
	dg := digest.SHA256.Digester()
	src := r
	if size >= 0 {
		src = io.LimitReader(r, size+1) // one more byte to notice an over-long blob
	}
	n, err := io.Copy(io.MultiWriter(f, dg.Hash()), src)
	if err != nil {
		return "", 0, &BlobError{want, what, fmt.Sprintf("read: %v", err)}
	}
	if size >= 0 && n < size {
		return "", 0, &BlobError{want, what, fmt.Sprintf("truncated: %d of %d bytes", n, size)}
	}
	if size >= 0 && n > size {
		return "", 0, &BlobError{want, what, fmt.Sprintf("longer than the %d bytes its descriptor says", size)}
	}
	got := dg.Digest()
	if want != "" && got != want {
		return "", 0, &BlobError{want, what, fmt.Sprintf("digest mismatch: content hashes to %s", got)}
	}
	if err := f.Sync(); err != nil {
		return "", 0, fmt.Errorf("stage %s blob %s: %w", what, got, err)
	}
	if _, ok := st.blobs[got]; ok {
		os.Remove(f.Name())
		return got, n, nil
	}
	if _, err := os.Stat(st.s.BlobPath(got)); err == nil {
		os.Remove(f.Name())
		st.blobs[got] = ""
		return got, n, nil
	}
	final := filepath.Join(st.dir, "blob-"+got.Encoded())
	if err := os.Rename(f.Name(), final); err != nil {
		return "", 0, fmt.Errorf("stage %s blob %s: %w", what, got, err)
	}
	st.blobs[got] = final
	return got, n, nil
}

// addJSON stores v, marshalled, as a blob and returns its descriptor.
func (st *staging) addJSON(v any, mediaType string) (ocispec.Descriptor, []byte, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return ocispec.Descriptor{}, nil, fmt.Errorf("encode %s: %w", mediaType, err)
	}
	d, n, err := st.addBlob(bytesReader(data), "", -1, mediaType)
	if err != nil {
		return ocispec.Descriptor{}, nil, err
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: d, Size: n}, data, nil
}

// blobPath is where a staged or stored blob can be read.
func (st *staging) blobPath(d digest.Digest) string {
	if p := st.blobs[d]; p != "" {
		return p
	}
	return st.s.BlobPath(d)
}

// layerDir is where a staged or stored layer can be read.
func (st *staging) layerDir(diffID digest.Digest) string {
	if p := st.layers[diffID]; p != "" {
		return p
	}
	return st.s.LayerDir(diffID)
}

// unpack makes sure the layer with diffID is unpacked, extracting the staged blob when the
// store does not have it yet. lowers are the directories of the layers below it; a layer that
// is already unpacked is re-checked against them (see checkLowerSymlinks).
func (st *staging) unpack(ctx context.Context, blob, diffID digest.Digest, lowers []string) error {
	if _, ok := st.layers[diffID]; !ok {
		if _, err := os.Stat(st.s.LayerDir(diffID)); err == nil {
			implicit, err := st.s.readLayerMeta(diffID)
			if err != nil {
				return err
			}
			st.layers[diffID], st.implicit[diffID] = "", implicit
		} else if err := st.extract(ctx, blob, diffID, lowers); err != nil {
			return err
		}
	}
	if err := checkLowerSymlinks(st.implicit[diffID], lowers); err != nil {
		return fmt.Errorf("layer %s (already unpacked) on this image's lower layers: %w", diffID, err)
	}
	return nil
}

// layerMeta is what the store remembers about an unpacked layer.
type layerMeta struct {
	ImplicitDirs []string `json:"implicitDirs,omitempty"`
}

func (st *staging) extract(ctx context.Context, blob, diffID digest.Digest, lowers []string) error {
	st.report(ImportEvent{Step: "unpack", What: "layer", Digest: diffID, Size: -1})
	dir := filepath.Join(st.dir, "layer-"+diffID.Encoded())
	if err := os.Mkdir(dir, 0o755); err != nil {
		return fmt.Errorf("unpack layer %s: %w", diffID, err)
	}
	f, err := os.Open(st.blobPath(blob))
	if err != nil {
		return fmt.Errorf("unpack layer %s: %w", blob, err)
	}
	defer f.Close()
	got, implicit, err := extractLayer(ctx, f, dir, lowers)
	if err != nil {
		return fmt.Errorf("unpack layer blob %s: %w", blob, err)
	}
	if got != diffID {
		return &BlobError{blob, "layer", fmt.Sprintf("uncompressed content hashes to %s, but the image config says diffID %s", got, diffID)}
	}
	data, err := json.Marshal(layerMeta{ImplicitDirs: implicit})
	if err != nil {
		return err
	}
	if err := os.WriteFile(dir+".json", data, 0o600); err != nil {
		return fmt.Errorf("unpack layer %s: %w", diffID, err)
	}
	st.layers[diffID], st.implicit[diffID] = dir, implicit
	st.newLayers++
	return nil
}

// addImage verifies a complete image whose manifest blob is staged (or stored): config present
// and parsed, every layer staged and unpacked in order. names are normalised name:tag refs.
func (st *staging) addImage(ctx context.Context, manifest digest.Digest, names []string) error {
	var m ocispec.Manifest
	if err := readJSONFile(st.blobPath(manifest), &m); err != nil {
		return &BlobError{manifest, "manifest", err.Error()}
	}
	if _, ok := st.blobs[m.Config.Digest]; !ok {
		return &BlobError{m.Config.Digest, "config", fmt.Sprintf("named by manifest %s but not imported", manifest)}
	}
	var cfg ocispec.Image
	if err := readJSONFile(st.blobPath(m.Config.Digest), &cfg); err != nil {
		return &BlobError{m.Config.Digest, "config", err.Error()}
	}
	if len(cfg.RootFS.DiffIDs) != len(m.Layers) {
		return fmt.Errorf("image %s: manifest lists %d layers but config lists %d diffIDs", m.Config.Digest, len(m.Layers), len(cfg.RootFS.DiffIDs))
	}
	size := m.Config.Size
	if fi, err := os.Stat(st.blobPath(manifest)); err == nil {
		size += fi.Size()
	}
	before := st.newLayers
	var lowers []string
	for i, l := range m.Layers {
		if _, ok := st.blobs[l.Digest]; !ok {
			return &BlobError{l.Digest, "layer", fmt.Sprintf("named by manifest %s but not imported", manifest)}
		}
		if err := st.unpack(ctx, l.Digest, cfg.RootFS.DiffIDs[i], lowers); err != nil {
			return err
		}
		lowers = append(lowers, st.layerDir(cfg.RootFS.DiffIDs[i]))
		size += l.Size
	}
	st.images = append(st.images, stagedImage{names: names, manifest: manifest, id: m.Config.Digest, size: size, created: cfg.Created, layers: len(m.Layers), fresh: st.newLayers - before})
	return nil
}

// commit renames staged blobs and layers into the store and records the images, all under
// the index lock. Blobs and layers another import placed first are kept.
func (st *staging) commit(ctx context.Context) ([]Imported, error) {
	var out []Imported
	err := st.s.update(ctx, func(ix *index) error {
		for d, p := range st.blobs {
			if p == "" {
				continue
			}
			final := st.s.BlobPath(d)
			if _, err := os.Stat(final); err == nil {
				continue
			}
			if err := os.Rename(p, final); err != nil {
				return fmt.Errorf("store blob %s: %w", d, err)
			}
		}
		for d, p := range st.layers {
			if p == "" {
				continue
			}
			final := st.s.LayerDir(d)
			if _, err := os.Stat(final); err == nil {
				continue
			}
			// Metadata first: a layer dir without it would skip the lower-symlink re-check.
			if err := os.Rename(p+".json", st.s.layerMetaPath(d)); err != nil {
				return fmt.Errorf("store layer %s: %w", d, err)
			}
			if err := os.Rename(p, final); err != nil {
				return fmt.Errorf("store layer %s: %w", d, err)
			}
		}
		if err := syncDir(st.s.blobDir()); err != nil {
			return err
		}
		now := time.Now().UTC()
		for _, im := range st.images {
			rec := ix.Images[im.manifest]
			if rec == nil {
				rec = &imageRecord{ID: im.id, Size: im.size, Created: im.created, Imported: now}
				ix.Images[im.manifest] = rec
			}
			for _, n := range im.names {
				ix.Tags[n] = im.manifest
			}
			out = append(out, Imported{Names: im.names, ManifestDigest: im.manifest, ID: im.id, Layers: im.layers, NewLayers: im.fresh})
		}
		return nil
	})
	return out, err
}

func readJSONFile(p string, v any) error {
	data, err := os.ReadFile(p)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("decode JSON: %w", err)
	}
	return nil
}
