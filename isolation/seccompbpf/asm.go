package seccompbpf

import (
	"fmt"

	"golang.org/x/net/bpf"
)

// next is the label of the instruction that follows a jump.
const next = -1

// asm is a tiny assembler with forward labels for classic BPF.
type asm struct {
	items  []item
	labels []int // label → instruction index, -1 until marked
}

type item struct {
	ins    bpf.Instruction
	jump   bool // bpf.Jump to target
	cond   bool // bpf.JumpIf to jt/jf
	test   bpf.JumpTest
	val    uint32
	jt, jf int
	target int
}

func (a *asm) label() int {
	a.labels = append(a.labels, -1)
	return len(a.labels) - 1
}

func (a *asm) mark(l int) { a.labels[l] = len(a.items) }

func (a *asm) emit(ins bpf.Instruction) { a.items = append(a.items, item{ins: ins}) }

func (a *asm) jumpIf(test bpf.JumpTest, val uint32, jt, jf int) {
	a.items = append(a.items, item{cond: true, test: test, val: val, jt: jt, jf: jf})
}

func (a *asm) jump(target int) { a.items = append(a.items, item{jump: true, target: target}) }

// resolve turns labels into relative skips.
func (a *asm) resolve() ([]bpf.Instruction, error) {
	out := make([]bpf.Instruction, len(a.items))
	skip := func(pos, l int) (int, error) {
		if l == next {
			return 0, nil
		}
		t := a.labels[l]
		if t <= pos {
			return 0, fmt.Errorf("internal error: label %d at %d is not after instruction %d", l, t, pos)
		}
		return t - pos - 1, nil
	}
	for i, it := range a.items {
		switch {
		case it.jump:
			s, err := skip(i, it.target)
			if err != nil {
				return nil, err
			}
			out[i] = bpf.Jump{Skip: uint32(s)}
		case it.cond:
			st, err := skip(i, it.jt)
			if err != nil {
				return nil, err
			}
			sf, err := skip(i, it.jf)
			if err != nil {
				return nil, err
			}
			if st > 255 || sf > 255 {
				return nil, fmt.Errorf("a rule is too long: conditional jump of %d instructions (at most 255)", max(st, sf))
			}
			out[i] = bpf.JumpIf{Cond: it.test, Val: it.val, SkipTrue: uint8(st), SkipFalse: uint8(sf)}
		default:
			out[i] = it.ins
		}
	}
	return out, nil
}
