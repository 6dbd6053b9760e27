package update

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/cowfs"
	"golang.org/x/sys/unix"
)

// Change is a held file whose content differs between the running generation and the new one.
type Change struct {
	HeldFile
	Old string `json:"-"` // host path of the running content
	New string `json:"-"` // host path of the new content; "" when the new image removes the file
}

// Removed reports whether the new generation no longer has the file.
func (c Change) Removed() bool { return c.New == "" }

// diffHeld returns the held files whose content at their path differs between the old view
// (oldStack, bottom first, ending with the old upper) and the new view (newStack).
func diffHeld(held []HeldFile, oldStack, newStack []string, hidden map[string]map[string]bool) ([]Change, error) {
	var out []Change
	for _, h := range held {
		oldPath, ok, err := layerLookup(oldStack, h.Path)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue // not on the image stack (e.g. created then renamed away); CRIU handles it
		}
		newPath, ok, err := layerLookupHiding(newStack, hidden, h.Path)
		if err != nil {
			return nil, err
		}
		if ok {
			if newPath == oldPath {
				continue // the same layer file in both generations
			}
			same, err := sameFile(oldPath, newPath)
			if err != nil {
				return nil, err
			}
			if same {
				continue
			}
		} else {
			newPath = ""
		}
		out = append(out, Change{HeldFile: h, Old: oldPath, New: newPath})
	}
	return out, nil
}

// sameFile compares type, mode, owner, size and bytes.
func sameFile(a, b string) (bool, error) {
	var sa, sb unix.Stat_t
	if err := unix.Lstat(a, &sa); err != nil {
		return false, fmt.Errorf("stat %s: %w", a, err)
	}
	if err := unix.Lstat(b, &sb); err != nil {
		return false, fmt.Errorf("stat %s: %w", b, err)
	}
	if sa.Mode != sb.Mode || sa.Uid != sb.Uid || sa.Gid != sb.Gid || sa.Size != sb.Size {
		return false, nil
	}
	if sa.Mode&unix.S_IFMT != unix.S_IFREG {
		return true, nil
	}
	fa, err := os.Open(a)
	if err != nil {
		return false, err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return false, err
	}
	defer fb.Close()
	bufA, bufB := make([]byte, 64<<10), make([]byte, 64<<10)
	for {
		na, ea := io.ReadFull(fa, bufA)
		nb, eb := io.ReadFull(fb, bufB)
		if na != nb || !bytes.Equal(bufA[:na], bufB[:nb]) {
			return false, nil
		}
		if ea == io.EOF || ea == io.ErrUnexpectedEOF {
			return eb == io.EOF || eb == io.ErrUnexpectedEOF, nil
		}
		if ea != nil {
			return false, fmt.Errorf("read %s: %w", a, ea)
		}
		if eb != nil {
			return false, fmt.Errorf("read %s: %w", b, eb)
		}
	}
}

// stageOld copies the running content of each changed file into the new generation's upper
// directory at its path, so that CRIU finds exactly the file the process had open when it
// restores into the new root. Parent directories are created with the mode and owner the
// merged new view has (newStack), so the upper adds no visible change of its own.
func stageOld(changes []Change, upper string, newStack []string) error {
	for _, c := range changes {
		dst := hostPathIn(upper, c.Path)
		if err := mkParents(upper, c.Path, newStack); err != nil {
			return err
		}
		if err := copyFile(c.Old, dst); err != nil {
			return fmt.Errorf("stage running content of %s: %w", c.Path, err)
		}
	}
	return nil
}

func mkParents(upper, p string, stack []string) error {
	rel := strings.TrimPrefix(filepath.Clean("/"+p), "/")
	parts := strings.Split(rel, "/")
	dir := "/"
	for _, part := range parts[:len(parts)-1] {
		dir = filepath.Join(dir, part)
		dst := hostPathIn(upper, dir)
		if _, err := os.Lstat(dst); err == nil {
			continue
		}
		mode, uid, gid := uint32(0o755), 0, 0
		if src, ok, _ := layerLookup(stack, dir); ok {
			var st unix.Stat_t
			if err := unix.Lstat(src, &st); err == nil {
				mode, uid, gid = st.Mode&0o7777, int(st.Uid), int(st.Gid)
			}
		}
		if err := os.Mkdir(dst, os.FileMode(mode)); err != nil && !os.IsExist(err) {
			return fmt.Errorf("create %s in new upper: %w", dir, err)
		}
		if err := os.Lchown(dst, uid, gid); err != nil {
			return fmt.Errorf("chown %s in new upper: %w", dir, err)
		}
		if err := os.Chmod(dst, cowfs.FileMode(mode)); err != nil {
			return fmt.Errorf("chmod %s in new upper: %w", dir, err)
		}
	}
	return nil
}

// copyFile copies a regular file with its mode and owner to dst (replacing dst atomically).
func copyFile(src, dst string) error {
	tmp, err := copyToTemp(src, dst)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// copyToTemp copies src (content, owner, mode) to a new hidden file beside dst and returns
// its path: renaming it to dst then replaces dst atomically.
func copyToTemp(src, dst string) (string, error) {
	var st unix.Stat_t
	if err := unix.Lstat(src, &st); err != nil {
		return "", fmt.Errorf("stat %s: %w", src, err)
	}
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".hot-stage-*")
	if err != nil {
		return "", err
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := io.Copy(tmp, in); err != nil {
		return "", fmt.Errorf("copy %s: %w", src, err)
	}
	if err := tmp.Chown(int(st.Uid), int(st.Gid)); err != nil {
		return "", err
	}
	if err := tmp.Chmod(cowfs.FileMode(st.Mode)); err != nil {
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	ok = true
	return tmp.Name(), nil
}

// publishing is new content copied beside the changed paths ahead of publishNew (a post-copy
// update copies while CRIU restores, so only the renames remain for the pause).
type publishing struct {
	done chan struct{}
	tmps map[string]string // path in the container → temp file on the host
	err  error
}

// preparePublish starts copying the new content of changes next to their paths in the
// mounted new root.
func preparePublish(changes []Change, mountedRoot string) *publishing {
	p := &publishing{done: make(chan struct{}), tmps: map[string]string{}}
	go func() {
		defer close(p.done)
		for _, c := range changes {
			if c.Removed() {
				continue
			}
			tmp, err := copyToTemp(c.New, hostPathIn(mountedRoot, c.Path))
			if err != nil {
				p.err = fmt.Errorf("publish new content of %s: %w", c.Path, err)
				return
			}
			p.tmps[c.Path] = tmp
		}
	}()
	return p
}

// publishNew makes the new generation's content visible at each changed path, through the
// mounted new root, after the processes were restored holding the staged running content:
// the new file replaces the staged one with a rename (the processes keep the old inode), and a
// file the new image removed is unlinked. This is what a package upgrade does to a running binary.
func publishNew(changes []Change, mountedRoot string, pre *publishing) error {
	if pre != nil {
		<-pre.done
		if pre.err != nil {
			return pre.err
		}
	}
	for _, c := range changes {
		dst := hostPathIn(mountedRoot, c.Path)
		if c.Removed() {
			if err := os.Remove(dst); err != nil && !os.IsNotExist(err) {
				return fmt.Errorf("remove %s (gone in the new image): %w", c.Path, err)
			}
			continue
		}
		if tmp, ok := pre.ready(c.Path); ok {
			if err := os.Rename(tmp, dst); err != nil {
				return fmt.Errorf("publish new content of %s: %w", c.Path, err)
			}
			continue
		}
		if err := copyFile(c.New, dst); err != nil {
			return fmt.Errorf("publish new content of %s: %w", c.Path, err)
		}
	}
	return nil
}

func (p *publishing) ready(path string) (string, bool) {
	if p == nil {
		return "", false
	}
	tmp, ok := p.tmps[path]
	return tmp, ok
}

// redundantCopies returns the paths g.Published whose copy in g.Upper still equals g's image
// content (the lookup through g.LowerDirs): copies an earlier update made on the image's
// behalf, which a later generation must not carry as if the container had written them.
func redundantCopies(g *container.Generation) (map[string]bool, error) {
	out := map[string]bool{}
	for _, p := range g.Published {
		cp := hostPathIn(g.Upper, p)
		if _, err := os.Lstat(cp); err != nil {
			continue
		}
		orig, ok, err := layerLookup(g.LowerDirs, p)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue
		}
		same, err := sameFile(cp, orig)
		if err != nil {
			return nil, err
		}
		if same {
			out[filepath.Clean("/"+p)] = true
		}
	}
	return out, nil
}

// dropCopies removes redundant copies from an upper directory that is not mounted.
// stashCopies is dropCopies for a post-copy update, whose original processes still use upper
// and may be resumed: the copies are moved to stash (a directory on the same file system),
// and unstashCopies moves them back.
func stashCopies(upper string, paths map[string]bool, stash string) error {
	for p := range paths {
		dst := hostPathIn(stash, p)
		if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
			return fmt.Errorf("stash the image's copy of %s: %w", p, err)
		}
		if err := os.Rename(hostPathIn(upper, p), dst); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("stash the image's copy of %s from %s: %w", p, upper, err)
		}
	}
	return nil
}

// unstashCopies moves the copies stashCopies moved back into upper.
func unstashCopies(upper string, paths []string, stash string) error {
	var errs []error
	for _, p := range paths {
		if err := os.Rename(hostPathIn(stash, p), hostPathIn(upper, p)); err != nil && !os.IsNotExist(err) {
			errs = append(errs, fmt.Errorf("put the image's copy of %s back into %s: %w", p, upper, err))
		}
	}
	return errors.Join(errs...)
}

func dropCopies(upper string, paths map[string]bool) error {
	for p := range paths {
		if err := os.Remove(hostPathIn(upper, p)); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("drop the image's copy of %s from %s: %w", p, upper, err)
		}
	}
	return nil
}
