package cowfs

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// MountOverlay mounts an overlay filesystem of lowerDirs (BOTTOM layer first) at target, with
// upper and work as its writable layer. With upper and work both "", the stack is mounted
// read-only.
//
// It uses the new mount API (fsopen/fsconfig/fsmount/move_mount) and passes each lower dir
// with its own "lowerdir+" fsconfig call (kernel >= 6.8), as a file descriptor. The classic
// mount(2) "lowerdir=a:b" option string is limited to one page, which an image with many
// layers under a long store path exceeds, and it cannot express paths containing ':' or ','.
// Kernels older than 6.8 get the classic option string when it fits.
func MountOverlay(target string, lowerDirs []string, upper, work string) error {
	if len(lowerDirs) == 0 {
		return fmt.Errorf("mount overlay at %s: no lower layers", target)
	}
	if (upper == "") != (work == "") {
		return fmt.Errorf("mount overlay at %s: upper and work dirs go together (got upper %q, work %q)", target, upper, work)
	}
	err := mountOverlayFsconfig(target, lowerDirs, upper, work)
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, errLowerdirPlus) {
		err = mountOverlayLegacy(target, lowerDirs, upper, work)
	}
	if err != nil {
		return fmt.Errorf("mount overlay at %s (%d lower layers): %w", target, len(lowerDirs), err)
	}
	return nil
}

var errLowerdirPlus = errors.New(`kernel does not know the overlay option "lowerdir+" (needs >= 6.8)`)

func mountOverlayFsconfig(target string, lowerDirs []string, upper, work string) error {
	fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return fmt.Errorf("fsopen overlay: %w", err)
	}
	defer unix.Close(fsfd)
	// Layers are passed as O_PATH file descriptors: fsconfig string values are cut at 256 bytes,
	// which a store path plus a 64-digit diffID nearly fills. Kernels >= 6.13 take the fd itself
	// (FSCONFIG_SET_FD); 6.8 to 6.12 take "/proc/self/fd/N" strings, which resolve to the same dir.
	open := func(p string) (int, error) {
		fd, err := unix.Open(p, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return -1, fmt.Errorf("open %s: %w", p, err)
		}
		return fd, nil
	}
	byFd := true
	// "lowerdir+" appends below the lower dirs given so far: top layer first.
	for i := len(lowerDirs) - 1; i >= 0; i-- {
		fd, err := open(lowerDirs[i])
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if byFd {
			err = unix.FsconfigSetFd(fsfd, "lowerdir+", fd)
			if errors.Is(err, unix.EINVAL) && i == len(lowerDirs)-1 {
				byFd = false
			}
		}
		if !byFd {
			err = unix.FsconfigSetString(fsfd, "lowerdir+", fmt.Sprintf("/proc/self/fd/%d", fd))
			if errors.Is(err, unix.EINVAL) && i == len(lowerDirs)-1 {
				return errLowerdirPlus
			}
		}
		if err != nil {
			return fmt.Errorf("fsconfig lowerdir+=%s: %w", lowerDirs[i], err)
		}
	}
	if upper != "" {
		for _, kv := range [][2]string{{"upperdir", upper}, {"workdir", work}} {
			fd, err := open(kv[1])
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			if err := unix.FsconfigSetString(fsfd, kv[0], fmt.Sprintf("/proc/self/fd/%d", fd)); err != nil {
				return fmt.Errorf("fsconfig %s=%s: %w", kv[0], kv[1], err)
			}
		}
	}
	// Our layer dirs are plain directories: no index (it pins the lower inodes and breaks a
	// later layer swap) and no metacopy (an upper must stay usable on its own as a lower).
	for _, kv := range [][2]string{{"index", "off"}, {"metacopy", "off"}} {
		if err := unix.FsconfigSetString(fsfd, kv[0], kv[1]); err != nil {
			return fmt.Errorf("fsconfig %s=%s: %w", kv[0], kv[1], err)
		}
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return fmt.Errorf("fsconfig create: %w", err)
	}
	attrs := 0
	if upper == "" {
		attrs = unix.MOUNT_ATTR_RDONLY
	}
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, attrs)
	if err != nil {
		return fmt.Errorf("fsmount: %w", err)
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount to %s: %w", target, err)
	}
	return nil
}

func mountOverlayLegacy(target string, lowerDirs []string, upper, work string) error {
	top := make([]string, 0, len(lowerDirs))
	for i := len(lowerDirs) - 1; i >= 0; i-- {
		if strings.ContainsAny(lowerDirs[i], ":,") {
			return fmt.Errorf("lower dir %q contains ':' or ',' which the classic overlay options cannot express", lowerDirs[i])
		}
		top = append(top, lowerDirs[i])
	}
	opts := "lowerdir=" + strings.Join(top, ":")
	var flags uintptr
	if upper != "" {
		opts += ",upperdir=" + upper + ",workdir=" + work
	} else {
		flags |= unix.MS_RDONLY
	}
	opts += ",index=off,metacopy=off"
	if len(opts) >= unix.Getpagesize() {
		return fmt.Errorf("overlay options are %d bytes, over the one-page limit of mount(2), and this kernel lacks \"lowerdir+\" (>= 6.8)", len(opts))
	}
	return unix.Mount("overlay", target, "overlay", flags, opts)
}

// Unmount removes every mount stacked at target (an overlay root and whatever was mounted over
// it), detaching lazily when one is busy. Nothing mounted there is not an error.
func Unmount(target string) error {
	for i := 0; i < 16; i++ {
		err := unix.Unmount(target, 0)
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if errors.Is(err, unix.EBUSY) {
			err = unix.Unmount(target, unix.MNT_DETACH)
		}
		if err != nil {
			return fmt.Errorf("unmount %s: %w", target, err)
		}
	}
	return fmt.Errorf("unmount %s: still mounted after 16 unmounts", target)
}
