package cowfs

import (
	"io/fs"

	"golang.org/x/sys/unix"
)

// FileMode converts a stat(2)/tar mode (permission bits plus setuid, setgid, sticky) into
// the fs.FileMode that os.Chmod and friends take. File type bits are ignored.
func FileMode(mode uint32) fs.FileMode {
	m := fs.FileMode(mode & 0o777)
	if mode&unix.S_ISUID != 0 {
		m |= fs.ModeSetuid
	}
	if mode&unix.S_ISGID != 0 {
		m |= fs.ModeSetgid
	}
	if mode&unix.S_ISVTX != 0 {
		m |= fs.ModeSticky
	}
	return m
}
