package container

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/hotctl/hot/isolation"
)

// File descriptors the monitor hands to the container init (hot __init).
const (
	initSyncFd   = 3 // read end: the monitor writes one byte once the init is in its cgroup
	initReportFd = 4 // write end: the init writes an error here; a clean exec closes it (CLOEXEC)
)

// InitMain is the container's init before it becomes the container's process: it runs as
// `hot __init CONFIG` in the fresh mount, pid, uts and ipc namespaces the monitor cloned it
// into, joins the container's network namespace, builds the root file system from the spec,
// and execs the entrypoint as PID 1. It only returns on failure, after reporting the error to
// the monitor through the report pipe.
//
// The network namespace is joined with setns on the locked OS thread that later calls execve:
// network namespaces are per thread and the exec'ed program inherits the calling thread's.
func InitMain(configPath string) error {
	runtime.LockOSThread() // never unlocked: this thread execs the container process
	report := os.NewFile(initReportFd, "report")
	err := initContainer(configPath)
	// Only reached on failure.
	msg := err.Error()
	if report != nil {
		io.WriteString(report, msg)
		report.Close()
	}
	return err
}

// ExecCommand is the hidden command `hot exec` runs inside the container (see ExecMain).
const ExecCommand = "__exec"

// ExecMain is `hot __exec SPECFD`, run by nsenter inside a running container's namespaces and
// root: it reads the process to run (with the container's capabilities, no_new_privs and
// seccomp profile) from the descriptor, closes every inherited descriptor above stderr, drops
// privileges in the init's order and execs the command. It only returns on failure.
func ExecMain(specFd int) error {
	runtime.LockOSThread() // never unlocked: this thread execs the command
	// The container's processes run as root too. Once this process has dropped to the
	// container's capabilities, the kernel would let them ptrace it or open /proc/<pid>/exe,
	// which is the hot binary on the host (runc's CVE-2019-5736). Not dumpable, /proc/<pid>
	// needs CAP_SYS_PTRACE; execve makes the command dumpable again.
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("container exec: set non-dumpable: %w", err)
	}
	f := os.NewFile(uintptr(specFd), "exec-spec")
	data, err := io.ReadAll(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("container exec: read spec: %w", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(data, &spec); err != nil || spec.Process == nil || len(spec.Process.Args) == 0 {
		return fmt.Errorf("container exec: bad spec from hot exec (%v)", err)
	}
	if err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err != nil {
		return fmt.Errorf("container exec: close inherited descriptors: %w", err)
	}
	restrict, err := isolation.NewRestrictor(spec.Process, spec.Linux)
	if err != nil {
		return err
	}
	return execProcess(spec.Process, restrict)
}

func initContainer(configPath string) error {
	unix.CloseOnExec(initReportFd)
	// Wait for the monitor to place us into the cgroup.
	syncf := os.NewFile(initSyncFd, "sync")
	var b [1]byte
	if n, err := syncf.Read(b[:]); n != 1 {
		return fmt.Errorf("container init: monitor went away before start: %v", err)
	}
	syncf.Close()

	var spec specs.Spec
	data, err := os.ReadFile(configPath)
	if err != nil {
		return fmt.Errorf("container init: read config: %w", err)
	}
	if err := json.Unmarshal(data, &spec); err != nil {
		return fmt.Errorf("container init: decode %s: %w", configPath, err)
	}
	if spec.Process == nil || spec.Root == nil || spec.Linux == nil {
		return fmt.Errorf("container init: %s lacks process, root or linux section", configPath)
	}
	// Parse capabilities and compile seccomp before changing anything.
	restrict, err := isolation.NewRestrictor(spec.Process, spec.Linux)
	if err != nil {
		return err
	}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type != specs.NetworkNamespace {
			continue
		}
		if ns.Path != "" {
			if err := joinNetns(ns.Path); err != nil {
				return err
			}
		} else if err := loopbackUp(); err != nil {
			// A fresh namespace (--network none): only lo, and it starts down.
			return err
		}
	}
	if err := setupRootfs(&spec); err != nil {
		return err
	}
	if spec.Hostname != "" {
		if err := unix.Sethostname([]byte(spec.Hostname)); err != nil {
			return fmt.Errorf("container init: set hostname %q: %w", spec.Hostname, err)
		}
	}
	// Masked and read-only paths need CAP_SYS_ADMIN: before any privilege is dropped.
	if err := isolation.ProtectPaths(spec.Linux); err != nil {
		return fmt.Errorf("container init: %w", err)
	}
	return execProcess(spec.Process, restrict)
}

func joinNetns(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("container init: open network namespace %s: %w", path, err)
	}
	defer unix.Close(fd)
	if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("container init: join network namespace %s: %w", path, err)
	}
	return nil
}

// loopbackUp sets the lo device of the current network namespace up.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("container init: socket for lo: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("container init: lo: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("container init: read lo flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("container init: set lo up: %w", err)
	}
	return nil
}

// setupRootfs mounts what the spec asks for under the root and pivots into it.
func setupRootfs(spec *specs.Spec) error {
	root := spec.Root.Path
	// Nothing we mount may propagate back to the host.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("container init: make / private: %w", err)
	}
	if err := unix.Mount(root, root, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("container init: bind root %s: %w", root, err)
	}
	for _, m := range spec.Mounts {
		if err := mountInRoot(root, m); err != nil {
			return err
		}
	}
	if err := createDevices(root, spec.Linux.Devices); err != nil {
		return err
	}
	for link, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1",
		"/dev/stderr": "/proc/self/fd/2", "/dev/ptmx": "pts/ptmx", "/dev/core": "/proc/kcore",
	} {
		if err := os.Symlink(target, filepath.Join(root, link)); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("container init: symlink %s: %w", link, err)
		}
	}
	// pivot_root(".", "."): stack the old root under the new one, then detach it.
	if err := unix.Chdir(root); err != nil {
		return fmt.Errorf("container init: chdir %s: %w", root, err)
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("container init: pivot_root to %s: %w", root, err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("container init: detach old root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("container init: chdir /: %w", err)
	}
	// stdin: the container's own /dev/null, not the host's the monitor passed (CRIU can only
	// dump files on mounts the container's mount namespace has).
	if fd, err := unix.Open("/dev/null", unix.O_RDWR|unix.O_CLOEXEC, 0); err == nil {
		err = unix.Dup3(fd, 0, 0)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("container init: stdin from /dev/null: %w", err)
		}
	} else {
		return fmt.Errorf("container init: open /dev/null: %w", err)
	}
	if spec.Root.Readonly {
		if err := unix.Mount("", "/", "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("container init: remount root read-only: %w", err)
		}
	}
	return nil
}

// inRoot joins a container path to the root and refuses paths that leave it through "..".
// Symlinks inside the image are not resolved safely yet (hardening is a later step).
func inRoot(root, p string) (string, error) {
	clean := filepath.Clean("/" + p)
	full := filepath.Join(root, clean)
	if full != root && !strings.HasPrefix(full, root+"/") {
		return "", fmt.Errorf("path %q leaves the container root", p)
	}
	return full, nil
}

func mountInRoot(root string, m specs.Mount) error {
	target, err := inRoot(root, m.Destination)
	if err != nil {
		return fmt.Errorf("container init: mount %s: %w", m.Destination, err)
	}
	if err := os.MkdirAll(target, 0o755); err != nil {
		return fmt.Errorf("container init: create mount point %s: %w", m.Destination, err)
	}
	flags, data := parseMountOptions(m.Options)
	ro := flags&unix.MS_RDONLY != 0
	if m.Type == "bind" || flags&unix.MS_BIND != 0 {
		// A bind mount ignores most flags until remounted.
		if err := unix.Mount(m.Source, target, "", flags&(unix.MS_BIND|unix.MS_REC), ""); err != nil {
			return fmt.Errorf("container init: bind %s on %s: %w", m.Source, m.Destination, err)
		}
		if flags&^(unix.MS_BIND|unix.MS_REC) != 0 {
			if err := unix.Mount("", target, "", flags|unix.MS_REMOUNT|unix.MS_BIND, ""); err != nil {
				return fmt.Errorf("container init: remount %s: %w", m.Destination, err)
			}
		}
		return nil
	}
	err = unix.Mount(m.Source, target, m.Type, flags, data)
	if err != nil && ro && m.Type == "sysfs" {
		// Some kernels refuse a fresh read-only sysfs in a new netns; mount, then remount ro.
		if err = unix.Mount(m.Source, target, m.Type, flags&^unix.MS_RDONLY, data); err == nil {
			err = unix.Mount("", target, "", flags|unix.MS_REMOUNT, data)
		}
	}
	if err != nil {
		return fmt.Errorf("container init: mount %s (%s): %w", m.Destination, m.Type, err)
	}
	return nil
}

// mountFlags maps mount(8) option words to flags; other words are passed on as data.
var mountFlags = map[string]struct {
	clear bool
	flag  uintptr
}{
	"ro": {false, unix.MS_RDONLY}, "rw": {true, unix.MS_RDONLY},
	"nosuid": {false, unix.MS_NOSUID}, "suid": {true, unix.MS_NOSUID},
	"nodev": {false, unix.MS_NODEV}, "dev": {true, unix.MS_NODEV},
	"noexec": {false, unix.MS_NOEXEC}, "exec": {true, unix.MS_NOEXEC},
	"noatime": {false, unix.MS_NOATIME}, "relatime": {false, unix.MS_RELATIME},
	"strictatime": {false, unix.MS_STRICTATIME}, "nodiratime": {false, unix.MS_NODIRATIME},
	"bind": {false, unix.MS_BIND}, "rbind": {false, unix.MS_BIND | unix.MS_REC},
	"sync": {false, unix.MS_SYNCHRONOUS}, "dirsync": {false, unix.MS_DIRSYNC},
}

// parseMountOptions splits OCI mount options into mount(2) flags and the data string.
func parseMountOptions(opts []string) (uintptr, string) {
	var flags uintptr
	var data []string
	for _, o := range opts {
		if f, ok := mountFlags[o]; ok {
			if f.clear {
				flags &^= f.flag
			} else {
				flags |= f.flag
			}
			continue
		}
		data = append(data, o)
	}
	return flags, strings.Join(data, ",")
}

func createDevices(root string, devs []specs.LinuxDevice) error {
	old := unix.Umask(0)
	defer unix.Umask(old)
	for _, d := range devs {
		p, err := inRoot(root, d.Path)
		if err != nil {
			return fmt.Errorf("container init: device %s: %w", d.Path, err)
		}
		mode := uint32(0o666)
		if d.FileMode != nil {
			mode = uint32(d.FileMode.Perm())
		}
		switch d.Type {
		case "c", "u":
			mode |= unix.S_IFCHR
		case "b":
			mode |= unix.S_IFBLK
		default:
			return fmt.Errorf("container init: device %s: unsupported type %q", d.Path, d.Type)
		}
		os.Remove(p)
		if err := unix.Mknod(p, mode, int(unix.Mkdev(uint32(d.Major), uint32(d.Minor)))); err != nil {
			return fmt.Errorf("container init: mknod %s: %w", d.Path, err)
		}
		if d.UID != nil || d.GID != nil {
			uid, gid := 0, 0
			if d.UID != nil {
				uid = int(*d.UID)
			}
			if d.GID != nil {
				gid = int(*d.GID)
			}
			if err := os.Chown(p, uid, gid); err != nil {
				return fmt.Errorf("container init: chown %s: %w", d.Path, err)
			}
		}
	}
	return nil
}

// execProcess switches to the process's user and directory, drops privileges and execs it.
func execProcess(p *specs.Process, restrict *isolation.Restrictor) error {
	if err := os.MkdirAll(p.Cwd, 0o755); err != nil {
		return fmt.Errorf("container init: create working directory %s: %w", p.Cwd, err)
	}
	if err := unix.Chdir(p.Cwd); err != nil {
		return fmt.Errorf("container init: chdir %s: %w", p.Cwd, err)
	}
	groups := make([]int, 0, len(p.User.AdditionalGids))
	for _, g := range p.User.AdditionalGids {
		groups = append(groups, int(g))
	}
	if err := restrict.BeforeSetuid(); err != nil {
		return err
	}
	if err := unix.Setgroups(groups); err != nil {
		return fmt.Errorf("container init: setgroups: %w", err)
	}
	if err := unix.Setresgid(int(p.User.GID), int(p.User.GID), int(p.User.GID)); err != nil {
		return fmt.Errorf("container init: setgid %d: %w", p.User.GID, err)
	}
	if err := unix.Setresuid(int(p.User.UID), int(p.User.UID), int(p.User.UID)); err != nil {
		return fmt.Errorf("container init: setuid %d: %w", p.User.UID, err)
	}
	path, err := lookPath(p.Args[0], lookEnv(p.Env, "PATH"))
	if err != nil {
		return fmt.Errorf("container init: %w", err)
	}
	if err := closeExecFrom(3); err != nil {
		return fmt.Errorf("container init: %w", err)
	}
	// Capabilities, no_new_privs, then seccomp: the last step before execve.
	if err := restrict.BeforeExec(); err != nil {
		return err
	}
	if err := unix.Exec(path, p.Args, p.Env); err != nil {
		return fmt.Errorf("container init: exec %s: %w", p.Args[0], err)
	}
	return nil
}

// lookPath finds an executable in the container's PATH (we are already inside its root).
func lookPath(file, pathEnv string) (string, error) {
	if strings.Contains(file, "/") {
		if err := isExecutable(file); err != nil {
			return "", fmt.Errorf("executable %s: %w", file, err)
		}
		return file, nil
	}
	for _, dir := range filepath.SplitList(pathEnv) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, file)
		if isExecutable(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("executable %q not found in the container's PATH %s", file, strconv.Quote(pathEnv))
}

func isExecutable(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return err
	}
	if st.IsDir() || st.Mode()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file", p)
	}
	return nil
}
