package cowfs

import (
	"archive/tar"
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

const (
	whiteoutPrefix = ".wh."
	whiteoutMeta   = ".wh..wh."
	whiteoutOpaque = ".wh..wh..opq"
	xattrOpaque    = "trusted.overlay.opaque"
	paxXattr       = "SCHILY.xattr."
)

// decompress detects gzip and zstd by their magic numbers and returns a reader of the
// uncompressed stream; anything else is returned as is (an uncompressed tar).
func decompress(r io.Reader) (io.ReadCloser, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	magic, err := br.Peek(4)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	switch {
	case len(magic) >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, fmt.Errorf("gzip: %w", err)
		}
		return zr, nil
	case len(magic) == 4 && magic[0] == 0x28 && magic[1] == 0xb5 && magic[2] == 0x2f && magic[3] == 0xfd:
		zr, err := zstd.NewReader(br)
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		return zr.IOReadCloser(), nil
	}
	return io.NopCloser(br), nil
}

// extractor unpacks one layer tar into dir, which must be a new, empty directory.
type extractor struct {
	dir      string
	rootFd   int
	lower    *lowerStack
	dirTimes []dirTime
	implicit map[string]bool // directories created only because an entry below them needed them
}

type dirTime struct {
	rel string
	ts  [2]unix.Timespec
}

// ExtractError is returned when a layer holds an entry that extraction refuses.
type ExtractError struct {
	Entry  string // the tar entry's name
	Reason string
}

func (e *ExtractError) Error() string {
	return fmt.Sprintf("layer entry %q refused: %s", e.Entry, e.Reason)
}

// extractLayer unpacks the (possibly compressed) layer tar r into dir and returns the digest
// of the uncompressed tar (its diffID) and the directories it created implicitly (for
// checkLowerSymlinks when the layer is reused in another image). lowers are the unpacked
// directories of the layers below, bottom first: an entry written through a symlink they hold
// is refused.
func extractLayer(ctx context.Context, r io.Reader, dir string, lowers []string) (digest.Digest, []string, error) {
	zr, err := decompress(r)
	if err != nil {
		return "", nil, err
	}
	defer zr.Close()
	dgst := digest.SHA256.Digester()
	tee := io.TeeReader(zr, dgst.Hash())

	x := &extractor{dir: dir, implicit: map[string]bool{}}
	if x.rootFd, err = unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err != nil {
		return "", nil, fmt.Errorf("open layer dir %s: %w", dir, err)
	}
	defer unix.Close(x.rootFd)
	if x.lower, err = openLowerStack(lowers); err != nil {
		return "", nil, err
	}
	defer x.lower.Close()

	tr := tar.NewReader(tee)
	for n := 0; ; n++ {
		if n%256 == 0 && ctx.Err() != nil {
			return "", nil, ctx.Err()
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", nil, fmt.Errorf("read tar: %w", err)
		}
		if err := x.entry(hdr, tr); err != nil {
			return "", nil, err
		}
	}
	// The tar's end-of-archive blocks and any padding belong to the diffID too.
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return "", nil, fmt.Errorf("read tar: %w", err)
	}
	for i := len(x.dirTimes) - 1; i >= 0; i-- {
		if err := x.setDirTime(x.dirTimes[i]); err != nil {
			return "", nil, err
		}
	}
	implicit := make([]string, 0, len(x.implicit))
	for d := range x.implicit {
		implicit = append(implicit, d)
	}
	sort.Strings(implicit) // parents before children
	return dgst.Digest(), implicit, nil
}

// setDirTime sets a directory's times once nothing more is written into it. A later entry may
// have replaced the directory or one of its parents (even by a symlink), so the parent is
// resolved again without following symlinks, and a directory that is gone is skipped.
func (x *extractor) setDirTime(dt dirTime) error {
	parent, base := path.Split(dt.rel)
	pfd := x.rootFd
	if parent = path.Clean("./" + parent); parent != "." {
		fd, err := resolveBeneath(x.rootFd, parent, unix.O_PATH|unix.O_DIRECTORY)
		if err != nil {
			return nil // replaced or removed by a later entry
		}
		defer unix.Close(fd)
		pfd = fd
	}
	var st unix.Stat_t
	if err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil
	}
	if err := unix.UtimesNanoAt(pfd, base, dt.ts[:], unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times of %s: %w", dt.rel, err)
	}
	return nil
}

// cleanEntryName checks a tar name and returns it relative to the layer root ("." for the root).
func cleanEntryName(name string) (string, error) {
	if strings.HasPrefix(name, "/") {
		return "", errors.New("absolute path")
	}
	for _, c := range strings.Split(name, "/") {
		if c == ".." {
			return "", errors.New("path contains '..' and would escape the layer root")
		}
	}
	if strings.ContainsRune(name, 0) {
		return "", errors.New("path contains a NUL byte")
	}
	return path.Clean("./" + name), nil
}

// entry applies one tar header.
func (x *extractor) entry(hdr *tar.Header, r io.Reader) error {
	rel, err := cleanEntryName(hdr.Name)
	if err != nil {
		return &ExtractError{hdr.Name, err.Error()}
	}
	if rel == "." {
		if hdr.Typeflag != tar.TypeDir {
			return &ExtractError{hdr.Name, "the layer root must be a directory"}
		}
		return x.setMeta(hdr, x.rootFd, ".", ".")
	}
	dir, base := path.Split(rel)
	dir = path.Clean("./" + dir)

	// Whiteouts become overlayfs whiteouts.
	if strings.HasPrefix(base, whiteoutPrefix) {
		pfd, err := x.openDir(hdr.Name, dir)
		if err != nil {
			return err
		}
		defer x.closeDir(pfd)
		switch {
		case base == whiteoutOpaque:
			if err := setXattrAt(pfd, ".", xattrOpaque, "y"); err != nil {
				return fmt.Errorf("layer entry %q: mark %s opaque: %w", hdr.Name, dir, err)
			}
			return nil
		case strings.HasPrefix(base, whiteoutMeta):
			return nil // other AUFS metadata (.wh..wh.plnk, ...) has no overlay meaning
		}
		name := strings.TrimPrefix(base, whiteoutPrefix)
		if name == "" || name == "." || name == ".." {
			return &ExtractError{hdr.Name, "whiteout names no file"}
		}
		if err := x.removeExisting(pfd, path.Join(dir, name), name, false); err != nil {
			return err
		}
		if err := unix.Mknodat(pfd, name, unix.S_IFCHR, 0); err != nil {
			return fmt.Errorf("layer entry %q: create whiteout: %w", hdr.Name, err)
		}
		return nil
	}

	pfd, err := x.openDir(hdr.Name, dir)
	if err != nil {
		return err
	}
	defer x.closeDir(pfd)
	if err := x.removeExisting(pfd, rel, base, hdr.Typeflag == tar.TypeDir); err != nil {
		return err
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := unix.Mkdirat(pfd, base, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("layer entry %q: mkdir: %w", hdr.Name, err)
		}
		delete(x.implicit, rel) // the layer does mean this directory
	case tar.TypeReg: // archive/tar reports old-style TypeRegA entries as TypeReg
		fd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return fmt.Errorf("layer entry %q: create: %w", hdr.Name, err)
		}
		f := os.NewFile(uintptr(fd), filepath.Join(x.dir, rel))
		_, err = io.Copy(f, r)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("layer entry %q: write: %w", hdr.Name, err)
		}
	case tar.TypeSymlink:
		if err := unix.Symlinkat(hdr.Linkname, pfd, base); err != nil {
			return fmt.Errorf("layer entry %q: symlink: %w", hdr.Name, err)
		}
	case tar.TypeLink:
		trel, err := cleanEntryName(hdr.Linkname)
		if err != nil {
			return &ExtractError{hdr.Name, fmt.Sprintf("hardlink target %q: %v", hdr.Linkname, err)}
		}
		tdir, tbase := path.Split(trel)
		tfd, err := x.lookupDir(hdr.Name, path.Clean("./"+tdir))
		if err != nil {
			return err
		}
		defer x.closeDir(tfd)
		var st unix.Stat_t
		if err := unix.Fstatat(tfd, tbase, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return &ExtractError{hdr.Name, fmt.Sprintf("hardlink target %q is not in this layer", hdr.Linkname)}
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return &ExtractError{hdr.Name, fmt.Sprintf("hardlink target %q is a directory", hdr.Linkname)}
		}
		if err := unix.Linkat(tfd, tbase, pfd, base, 0); err != nil {
			return fmt.Errorf("layer entry %q: hardlink to %q: %w", hdr.Name, hdr.Linkname, err)
		}
		return nil // a hardlink shares the target's metadata
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		kind := uint32(unix.S_IFIFO)
		if hdr.Typeflag == tar.TypeChar {
			kind = unix.S_IFCHR
		} else if hdr.Typeflag == tar.TypeBlock {
			kind = unix.S_IFBLK
		}
		dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
		if err := unix.Mknodat(pfd, base, kind|0o600, int(dev)); err != nil {
			return fmt.Errorf("layer entry %q: mknod: %w", hdr.Name, err)
		}
	case tar.TypeXGlobalHeader:
		return nil
	default:
		return &ExtractError{hdr.Name, fmt.Sprintf("unsupported tar entry type %q", hdr.Typeflag)}
	}
	return x.setMeta(hdr, pfd, base, rel)
}

// setMeta applies owner, mode, xattrs and times of hdr to base in the directory pfd.
func (x *extractor) setMeta(hdr *tar.Header, pfd int, base, rel string) error {
	if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("layer entry %q: chown: %w", hdr.Name, err)
	}
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, paxXattr)
		if !ok {
			continue
		}
		// Overlay's own xattrs in an image would change what the union shows; only whiteout
		// entries may produce them.
		if strings.HasPrefix(name, "trusted.overlay.") {
			continue
		}
		if err := setXattrAt(pfd, base, name, v); err != nil {
			return fmt.Errorf("layer entry %q: set xattr %s: %w", hdr.Name, name, err)
		}
	}
	if hdr.Typeflag != tar.TypeSymlink {
		// After chown, which clears set-id bits.
		if err := unix.Fchmodat(pfd, base, uint32(hdr.Mode)&0o7777, 0); err != nil {
			return fmt.Errorf("layer entry %q: chmod: %w", hdr.Name, err)
		}
	}
	ts := [2]unix.Timespec{unix.NsecToTimespec(hdr.AccessTime.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
	if hdr.AccessTime.IsZero() {
		ts[0] = ts[1]
	}
	if hdr.Typeflag == tar.TypeDir {
		x.dirTimes = append(x.dirTimes, dirTime{rel: rel, ts: ts})
		return nil
	}
	if err := unix.UtimesNanoAt(pfd, base, ts[:], unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("layer entry %q: set times: %w", hdr.Name, err)
	}
	return nil
}

// removeExisting makes room for a new entry at rel: a directory stays when the new entry is
// a directory too; anything else is removed.
func (x *extractor) removeExisting(pfd int, rel, base string, keepDir bool) error {
	var st unix.Stat_t
	err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("layer entry %q: stat: %w", rel, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		if keepDir {
			return nil
		}
		// os.Root never follows a symlink out of the layer.
		root, err := os.OpenRoot(x.dir)
		if err != nil {
			return err
		}
		defer root.Close()
		return root.RemoveAll(rel)
	}
	return unix.Unlinkat(pfd, base, 0)
}

// setXattrAt sets an extended attribute on base in directory pfd, on base itself when it is
// a symlink: the O_PATH fd is reached through its /proc magic link, never by path.
func setXattrAt(pfd int, base, name, value string) error {
	fd, err := unix.Openat(pfd, base, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Setxattr("/proc/self/fd/"+strconv.Itoa(fd), name, []byte(value), 0)
}

func (x *extractor) closeDir(fd int) {
	if fd != x.rootFd {
		unix.Close(fd)
	}
}

// resolveBeneath opens rel under dirfd without following any symlink and without leaving it.
func resolveBeneath(dirfd int, rel string, flags uint64) (int, error) {
	return unix.Openat2(dirfd, rel, &unix.OpenHow{
		Flags:   flags | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV,
	})
}

// lookupDir opens an existing directory rel of this layer for an entry, refusing symlinks.
func (x *extractor) lookupDir(entry, rel string) (int, error) {
	if rel == "." {
		return x.rootFd, nil
	}
	fd, err := resolveBeneath(x.rootFd, rel, unix.O_PATH|unix.O_DIRECTORY)
	switch {
	case err == nil:
		return fd, nil
	case errors.Is(err, unix.ELOOP):
		return -1, &ExtractError{entry, fmt.Sprintf("%q is a symlink in this layer; writing through a symlink is refused", rel)}
	case errors.Is(err, unix.EXDEV):
		return -1, &ExtractError{entry, "path escapes the layer root"}
	case errors.Is(err, unix.ENOTDIR):
		return -1, &ExtractError{entry, fmt.Sprintf("a component of %q is not a directory", rel)}
	case errors.Is(err, unix.ENOENT):
		return -1, &ExtractError{entry, fmt.Sprintf("%q is not in this layer", rel)}
	}
	return -1, fmt.Errorf("layer entry %q: open %s: %w", entry, rel, err)
}

// openDir opens directory rel of this layer for the entry, creating missing components (owned
// by root, mode 0755) as the tar format allows. Symlinks are never followed: a component that
// is a symlink here, or that is missing here but is a symlink in the union of the lower
// layers, refuses the entry.
func (x *extractor) openDir(entry, rel string) (int, error) {
	if rel == "." {
		return x.rootFd, nil
	}
	cur := x.rootFd
	done := "."
	for _, c := range strings.Split(rel, "/") {
		next := path.Join(done, c)
		fd, err := resolveBeneath(cur, c, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW)
		if errors.Is(err, unix.ENOENT) {
			if err := x.lower.refuseSymlink(entry, next); err != nil {
				x.closeDir(cur)
				return -1, err
			}
			if err := unix.Mkdirat(cur, c, 0o755); err != nil {
				x.closeDir(cur)
				return -1, fmt.Errorf("layer entry %q: mkdir %s: %w", entry, next, err)
			}
			x.implicit[next] = true
			fd, err = resolveBeneath(cur, c, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW)
		}
		x.closeDir(cur)
		switch {
		case err == nil:
		case errors.Is(err, unix.ELOOP):
			return -1, &ExtractError{entry, fmt.Sprintf("%q is a symlink in this layer; writing through a symlink is refused", next)}
		case errors.Is(err, unix.ENOTDIR):
			var st unix.Stat_t
			if unix.Fstatat(x.rootFd, next, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
				return -1, &ExtractError{entry, fmt.Sprintf("%q is a symlink in this layer; writing through a symlink is refused", next)}
			}
			return -1, &ExtractError{entry, fmt.Sprintf("%q is not a directory in this layer", next)}
		default:
			return -1, fmt.Errorf("layer entry %q: open %s: %w", entry, next, err)
		}
		cur, done = fd, next
	}
	return cur, nil
}

// lowerStack is the unpacked layers below the one being extracted, bottom first.
type lowerStack struct {
	fds  []int
	dirs []string
}

func openLowerStack(dirs []string) (*lowerStack, error) {
	ls := &lowerStack{}
	for _, d := range dirs {
		fd, err := unix.Open(d, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			ls.Close()
			return nil, fmt.Errorf("open lower layer dir %s: %w", d, err)
		}
		ls.fds = append(ls.fds, fd)
		ls.dirs = append(ls.dirs, d)
	}
	return ls, nil
}

func (ls *lowerStack) Close() {
	for _, fd := range ls.fds {
		unix.Close(fd)
	}
}

// refuseSymlink returns an ExtractError when the union of the lower layers shows rel as a
// symlink, so that creating directory rel in an upper layer would write "through" it.
func (ls *lowerStack) refuseSymlink(entry, rel string) error {
	j := ls.symlinkAt(rel)
	if j < 0 {
		return nil
	}
	diffID := strings.TrimPrefix(filepath.Base(ls.dirs[j]), "layer-")
	return &ExtractError{entry, fmt.Sprintf("%q is a symlink in lower layer %d (diffID sha256:%s); writing through a symlink is refused", rel, j+1, diffID)}
}

// checkLowerSymlinks re-checks a layer that is already unpacked (another image brought it)
// against this image's lower layers: none of the directories it created implicitly may be a
// symlink below it.
func checkLowerSymlinks(implicit, lowers []string) error {
	if len(implicit) == 0 || len(lowers) == 0 {
		return nil
	}
	ls, err := openLowerStack(lowers)
	if err != nil {
		return err
	}
	defer ls.Close()
	for _, rel := range implicit {
		if err := ls.refuseSymlink(rel+"/", rel); err != nil {
			return err
		}
	}
	return nil
}

// symlinkAt reports which lower layer (index, bottom = 0) shows rel as a symlink in the
// union of the lower layers, or -1. It walks the lower layers top-down as overlayfs does:
// a whiteout or an opaque ancestor directory ends the search.
func (ls *lowerStack) symlinkAt(rel string) int {
	for j := len(ls.fds) - 1; j >= 0; j-- {
		fd, err := resolveBeneath(ls.fds[j], rel, unix.O_PATH|unix.O_NOFOLLOW)
		if err == nil {
			var st unix.Stat_t
			serr := unix.Fstat(fd, &st)
			unix.Close(fd)
			if serr != nil {
				return -1
			}
			if st.Mode&unix.S_IFMT == unix.S_IFLNK {
				return j
			}
			return -1 // a directory, file or whiteout hides everything below
		}
		if !errors.Is(err, unix.ENOENT) {
			return -1 // an ancestor is not a directory here: rel is not visible below
		}
		if ls.opaqueAncestor(j, rel) {
			return -1
		}
	}
	return -1
}

// opaqueAncestor reports whether an ancestor of rel in lower layer j is an opaque directory.
func (ls *lowerStack) opaqueAncestor(j int, rel string) bool {
	for d := path.Dir(rel); d != "."; d = path.Dir(d) {
		fd, err := resolveBeneath(ls.fds[j], d, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW)
		if err != nil {
			continue
		}
		buf := make([]byte, 4)
		n, err := unix.Fgetxattr(fd, xattrOpaque, buf)
		unix.Close(fd)
		if err == nil && n == 1 && buf[0] == 'y' {
			return true
		}
	}
	return false
}
