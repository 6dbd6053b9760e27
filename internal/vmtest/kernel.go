package vmtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// DefaultKernelCache is where scripts/vm-kernel.sh caches the VM kernel.
const DefaultKernelCache = "/var/cache/hot/vm-kernel"

// Kernel is a bootable kernel image with the headers to build modules for it.
type Kernel struct {
	Release string // e.g. 6.1.0-56-amd64, what `uname -r` prints in the guest
	Image   string // vmlinuz
	Config  string // the kernel's .config ("" when not cached)
	Headers string // /lib/modules/RELEASE/build ("" when not installed)
}

// FindKernel returns the kernel scripts/vm-kernel.sh cached in dir (DefaultKernelCache, or
// $HOT_VM_KERNEL_CACHE, when dir is ""): the entry the "current" link names.
func FindKernel(dir string) (Kernel, error) {
	if dir == "" {
		dir = os.Getenv("HOT_VM_KERNEL_CACHE")
	}
	if dir == "" {
		dir = DefaultKernelCache
	}
	target, err := os.Readlink(filepath.Join(dir, "current"))
	if err != nil {
		return Kernel{}, fmt.Errorf("find VM kernel in %s: %w (run scripts/vm-kernel.sh, part of `make deps`)", dir, err)
	}
	rel := filepath.Base(target)
	k := Kernel{Release: rel, Image: filepath.Join(dir, rel, "vmlinuz")}
	if _, err := os.Stat(k.Image); err != nil {
		return Kernel{}, fmt.Errorf("find VM kernel %s: %w (run scripts/vm-kernel.sh)", rel, err)
	}
	if c := filepath.Join(dir, rel, "config"); fileExists(c) {
		k.Config = c
	}
	if h := filepath.Join("/lib/modules", rel, "build"); fileExists(filepath.Join(h, "Makefile")) {
		k.Headers = h
	}
	return k, nil
}

// ConfigEnabled reports whether the kernel's .config sets option (e.g. "CONFIG_LIVEPATCH") to y.
func (k Kernel) ConfigEnabled(option string) (bool, error) {
	if k.Config == "" {
		return false, fmt.Errorf("kernel %s: no cached .config", k.Release)
	}
	b, err := os.ReadFile(k.Config)
	if err != nil {
		return false, fmt.Errorf("read config of kernel %s: %w", k.Release, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if line == option+"=y" {
			return true, nil
		}
	}
	return false, nil
}

// Require skips t unless a VM can be booted here: not -short, root (module builds and qemu
// are run as root in CI), qemu-system-x86_64 and busybox-static installed, the kernel cached.
// When headers is true it also requires the kernel's headers (for BuildModules).
func Require(t testing.TB, headers bool) Kernel {
	t.Helper()
	if testing.Short() {
		t.Skip("VM test: boots a kernel under qemu, skipped in -short mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("VM test: requires root")
	}
	if _, err := exec.LookPath(qemuBinary); err != nil {
		t.Skipf("VM test: %s not found (Debian package qemu-system-x86, installed by `make deps`)", qemuBinary)
	}
	if _, err := findBusybox(); err != nil {
		t.Skipf("VM test: %v", err)
	}
	k, err := FindKernel("")
	if err != nil {
		t.Skipf("VM test: %v", err)
	}
	if headers && k.Headers == "" {
		t.Skipf("VM test: headers for %s missing: /lib/modules/%s/build (package linux-headers-%s, installed by scripts/vm-kernel.sh)", k.Release, k.Release, k.Release)
	}
	return k
}

// BuildModules copies the module sources in srcDir (a Kbuild or Makefile and its .c/.h
// files, flat) into outDir and builds them there against k's headers. The .ko files end up
// in outDir; srcDir is not written to.
func BuildModules(ctx context.Context, k Kernel, srcDir, outDir string) error {
	if k.Headers == "" {
		return fmt.Errorf("build modules from %s: no headers for kernel %s (install linux-headers-%s)", srcDir, k.Release, k.Release)
	}
	ents, err := os.ReadDir(srcDir)
	if err != nil {
		return fmt.Errorf("build modules: read %s: %w", srcDir, err)
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return fmt.Errorf("build modules: %w", err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(srcDir, e.Name()))
		if err != nil {
			return fmt.Errorf("build modules: %w", err)
		}
		if err := os.WriteFile(filepath.Join(outDir, e.Name()), b, 0o644); err != nil {
			return fmt.Errorf("build modules: %w", err)
		}
	}
	cmd := exec.CommandContext(ctx, "make", "-C", k.Headers, "M="+outDir, "modules")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("build modules in %s against %s: %w\n%s", outDir, k.Headers, err, lastLines(string(out), 30))
	}
	return nil
}

func findBusybox() (string, error) {
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		if fileExists(p) {
			if err := requireStatic(p); err != nil {
				return "", fmt.Errorf("%w (install busybox-static instead of busybox)", err)
			}
			return p, nil
		}
	}
	return "", errors.New("busybox not found (Debian package busybox-static, installed by `make deps`)")
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
