package livepatch

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Supported reports whether the running kernel can load livepatch modules: nil, or an error
// matching ErrNotSupported that names every missing piece. `hot doctor` calls it.
func Supported() error { return Host().Supported() }

// Supported reports whether this System's kernel can load livepatches (see the package
// Supported). Errors not matching ErrNotSupported mean the probe itself failed.
func (s *System) Supported() error {
	var reasons []string
	modulesOK := true
	if _, err := os.Stat(filepath.Join(s.ProcDir, "modules")); errors.Is(err, fs.ErrNotExist) {
		reasons = append(reasons, "no module loading (no /proc/modules: kernel built without CONFIG_MODULES)")
		modulesOK = false
	} else if err != nil {
		return fmt.Errorf("probe module loading: %w", err)
	}
	if modulesOK {
		if v, err := readInt(filepath.Join(s.ProcDir, "sys/kernel/modules_disabled")); err == nil && v != 0 {
			reasons = append(reasons, "module loading switched off (kernel.modules_disabled=1; only a reboot turns it back on)")
			modulesOK = false
		}
	}
	if modulesOK && s.LoadModule == nil {
		// finit_module on an invalid fd: EBADF means the syscall is there and we may use it.
		switch err := unix.FinitModule(-1, "", 0); {
		case errors.Is(err, unix.ENOSYS):
			reasons = append(reasons, "no module loading (finit_module: ENOSYS)")
		case errors.Is(err, unix.EPERM):
			reasons = append(reasons, "module loading not permitted (finit_module: EPERM; needs CAP_SYS_MODULE, and kernel lockdown or modules_disabled may forbid it)")
		}
	}
	if _, err := os.Stat(s.LivepatchDir); errors.Is(err, fs.ErrNotExist) {
		reasons = append(reasons, fmt.Sprintf("no %s (kernel built without CONFIG_LIVEPATCH)", s.LivepatchDir))
	} else if err != nil {
		return fmt.Errorf("probe livepatch: %w", err)
	}
	if len(reasons) > 0 {
		return &NotSupportedError{Reasons: reasons}
	}
	return nil
}

// release returns the kernel release to check vermagic against.
func (s *System) release() (string, error) {
	if s.Release != "" {
		return s.Release, nil
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", fmt.Errorf("uname: %w", err)
	}
	return unix.ByteSliceToString(u.Release[:]), nil
}

func (s *System) loadModule(f *os.File, params string) error {
	if s.LoadModule != nil {
		return s.LoadModule(f, params)
	}
	return unix.FinitModule(int(f.Fd()), params, 0)
}

func (s *System) deleteModule(name string) error {
	if s.DeleteModule != nil {
		return s.DeleteModule(name)
	}
	return unix.DeleteModule(name, unix.O_NONBLOCK)
}

// loadErrorHint explains a finit_module failure.
func loadErrorHint(err error) string {
	switch {
	case errors.Is(err, unix.EEXIST):
		return "a module of that name is already loaded"
	case errors.Is(err, unix.ENOEXEC):
		return "the kernel rejected the module format (see dmesg)"
	case errors.Is(err, unix.EKEYREJECTED), errors.Is(err, unix.ENOKEY):
		return "the kernel requires a signed module (module.sig_enforce or lockdown): sign it with a trusted key"
	case errors.Is(err, unix.EPERM):
		return "not permitted: needs root with CAP_SYS_MODULE; lockdown or kernel.modules_disabled may forbid loading"
	case errors.Is(err, unix.ENOENT):
		return "the kernel could not find a symbol or object the patch needs (see dmesg)"
	case errors.Is(err, unix.EINVAL):
		return "the kernel refused the patch (see dmesg: e.g. a function it patches does not exist or another patch conflicts)"
	case errors.Is(err, unix.EBUSY):
		return "another livepatch transition is in progress: wait for it ('hot livepatch list') and retry"
	}
	return "see dmesg"
}
