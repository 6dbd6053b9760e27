package cowfs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
)

// RootfsOptions describes the one-layer image ImportRootfs makes.
type RootfsOptions struct {
	Tag        string   // name:tag to give the image ("" leaves it untagged)
	Entrypoint []string // config.Entrypoint
	Cmd        []string // config.Cmd
	Env        []string // KEY=VALUE; PATH gets the usual default unless given
	WorkingDir string
	Created    time.Time // zero means now
	Progress   func(ImportEvent)
}

const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// ImportRootfs makes a one-layer image from a root filesystem: a directory, or a tar archive
// (plain, gzip or zstd).
func (s *Store) ImportRootfs(ctx context.Context, src string, opts RootfsOptions) (*Imported, error) {
	var names []string
	if opts.Tag != "" {
		n, err := NormalizeName(opts.Tag)
		if err != nil {
			return nil, err
		}
		names = []string{n}
	}
	for _, e := range opts.Env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			return nil, fmt.Errorf("environment entry %q: want KEY=VALUE", e)
		}
	}
	if opts.WorkingDir != "" && !strings.HasPrefix(opts.WorkingDir, "/") {
		return nil, fmt.Errorf("working directory %q: must be an absolute path", opts.WorkingDir)
	}
	fi, err := os.Stat(src)
	if err != nil {
		return nil, fmt.Errorf("import root filesystem: %w", err)
	}

	st, err := s.newStaging(ctx)
	if err != nil {
		return nil, err
	}
	defer st.cleanup()
	st.progress = opts.Progress
	st.report(ImportEvent{Step: "archive", What: "root filesystem", Size: -1})

	// The layer is stored uncompressed: its digest is its diffID.
	pr, pw := io.Pipe()
	go func() {
		if fi.IsDir() {
			pw.CloseWithError(writeDirTar(ctx, pw, src))
			return
		}
		pw.CloseWithError(copyDecompressed(pw, src))
	}()
	layer, layerSize, err := st.addBlob(pr, "", -1, "layer")
	pr.CloseWithError(err)
	if err != nil {
		return nil, fmt.Errorf("import root filesystem %s: %w", src, err)
	}

	created := opts.Created
	if created.IsZero() {
		created = time.Now().UTC().Truncate(time.Second)
	}
	env := append([]string(nil), opts.Env...)
	hasPath := false
	for _, e := range env {
		hasPath = hasPath || strings.HasPrefix(e, "PATH=")
	}
	if !hasPath {
		env = append([]string{defaultPath}, env...)
	}
	cfg := ocispec.Image{
		Created:  &created,
		Platform: ocispec.Platform{Architecture: runtime.GOARCH, OS: "linux"},
		Config: ocispec.ImageConfig{
			Entrypoint: opts.Entrypoint,
			Cmd:        opts.Cmd,
			Env:        env,
			WorkingDir: opts.WorkingDir,
		},
		RootFS:  ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{layer}},
		History: []ocispec.History{{Created: &created, CreatedBy: "hot image import --rootfs " + filepath.Base(src)}},
	}
	cfgDesc, _, err := st.addJSON(cfg, ocispec.MediaTypeImageConfig)
	if err != nil {
		return nil, err
	}
	m := ocispec.Manifest{
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    cfgDesc,
		Layers:    []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageLayer, Digest: layer, Size: layerSize}},
	}
	m.SchemaVersion = 2
	mDesc, _, err := st.addJSON(m, ocispec.MediaTypeImageManifest)
	if err != nil {
		return nil, err
	}
	if err := st.addImage(ctx, mDesc.Digest, names); err != nil {
		return nil, fmt.Errorf("import root filesystem %s: %w", src, err)
	}
	out, err := st.commit(ctx)
	if err != nil {
		return nil, err
	}
	return &out[0], nil
}

func copyDecompressed(w io.Writer, src string) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	zr, err := decompress(f)
	if err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	defer zr.Close()
	if _, err := io.Copy(w, zr); err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	return nil
}

// writeDirTar writes the tree under dir as a tar stream: owners, modes, xattrs, device nodes,
// fifos, symlinks and hardlinks kept; sockets skipped (they cannot be archived).
func writeDirTar(ctx context.Context, w io.Writer, dir string) error {
	tw := tar.NewWriter(w)
	type inode struct{ dev, ino uint64 }
	links := map[inode]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return fmt.Errorf("stat %s: %w", p, err)
		}
		hdr := &tar.Header{
			Name:    filepath.ToSlash(rel),
			Mode:    int64(st.Mode & 0o7777),
			Uid:     int(st.Uid),
			Gid:     int(st.Gid),
			ModTime: time.Unix(st.Mtim.Unix()),
			Format:  tar.FormatPAX,
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			hdr.Typeflag = tar.TypeDir
			hdr.Name += "/"
			if rel == "." {
				hdr.Name = "./"
			}
		case unix.S_IFREG:
			hdr.Typeflag = tar.TypeReg
			hdr.Size = st.Size
			if st.Nlink > 1 {
				key := inode{uint64(st.Dev), st.Ino}
				if first, ok := links[key]; ok {
					hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
				} else {
					links[key] = hdr.Name
				}
			}
		case unix.S_IFLNK:
			hdr.Typeflag = tar.TypeSymlink
			if hdr.Linkname, err = os.Readlink(p); err != nil {
				return err
			}
		case unix.S_IFCHR, unix.S_IFBLK:
			hdr.Typeflag = tar.TypeChar
			if st.Mode&unix.S_IFMT == unix.S_IFBLK {
				hdr.Typeflag = tar.TypeBlock
			}
			hdr.Devmajor, hdr.Devminor = int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
		case unix.S_IFIFO:
			hdr.Typeflag = tar.TypeFifo
		default:
			return nil // sockets
		}
		xattrs, err := readXattrs(p)
		if err != nil {
			return err
		}
		for k, v := range xattrs {
			if hdr.PAXRecords == nil {
				hdr.PAXRecords = map[string]string{}
			}
			hdr.PAXRecords[paxXattr+k] = v
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("archive %s: %w", p, err)
		}
		if hdr.Typeflag == tar.TypeReg {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			err = copyN(tw, f, hdr.Size)
			f.Close()
			if err != nil {
				return fmt.Errorf("archive %s (did it change while being read?): %w", p, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

// readXattrs lists the extended attributes of p (not following a symlink).
func readXattrs(p string) (map[string]string, error) {
	buf := make([]byte, 4096)
	n, err := unix.Llistxattr(p, buf)
	if errors.Is(err, unix.ERANGE) {
		sz, err2 := unix.Llistxattr(p, nil)
		if err2 != nil {
			return nil, fmt.Errorf("list xattrs of %s: %w", p, err2)
		}
		buf = make([]byte, sz)
		n, err = unix.Llistxattr(p, buf)
	}
	if errors.Is(err, unix.ENOTSUP) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list xattrs of %s: %w", p, err)
	}
	out := map[string]string{}
	for _, name := range bytes.Split(buf[:n], []byte{0}) {
		if len(name) == 0 {
			continue
		}
		k := string(name)
		sz, err := unix.Lgetxattr(p, k, nil)
		if err != nil {
			return nil, fmt.Errorf("read xattr %s of %s: %w", k, p, err)
		}
		val := make([]byte, sz)
		sz, err = unix.Lgetxattr(p, k, val)
		if err != nil {
			return nil, fmt.Errorf("read xattr %s of %s: %w", k, p, err)
		}
		out[k] = string(val[:sz])
	}
	return out, nil
}

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }
