// Command secprobe tries the operations a container's isolation must forbid or allow and
// prints one JSON object with the outcome of each. The isolation end-to-end tests build it
// statically (CGO_ENABLED=0) and run it as a container's process.
//
//	secprobe            probe once, print, exit
//	secprobe serve DIR  probe at start and on every SIGUSR1, writing DIR/probe-N.json
//	                    (N counts from 0), and keep running (for checkpoint/restore tests)
//
// Scratch files go to $TMPDIR (default /tmp). Probes are written to have no lasting effect even
// where they succeed: reboot uses LINUX_REBOOT_CMD_CAD_OFF and only runs as PID 1 of a PID
// namespace (where the kernel answers EINVAL instead of touching the host), settimeofday
// passes no time, clock_settime passes an invalid time (EINVAL once past the permission
// checks), the tmpfs mount is unmounted, unshare happens on a thread that then exits, and the
// hostname is rewritten with its own value.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Result is the outcome of one probe: OK, or the error (an errno name where there is one).
type Result struct {
	OK  bool   `json:"ok"`
	Err string `json:"err,omitempty"`
}

// Report is what secprobe prints.
type Report struct {
	PID    int               `json:"pid"`
	Status map[string]string `json:"status"` // CapEff, CapPrm, CapBnd, CapInh, CapAmb, NoNewPrivs, Seccomp
	Probes map[string]Result `json:"probes"`
}

func main() {
	if len(os.Args) == 3 && os.Args[1] == "serve" {
		serve(os.Args[2])
		return
	}
	if err := json.NewEncoder(os.Stdout).Encode(probe()); err != nil {
		os.Exit(1)
	}
}

func serve(dir string) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR1)
	for n := 0; ; n++ {
		b, _ := json.Marshal(probe())
		tmp := filepath.Join(dir, fmt.Sprintf(".probe-%d.json", n))
		if err := os.WriteFile(tmp, b, 0o644); err == nil {
			os.Rename(tmp, filepath.Join(dir, fmt.Sprintf("probe-%d.json", n)))
		}
		fmt.Printf("%s\n", b)
		<-sig
	}
}

func result(err error) Result {
	if err == nil {
		return Result{OK: true}
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		if name := unix.ErrnoName(errno); name != "" {
			return Result{Err: name}
		}
	}
	return Result{Err: err.Error()}
}

func errnoErr(e syscall.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}

func probe() Report {
	r := Report{PID: os.Getpid(), Status: status(), Probes: map[string]Result{}}
	p := r.Probes
	p["mount"] = result(tryMount())
	p["unshare_mount_ns"] = result(tryUnshare())
	p["bpf_prog_load"] = result(tryBPF())
	p["raw_socket"] = result(tryRawSocket())
	if os.Getpid() == 1 {
		p["reboot"] = result(tryReboot())
	}
	_, _, e := unix.RawSyscall(unix.SYS_SETTIMEOFDAY, 0, 0, 0)
	p["settimeofday"] = result(errnoErr(e))
	bad := unix.Timespec{Sec: 0, Nsec: -1}
	_, _, e = unix.RawSyscall(unix.SYS_CLOCK_SETTIME, unix.CLOCK_REALTIME, uintptr(unsafe.Pointer(&bad)), 0)
	p["clock_settime"] = result(errnoErr(e))
	p["read_kcore"] = result(tryRead("/proc/kcore"))
	p["read_timer_list"] = result(tryRead("/proc/timer_list"))
	p["list_sys_firmware"] = result(tryList("/sys/firmware"))
	p["write_proc_sys"] = result(tryProcSys())
	p["bind_80"] = result(tryBind80())
	p["write_file"] = result(tryWrite())
	p["chown"] = result(tryChown())
	return r
}

func status() map[string]string {
	out := map[string]string{}
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch k {
		case "CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb", "NoNewPrivs", "Seccomp":
			out[k] = strings.TrimSpace(v)
		}
	}
	return out
}

func tryMount() error {
	dir := filepath.Join(os.TempDir(), "secprobe-mnt")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=64k"); err != nil {
		return err
	}
	return unix.Unmount(dir, 0)
}

func tryUnshare() error {
	// On a thread of its own: a successful unshare changes only that thread, which then exits.
	done := make(chan error)
	go func() {
		lockThreadForever()
		done <- unix.Unshare(unix.CLONE_NEWNS)
	}()
	return <-done
}

func tryBPF() error {
	// BPF_PROG_LOAD of a socket filter "r0 = 0; exit".
	insns := [2]uint64{0x00000000000000b7, 0x0000000000000095}
	license := []byte("GPL\x00")
	var attr [128]byte
	*(*uint32)(unsafe.Pointer(&attr[0])) = unix.BPF_PROG_TYPE_SOCKET_FILTER
	*(*uint32)(unsafe.Pointer(&attr[4])) = 2
	*(*uint64)(unsafe.Pointer(&attr[8])) = uint64(uintptr(unsafe.Pointer(&insns[0])))
	*(*uint64)(unsafe.Pointer(&attr[16])) = uint64(uintptr(unsafe.Pointer(&license[0])))
	fd, _, e := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_LOAD, uintptr(unsafe.Pointer(&attr[0])), uintptr(len(attr)))
	if e != 0 {
		return e
	}
	return unix.Close(int(fd))
}

func tryRawSocket() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP)
	if err != nil {
		return err
	}
	return unix.Close(fd)
}

func tryReboot() error {
	// In a PID namespace other than the host's, a permitted CAD_OFF returns EINVAL.
	_, _, e := unix.RawSyscall6(unix.SYS_REBOOT, unix.LINUX_REBOOT_MAGIC1, unix.LINUX_REBOOT_MAGIC2, unix.LINUX_REBOOT_CMD_CAD_OFF, 0, 0, 0)
	return errnoErr(e)
}

// tryRead succeeds if p yields data (a path masked with /dev/null yields none).
func tryRead(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 64)
	n, err := f.Read(buf)
	if n == 0 {
		if err == nil {
			err = errors.New("empty")
		}
		return fmt.Errorf("read nothing: %w", err)
	}
	return nil
}

// tryList succeeds if directory p has entries (a masked directory is an empty tmpfs).
func tryList(p string) error {
	ents, err := os.ReadDir(p)
	if err != nil {
		return err
	}
	if len(ents) == 0 {
		return errors.New("empty directory")
	}
	return nil
}

func tryProcSys() error {
	name, err := os.ReadFile("/proc/sys/kernel/hostname")
	if err != nil {
		return err
	}
	return os.WriteFile("/proc/sys/kernel/hostname", name, 0o644)
}

func tryBind80() error {
	l, err := net.Listen("tcp", ":80")
	if err != nil {
		var se *os.SyscallError
		if errors.As(err, &se) {
			return se.Err
		}
		return err
	}
	return l.Close()
}

func tryWrite() error {
	p := filepath.Join(os.TempDir(), "secprobe-write")
	if err := os.WriteFile(p, []byte("hello"), 0o644); err != nil {
		return err
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return err
	}
	if string(b) != "hello" {
		return errors.New("read back something else")
	}
	return nil
}

func tryChown() error {
	p := filepath.Join(os.TempDir(), "secprobe-chown")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		return err
	}
	return os.Chown(p, 1000, 1000)
}
