package seccompbpf

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// Assemble returns the program as the kernel takes it.
func (p *Program) Assemble() ([]unix.SockFilter, error) {
	raw, err := bpf.Assemble(p.Instructions)
	if err != nil {
		return nil, fmt.Errorf("assemble seccomp filter: %w", err)
	}
	out := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		out[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	return out, nil
}

// Load installs the program on the calling OS thread (and, with the TSYNC flag, on every
// thread of the process). The caller must hold its goroutine on the thread
// (runtime.LockOSThread) and must either have set no_new_privs or hold CAP_SYS_ADMIN.
func (p *Program) Load() error {
	filter, err := p.Assemble()
	if err != nil {
		return err
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	_, _, errno := unix.RawSyscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, uintptr(p.Flags), uintptr(unsafe.Pointer(&prog)))
	if errno != 0 {
		err := fmt.Errorf("load seccomp filter (%d instructions): %w", len(filter), errno)
		if errors.Is(errno, unix.EACCES) {
			err = fmt.Errorf("%w: set no_new_privs first or keep CAP_SYS_ADMIN until the filter is loaded", err)
		}
		return err
	}
	return nil
}

// Available reports whether this kernel can load the filters Compile makes: seccomp filter
// mode with the ERRNO, KILL_PROCESS and LOG actions (SECCOMP_GET_ACTION_AVAIL; nothing is
// loaded).
func Available() error {
	for _, a := range []struct {
		name string
		val  uint32
	}{{"SECCOMP_RET_ERRNO", unix.SECCOMP_RET_ERRNO}, {"SECCOMP_RET_KILL_PROCESS", unix.SECCOMP_RET_KILL_PROCESS}, {"SECCOMP_RET_LOG", unix.SECCOMP_RET_LOG}} {
		v := a.val
		_, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_GET_ACTION_AVAIL, 0, uintptr(unsafe.Pointer(&v)))
		if errno != 0 {
			return fmt.Errorf("seccomp filter action %s: %w (needs CONFIG_SECCOMP_FILTER, Linux >= 4.14)", a.name, errno)
		}
	}
	return nil
}
