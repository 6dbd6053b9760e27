package cowfs

import (
	"archive/tar"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"

	"github.com/opencontainers/go-digest"
)

// source is a place images are imported from: an OCI layout directory, or a tar archive
// (OCI archive or docker-archive) read in place.
type source interface {
	// open returns the file at the slash-separated path name relative to the source root.
	// A missing file yields an error wrapping fs.ErrNotExist.
	open(name string) (io.ReadCloser, error)
	has(name string) bool
	Close() error
}

// dirSource reads an OCI layout directory.
type dirSource struct{ root *os.Root }

func openDirSource(dir string) (*dirSource, error) {
	r, err := os.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	return &dirSource{root: r}, nil
}

// open reads below the directory only: os.Root refuses names and symlinks that leave it.
func (d *dirSource) open(name string) (io.ReadCloser, error) {
	f, err := d.root.Open(name)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s: not a regular file", name)
	}
	return f, nil
}

func (d *dirSource) has(name string) bool {
	_, err := d.root.Stat(name)
	return err == nil
}

func (d *dirSource) Close() error { return d.root.Close() }

// tarSource reads a tar archive in place: entries are indexed once, then read as sections
// of the file.
type tarSource struct {
	f       *os.File
	entries map[string]tarEntry
}

type tarEntry struct {
	offset, size int64
	link         string // symlink or hardlink target (cleaned, archive-relative) when set
}

// posReader tracks the read position so the tar reader's data offsets are known. It passes
// Seek through so that skipping over entry data does not read it.
type posReader struct {
	f   *os.File
	pos int64
}

func (p *posReader) Read(b []byte) (int, error) {
	n, err := p.f.Read(b)
	p.pos += int64(n)
	return n, err
}

func (p *posReader) Seek(off int64, whence int) (int64, error) {
	n, err := p.f.Seek(off, whence)
	if err == nil {
		p.pos = n
	}
	return n, err
}

func openTarSource(file string) (*tarSource, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	magic := make([]byte, 4)
	if _, err := io.ReadFull(f, magic); err == nil && (magic[0] == 0x1f && magic[1] == 0x8b || magic[0] == 0x28 && magic[1] == 0xb5) {
		f.Close()
		return nil, fmt.Errorf("%s is compressed: decompress it first (gunzip/unzstd), image archives are plain tar", file)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	ts := &tarSource{f: f, entries: map[string]tarEntry{}}
	pr := &posReader{f: f}
	tr := tar.NewReader(pr)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("read archive %s: %w", file, err)
		}
		name := path.Clean("/" + hdr.Name)[1:]
		switch hdr.Typeflag {
		case tar.TypeReg: // archive/tar reports old-style TypeRegA entries as TypeReg
			ts.entries[name] = tarEntry{offset: pr.pos, size: hdr.Size}
		case tar.TypeSymlink:
			target := hdr.Linkname
			if !strings.HasPrefix(target, "/") {
				target = path.Join(path.Dir(name), target)
			}
			ts.entries[name] = tarEntry{link: path.Clean("/" + target)[1:]}
		case tar.TypeLink:
			ts.entries[name] = tarEntry{link: path.Clean("/" + hdr.Linkname)[1:]}
		}
	}
	return ts, nil
}

func (t *tarSource) lookup(name string) (tarEntry, bool) {
	name = path.Clean("/" + name)[1:]
	for hops := 0; hops < 8; hops++ {
		e, ok := t.entries[name]
		if !ok || e.link == "" {
			return e, ok
		}
		name = e.link
	}
	return tarEntry{}, false
}

func (t *tarSource) open(name string) (io.ReadCloser, error) {
	e, ok := t.lookup(name)
	if !ok {
		return nil, fmt.Errorf("%s: %w", name, fs.ErrNotExist)
	}
	return io.NopCloser(io.NewSectionReader(t.f, e.offset, e.size)), nil
}

func (t *tarSource) has(name string) bool {
	_, ok := t.lookup(name)
	return ok
}

func (t *tarSource) Close() error { return t.f.Close() }

// blobName is where an OCI layout keeps the blob with digest d.
func blobName(d digest.Digest) string {
	return "blobs/" + string(d.Algorithm()) + "/" + d.Encoded()
}

// openSource opens p as a directory or tar archive and reports its format.
func openSource(p string) (source, string, error) {
	fi, err := os.Stat(p)
	if err != nil {
		return nil, "", fmt.Errorf("import %s: %w", p, err)
	}
	var src source
	if fi.IsDir() {
		src, err = openDirSource(p)
	} else {
		src, err = openTarSource(p)
	}
	if err != nil {
		return nil, "", fmt.Errorf("import %s: %w", p, err)
	}
	switch {
	case src.has("index.json") && src.has("oci-layout"):
		return src, "oci", nil
	case src.has("manifest.json"):
		return src, "docker-archive", nil
	}
	src.Close()
	kind := "archive"
	if fi.IsDir() {
		kind = "directory"
	}
	return nil, "", fmt.Errorf("import %s: %s is neither an OCI image layout (index.json + oci-layout) nor a docker-archive (manifest.json); for a plain root filesystem use --rootfs", p, kind)
}
