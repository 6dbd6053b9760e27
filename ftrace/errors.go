package ftrace

import (
	"errors"
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNotSupported is matched (errors.Is) by every error saying that the running kernel
// does not allow a mechanism. Such errors are UnsupportedError values.
var ErrNotSupported = errors.New("not supported by this kernel")

// ErrBadSpec is matched by every error about the fix spec itself (unknown kind, bad or
// missing parameter, unknown target, wrong signature). Such errors are raised before
// anything is loaded into the kernel.
var ErrBadSpec = errors.New("bad fix spec")

// ErrNotFound is matched when a named fix does not exist.
var ErrNotFound = errors.New("no such fix")

// UnsupportedError says that the kernel refused a mechanism, with the errno it answered
// and a reason an operator can act on.
type UnsupportedError struct {
	Mechanism Mechanism
	Op        string        // what was tried: "load", "attach", "check"
	Errno     syscall.Errno // 0 when the answer was not an errno
	Reason    string
	Err       error // the underlying error, if any
}

func (e *UnsupportedError) Error() string {
	msg := fmt.Sprintf("%s %s", e.Mechanism, ErrNotSupported)
	if e.Errno != 0 {
		msg += fmt.Sprintf(": %s refused with %s (%v)", e.Op, errnoName(e.Errno), e.Errno)
	} else if e.Op != "" {
		msg += ": " + e.Op + " failed"
	}
	if e.Reason != "" {
		msg += ": " + e.Reason
	}
	return msg
}

// Is makes errors.Is(err, ErrNotSupported) true.
func (e *UnsupportedError) Is(target error) bool { return target == ErrNotSupported }

// Unwrap exposes the kernel's error (so errors.Is(err, unix.EPERM) works too).
func (e *UnsupportedError) Unwrap() error { return e.Err }

// SpecError describes what is wrong with a fix spec and how to fix it.
type SpecError struct {
	Spec    string // the spec as given
	Problem string
	Hint    string // what to do instead; may be empty
}

func (e *SpecError) Error() string {
	msg := fmt.Sprintf("fix spec %q: %s", e.Spec, e.Problem)
	if e.Hint != "" {
		msg += " (" + e.Hint + ")"
	}
	return msg
}

// Is makes errors.Is(err, ErrBadSpec) true.
func (e *SpecError) Is(target error) bool { return target == ErrBadSpec }

func specErr(spec, hint, format string, args ...any) *SpecError {
	return &SpecError{Spec: spec, Problem: fmt.Sprintf(format, args...), Hint: hint}
}

// errnoName returns the symbolic name of an errno (ENOTSUPP is kernel-internal but leaks
// out of the BPF syscall).
func errnoName(e syscall.Errno) string {
	if e == 524 {
		return "ENOTSUPP"
	}
	if n := unix.ErrnoName(e); n != "" {
		return n
	}
	return fmt.Sprintf("errno %d", int(e))
}
