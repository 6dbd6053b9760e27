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

// SidelineIfindex is the interface index sidelined sockets are bound to. No interface has
// it, so no packet ever matches such a socket; the kernel does not check that the index
// exists (SO_BINDTOIFINDEX).
const SidelineIfindex = 0x7ffffff0

// SidelinedSocket is one socket Sideline moved out of the way, with the options it had.
type SidelinedSocket struct {
	PID       int  `json:"pid"`
	FD        int  `json:"fd"`
	Ifindex   int  `json:"ifindex"`   // SO_BINDTOIFINDEX before
	ReusePort bool `json:"reusePort"` // SO_REUSEPORT before
	ReuseAddr bool `json:"reuseAddr"` // SO_REUSEADDR before
}

// Sideline takes the TCP and UDP sockets of the (frozen) processes pids out of the way of a
// copy of them restored into the same network namespace, without closing them: each is bound
// to SidelineIfindex, so it matches no packet and no 4-tuple lookup (a restored connection
// with the same addresses can be created, and incoming segments reach the copy), and gets
// SO_REUSEADDR and SO_REUSEPORT, so a restored listener or UDP socket can bind its port.
// Unsideline puts everything back, making the originals whole again.
//
// A lazy in-place update needs this: the original processes stay frozen under CRIU, which
// serves their memory pages, while the copy already runs. Abstract unix sockets cannot be
// sidelined; a restore that needs one of their names fails (and is rolled back).
func Sideline(pids []int) ([]SidelinedSocket, error) {
	var out []SidelinedSocket
	for _, pid := range pids {
		err := eachSocket(pid, func(fd, dup int) error {
			domain, err := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_DOMAIN)
			if err != nil || (domain != unix.AF_INET && domain != unix.AF_INET6) {
				return nil
			}
			proto, err := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_PROTOCOL)
			if err != nil || (proto != unix.IPPROTO_TCP && proto != unix.IPPROTO_UDP) {
				return nil
			}
			s := SidelinedSocket{PID: pid, FD: fd}
			if s.Ifindex, err = unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_BINDTOIFINDEX); err != nil {
				return fmt.Errorf("sideline socket %d of pid %d: read SO_BINDTOIFINDEX: %w", fd, pid, err)
			}
			v, _ := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_REUSEPORT)
			s.ReusePort = v != 0
			v, _ = unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_REUSEADDR)
			s.ReuseAddr = v != 0
			for _, o := range []struct {
				name string
				opt  int
				val  int
			}{{"SO_REUSEADDR", unix.SO_REUSEADDR, 1}, {"SO_REUSEPORT", unix.SO_REUSEPORT, 1}, {"SO_BINDTOIFINDEX", unix.SO_BINDTOIFINDEX, SidelineIfindex}} {
				if err := unix.SetsockoptInt(dup, unix.SOL_SOCKET, o.opt, o.val); err != nil {
					return fmt.Errorf("sideline socket %d of pid %d: set %s: %w", fd, pid, o.name, err)
				}
			}
			out = append(out, s)
			return nil
		})
		if err != nil {
			return out, errors.Join(err, Unsideline(out))
		}
	}
	return out, nil
}

// Unsideline gives the sockets Sideline moved their options back. Sockets whose process or
// descriptor is gone are skipped.
func Unsideline(socks []SidelinedSocket) error {
	var errs []error
	byPid := map[int][]SidelinedSocket{}
	for _, s := range socks {
		byPid[s.PID] = append(byPid[s.PID], s)
	}
	for pid, list := range byPid {
		pidfd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			continue // exited
		}
		for _, s := range list {
			dup, err := unix.PidfdGetfd(pidfd, s.FD, 0)
			if err != nil {
				continue
			}
			// The index first: with it, the socket matches packets again.
			if err := unix.SetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_BINDTOIFINDEX, s.Ifindex); err != nil {
				errs = append(errs, fmt.Errorf("unsideline socket %d of pid %d: %w", s.FD, pid, err))
			}
			unix.SetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_REUSEPORT, boolInt(s.ReusePort))
			unix.SetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_REUSEADDR, boolInt(s.ReuseAddr))
			unix.Close(dup)
		}
		unix.Close(pidfd)
	}
	return errors.Join(errs...)
}

// UnsidelineAll finds the sockets of pids still bound to SidelineIfindex and unbinds them:
// for a crash recovery that lost the list Sideline returned. Their reuse options stay set.
func UnsidelineAll(pids []int) (int, error) {
	n := 0
	var errs []error
	for _, pid := range pids {
		err := eachSocket(pid, func(fd, dup int) error {
			if v, err := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_BINDTOIFINDEX); err != nil || v != SidelineIfindex {
				return nil
			}
			if err := unix.SetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_BINDTOIFINDEX, 0); err != nil {
				return fmt.Errorf("unsideline socket %d of pid %d: %w", fd, pid, err)
			}
			n++
			return nil
		})
		if err != nil {
			errs = append(errs, err)
		}
	}
	return n, errors.Join(errs...)
}

// eachSocket calls fn with every socket descriptor of pid (its number there, and a copy in
// this process that fn must not close). A process that exited is skipped.
func eachSocket(pid int, fn func(fd, dup int) error) error {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
		return fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(pidfd)
	fdDir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	ents, err := os.ReadDir(fdDir)
	if err != nil {
		return nil // exited meanwhile
	}
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
		err = fn(fd, dup)
		unix.Close(dup)
		if err != nil {
			return err
		}
	}
	return nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
