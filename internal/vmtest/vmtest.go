package vmtest

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"strings"
	"sync"
	"time"
)

const (
	qemuBinary     = "qemu-system-x86_64"
	debugExitPort  = 0xf4
	maxStatus      = 127 // qemu's exit status is (byte<<1)|1 and must fit in 8 bits
	defaultTimeout = 5 * time.Minute
)

// File is a host file to put into the initramfs.
type File struct {
	Src  string // host path
	Dst  string // absolute guest path
	Mode uint32 // permission bits; 0 means 0644 (0755 when Src is executable)
}

// Config describes one VM run.
type Config struct {
	Kernel  string        // kernel image (bzImage/vmlinuz)
	Hot     string        // optional static hot binary, installed as /bin/hot
	Files   []File        // more files for the guest
	Script  string        // guest shell script (busybox sh); its exit status is the verdict
	Timeout time.Duration // whole run, boot included; default 5 min
	Memory  string        // guest RAM, default "512M"
	CPUs    int           // guest CPUs, default 2
	Append  string        // extra kernel command line
	Console io.Writer     // optional live copy of the serial console
	WorkDir string        // where to write the initramfs; default a temp dir removed after the run
}

// Result is the outcome of a run that produced a verdict.
type Result struct {
	Status   int           // the guest script's exit status (capped at 127)
	Console  string        // everything the guest printed on the serial console
	Duration time.Duration // qemu start to exit
}

// Run boots cfg.Kernel with an initramfs holding busybox, the files and the script, and
// returns the script's exit status. An error means there was no verdict: qemu could not
// start, the guest panicked or powered off without reporting, or the timeout hit.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if cfg.Kernel == "" {
		return nil, errors.New("vmtest: Config.Kernel is empty")
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = defaultTimeout
	}
	if cfg.Memory == "" {
		cfg.Memory = "512M"
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = 2
	}
	work := cfg.WorkDir
	if work == "" {
		d, err := os.MkdirTemp("", "hot-vmtest-")
		if err != nil {
			return nil, fmt.Errorf("vmtest: %w", err)
		}
		defer os.RemoveAll(d)
		work = d
	}
	initrd := path.Join(work, "initramfs.cpio")
	if err := writeInitramfs(initrd, cfg); err != nil {
		return nil, err
	}

	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	args := []string{
		"-accel", "tcg", "-m", cfg.Memory, "-smp", fmt.Sprint(cfg.CPUs),
		"-nographic", "-nic", "none", "-no-reboot",
		"-device", fmt.Sprintf("isa-debug-exit,iobase=%#x,iosize=0x04", debugExitPort),
		"-kernel", cfg.Kernel, "-initrd", initrd,
		"-append", strings.TrimSpace("console=ttyS0 panic=-1 oops=panic quiet " + cfg.Append),
	}
	cmd := exec.CommandContext(ctx, qemuBinary, args...)
	var console lockedBuffer
	var out io.Writer = &console
	if cfg.Console != nil {
		out = io.MultiWriter(&console, cfg.Console)
	}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Stdin = nil // /dev/null: -nographic would otherwise read the monitor from our stdin
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	err := cmd.Run()
	res := &Result{Console: console.String(), Duration: time.Since(start)}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return res, fmt.Errorf("vmtest: no verdict within %s (qemu killed); console tail:\n%s", cfg.Timeout, lastLines(res.Console, 40))
	}
	if ctx.Err() != nil {
		return res, fmt.Errorf("vmtest: run cancelled (qemu killed): %w", ctx.Err())
	}
	var ee *exec.ExitError
	switch {
	case err == nil:
		return res, fmt.Errorf("vmtest: qemu exited 0: guest panicked or powered off without a verdict; console tail:\n%s", lastLines(res.Console, 40))
	case errors.As(err, &ee) && ee.ExitCode() > 0 && ee.ExitCode()&1 == 1:
		res.Status = ee.ExitCode() >> 1
		return res, nil
	default:
		return res, fmt.Errorf("vmtest: run %s: %w; console tail:\n%s", qemuBinary, err, lastLines(res.Console, 40))
	}
}

// initScript is the guest's /init. It never exits (the kernel would panic): it reports the
// script's status through the isa-debug-exit port, which ends qemu, and sleeps.
const initScript = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /root
echo "vmtest: guest $(uname -r) up after $(cut -d' ' -f1 /proc/uptime)s"
sh /vmtest/script.sh
rc=$?
[ "$rc" -gt %[1]d ] && rc=%[1]d
echo "vmtest: script exit status $rc"
printf "$(printf '\\%%03o' "$rc")" | dd of=/dev/port bs=1 seek=%[2]d count=1 2>/dev/null
echo "vmtest: writing the verdict to port %#[2]x failed; powering off" >&2
poweroff -f
while :; do sleep 3600; done
`

func writeInitramfs(dst string, cfg Config) error {
	bb, err := findBusybox()
	if err != nil {
		return fmt.Errorf("vmtest: %w", err)
	}
	entries := []cpioEntry{
		{name: "dev/console", mode: modeChr | 0o600, devMajor: 5, devMinor: 1},
		{name: "proc", mode: modeDir | 0o755},
		{name: "sys", mode: modeDir | 0o755},
		{name: "tmp", mode: modeDir | 0o1777},
		{name: "sbin", mode: modeDir | 0o755},
		{name: "bin/busybox", mode: modeReg | 0o755, src: bb},
		{name: "bin/sh", mode: modeLink | 0o777, data: []byte("busybox")},
		{name: "init", mode: modeReg | 0o755, data: []byte(fmt.Sprintf(initScript, maxStatus, debugExitPort))},
		{name: "vmtest/script.sh", mode: modeReg | 0o755, data: []byte(cfg.Script)},
	}
	if cfg.Hot != "" {
		if err := requireStatic(cfg.Hot); err != nil {
			return fmt.Errorf("vmtest: hot binary: %w (build it with CGO_ENABLED=0)", err)
		}
		entries = append(entries, cpioEntry{name: "bin/hot", mode: modeReg | 0o755, src: cfg.Hot})
	}
	for _, f := range cfg.Files {
		if !path.IsAbs(f.Dst) {
			return fmt.Errorf("vmtest: guest path %q of %s is not absolute", f.Dst, f.Src)
		}
		st, err := os.Stat(f.Src)
		if err != nil {
			return fmt.Errorf("vmtest: file for the guest: %w", err)
		}
		mode := f.Mode
		if mode == 0 {
			mode = 0o644
			if st.Mode()&0o111 != 0 {
				mode = 0o755
			}
		}
		entries = append(entries, cpioEntry{name: f.Dst, mode: modeReg | mode&0o7777, src: f.Src})
	}
	out, err := os.Create(dst)
	if err != nil {
		return fmt.Errorf("vmtest: create initramfs: %w", err)
	}
	if err := writeCPIO(out, entries); err != nil {
		out.Close()
		return fmt.Errorf("vmtest: %w", err)
	}
	if err := out.Close(); err != nil {
		return fmt.Errorf("vmtest: write initramfs %s: %w", dst, err)
	}
	return nil
}

// requireStatic fails unless p is an ELF executable without a dynamic loader.
func requireStatic(p string) error {
	f, err := elf.Open(p)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked; the initramfs has no libc", p)
		}
	}
	return nil
}

// lockedBuffer is a bytes.Buffer safe for qemu's stdout and stderr copiers.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
