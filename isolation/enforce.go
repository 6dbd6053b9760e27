package isolation

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/hotctl/hot/isolation/seccompbpf"
)

// compileSeccomp compiles a profile for this machine.
func compileSeccomp(s *specs.LinuxSeccomp) (*seccompbpf.Program, error) {
	return seccompbpf.Compile(s)
}

// ProtectPaths hides spec.Linux.MaskedPaths (files under /dev/null, directories under an
// empty read-only tmpfs) and makes ReadonlyPaths read-only. The container init calls it inside
// the container's mount namespace after pivot_root, while it still holds CAP_SYS_ADMIN.
// Paths that do not exist in the container are skipped, as runc does.
func ProtectPaths(l *specs.Linux) error {
	if l == nil {
		return nil
	}
	for _, p := range l.MaskedPaths {
		if err := maskPath(p); err != nil {
			return err
		}
	}
	for _, p := range l.ReadonlyPaths {
		if err := readonlyPath(p); err != nil {
			return err
		}
	}
	return nil
}

func maskPath(p string) error {
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("mask %s: %w", p, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		if maskWithEmptyDir(p) == nil {
			return nil
		}
		if err := unix.Mount("tmpfs", p, "tmpfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "size=0,mode=0555"); err != nil {
			return fmt.Errorf("mask directory %s with a read-only tmpfs: %w", p, err)
		}
		return nil
	}
	if err := unix.Mount("/dev/null", p, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("mask %s with /dev/null: %w", p, err)
	}
	return nil
}

// maskSource is an empty directory in the container's own /dev tmpfs that masked directories
// are read-only bind mounts of. A bind mount within the container costs a checkpoint
// nothing, while every tmpfs mask is a file system CRIU archives (tar + gzip) at each dump
// and unpacks at each restore, ~5 ms each way on the machines we measured.
const maskSource = "/dev/.masked"

// maskWithEmptyDir mounts a read-only view of maskSource over directory p.
func maskWithEmptyDir(p string) error {
	if err := os.Mkdir(maskSource, 0o555); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(maskSource, &fs); err != nil || fs.Type != unix.TMPFS_MAGIC {
		return fmt.Errorf("mask %s: %s is not on the container's /dev tmpfs", p, maskSource)
	}
	if err := unix.Mount(maskSource, p, "", unix.MS_BIND, ""); err != nil {
		return err
	}
	if err := unix.Mount("", p, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		unix.Unmount(p, unix.MNT_DETACH)
		return err
	}
	return nil
}

func readonlyPath(p string) error {
	if err := unix.Mount(p, p, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("bind %s for read-only: %w", p, err)
	}
	// A bind remount must repeat the flags the mount already has (nosuid, nodev, noexec).
	var fs unix.Statfs_t
	if err := unix.Statfs(p, &fs); err != nil {
		return fmt.Errorf("statfs %s: %w", p, err)
	}
	keep := uintptr(fs.Flags) & (unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC | unix.MS_NOATIME | unix.MS_NODIRATIME | unix.MS_RELATIME)
	if err := unix.Mount("", p, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_REC|keep, ""); err != nil {
		return fmt.Errorf("remount %s read-only: %w", p, err)
	}
	return nil
}

// Restrictor drops a container process's privileges in the order the kernel requires. The
// container init builds it from the spec before it changes anything (so a bad spec fails
// early), then calls BeforeSetuid, switches to the process's user and group, and calls
// BeforeExec right before execve, all on one locked OS thread: capabilities, no_new_privs and
// seccomp filters are per thread, and execve keeps only the calling thread's.
type Restrictor struct {
	bounding, effective, permitted, inheritable, ambient uint64
	hasCaps                                              bool
	nonRoot                                              bool
	noNewPrivs                                           bool
	filter                                               *seccompbpf.Program
	seccompLoaded                                        bool
	lastCap                                              int
}

// NewRestrictor reads p's capabilities and no_new_privs and compiles the seccomp filter.
func NewRestrictor(p *specs.Process, l *specs.Linux) (*Restrictor, error) {
	if p == nil {
		return nil, errors.New("container init: spec has no process section")
	}
	r := &Restrictor{nonRoot: p.User.UID != 0, noNewPrivs: p.NoNewPrivileges, lastCap: lastCap()}
	if c := p.Capabilities; c != nil {
		r.hasCaps = true
		var err error
		// Nobody can grant what it does not hold (on some hosts root lacks CAP_SYS_RESOURCE):
		// a privileged container gets every capability the init has.
		held, err := heldCaps()
		if err != nil {
			return nil, fmt.Errorf("container init: %w", err)
		}
		for _, s := range []struct {
			dst  *uint64
			list []string
			name string
		}{
			{&r.bounding, c.Bounding, "bounding"}, {&r.effective, c.Effective, "effective"},
			{&r.permitted, c.Permitted, "permitted"}, {&r.inheritable, c.Inheritable, "inheritable"},
			{&r.ambient, c.Ambient, "ambient"},
		} {
			if *s.dst, err = capMask(s.list, r.lastCap); err != nil {
				return nil, fmt.Errorf("container init: %s capabilities: %w", s.name, err)
			}
			*s.dst &= held
		}
	}
	if l != nil && l.Seccomp != nil {
		prog, err := compileSeccomp(l.Seccomp)
		if err != nil {
			return nil, fmt.Errorf("container init: %w", err)
		}
		r.filter = prog
	}
	return r, nil
}

// capMask turns names into a bit mask; capabilities this kernel does not know are left out.
func capMask(names []string, last int) (uint64, error) {
	var m uint64
	for _, n := range names {
		c, err := CanonicalCap(n)
		if err != nil {
			return 0, err
		}
		nr, _ := capNumber(c)
		if nr <= last {
			m |= 1 << nr
		}
	}
	return m, nil
}

// heldCaps is the calling thread's permitted set.
func heldCaps() (uint64, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return 0, fmt.Errorf("read own capabilities: %w", err)
	}
	return uint64(data[0].Permitted) | uint64(data[1].Permitted)<<32, nil
}

// lastCap is the highest capability the running kernel knows.
func lastCap() int {
	b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n < 64 {
			return n
		}
	}
	return len(capNames) - 1
}

// BeforeSetuid shrinks the bounding set (which needs CAP_SETPCAP, so it happens while the init
// is still fully privileged) and, for a non-root process, sets PR_SET_KEEPCAPS so that the
// permitted set survives the switch to that user. Without no_new_privs the seccomp filter is
// loaded here, while CAP_SYS_ADMIN is still held; it must then allow what follows
// (setgroups, setresuid, capset, prctl, execve), as the default profile does.
func (r *Restrictor) BeforeSetuid() error {
	if r.hasCaps {
		for c := 0; c <= r.lastCap; c++ {
			if r.bounding&(1<<c) != 0 {
				continue
			}
			if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
				return fmt.Errorf("container init: drop %s from the bounding set: %w", capNames[c], err)
			}
		}
		if r.nonRoot {
			if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 1, 0, 0, 0); err != nil {
				return fmt.Errorf("container init: keep capabilities across setuid: %w", err)
			}
		}
	}
	if r.filter != nil && !r.noNewPrivs {
		if err := r.filter.Load(); err != nil {
			return fmt.Errorf("container init: %w", err)
		}
		r.seccompLoaded = true
	}
	return nil
}

// BeforeExec sets the effective, permitted and inheritable sets, raises the ambient ones,
// sets no_new_privs and loads the seccomp filter, in that order: it is the last thing before
// execve.
func (r *Restrictor) BeforeExec() error {
	if r.hasCaps {
		if r.nonRoot {
			if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 0, 0, 0, 0); err != nil {
				return fmt.Errorf("container init: clear keep-capabilities: %w", err)
			}
		}
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		data := [2]unix.CapUserData{
			{Effective: uint32(r.effective), Permitted: uint32(r.permitted), Inheritable: uint32(r.inheritable)},
			{Effective: uint32(r.effective >> 32), Permitted: uint32(r.permitted >> 32), Inheritable: uint32(r.inheritable >> 32)},
		}
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			return fmt.Errorf("container init: set capabilities: %w", err)
		}
		if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
			return fmt.Errorf("container init: clear ambient capabilities: %w", err)
		}
		for c := 0; c <= r.lastCap; c++ {
			if r.ambient&(1<<c) == 0 {
				continue
			}
			if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_RAISE, uintptr(c), 0, 0); err != nil {
				return fmt.Errorf("container init: raise ambient %s (it must also be permitted and inheritable): %w", capNames[c], err)
			}
		}
	}
	if r.noNewPrivs {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("container init: set no_new_privs: %w", err)
		}
	}
	if r.filter != nil && !r.seccompLoaded {
		if err := r.filter.Load(); err != nil {
			return fmt.Errorf("container init: %w", err)
		}
		r.seccompLoaded = true
	}
	return nil
}
