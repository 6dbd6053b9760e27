package checkpoint

import (
	"archive/tar"
	"bufio"
	"errors"
	"fmt"
	"github.com/hotctl/hot/cowfs"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The upper layer travels as a tar of the container's overlay upper directory, as the kernel
// keeps it: whiteouts are 0/0 character devices, opaque directories carry the
// trusted.overlay.opaque xattr. Extended attributes are kept as PAX "SCHILY.xattr." records.

const xattrPAX = "SCHILY.xattr."

func writeDirTarFile(dst, dir string) error {
	f, err := os.Create(dst)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	err = WriteDirTar(bw, dir)
	if ferr := bw.Flush(); err == nil {
		err = ferr
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// WriteDirTar writes the tree under dir to w (not following symlinks).
func WriteDirTar(w io.Writer, dir string) error {
	tw := tar.NewWriter(w)
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil || rel == "." {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		link := ""
		if info.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		hdr.Name = filepath.ToSlash(rel)
		if info.IsDir() {
			hdr.Name += "/"
		}
		hdr.Uname, hdr.Gname = "", ""
		hdr.Format = tar.FormatPAX
		if xs, err := listXattrs(p); err == nil && len(xs) > 0 {
			hdr.PAXRecords = xs
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, f)
			f.Close()
			return err
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

func listXattrs(p string) (map[string]string, error) {
	buf := make([]byte, 4096)
	n, err := unix.Llistxattr(p, buf)
	if err != nil || n == 0 {
		return nil, err
	}
	out := map[string]string{}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		if name == "" {
			continue
		}
		v := make([]byte, 4096)
		m, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			continue
		}
		out[xattrPAX+name] = string(v[:m])
	}
	return out, nil
}

// ExtractDirTar unpacks a tar written by WriteDirTar into dir (an empty directory). Entries
// may not leave dir (absolute names, "..", or a path through a symlink are refused), and the
// only device nodes accepted are overlay whiteouts (character device 0/0).
func ExtractDirTar(r io.Reader, dir string) error {
	tr := tar.NewReader(r)
	type dirTime struct {
		path string
		t    time.Time
	}
	var dirs []dirTime
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		name := filepath.Clean(filepath.FromSlash(hdr.Name))
		if filepath.IsAbs(name) || name == "." || name == ".." || strings.HasPrefix(name, ".."+string(filepath.Separator)) {
			return fmt.Errorf("upper layer entry %q leaves the directory", hdr.Name)
		}
		if err := noSymlinkParents(dir, name); err != nil {
			return err
		}
		dst := filepath.Join(dir, name)
		mode := uint32(hdr.Mode & 0o7777)
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.Mkdir(dst, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
				return err
			}
			dirs = append(dirs, dirTime{dst, hdr.ModTime})
		case tar.TypeReg:
			f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("upper layer %s: %w", hdr.Name, err)
			}
		case tar.TypeSymlink:
			if err := os.Symlink(hdr.Linkname, dst); err != nil {
				return err
			}
		case tar.TypeChar:
			if hdr.Devmajor != 0 || hdr.Devminor != 0 {
				return fmt.Errorf("upper layer entry %q is a device %d:%d (only 0:0 whiteouts are accepted)", hdr.Name, hdr.Devmajor, hdr.Devminor)
			}
			if err := unix.Mknod(dst, unix.S_IFCHR|mode, 0); err != nil {
				return fmt.Errorf("upper layer whiteout %s: %w", hdr.Name, err)
			}
		case tar.TypeFifo:
			if err := unix.Mkfifo(dst, mode); err != nil {
				return err
			}
		default:
			return fmt.Errorf("upper layer entry %q has unsupported type %q", hdr.Name, hdr.Typeflag)
		}
		for k, v := range hdr.PAXRecords {
			if name, ok := strings.CutPrefix(k, xattrPAX); ok {
				if err := unix.Lsetxattr(dst, name, []byte(v), 0); err != nil {
					return fmt.Errorf("upper layer %s: set xattr %s: %w", hdr.Name, name, err)
				}
			}
		}
		if err := os.Lchown(dst, hdr.Uid, hdr.Gid); err != nil {
			return err
		}
		if hdr.Typeflag != tar.TypeSymlink {
			if err := os.Chmod(dst, cowfs.FileMode(mode)); err != nil {
				return err
			}
			if hdr.Typeflag != tar.TypeDir {
				os.Chtimes(dst, hdr.ModTime, hdr.ModTime)
			}
		}
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		os.Chtimes(dirs[i].path, dirs[i].t, dirs[i].t)
	}
	return nil
}

// noSymlinkParents refuses a name whose parent directories inside root include a symlink.
func noSymlinkParents(root, name string) error {
	parts := strings.Split(filepath.Dir(name), string(filepath.Separator))
	p := root
	for _, part := range parts {
		if part == "." || part == "" {
			continue
		}
		p = filepath.Join(p, part)
		fi, err := os.Lstat(p)
		if err != nil {
			return fmt.Errorf("upper layer entry %q: parent %s: %w", name, part, err)
		}
		if !fi.IsDir() {
			return fmt.Errorf("upper layer entry %q goes through %s, which is not a directory", name, part)
		}
	}
	return nil
}
