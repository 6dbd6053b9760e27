package ftrace

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"
)

// MechanismSupport is the kernel's answer for one mechanism: Err is nil when a trivial
// program of that kind loaded (and, for trampolines, attached); an error matching
// ErrNotSupported when the kernel refused it; any other error when the probe itself could
// not run (inconclusive).
type MechanismSupport struct {
	Mechanism Mechanism
	Err       error
}

// Supported reports whether the probe succeeded.
func (s MechanismSupport) Supported() bool { return s.Err == nil }

// MarshalJSON renders {"mechanism","supported","conclusive","errno","error"}.
func (s MechanismSupport) MarshalJSON() ([]byte, error) {
	out := struct {
		Mechanism  Mechanism `json:"mechanism"`
		Supported  bool      `json:"supported"`
		Conclusive bool      `json:"conclusive"`
		Errno      string    `json:"errno,omitempty"`
		Error      string    `json:"error,omitempty"`
	}{Mechanism: s.Mechanism, Supported: s.Err == nil, Conclusive: s.Err == nil || errors.Is(s.Err, ErrNotSupported)}
	if s.Err != nil {
		out.Error = s.Err.Error()
		var ue *UnsupportedError
		if errors.As(s.Err, &ue) && ue.Errno != 0 {
			out.Errno = errnoName(ue.Errno)
		}
	}
	return json.Marshal(out)
}

// probeTargets are harmless attach points for the trampoline probes: the programs return
// 0 (change nothing) and are detached right away.
func probeTarget(m Mechanism) string {
	if m == MechLSM {
		return "file_open"
	}
	return "security_file_open"
}

// Probe finds out which mechanisms the running kernel allows by loading a trivial
// program of each kind (and attaching the trampoline ones for an instant), never by
// comparing version numbers. It needs root (CAP_BPF and CAP_SYS_ADMIN).
func Probe(ctx context.Context) []MechanismSupport {
	var out []MechanismSupport
	for _, m := range Mechanisms() {
		if ctx.Err() != nil {
			out = append(out, MechanismSupport{Mechanism: m, Err: ctx.Err()})
			continue
		}
		out = append(out, MechanismSupport{Mechanism: m, Err: probe(m)})
	}
	return out
}

func probe(m Mechanism) error {
	ret := int32(0)
	target := ""
	if !m.Trampoline() {
		ret = 1 // cgroup programs: 1 = allow
	} else {
		target = probeTarget(m)
	}
	pp := newProgram(m, target, asm.Instructions{asm.Mov.Imm(asm.R0, ret), asm.Return()})
	pp.spec.Name = "hot_probe"
	prog, err := ebpf.NewProgram(pp.spec)
	if err != nil {
		return kernelError(m, target, "load", err)
	}
	defer prog.Close()
	if !m.Trampoline() {
		if _, err := cgroup2Mount(); err != nil {
			// The kernel has the program type; the host lacks the hierarchy to attach to.
			return fmt.Errorf("%s programs load, but there is nothing to attach them to: %w", m, err)
		}
		return nil
	}
	l, err := attach(pp, prog)
	if err != nil {
		return kernelError(m, target, "attach", err)
	}
	l.Close()
	if m == MechLSM {
		lsms, err := activeLSMs()
		if err != nil {
			return fmt.Errorf("lsm: programs load and attach, but the active LSMs are unknown: %w", err)
		}
		if !contains(lsms, "bpf") {
			return &UnsupportedError{Mechanism: m, Op: "check", Reason: fmt.Sprintf("programs load and attach but BPF LSM is not active (active: %s), so they would never run; boot with lsm=%s,bpf", strings.Join(lsms, ","), strings.Join(lsms, ","))}
		}
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// cgroup2Mount returns a mounted cgroup2 hierarchy (cgroup-BPF attaches there).
func cgroup2Mount() (string, error) {
	for _, p := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		var fs unix.Statfs_t
		if unix.Statfs(p, &fs) == nil && fs.Type == unix.CGROUP2_SUPER_MAGIC {
			return p, nil
		}
	}
	return "", errors.New("no cgroup2 hierarchy mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified (mount -t cgroup2 none DIR)")
}

// kernelError turns a load or attach failure into an UnsupportedError when it is the
// kernel refusing the mechanism, and into a plain wrapped error otherwise (e.g. a
// verifier rejection, which would be a bug in hot's programs).
func kernelError(m Mechanism, target, op string, err error) error {
	var errno syscall.Errno
	errors.As(err, &errno)
	what := string(m)
	if target != "" {
		what += " on " + target
	}
	ue := &UnsupportedError{Mechanism: m, Op: op, Errno: errno, Err: err}
	switch {
	case errors.Is(err, ebpf.ErrNotSupported):
		ue.Reason = fmt.Sprintf("%s: %v", what, err)
		return ue
	case errno == syscall.EPERM && !privileged():
		return fmt.Errorf("%s %s: %w (needs CAP_BPF and CAP_SYS_ADMIN: run as root)", op, what, err)
	case errno == syscall.EPERM && m.Trampoline():
		ue.Reason = "the kernel refuses BPF trampoline programs although this process has CAP_BPF and CAP_SYS_ADMIN, " +
			"so ftrace-based attachment is disabled by the kernel build or its security policy; " +
			"use a cgroup-BPF fix kind instead (" + strings.Join(cgroupKinds(), ", ") + ")"
		return ue
	case errno == syscall.EPERM:
		ue.Reason = fmt.Sprintf("the kernel refuses %s programs although this process has CAP_BPF and CAP_SYS_ADMIN", m)
		return ue
	case m.Trampoline() && (errno == syscall.EINVAL || errno == syscall.EOPNOTSUPP || errno == 524 || errno == syscall.ENOENT || errno == syscall.ESRCH):
		ue.Reason = fmt.Sprintf("the kernel cannot attach %s (trampolines unsupported for this target or architecture): %v", what, err)
		return ue
	case !m.Trampoline() && (errno == syscall.EINVAL || errno == syscall.EOPNOTSUPP) && op == "attach":
		ue.Reason = fmt.Sprintf("the kernel cannot attach %s: %v", what, err)
		return ue
	}
	return fmt.Errorf("%s %s program: %w", op, what, err)
}

func cgroupKinds() []string {
	var out []string
	for _, k := range Kinds() {
		if !k.Mechanisms[0].Trampoline() {
			out = append(out, k.Name)
		}
	}
	return out
}

// privileged reports whether the process has CAP_SYS_ADMIN or CAP_BPF in its effective set.
func privileged() bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return os.Geteuid() == 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				return os.Geteuid() == 0
			}
			const capSysAdmin, capBPF = 21, 39
			return caps&(1<<capSysAdmin) != 0 || caps&(1<<capBPF) != 0
		}
	}
	return os.Geteuid() == 0
}
