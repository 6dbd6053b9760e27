package ftrace

import (
	"encoding/binary"
	"net/netip"

	"github.com/cilium/ebpf/asm"
)

// The programs are generated with cilium/ebpf's asm package from the fix parameters, so
// the conditions are constants in the code and no clang is needed anywhere.
//
// Shape of every program:
//
//	r6 = ctx
//	<conditions: each jumps to "allow" when it does not match>
//	hits[0] += 1              (atomic, when the map lookup succeeds)
//	return <deny value>
//	allow: return <allow value>
//
// Stack: fp-8 holds the u32 map key; buffers live below it.

const (
	hitsMapName = "hits"
	labelAllow  = "allow"
	labelDeny   = "deny"
)

// cond emits instructions that jump to labelAllow when the condition does not hold. It may
// use r1-r5 and r0 but must keep r6 (the context).
type cond func() asm.Instructions

// denyProgram assembles the conditions, the hit counter and the two exits.
func denyProgram(conds []cond, denyRet, allowRet int32) asm.Instructions {
	insns := asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1)}
	for _, c := range conds {
		insns = append(insns, c()...)
	}
	insns = append(insns, countHit()...)
	insns = append(insns,
		asm.Mov.Imm(asm.R0, denyRet).WithSymbol(labelDeny),
		asm.Return(),
	)
	if len(conds) > 0 {
		insns = append(insns,
			asm.Mov.Imm(asm.R0, allowRet).WithSymbol(labelAllow),
			asm.Return(),
		)
	}
	return insns
}

// countHit increments hits[0]; on a failed lookup it jumps straight to labelDeny.
func countHit() asm.Instructions {
	return asm.Instructions{
		asm.StoreImm(asm.RFP, -8, 0, asm.Word),
		asm.LoadMapPtr(asm.R1, 0).WithReference(hitsMapName),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -8),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, labelDeny),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
	}
}

// ctxU32Equals: *(u32 *)(ctx+off) == want.
func ctxU32Equals(off int16, want uint32) cond {
	return func() asm.Instructions {
		return asm.Instructions{
			asm.LoadMem(asm.R2, asm.R6, off, asm.Word),
			asm.JNE.Imm32(asm.R2, int32(want), labelAllow),
		}
	}
}

// stackEquals compares the stack bytes at fp+off with want (len(want) a multiple of 8).
func stackEquals(off int16, want []byte) asm.Instructions {
	var insns asm.Instructions
	for i := 0; i+8 <= len(want); i += 8 {
		insns = append(insns,
			asm.LoadMem(asm.R1, asm.RFP, off+int16(i), asm.DWord),
			asm.LoadImm(asm.R2, int64(binary.LittleEndian.Uint64(want[i:i+8])), asm.DWord),
			asm.JNE.Reg(asm.R1, asm.R2, labelAllow),
		)
	}
	return insns
}

// zeroStack clears n bytes (multiple of 8) at fp+off; it clobbers r1.
func zeroStack(off int16, n int) asm.Instructions {
	insns := asm.Instructions{asm.Mov.Imm(asm.R1, 0)}
	for i := 0; i < n; i += 8 {
		insns = append(insns, asm.StoreMem(asm.RFP, off+int16(i), asm.R1, asm.DWord))
	}
	return insns
}

// padded returns s followed by at least one NUL, padded with NULs to a multiple of 8.
func padded(s string, min int) []byte {
	n := (len(s) + 1 + 7) / 8 * 8
	if n < min {
		n = min
	}
	b := make([]byte, n)
	copy(b, s)
	return b
}

// --- cgroup/sock_create: struct bpf_sock {u32 bound_dev_if, family, type, protocol ...}

func sockCreateProgram(family, sockType, protocol uint32, haveType, haveProto bool) asm.Instructions {
	conds := []cond{ctxU32Equals(4, family)}
	if haveType {
		conds = append(conds, ctxU32Equals(8, sockType))
	}
	if haveProto {
		conds = append(conds, ctxU32Equals(12, protocol))
	}
	return denyProgram(conds, 0, 1)
}

// --- cgroup/connect{4,6}, cgroup/bind{4,6}: struct bpf_sock_addr
// {u32 user_family; u32 user_ip4; u32 user_ip6[4]; u32 user_port; ...}, addresses and
// port in network byte order.

func sockAddrProgram(v6 bool, addr netip.Addr, port uint16) asm.Instructions {
	var conds []cond
	if port != 0 {
		// user_port holds the port in network order in its low 16 bits.
		conds = append(conds, ctxU32Equals(24, uint32(port>>8|port<<8)))
	}
	if addr.IsValid() {
		if v6 {
			b := addr.As16()
			for i := 0; i < 4; i++ {
				conds = append(conds, ctxU32Equals(int16(8+4*i), binary.LittleEndian.Uint32(b[4*i:])))
			}
		} else {
			b := addr.As4()
			conds = append(conds, ctxU32Equals(4, binary.LittleEndian.Uint32(b[:])))
		}
	}
	return denyProgram(conds, 0, 1)
}

// --- cgroup/sysctl: struct bpf_sysctl {u32 write; u32 file_pos}; the name comes from
// bpf_sysctl_get_name(ctx, buf, len, 0) as "net/ipv4/ip_forward".

const sysctlBuf = 128 // bytes, fits maxSysctlName + NUL

func sysctlProgram(name string, writeOnly bool) asm.Instructions {
	const bufOff = -8 - sysctlBuf
	var conds []cond
	if writeOnly {
		conds = append(conds, func() asm.Instructions {
			return asm.Instructions{
				asm.LoadMem(asm.R2, asm.R6, 0, asm.Word),
				asm.JEq.Imm32(asm.R2, 0, labelAllow),
			}
		})
	}
	conds = append(conds, func() asm.Instructions {
		insns := zeroStack(bufOff, sysctlBuf)
		insns = append(insns,
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, bufOff),
			asm.Mov.Imm(asm.R3, sysctlBuf),
			asm.Mov.Imm(asm.R4, 0),
			asm.FnSysctlGetName.Call(),
			asm.JNE.Imm(asm.R0, int32(len(name)), labelAllow),
		)
		return append(insns, stackEquals(bufOff, padded(name, 0))...)
	})
	return denyProgram(conds, 0, 1)
}

// --- cgroup/dev: struct bpf_cgroup_dev_ctx {u32 access_type (access<<16 | type); u32 major; u32 minor}

const (
	devBlock = 1
	devChar  = 2
	accMknod = 1
	accRead  = 2
	accWrite = 4
)

func deviceProgram(devType uint32, major, minor int64, access uint32) asm.Instructions {
	var conds []cond
	if devType != 0 {
		conds = append(conds, func() asm.Instructions {
			return asm.Instructions{
				asm.LoadMem(asm.R2, asm.R6, 0, asm.Word),
				asm.And.Imm32(asm.R2, 0xffff),
				asm.JNE.Imm32(asm.R2, int32(devType), labelAllow),
			}
		})
	}
	conds = append(conds, func() asm.Instructions {
		return asm.Instructions{
			asm.LoadMem(asm.R2, asm.R6, 0, asm.Word),
			asm.RSh.Imm32(asm.R2, 16),
			asm.And.Imm32(asm.R2, int32(access)),
			asm.JEq.Imm32(asm.R2, 0, labelAllow),
		}
	})
	if major >= 0 {
		conds = append(conds, ctxU32Equals(4, uint32(major)))
	}
	if minor >= 0 {
		conds = append(conds, ctxU32Equals(8, uint32(minor)))
	}
	return denyProgram(conds, 0, 1)
}

// --- trampoline programs (fentry/fexit/fmod_ret/lsm): ctx is an array of u64 arguments.

// commEquals: bpf_get_current_comm() == comm (buffer of 16 bytes at fp-24).
func commEquals(comm string) cond {
	return func() asm.Instructions {
		insns := zeroStack(-24, 16)
		insns = append(insns,
			asm.Mov.Reg(asm.R1, asm.RFP),
			asm.Add.Imm(asm.R1, -24),
			asm.Mov.Imm(asm.R2, 16),
			asm.FnGetCurrentComm.Call(),
			asm.JNE.Imm(asm.R0, 0, labelAllow),
		)
		return append(insns, stackEquals(-24, padded(comm, 16))...)
	}
}

// cgroupEquals: bpf_get_current_cgroup_id() == id.
func cgroupEquals(id uint64) cond {
	return func() asm.Instructions {
		return asm.Instructions{
			asm.FnGetCurrentCgroupId.Call(),
			asm.LoadImm(asm.R1, int64(id), asm.DWord),
			asm.JNE.Reg(asm.R0, asm.R1, labelAllow),
		}
	}
}

// fileLayout holds the kernel struct offsets the open-deny condition reads, taken from
// the running kernel's BTF.
type fileLayout struct {
	fInode, iIno, iSb, sDev uint32
}

// fileIs: the struct file * in argument 0 is the inode ino on the device dev (kernel
// dev_t encoding, MAJOR<<20 | MINOR).
func fileIs(l fileLayout, dev uint32, ino uint64) cond {
	return func() asm.Instructions {
		return asm.Instructions{
			asm.LoadMem(asm.R1, asm.R6, 0, asm.DWord),               // file
			asm.LoadMem(asm.R2, asm.R1, int16(l.fInode), asm.DWord), // file->f_inode
			asm.LoadMem(asm.R3, asm.R2, int16(l.iIno), asm.DWord),   // inode->i_ino
			asm.LoadImm(asm.R4, int64(ino), asm.DWord),              //
			asm.JNE.Reg(asm.R3, asm.R4, labelAllow),                 //
			asm.LoadMem(asm.R3, asm.R2, int16(l.iSb), asm.DWord),    // inode->i_sb
			asm.LoadMem(asm.R3, asm.R3, int16(l.sDev), asm.Word),    // sb->s_dev
			asm.JNE.Imm32(asm.R3, int32(dev), labelAllow),           //
		}
	}
}

// countProgram counts every call (fentry/fexit must return 0).
func countProgram() asm.Instructions {
	return denyProgram(nil, 0, 0)
}
