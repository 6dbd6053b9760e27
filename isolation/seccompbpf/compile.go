package seccompbpf

import (
	"fmt"
	"slices"
	"sort"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// Layout of struct seccomp_data (little-endian x86_64).
const (
	offNr   = 0
	offArch = 4
	offArgs = 16

	x32SyscallBit = 0x40000000
	maxInsns      = 4096 // BPF_MAXINSNS
)

// Program is a compiled filter.
type Program struct {
	Instructions []bpf.Instruction
	Flags        uint     // SECCOMP_FILTER_FLAG_* for seccomp(2)
	Skipped      []string // syscall names the profile lists that x86_64 does not have
}

// rule is one alternative for a syscall: all conds must hold for ret to be returned.
type rule struct {
	conds []specs.LinuxSeccompArg
	ret   uint32
}

// Compile turns s into a seccomp BPF program for x86_64. See the package doc for semantics.
func Compile(s *specs.LinuxSeccomp) (*Program, error) {
	if s == nil {
		return nil, fmt.Errorf("compile seccomp filter: no profile")
	}
	if s.ListenerPath != "" {
		return nil, fmt.Errorf("compile seccomp filter: listenerPath %q needs a seccomp agent, which hot does not support", s.ListenerPath)
	}
	if len(s.Architectures) > 0 && !slices.Contains(s.Architectures, specs.ArchX86_64) {
		return nil, fmt.Errorf("compile seccomp filter: the profile's architectures %v do not include SCMP_ARCH_X86_64", s.Architectures)
	}
	def, err := actionValue(s.DefaultAction, s.DefaultErrnoRet)
	if err != nil {
		return nil, fmt.Errorf("compile seccomp filter: defaultAction: %w", err)
	}
	p := &Program{}
	if p.Flags, err = flagValue(s.Flags); err != nil {
		return nil, fmt.Errorf("compile seccomp filter: %w", err)
	}

	// Collect the rules of each syscall number, conditional ones first, in profile order.
	rules := map[uint32][]rule{}
	for i, sc := range s.Syscalls {
		ret, err := actionValue(sc.Action, sc.ErrnoRet)
		if err != nil {
			return nil, fmt.Errorf("compile seccomp filter: syscalls[%d] %v: %w", i, sc.Names, err)
		}
		for _, a := range sc.Args {
			if a.Index > 5 {
				return nil, fmt.Errorf("compile seccomp filter: syscalls[%d] %v: argument index %d: syscalls have 6 arguments (0-5)", i, sc.Names, a.Index)
			}
			if _, ok := argOps[a.Op]; !ok {
				return nil, fmt.Errorf("compile seccomp filter: syscalls[%d] %v: unknown operator %q", i, sc.Names, a.Op)
			}
		}
		alts := splitArgs(sc.Args)
		for _, name := range sc.Names {
			nr, ok := sysnumAMD64[name]
			if !ok {
				if !slices.Contains(p.Skipped, name) {
					p.Skipped = append(p.Skipped, name)
				}
				continue
			}
			for _, conds := range alts {
				rules[nr] = append(rules[nr], rule{conds: conds, ret: ret})
			}
		}
	}
	nrs := make([]uint32, 0, len(rules))
	for nr, rs := range rules {
		nrs = append(nrs, nr)
		sort.SliceStable(rs, func(i, j int) bool { return len(rs[i].conds) > 0 && len(rs[j].conds) == 0 })
	}
	slices.Sort(nrs)

	var a asm
	// Another ABI (i386, x32): ENOSYS.
	enosys := bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)}
	native, notX32 := a.label(), a.label()
	a.emit(bpf.LoadAbsolute{Off: offArch, Size: 4})
	a.jumpIf(bpf.JumpEqual, unix.AUDIT_ARCH_X86_64, native, next)
	a.emit(enosys)
	a.mark(native)
	a.emit(bpf.LoadAbsolute{Off: offNr, Size: 4})
	a.jumpIf(bpf.JumpGreaterOrEqual, x32SyscallBit, next, notX32)
	a.emit(enosys)
	a.mark(notX32)
	for _, nr := range nrs {
		skip := a.label()
		rs := rules[nr]
		if len(rs) == 1 && len(rs[0].conds) == 0 {
			if rs[0].ret == def {
				continue // same as not listing it
			}
			a.jumpIf(bpf.JumpEqual, nr, next, skip)
			a.emit(bpf.RetConstant{Val: rs[0].ret})
			a.mark(skip)
			continue
		}
		// Blocks with conditions can be longer than a conditional jump reaches: jump over
		// them with an unconditional one.
		body := a.label()
		a.jumpIf(bpf.JumpEqual, nr, body, next)
		a.jump(skip)
		a.mark(body)
		terminated := false
		for _, r := range rs {
			if len(r.conds) == 0 {
				a.emit(bpf.RetConstant{Val: r.ret})
				terminated = true
				break // later rules for this syscall cannot match first
			}
			fail := a.label()
			for _, c := range r.conds {
				pass := a.label()
				a.compare(c, pass, fail)
				a.mark(pass)
			}
			a.emit(bpf.RetConstant{Val: r.ret})
			a.mark(fail)
		}
		if !terminated {
			// The syscall number matched, none of its rules did: nothing else can match.
			a.emit(bpf.RetConstant{Val: def})
		}
		a.mark(skip)
	}
	a.emit(bpf.RetConstant{Val: def})

	insns, err := a.resolve()
	if err != nil {
		return nil, fmt.Errorf("compile seccomp filter: %w", err)
	}
	if len(insns) > maxInsns {
		return nil, fmt.Errorf("compile seccomp filter: %d instructions, the kernel takes at most %d: shorten the profile", len(insns), maxInsns)
	}
	p.Instructions = insns
	return p, nil
}

// splitArgs returns the alternatives (ORed) of one syscall entry, each a list of ANDed
// comparisons. Like runc, an entry that compares one argument more than once becomes one
// alternative per comparison.
func splitArgs(args []specs.LinuxSeccompArg) [][]specs.LinuxSeccompArg {
	seen := map[uint]bool{}
	dup := false
	for _, a := range args {
		dup = dup || seen[a.Index]
		seen[a.Index] = true
	}
	if !dup {
		return [][]specs.LinuxSeccompArg{args}
	}
	out := make([][]specs.LinuxSeccompArg, 0, len(args))
	for _, a := range args {
		out = append(out, []specs.LinuxSeccompArg{a})
	}
	return out
}

var argOps = map[specs.LinuxSeccompOperator]bool{
	specs.OpEqualTo: true, specs.OpNotEqual: true, specs.OpGreaterThan: true,
	specs.OpGreaterEqual: true, specs.OpLessThan: true, specs.OpLessEqual: true,
	specs.OpMaskedEqual: true,
}

// actionValue is the SECCOMP_RET_* value of an action; errnoRet defaults to EPERM.
func actionValue(act specs.LinuxSeccompAction, errnoRet *uint) (uint32, error) {
	data := uint32(unix.EPERM)
	if errnoRet != nil {
		if *errnoRet > 0xffff {
			return 0, fmt.Errorf("errnoRet %d does not fit in 16 bits", *errnoRet)
		}
		data = uint32(*errnoRet)
	}
	switch act {
	case specs.ActAllow:
		return unix.SECCOMP_RET_ALLOW, nil
	case specs.ActErrno:
		return unix.SECCOMP_RET_ERRNO | data, nil
	case specs.ActKill, specs.ActKillThread:
		return unix.SECCOMP_RET_KILL_THREAD, nil
	case specs.ActKillProcess:
		return unix.SECCOMP_RET_KILL_PROCESS, nil
	case specs.ActTrap:
		return unix.SECCOMP_RET_TRAP, nil
	case specs.ActTrace:
		return unix.SECCOMP_RET_TRACE | data, nil
	case specs.ActLog:
		return unix.SECCOMP_RET_LOG, nil
	case specs.ActNotify:
		return 0, fmt.Errorf("action %s needs a seccomp agent, which hot does not support", act)
	}
	return 0, fmt.Errorf("unknown action %q", act)
}

func flagValue(flags []specs.LinuxSeccompFlag) (uint, error) {
	var v uint
	for _, f := range flags {
		switch f {
		case specs.LinuxSeccompFlagLog:
			v |= unix.SECCOMP_FILTER_FLAG_LOG
		case specs.LinuxSeccompFlagSpecAllow:
			v |= unix.SECCOMP_FILTER_FLAG_SPEC_ALLOW
		case "SECCOMP_FILTER_FLAG_TSYNC":
			v |= unix.SECCOMP_FILTER_FLAG_TSYNC
		default:
			return 0, fmt.Errorf("unsupported seccomp flag %q", f)
		}
	}
	return v, nil
}

// compare emits the 64-bit comparison c on its argument, jumping to pass or fail.
func (a *asm) compare(c specs.LinuxSeccompArg, pass, fail int) {
	lo := bpf.LoadAbsolute{Off: offArgs + 8*uint32(c.Index), Size: 4}
	hi := bpf.LoadAbsolute{Off: offArgs + 8*uint32(c.Index) + 4, Size: 4}
	vhi, vlo := uint32(c.Value>>32), uint32(c.Value)
	switch c.Op {
	case specs.OpEqualTo:
		a.emit(hi)
		a.jumpIf(bpf.JumpEqual, vhi, next, fail)
		a.emit(lo)
		a.jumpIf(bpf.JumpEqual, vlo, pass, fail)
	case specs.OpNotEqual:
		a.emit(hi)
		a.jumpIf(bpf.JumpEqual, vhi, next, pass)
		a.emit(lo)
		a.jumpIf(bpf.JumpEqual, vlo, fail, pass)
	case specs.OpGreaterThan, specs.OpGreaterEqual, specs.OpLessThan, specs.OpLessEqual:
		// GT/GE pass when the high word is bigger, LT/LE (the negation of GE/GT) fail then.
		above, below := pass, fail
		last := bpf.JumpGreaterThan
		switch c.Op {
		case specs.OpGreaterEqual:
			last = bpf.JumpGreaterOrEqual
		case specs.OpLessThan:
			above, below, last = fail, pass, bpf.JumpGreaterOrEqual
		case specs.OpLessEqual:
			above, below = fail, pass
		}
		a.emit(hi)
		a.jumpIf(bpf.JumpGreaterThan, vhi, above, next)
		a.jumpIf(bpf.JumpEqual, vhi, next, below)
		a.emit(lo)
		a.jumpIf(last, vlo, above, below)
	case specs.OpMaskedEqual:
		// runtime-spec: (arg & value) == valueTwo.
		mhi, mlo := uint32(c.Value>>32), uint32(c.Value)
		whi, wlo := uint32(c.ValueTwo>>32), uint32(c.ValueTwo)
		a.emit(hi)
		a.emit(bpf.ALUOpConstant{Op: bpf.ALUOpAnd, Val: mhi})
		a.jumpIf(bpf.JumpEqual, whi, next, fail)
		a.emit(lo)
		a.emit(bpf.ALUOpConstant{Op: bpf.ALUOpAnd, Val: mlo})
		a.jumpIf(bpf.JumpEqual, wlo, pass, fail)
	}
}
