package checkpoint

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// releaseTCPRepair takes every TCP socket of the tree rooted at pid out of repair mode.
//
// CRIU puts established connections into TCP repair mode while it dumps them and takes them
// out again when it finishes or fails cleanly. A CRIU that dies (SIGKILL, OOM) leaves them in
// repair mode, where they no longer answer: the peers see resets once the network lock is
// gone. A copy of each socket obtained with pidfd_getfd(2) shares the socket, so setting
// TCP_REPAIR_OFF on it repairs the original. Sockets that are not TCP, or not in a state
// repair applies to, refuse the option; that is ignored. It returns how many sockets it
// switched back.
func releaseTCPRepair(pid int) (int, error) {
	pids, err := treePIDs(pid)
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for _, p := range pids {
		k, err := releaseTCPRepairOf(p)
		n += k
		if err != nil {
			errs = append(errs, err)
		}
	}
	return n, errors.Join(errs...)
}

func releaseTCPRepairOf(pid int) (int, error) {
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
		if err := unix.SetsockoptInt(dup, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF); err == nil {
			n++
		}
		unix.Close(dup)
	}
	return n, nil
}

// treePIDs lists pid and all its descendants (through /proc/PID/task/TID/children).
func treePIDs(pid int) ([]int, error) {
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		tasks, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(out[i]), "task"))
		if err != nil {
			if i == 0 {
				return nil, fmt.Errorf("list tasks of %d: %w", pid, err)
			}
			continue
		}
		for _, t := range tasks {
			b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(out[i]), "task", t.Name(), "children"))
			if err != nil {
				continue
			}
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil {
					out = append(out, c)
				}
			}
		}
	}
	return out, nil
}
