package ftrace

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"
)

// Env is what pre-flight checks read from the system. The zero value reads the real
// system; tests replace single functions.
type Env struct {
	// KernelBTF returns the running kernel's BTF (default btf.LoadKernelSpec).
	KernelBTF func() (*btf.Spec, error)
	// CgroupID checks that path is a cgroup2 directory and returns its cgroup id.
	CgroupID func(path string) (uint64, error)
	// FileID returns the kernel device number (MAJOR<<20|MINOR) and inode of path.
	FileID func(path string) (dev uint32, ino uint64, err error)
	// ActiveLSMs returns the active LSMs (default: /sys/kernel/security/lsm).
	ActiveLSMs func() ([]string, error)
}

func (e *Env) withDefaults() *Env {
	out := Env{}
	if e != nil {
		out = *e
	}
	if out.KernelBTF == nil {
		out.KernelBTF = sync.OnceValues(btf.LoadKernelSpec)
	}
	if out.CgroupID == nil {
		out.CgroupID = cgroup2ID
	}
	if out.FileID == nil {
		out.FileID = fileID
	}
	if out.ActiveLSMs == nil {
		out.ActiveLSMs = activeLSMs
	}
	return &out
}

// Plan is a fix ready to load: its canonical spec, a one-line summary, and the programs
// with their mechanism and target. Building a plan touches nothing in the kernel.
type Plan struct {
	Spec     Spec
	Summary  string
	Programs []ProgramPlan
}

// ProgramPlan is one program of a fix.
type ProgramPlan struct {
	Mechanism Mechanism
	Target    string // cgroup2 directory, kernel function or LSM hook
	spec      *ebpf.ProgramSpec
}

// Prepare runs the pre-flight checks of s and generates its programs. Errors about the
// spec or its target match ErrBadSpec; a mechanism the system cannot provide at all
// (e.g. BPF LSM not active) gives an UnsupportedError.
func Prepare(env *Env, s Spec) (*Plan, error) {
	k, ok := lookupKind(s.Kind)
	if !ok {
		return nil, specErr(s.String(), "known kinds: "+strings.Join(kindNames(), ", "), "unknown fix kind %q", s.Kind)
	}
	p, err := k.plan(env.withDefaults(), s)
	if err != nil {
		var se *SpecError
		if errors.As(err, &se) || errors.Is(err, ErrNotSupported) {
			return nil, err
		}
		return nil, specErr(s.String(), "", "%v", err)
	}
	p.Spec = s
	return p, nil
}

func newProgram(m Mechanism, target string, insns asm.Instructions) ProgramPlan {
	typ, attach := m.kernelTypes()
	ps := &ebpf.ProgramSpec{
		Name:         progName(m),
		Type:         typ,
		AttachType:   attach,
		Instructions: insns,
		License:      "GPL",
	}
	if m.Trampoline() {
		ps.AttachTo = target
		if m == MechLSM {
			ps.AttachTo = strings.TrimPrefix(target, "bpf_lsm_")
		}
	}
	return ProgramPlan{Mechanism: m, Target: target, spec: ps}
}

// progName is the kernel object name (<= 15 characters).
func progName(m Mechanism) string {
	n := "hot_" + strings.NewReplacer("cgroup/", "", "/", "_").Replace(string(m))
	if len(n) > 15 {
		n = n[:15]
	}
	return n
}

func planCgroup(env *Env, s Spec) (string, error) {
	dir := s.Params["cgroup"]
	if _, err := env.CgroupID(dir); err != nil {
		return "", err
	}
	return dir, nil
}

func planSockCreate(env *Env, s Spec) (*Plan, error) {
	dir, err := planCgroup(env, s)
	if err != nil {
		return nil, err
	}
	family := uint32(syscall.AF_INET)
	if s.Params["family"] == "inet6" {
		family = syscall.AF_INET6
	}
	typ, haveType := sockTypes()[s.Params["type"]]
	proto, haveProto := s.Params["protocol"]
	insns := sockCreateProgram(family, typ, protocolNumber(proto), haveType, haveProto)
	what := s.Params["family"]
	if haveType {
		what += " " + s.Params["type"]
	}
	if haveProto {
		what += " " + proto
	}
	return &Plan{
		Summary:  fmt.Sprintf("deny creating %s sockets in cgroup %s", what, dir),
		Programs: []ProgramPlan{newProgram(MechSockCreate, dir, insns)},
	}, nil
}

func planSockAddr(env *Env, s Spec, m4, m6 Mechanism) (*Plan, error) {
	dir, err := planCgroup(env, s)
	if err != nil {
		return nil, err
	}
	var addr netip.Addr
	if a := s.Params["addr"]; a != "" {
		addr = netip.MustParseAddr(a)
	}
	var port uint16
	if p := s.Params["port"]; p != "" {
		n, _ := strconv.ParseUint(p, 10, 16)
		port = uint16(n)
	}
	p := &Plan{}
	if !addr.IsValid() || addr.Is4() {
		p.Programs = append(p.Programs, newProgram(m4, dir, sockAddrProgram(false, addr, port)))
	}
	// IPv6 sockets reach IPv4 peers through v4-mapped addresses: cover them too.
	v6 := addr
	if addr.Is4() {
		v6 = netip.AddrFrom16(addr.As16())
	}
	p.Programs = append(p.Programs, newProgram(m6, dir, sockAddrProgram(true, v6, port)))
	verb := strings.TrimSuffix(string(m4)[len("cgroup/"):], "4")
	target := "any address"
	if addr.IsValid() {
		target = addr.String()
	}
	if port != 0 {
		target += fmt.Sprintf(" port %d", port)
	}
	p.Summary = fmt.Sprintf("deny %s to %s from cgroup %s", verb, target, dir)
	return p, nil
}

func planSysctl(env *Env, s Spec) (*Plan, error) {
	dir, err := planCgroup(env, s)
	if err != nil {
		return nil, err
	}
	name, writeOnly := s.Params["name"], s.Params["access"] != "rw"
	verb := "reading and writing"
	if writeOnly {
		verb = "writing"
	}
	return &Plan{
		Summary:  fmt.Sprintf("deny %s sysctl %s in cgroup %s", verb, name, dir),
		Programs: []ProgramPlan{newProgram(MechSysctl, dir, sysctlProgram(name, writeOnly))},
	}, nil
}

func planDevice(env *Env, s Spec) (*Plan, error) {
	dir, err := planCgroup(env, s)
	if err != nil {
		return nil, err
	}
	var typ uint32
	switch s.Params["type"] {
	case "b":
		typ = devBlock
	case "c":
		typ = devChar
	}
	num := func(v string) int64 {
		if v == "*" {
			return -1
		}
		n, _ := strconv.ParseInt(v, 10, 64)
		return n
	}
	var access uint32
	for _, c := range s.Params["access"] {
		switch c {
		case 'm':
			access |= accMknod
		case 'r':
			access |= accRead
		case 'w':
			access |= accWrite
		}
	}
	return &Plan{
		Summary: fmt.Sprintf("deny %s access to %s %s:%s devices in cgroup %s", s.Params["access"],
			s.Params["type"], s.Params["major"], s.Params["minor"], dir),
		Programs: []ProgramPlan{newProgram(MechDevice, dir, deviceProgram(typ, num(s.Params["major"]), num(s.Params["minor"]), access))},
	}, nil
}

// trampolineConds builds the comm/cgroup conditions shared by open-deny and hook-deny.
func trampolineConds(env *Env, s Spec) ([]cond, string, error) {
	var conds []cond
	var who []string
	if c := s.Params["comm"]; c != "" {
		conds = append(conds, commEquals(c))
		who = append(who, "comm "+c)
	}
	if dir := s.Params["cgroup"]; dir != "" {
		id, err := env.CgroupID(dir)
		if err != nil {
			return nil, "", err
		}
		conds = append(conds, cgroupEquals(id))
		who = append(who, "cgroup "+dir)
	}
	if len(who) == 0 {
		return conds, "every task", nil
	}
	return conds, strings.Join(who, " in "), nil
}

// hookTarget returns the BTF function a fmod_ret or LSM program attaches to for hook, and
// checks that BPF LSM is active when the mechanism is lsm.
func hookTarget(env *Env, m Mechanism, hook string) (string, error) {
	if m == MechFmodRet {
		return "security_" + hook, nil
	}
	lsms, err := env.ActiveLSMs()
	if err != nil {
		return "", &UnsupportedError{Mechanism: MechLSM, Op: "check", Reason: fmt.Sprintf("cannot tell whether BPF LSM is active: %v", err), Err: err}
	}
	for _, l := range lsms {
		if l == "bpf" {
			return "bpf_lsm_" + hook, nil
		}
	}
	return "", &UnsupportedError{Mechanism: MechLSM, Op: "check", Reason: fmt.Sprintf("BPF LSM is not active (active LSMs: %s); boot with lsm=%s,bpf or use mech=fmod_ret", strings.Join(lsms, ","), strings.Join(lsms, ","))}
}

func denyReturn(s Spec) int32 {
	return -int32(errnos()[s.Params["errno"]])
}

func planOpenDeny(env *Env, s Spec) (*Plan, error) {
	m := Mechanism(s.Params["mech"])
	target, err := hookTarget(env, m, "file_open")
	if err != nil {
		return nil, err
	}
	path := s.Params["path"]
	dev, ino, err := env.FileID(path)
	if err != nil {
		return nil, err
	}
	kb, err := kernelBTF(env, m)
	if err != nil {
		return nil, err
	}
	if _, err := checkSignature(kb, target, "file"); err != nil {
		return nil, err
	}
	var l fileLayout
	for _, f := range []struct {
		dst           *uint32
		struc, member string
		size          int
	}{
		{&l.fInode, "file", "f_inode", 8},
		{&l.iIno, "inode", "i_ino", 8},
		{&l.iSb, "inode", "i_sb", 8},
		{&l.sDev, "super_block", "s_dev", 4},
	} {
		if *f.dst, err = fieldOffset(kb, f.struc, f.member, f.size); err != nil {
			return nil, err
		}
	}
	conds, who, err := trampolineConds(env, s)
	if err != nil {
		return nil, err
	}
	conds = append(conds, fileIs(l, dev, ino))
	return &Plan{
		Summary:  fmt.Sprintf("make opening %s (inode %d) fail with %s for %s, via %s on %s", path, ino, s.Params["errno"], who, m, target),
		Programs: []ProgramPlan{newProgram(m, target, denyProgram(conds, denyReturn(s), 0))},
	}, nil
}

func planHookDeny(env *Env, s Spec) (*Plan, error) {
	m := Mechanism(s.Params["mech"])
	target, err := hookTarget(env, m, s.Params["hook"])
	if err != nil {
		return nil, err
	}
	kb, err := kernelBTF(env, m)
	if err != nil {
		return nil, err
	}
	if _, err := checkSignature(kb, target); err != nil {
		return nil, err
	}
	conds, who, err := trampolineConds(env, s)
	if err != nil {
		return nil, err
	}
	return &Plan{
		Summary:  fmt.Sprintf("make %s fail with %s for %s, via %s", target, s.Params["errno"], who, m),
		Programs: []ProgramPlan{newProgram(m, target, denyProgram(conds, denyReturn(s), 0))},
	}, nil
}

func planCount(env *Env, s Spec) (*Plan, error) {
	m, fn := Mechanism(s.Params["mech"]), s.Params["func"]
	kb, err := kernelBTF(env, m)
	if err != nil {
		return nil, err
	}
	if _, err := kernelFunc(kb, fn); err != nil {
		return nil, err
	}
	return &Plan{
		Summary:  fmt.Sprintf("count calls of %s (%s)", fn, m),
		Programs: []ProgramPlan{newProgram(m, fn, countProgram())},
	}, nil
}

// cgroup2ID checks that dir is a directory on a cgroup2 file system and returns its
// cgroup id (the directory's inode number on cgroup2).
func cgroup2ID(dir string) (uint64, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w (create it with mkdir under a cgroup2 mount, e.g. /sys/fs/cgroup/unified)", dir, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("cgroup %s is not a cgroup2 directory (cgroup-BPF attaches to cgroup v2 only; on hybrid hosts use a directory under /sys/fs/cgroup/unified)", dir)
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", dir, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return 0, fmt.Errorf("cgroup %s is not a directory", dir)
	}
	return st.Ino, nil
}

// fileID returns the kernel dev_t and inode of path.
func fileID(path string) (uint32, uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, 0, fmt.Errorf("path %s: %w (open-deny matches an existing file by inode)", path, err)
	}
	dev := uint64(st.Dev)
	return unix.Major(dev)<<20 | unix.Minor(dev), st.Ino, nil
}

// activeLSMs reads the list of active LSMs from securityfs.
func activeLSMs() ([]string, error) {
	const f = "/sys/kernel/security/lsm"
	b, err := os.ReadFile(f)
	if errors.Is(err, os.ErrNotExist) {
		// securityfs not mounted (e.g. a minimal initramfs): mount it and retry.
		if merr := unix.Mount("securityfs", "/sys/kernel/security", "securityfs", 0, ""); merr == nil {
			b, err = os.ReadFile(f)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("read active LSMs: %w", err)
	}
	return strings.Split(strings.TrimSpace(string(b)), ","), nil
}

// kernelBTF loads the kernel BTF for a trampoline mechanism; without it no trampoline
// program can be loaded at all.
func kernelBTF(env *Env, m Mechanism) (*btf.Spec, error) {
	kb, err := env.KernelBTF()
	if err != nil {
		return nil, &UnsupportedError{Mechanism: m, Op: "check", Reason: fmt.Sprintf("kernel BTF unavailable (needs CONFIG_DEBUG_INFO_BTF and /sys/kernel/btf/vmlinux): %v", err), Err: err}
	}
	return kb, nil
}
