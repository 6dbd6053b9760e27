package seccompbpf

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	mobyseccomp "github.com/moby/profiles/seccomp"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

const childEnv = "HOT_SECCOMPBPF_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		if err := loadChild(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// loadChild loads the default profile on its locked thread and checks the kernel applies it.
func loadChild() error {
	runtime.LockOSThread()
	spec := &specs.Spec{Process: &specs.Process{Capabilities: &specs.LinuxCapabilities{}}}
	sc, err := mobyseccomp.GetDefaultProfile(spec)
	if err != nil {
		return err
	}
	p, err := Compile(sc)
	if err != nil {
		return err
	}
	// Before the filter: clone3 with no arguments is refused by the kernel itself (EINVAL).
	if _, _, e := unix.RawSyscall(unix.SYS_CLONE3, 0, 0, 0); e != unix.EINVAL {
		return fmt.Errorf("clone3 before the filter: got %v, want EINVAL", e)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return err
	}
	if err := p.Load(); err != nil {
		return err
	}
	if _, _, e := unix.RawSyscall(unix.SYS_CLONE3, 0, 0, 0); e != unix.ENOSYS {
		return fmt.Errorf("clone3 after the filter: got %v, want ENOSYS", e)
	}
	// getpid through the x32 ABI (bit 30): refused whatever the profile says.
	if _, _, e := unix.RawSyscall(unix.SYS_GETPID|x32SyscallBit, 0, 0, 0); e != unix.ENOSYS {
		return fmt.Errorf("x32 getpid after the filter: got %v, want ENOSYS", e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_PERSONALITY, 1, 0, 0); e != unix.EPERM {
		return fmt.Errorf("personality(1) after the filter: got %v, want EPERM", e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_PERSONALITY, 0xffffffff, 0, 0); e != 0 {
		return fmt.Errorf("personality query after the filter: %v", e)
	}
	status, err := os.ReadFile("/proc/thread-self/status")
	if err != nil {
		return err
	}
	if !strings.Contains(string(status), "Seccomp:\t2") {
		return errors.New("/proc/thread-self/status does not say Seccomp: 2")
	}
	// The filter must survive execve: the exec'ed program reports its own status.
	out := "/proc/self/status"
	return unix.Exec("/bin/grep", []string{"grep", "-E", "^(Seccomp|NoNewPrivs):", out}, os.Environ())
}

// TestLoadIntoKernel loads the compiled default profile in a child process (no root needed:
// no_new_privs allows an unprivileged filter) and checks that the kernel enforces it on the
// thread and across execve.
func TestLoadIntoKernel(t *testing.T) {
	if _, err := os.Stat("/bin/grep"); err != nil {
		t.Skip("needs /bin/grep to check the exec'ed program's status")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self, "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "Seccomp:\t2") || !strings.Contains(string(out), "NoNewPrivs:\t1") {
		t.Fatalf("exec'ed program is not filtered:\n%s", out)
	}
}

func TestAvailable(t *testing.T) {
	if err := Available(); err != nil {
		t.Fatalf("this kernel loads filters (TestLoadIntoKernel), but Available says: %v", err)
	}
}
