package update

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// layerLookup resolves an absolute path p through a stack of overlayfs layer directories
// (bottom first) the way an overlay mount of that stack would: the topmost layer holding the
// path wins; a whiteout (char device 0/0) hides it; an opaque directory or a non-directory on
// the way hides everything below it. It returns the host path of the winning entry, or
// found=false when the merged view has no such path.
func layerLookup(layers []string, p string) (hostPath string, found bool, err error) {
	return layerLookupHiding(layers, nil, p)
}

// layerLookupHiding is layerLookup with some entries treated as absent: hidden maps a layer
// directory to paths (as given to the lookup) that do not exist in it.
func layerLookupHiding(layers []string, hidden map[string]map[string]bool, p string) (hostPath string, found bool, err error) {
	rel := strings.TrimPrefix(filepath.Clean("/"+p), "/")
	if rel == "" {
		return "", false, fmt.Errorf("look up %q: not a file path", p)
	}
	parts := strings.Split(rel, "/")
	for i := len(layers) - 1; i >= 0; i-- {
		layer := layers[i]
		// Walk the parents in this layer: a whiteout, a non-directory or an opaque directory
		// at a parent ends the search in this layer and hides the lower ones.
		blocked := false
		dir := layer
		for _, part := range parts[:len(parts)-1] {
			dir = filepath.Join(dir, part)
			fi, err := os.Lstat(dir)
			if errors.Is(err, fs.ErrNotExist) {
				break // this layer does not have the parent; lower layers may
			}
			if err != nil {
				return "", false, fmt.Errorf("look up %s in layer %s: %w", p, layer, err)
			}
			if isWhiteout(fi) || !fi.IsDir() {
				return "", false, nil
			}
			if isOpaque(dir) {
				blocked = true
			}
		}
		if hidden[layer]["/"+rel] {
			if blocked {
				return "", false, nil
			}
			continue
		}
		cand := filepath.Join(layer, rel)
		fi, err := os.Lstat(cand)
		switch {
		case err == nil && isWhiteout(fi):
			return "", false, nil
		case err == nil:
			return cand, true, nil
		case !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, unix.ENOTDIR):
			return "", false, fmt.Errorf("look up %s in layer %s: %w", p, layer, err)
		}
		if blocked {
			return "", false, nil
		}
	}
	return "", false, nil
}

func isWhiteout(fi fs.FileInfo) bool {
	if fi.Mode()&fs.ModeCharDevice == 0 {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	return st.Rdev == 0
}

func isOpaque(dir string) bool {
	buf := make([]byte, 8)
	n, err := unix.Lgetxattr(dir, "trusted.overlay.opaque", buf)
	return err == nil && n == 1 && buf[0] == 'y'
}
