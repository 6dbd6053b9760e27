package sockets

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// SetTCPRepair switches every TCP socket that process pid holds into TCP repair mode (on) or
// out of it (off), and returns how many sockets took the change.
//
// A copy of a socket obtained with pidfd_getfd(2) shares the socket, so the option set on the
// copy applies to the original. Off repairs what a killed CRIU left in repair mode (such
// sockets no longer answer). On is for discarding a process tree without its peers noticing:
// a socket closed in repair mode sends neither FIN nor RST and frees its address at once, so
// the connection can be restored from a checkpoint taken earlier. Sockets that are not TCP,
// or not in a state repair applies to, refuse the option; that is ignored.
func SetTCPRepair(pid int, on bool) (int, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return 0, nil
		}
		return 0, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(pidfd)
	fdDir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	ents, err := os.ReadDir(fdDir)
	if err != nil {
		return 0, nil // exited meanwhile
	}
	val := unix.TCP_REPAIR_OFF
	if on {
		val = unix.TCP_REPAIR_ON
	}
	n := 0
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(fdDir, e.Name()))
		if err != nil || !strings.HasPrefix(target, "socket:") {
			continue
		}
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		dup, err := unix.PidfdGetfd(pidfd, fd, 0)
		if err != nil {
			continue
		}
		if err := unix.SetsockoptInt(dup, unix.IPPROTO_TCP, unix.TCP_REPAIR, val); err == nil {
			n++
		}
		unix.Close(dup)
	}
	return n, nil
}
