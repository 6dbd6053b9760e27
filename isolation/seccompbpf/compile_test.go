package seccompbpf

import (
	"encoding/binary"
	"math/rand/v2"
	"strings"
	"testing"

	mobyseccomp "github.com/moby/profiles/seccomp"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// call is one syscall as the filter sees it.
type call struct {
	nr   uint32
	arch uint32
	args [6]uint64
}

func sys(nr uint32, args ...uint64) call {
	c := call{nr: nr, arch: unix.AUDIT_ARCH_X86_64}
	copy(c.args[:], args)
	return c
}

// run executes prog in x/net/bpf's VM. The VM loads 32-bit words big-endian while the kernel
// loads them in host order, so each 32-bit word of seccomp_data is stored big-endian here,
// with the 64-bit arguments split low word first as on little-endian x86_64.
func run(t *testing.T, p *Program, c call) uint32 {
	t.Helper()
	data := make([]byte, 64)
	binary.BigEndian.PutUint32(data[0:], c.nr)
	binary.BigEndian.PutUint32(data[4:], c.arch)
	for i, a := range c.args {
		binary.BigEndian.PutUint32(data[16+8*i:], uint32(a))
		binary.BigEndian.PutUint32(data[20+8*i:], uint32(a>>32))
	}
	vm, err := bpf.NewVM(p.Instructions)
	if err != nil {
		t.Fatalf("program rejected by the VM: %v", err)
	}
	out, err := vm.Run(data)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	return uint32(out)
}

const (
	allow = unix.SECCOMP_RET_ALLOW
	eperm = unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)
	enosy = unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)
)

func defaultProfile(t *testing.T, caps ...string) *Program {
	t.Helper()
	spec := &specs.Spec{Process: &specs.Process{Capabilities: &specs.LinuxCapabilities{Bounding: caps}}}
	sc, err := mobyseccomp.GetDefaultProfile(spec)
	if err != nil {
		t.Fatal(err)
	}
	p, err := Compile(sc)
	if err != nil {
		t.Fatalf("compile the default profile: %v", err)
	}
	if len(p.Instructions) > maxInsns {
		t.Fatalf("%d instructions", len(p.Instructions))
	}
	return p
}

func TestDefaultProfile(t *testing.T) {
	p := defaultProfile(t, "CAP_CHOWN", "CAP_SETUID", "CAP_NET_BIND_SERVICE")
	t.Logf("default profile: %d instructions, skipped %d non-x86_64 names", len(p.Instructions), len(p.Skipped))
	cases := []struct {
		name string
		c    call
		want uint32
	}{
		{"read", sys(unix.SYS_READ, 0, 0, 0), allow},
		{"execve", sys(unix.SYS_EXECVE), allow},
		{"mount", sys(unix.SYS_MOUNT), eperm},
		{"umount2", sys(unix.SYS_UMOUNT2), eperm},
		{"bpf", sys(unix.SYS_BPF, 5), eperm},
		{"reboot", sys(unix.SYS_REBOOT), eperm},
		{"settimeofday", sys(unix.SYS_SETTIMEOFDAY), eperm},
		{"clock_settime", sys(unix.SYS_CLOCK_SETTIME), eperm},
		{"init_module", sys(unix.SYS_INIT_MODULE), eperm},
		{"kexec_load", sys(unix.SYS_KEXEC_LOAD), eperm},
		{"unshare", sys(unix.SYS_UNSHARE, unix.CLONE_NEWNS), eperm},
		{"setns", sys(unix.SYS_SETNS), eperm},
		{"clone thread", sys(unix.SYS_CLONE, unix.CLONE_VM|unix.CLONE_FS|unix.CLONE_FILES|unix.CLONE_SIGHAND|unix.CLONE_THREAD), allow},
		{"clone fork", sys(unix.SYS_CLONE, uint64(unix.SIGCHLD)), allow},
		{"clone newns", sys(unix.SYS_CLONE, unix.CLONE_NEWNS|uint64(unix.SIGCHLD)), eperm},
		{"clone newuser", sys(unix.SYS_CLONE, unix.CLONE_NEWUSER), eperm},
		{"clone3", sys(unix.SYS_CLONE3), enosy},
		{"socket inet", sys(unix.SYS_SOCKET, unix.AF_INET, unix.SOCK_STREAM), allow},
		{"socket unix", sys(unix.SYS_SOCKET, unix.AF_UNIX, unix.SOCK_STREAM), allow},
		{"socket netlink", sys(unix.SYS_SOCKET, unix.AF_NETLINK, unix.SOCK_RAW), allow},
		{"socket vsock", sys(unix.SYS_SOCKET, unix.AF_VSOCK, unix.SOCK_STREAM), eperm},
		{"socket inet with high bits", sys(unix.SYS_SOCKET, 1<<32|unix.AF_INET), eperm},
		{"personality 0", sys(unix.SYS_PERSONALITY, 0), allow},
		{"personality query", sys(unix.SYS_PERSONALITY, 0xffffffff), allow},
		{"personality other", sys(unix.SYS_PERSONALITY, 1), eperm},
		{"unknown number", sys(999), eperm},
		{"x32 read", sys(unix.SYS_READ | x32SyscallBit), enosy},
		{"i386 read", call{nr: 3, arch: unix.AUDIT_ARCH_I386}, enosy},
	}
	for _, tc := range cases {
		if got := run(t, p, tc.c); got != tc.want {
			t.Errorf("%s: got %#x, want %#x", tc.name, got, tc.want)
		}
	}
}

func TestDefaultProfileFollowsCapabilities(t *testing.T) {
	p := defaultProfile(t, "CAP_SYS_ADMIN", "CAP_SYS_TIME", "CAP_SYS_BOOT", "CAP_BPF")
	for name, c := range map[string]call{
		"mount":         sys(unix.SYS_MOUNT),
		"settimeofday":  sys(unix.SYS_SETTIMEOFDAY),
		"reboot":        sys(unix.SYS_REBOOT),
		"bpf":           sys(unix.SYS_BPF),
		"clone newns":   sys(unix.SYS_CLONE, unix.CLONE_NEWNS),
		"clone3":        sys(unix.SYS_CLONE3),
		"unshare newns": sys(unix.SYS_UNSHARE, unix.CLONE_NEWNS),
	} {
		if got := run(t, p, c); got != allow {
			t.Errorf("%s with the capability: got %#x, want allow", name, got)
		}
	}
	if got := run(t, p, sys(unix.SYS_INIT_MODULE)); got != eperm {
		t.Errorf("init_module without CAP_SYS_MODULE: got %#x, want EPERM", got)
	}
}

// ref is the meaning of one comparison, written directly from libseccomp's definition.
func ref(op specs.LinuxSeccompOperator, arg, v, v2 uint64) bool {
	switch op {
	case specs.OpEqualTo:
		return arg == v
	case specs.OpNotEqual:
		return arg != v
	case specs.OpGreaterThan:
		return arg > v
	case specs.OpGreaterEqual:
		return arg >= v
	case specs.OpLessThan:
		return arg < v
	case specs.OpLessEqual:
		return arg <= v
	case specs.OpMaskedEqual:
		return arg&v == v2
	}
	panic(op)
}

func TestComparisonsMatchReference(t *testing.T) {
	ops := []specs.LinuxSeccompOperator{specs.OpEqualTo, specs.OpNotEqual, specs.OpGreaterThan,
		specs.OpGreaterEqual, specs.OpLessThan, specs.OpLessEqual, specs.OpMaskedEqual}
	rng := rand.New(rand.NewPCG(1, 2))
	// Values near word boundaries are where 64-bit comparisons built from 32-bit words break.
	interesting := []uint64{0, 1, 2, 0xffffffff, 0x100000000, 0x100000001, 0x1ffffffff, 1 << 63, ^uint64(0), ^uint64(0) - 1}
	pick := func() uint64 {
		if rng.IntN(2) == 0 {
			return interesting[rng.IntN(len(interesting))]
		}
		return rng.Uint64() >> (rng.IntN(4) * 16)
	}
	for _, op := range ops {
		for range 200 {
			v, v2 := pick(), pick()
			idx := uint(rng.IntN(6))
			if op == specs.OpMaskedEqual {
				v2 &= v // otherwise it can never match
			}
			prof := &specs.LinuxSeccomp{
				DefaultAction: specs.ActErrno,
				Syscalls: []specs.LinuxSyscall{{Names: []string{"getpid"}, Action: specs.ActAllow,
					Args: []specs.LinuxSeccompArg{{Index: idx, Value: v, ValueTwo: v2, Op: op}}}},
			}
			p, err := Compile(prof)
			if err != nil {
				t.Fatal(err)
			}
			for range 20 {
				arg := pick()
				switch rng.IntN(4) {
				case 0:
					arg = v
				case 1:
					arg = v + 1
				case 2:
					arg = v - 1
				}
				c := sys(unix.SYS_GETPID)
				c.args[idx] = arg
				want := eperm
				if ref(op, arg, v, v2) {
					want = allow
				}
				if got := run(t, p, c); got != want {
					t.Fatalf("%s value=%#x valueTwo=%#x on arg%d=%#x: got %#x, want %#x", op, v, v2, idx, arg, got, want)
				}
			}
		}
	}
}

func TestRuleSemantics(t *testing.T) {
	errno := func(n uint) *uint { return &n }
	prof := &specs.LinuxSeccomp{
		DefaultAction:   specs.ActErrno,
		DefaultErrnoRet: errno(uint(unix.EACCES)),
		Syscalls: []specs.LinuxSyscall{
			// Two different arguments: AND.
			{Names: []string{"kill"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				{Index: 0, Value: 1, Op: specs.OpEqualTo}, {Index: 1, Value: 9, Op: specs.OpEqualTo}}},
			// The same argument twice: OR (runc's reading).
			{Names: []string{"tkill"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				{Index: 1, Value: 9, Op: specs.OpEqualTo}, {Index: 1, Value: 15, Op: specs.OpEqualTo}}},
			// Unconditional entry listed first, conditional second: the conditional one wins.
			{Names: []string{"getuid"}, Action: specs.ActErrno, ErrnoRet: errno(uint(unix.EIO))},
			{Names: []string{"getuid"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{{Index: 0, Value: 7, Op: specs.OpEqualTo}}},
			{Names: []string{"getgid", "no_such_syscall", "arm_fadvise64_64"}, Action: specs.ActKillProcess},
			{Names: []string{"gettid"}, Action: specs.ActTrap},
			{Names: []string{"getppid"}, Action: specs.ActLog},
		},
	}
	p, err := Compile(prof)
	if err != nil {
		t.Fatal(err)
	}
	eacces := unix.SECCOMP_RET_ERRNO | uint32(unix.EACCES)
	for _, tc := range []struct {
		name string
		c    call
		want uint32
	}{
		{"kill both match", sys(unix.SYS_KILL, 1, 9), allow},
		{"kill one matches", sys(unix.SYS_KILL, 1, 15), eacces},
		{"tkill 9", sys(unix.SYS_TKILL, 0, 9), allow},
		{"tkill 15", sys(unix.SYS_TKILL, 0, 15), allow},
		{"tkill 2", sys(unix.SYS_TKILL, 0, 2), eacces},
		{"getuid cond", sys(unix.SYS_GETUID, 7), allow},
		{"getuid other", sys(unix.SYS_GETUID, 8), unix.SECCOMP_RET_ERRNO | uint32(unix.EIO)},
		{"getgid", sys(unix.SYS_GETGID), unix.SECCOMP_RET_KILL_PROCESS},
		{"gettid", sys(unix.SYS_GETTID), unix.SECCOMP_RET_TRAP},
		{"getppid", sys(unix.SYS_GETPPID), unix.SECCOMP_RET_LOG},
		{"unlisted", sys(unix.SYS_GETPID), eacces},
	} {
		if got := run(t, p, tc.c); got != tc.want {
			t.Errorf("%s: got %#x, want %#x", tc.name, got, tc.want)
		}
	}
	if strings.Join(p.Skipped, ",") != "no_such_syscall,arm_fadvise64_64" {
		t.Errorf("skipped = %v", p.Skipped)
	}
}

func TestLongRuleBlock(t *testing.T) {
	// 120 alternatives for one syscall are far longer than a conditional jump reaches.
	var args []specs.LinuxSeccompArg
	for i := range 120 {
		args = append(args, specs.LinuxSeccompArg{Index: 0, Value: uint64(i * 3), Op: specs.OpEqualTo})
	}
	prof := &specs.LinuxSeccomp{DefaultAction: specs.ActErrno, Syscalls: []specs.LinuxSyscall{
		{Names: []string{"ioctl"}, Action: specs.ActAllow, Args: args},
		{Names: []string{"write"}, Action: specs.ActAllow},
	}}
	p, err := Compile(prof)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		c    call
		want uint32
	}{
		{sys(unix.SYS_IOCTL, 0), allow}, {sys(unix.SYS_IOCTL, 357), allow},
		{sys(unix.SYS_IOCTL, 358), eperm}, {sys(unix.SYS_WRITE), allow}, {sys(unix.SYS_READ), eperm},
	} {
		if got := run(t, p, tc.c); got != tc.want {
			t.Errorf("nr %d arg %d: got %#x, want %#x", tc.c.nr, tc.c.args[0], got, tc.want)
		}
	}
}

func TestCompileRefuses(t *testing.T) {
	ok := specs.LinuxSyscall{Names: []string{"read"}, Action: specs.ActAllow}
	for name, prof := range map[string]*specs.LinuxSeccomp{
		"notify":       {DefaultAction: specs.ActErrno, Syscalls: []specs.LinuxSyscall{{Names: []string{"read"}, Action: specs.ActNotify}}},
		"listener":     {DefaultAction: specs.ActErrno, ListenerPath: "/run/agent.sock"},
		"bad action":   {DefaultAction: "SCMP_ACT_MAYBE"},
		"bad operator": {DefaultAction: specs.ActErrno, Syscalls: []specs.LinuxSyscall{{Names: []string{"read"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{{Index: 0, Op: "SCMP_CMP_ALMOST"}}}}},
		"bad index":    {DefaultAction: specs.ActErrno, Syscalls: []specs.LinuxSyscall{{Names: []string{"read"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{{Index: 6, Op: specs.OpEqualTo}}}}},
		"arm only":     {DefaultAction: specs.ActErrno, Architectures: []specs.Arch{specs.ArchAARCH64}, Syscalls: []specs.LinuxSyscall{ok}},
		"bad flag":     {DefaultAction: specs.ActErrno, Flags: []specs.LinuxSeccompFlag{"SECCOMP_FILTER_FLAG_NEW_LISTENER"}},
	} {
		if _, err := Compile(prof); err == nil {
			t.Errorf("%s: compiled, want an error", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}
