package cowfs

import (
	"bytes"
	"context"
	_ "crypto/sha256" // registers sha256 for go-digest
	"encoding/json"
	"errors"
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

// ErrNotFound is wrapped by errors about unknown images.
var ErrNotFound = errors.New("image not found")

// ErrInUse is wrapped by Remove when containers still hold the image.
var ErrInUse = errors.New("image in use")

// Store is an image and layer store rooted at one directory.
type Store struct {
	root string
}

// Image is a resolved image: its digests, config and unpacked layer directories.
type Image struct {
	Name           string        // "name:tag" it was resolved by, "" if resolved by digest
	ManifestDigest digest.Digest // digest of the OCI manifest
	ID             digest.Digest // config digest (image ID)
	Config         ocispec.Image // full image config
	LayerDirs      []string      // unpacked layer dirs, BOTTOM layer first, each usable as an overlay lowerdir
}

// Summary is one line of List.
type Summary struct {
	Names          []string      `json:"names"` // name:tag references, sorted; empty when untagged
	ManifestDigest digest.Digest `json:"manifestDigest"`
	ID             digest.Digest `json:"id"`
	Size           int64         `json:"size"` // manifest + config + layer blobs, as stored
	Created        *time.Time    `json:"created,omitempty"`
	Holders        []string      `json:"holders,omitempty"`
}

// index is the content of images.json.
type index struct {
	Version int                            `json:"version"`
	Tags    map[string]digest.Digest       `json:"tags"`   // name:tag → manifest digest
	Images  map[digest.Digest]*imageRecord `json:"images"` // manifest digest → record
	Holds   map[digest.Digest]holderSet    `json:"holds,omitempty"`
}

type holderSet map[string]time.Time // holder → since

type imageRecord struct {
	ID       digest.Digest `json:"id"`
	Size     int64         `json:"size"`
	Created  *time.Time    `json:"created,omitempty"`
	Imported time.Time     `json:"imported"`
}

const indexVersion = 1

// Open opens (creating if needed) the store under root.
func Open(root string) (*Store, error) {
	if root == "" {
		return nil, errors.New("open image store: empty root directory")
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("open image store %s: %w", root, err)
	}
	s := &Store{root: abs}
	for _, d := range []string{s.blobDir(), s.layersDir(), s.layerMetaDir(), s.tmpDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("open image store %s: %w", abs, err)
		}
	}
	return s, nil
}

// Root returns the store's root directory.
func (s *Store) Root() string { return s.root }

func (s *Store) blobDir() string   { return filepath.Join(s.root, "blobs", "sha256") }
func (s *Store) layersDir() string { return filepath.Join(s.root, "layers") }
func (s *Store) tmpDir() string    { return filepath.Join(s.root, "tmp") }
func (s *Store) layerMetaDir() string {
	return filepath.Join(s.root, "layermeta")
}

func (s *Store) layerMetaPath(diffID digest.Digest) string {
	return filepath.Join(s.layerMetaDir(), diffID.Encoded()+".json")
}

// readLayerMeta returns the implicitly created directories recorded for an unpacked layer.
func (s *Store) readLayerMeta(diffID digest.Digest) ([]string, error) {
	var m layerMeta
	if err := readJSONFile(s.layerMetaPath(diffID), &m); err != nil {
		return nil, fmt.Errorf("layer %s: metadata: %w (remove the images using it and re-import)", diffID, err)
	}
	return m.ImplicitDirs, nil
}
func (s *Store) indexPath() string { return filepath.Join(s.root, "images.json") }

// BlobPath is where the blob with digest d lives.
func (s *Store) BlobPath(d digest.Digest) string { return filepath.Join(s.blobDir(), d.Encoded()) }

// LayerDir is where the layer with diffID d is unpacked.
func (s *Store) LayerDir(diffID digest.Digest) string {
	return filepath.Join(s.layersDir(), diffID.Encoded())
}

// lockFile takes an flock on root/name, waiting until ctx ends; the returned func releases it.
func (s *Store) lockFile(ctx context.Context, name string, how int) (func(), error) {
	for {
		unlock, err := s.tryLockFile(name, how)
		if err != nil || unlock != nil {
			return unlock, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("lock %s: %w", filepath.Join(s.root, name), ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// tryLockFile takes an flock on root/name if it is free; it returns a nil func when it is not.
func (s *Store) tryLockFile(name string, how int) (func(), error) {
	p := filepath.Join(s.root, name)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	err = unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
	if err == nil {
		return func() { f.Close() }, nil
	}
	f.Close()
	if errors.Is(err, unix.EWOULDBLOCK) {
		return nil, nil
	}
	return nil, fmt.Errorf("lock %s: %w", p, err)
}

// update runs fn on the index under the exclusive index lock and writes the result atomically
// if fn returns nil.
func (s *Store) update(ctx context.Context, fn func(ix *index) error) error {
	unlock, err := s.lockFile(ctx, "images.lock", unix.LOCK_EX)
	if err != nil {
		return err
	}
	defer unlock()
	ix, err := s.readIndex()
	if err != nil {
		return err
	}
	if err := fn(ix); err != nil {
		return err
	}
	data, err := json.MarshalIndent(ix, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", s.indexPath(), err)
	}
	return writeFileAtomic(s.indexPath(), append(data, '\n'), 0o600)
}

// view reads a consistent snapshot of the index (under the shared index lock).
func (s *Store) view(ctx context.Context) (*index, error) {
	unlock, err := s.lockFile(ctx, "images.lock", unix.LOCK_SH)
	if err != nil {
		return nil, err
	}
	defer unlock()
	return s.readIndex()
}

func (s *Store) readIndex() (*index, error) {
	ix := &index{Version: indexVersion}
	data, err := os.ReadFile(s.indexPath())
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("read %s: %w", s.indexPath(), err)
	default:
		if err := json.Unmarshal(data, ix); err != nil {
			return nil, fmt.Errorf("read %s: corrupt index: %w", s.indexPath(), err)
		}
		if ix.Version != indexVersion {
			return nil, fmt.Errorf("read %s: index version %d, this hot understands %d", s.indexPath(), ix.Version, indexVersion)
		}
	}
	if ix.Tags == nil {
		ix.Tags = map[string]digest.Digest{}
	}
	if ix.Images == nil {
		ix.Images = map[digest.Digest]*imageRecord{}
	}
	if ix.Holds == nil {
		ix.Holds = map[digest.Digest]holderSet{}
	}
	return ix, nil
}

// writeFileAtomic writes data to a temp file next to path, fsyncs it and renames it over path.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// lookup finds the manifest digest for ref in ix. name is the normalised name:tag when ref
// was a name.
func (ix *index) lookup(ref string) (name string, manifest digest.Digest, err error) {
	ref = strings.TrimSpace(ref)
	if ref == "" {
		return "", "", fmt.Errorf("empty image reference: %w", ErrNotFound)
	}
	if d, perr := digest.Parse(ref); perr == nil {
		if _, ok := ix.Images[d]; ok {
			return "", d, nil
		}
		for md, rec := range ix.Images {
			if rec.ID == d {
				return "", md, nil
			}
		}
		return "", "", notFound(ref)
	}
	if n, nerr := NormalizeName(ref); nerr == nil {
		if md, ok := ix.Tags[n]; ok {
			return n, md, nil
		}
	}
	if isHexPrefix(ref) {
		var matches []digest.Digest
		for md, rec := range ix.Images {
			if strings.HasPrefix(rec.ID.Encoded(), ref) || strings.HasPrefix(md.Encoded(), ref) {
				matches = append(matches, md)
			}
		}
		switch len(matches) {
		case 1:
			return "", matches[0], nil
		case 0:
		default:
			return "", "", fmt.Errorf("image ID prefix %q is ambiguous (%d images match): give more digits (see `hot image ls --no-trunc`)", ref, len(matches))
		}
	}
	return "", "", notFound(ref)
}

func notFound(ref string) error {
	return fmt.Errorf("image %q: %w: see `hot image ls` for the images in this store, `hot image import` to add one", ref, ErrNotFound)
}

func isHexPrefix(s string) bool {
	if len(s) < 12 || len(s) > 64 {
		return false
	}
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// Resolve finds an image by name:tag, name (= name:latest), image ID (sha256:... or a unique
// hex prefix of at least 12 digits) or manifest digest.
func (s *Store) Resolve(ctx context.Context, ref string) (*Image, error) {
	ix, err := s.view(ctx)
	if err != nil {
		return nil, err
	}
	name, md, err := ix.lookup(ref)
	if err != nil {
		return nil, err
	}
	img, err := s.loadImage(md)
	if err != nil {
		return nil, fmt.Errorf("resolve image %q: %w", ref, err)
	}
	img.Name = name
	return img, nil
}

// loadImage reads the manifest and config of md from the store (verifying both) and locates
// its layer directories.
func (s *Store) loadImage(md digest.Digest) (*Image, error) {
	var m ocispec.Manifest
	if err := s.readJSONBlob(md, &m); err != nil {
		return nil, err
	}
	var cfg ocispec.Image
	if err := s.readJSONBlob(m.Config.Digest, &cfg); err != nil {
		return nil, err
	}
	img := &Image{ManifestDigest: md, ID: m.Config.Digest, Config: cfg}
	for _, d := range cfg.RootFS.DiffIDs {
		dir := s.LayerDir(d)
		if _, err := os.Stat(dir); err != nil {
			return nil, fmt.Errorf("layer %s of image %s missing from the store (re-import the image): %w", d, m.Config.Digest, err)
		}
		img.LayerDirs = append(img.LayerDirs, dir)
	}
	return img, nil
}

// readBlob reads a stored blob and checks it against its digest.
func (s *Store) readBlob(d digest.Digest) ([]byte, error) {
	if err := d.Validate(); err != nil {
		return nil, fmt.Errorf("blob %q: %w", d, err)
	}
	data, err := os.ReadFile(s.BlobPath(d))
	if err != nil {
		return nil, fmt.Errorf("read blob %s: %w", d, err)
	}
	if got := d.Algorithm().FromBytes(data); got != d {
		return nil, fmt.Errorf("blob %s in the store is corrupt (content hashes to %s)", d, got)
	}
	return data, nil
}

func (s *Store) readJSONBlob(d digest.Digest, v any) error {
	data, err := s.readBlob(d)
	if err != nil {
		return err
	}
	if err := json.NewDecoder(bytes.NewReader(data)).Decode(v); err != nil {
		return fmt.Errorf("decode blob %s: %w", d, err)
	}
	return nil
}

// List returns every image in the store, sorted by first name then digest.
func (s *Store) List(ctx context.Context) ([]Summary, error) {
	ix, err := s.view(ctx)
	if err != nil {
		return nil, err
	}
	names := map[digest.Digest][]string{}
	for n, md := range ix.Tags {
		names[md] = append(names[md], n)
	}
	out := make([]Summary, 0, len(ix.Images))
	for md, rec := range ix.Images {
		sum := Summary{ManifestDigest: md, ID: rec.ID, Size: rec.Size, Created: rec.Created, Names: names[md]}
		sort.Strings(sum.Names)
		if sum.Names == nil {
			sum.Names = []string{}
		}
		for h := range ix.Holds[rec.ID] {
			sum.Holders = append(sum.Holders, h)
		}
		sort.Strings(sum.Holders)
		out = append(out, sum)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := "", ""
		if len(out[i].Names) > 0 {
			a = out[i].Names[0]
		}
		if len(out[j].Names) > 0 {
			b = out[j].Names[0]
		}
		if a != b {
			return a != "" && (b == "" || a < b)
		}
		return out[i].ManifestDigest < out[j].ManifestDigest
	})
	return out, nil
}

// Hold records that holder (a container ID) uses image id; Remove refuses while it is held.
func (s *Store) Hold(ctx context.Context, id digest.Digest, holder string) error {
	if holder == "" {
		return errors.New("hold image: empty holder")
	}
	return s.update(ctx, func(ix *index) error {
		found := false
		for _, rec := range ix.Images {
			if rec.ID == id {
				found = true
				break
			}
		}
		if !found {
			return fmt.Errorf("hold image %s for %s: %w", id, holder, notFound(string(id)))
		}
		if ix.Holds[id] == nil {
			ix.Holds[id] = holderSet{}
		}
		if _, ok := ix.Holds[id][holder]; !ok {
			ix.Holds[id][holder] = time.Now().UTC()
		}
		return nil
	})
}

// Release drops holder's hold on image id. Releasing a hold that does not exist is not an error.
func (s *Store) Release(ctx context.Context, id digest.Digest, holder string) error {
	return s.update(ctx, func(ix *index) error {
		delete(ix.Holds[id], holder)
		if len(ix.Holds[id]) == 0 {
			delete(ix.Holds, id)
		}
		return nil
	})
}

// copyN copies exactly n bytes or fails.
func copyN(dst io.Writer, src io.Reader, n int64) error {
	got, err := io.CopyN(dst, src, n)
	if err == io.EOF {
		return fmt.Errorf("truncated: got %d of %d bytes", got, n)
	}
	return err
}
