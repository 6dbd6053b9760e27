package sockets

import "golang.org/x/sys/unix"

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
	val := unix.TCP_REPAIR_OFF
	if on {
		val = unix.TCP_REPAIR_ON
	}
	n := 0
	err := eachSocket(pid, func(_, dup int) error {
		if unix.SetsockoptInt(dup, unix.IPPROTO_TCP, unix.TCP_REPAIR, val) == nil {
			n++
		}
		return nil
	})
	return n, err
}
