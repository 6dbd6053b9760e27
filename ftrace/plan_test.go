package ftrace

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
)

// fakeKernel builds a small kernel BTF: security_file_open(struct file *) with the struct
// layout open-deny reads, a void hook, an int hook, and the BPF LSM stub. fileOpenParam
// replaces the parameter struct of security_file_open (to test signature checks).
func fakeKernel(t *testing.T, fileOpenParam string) *btf.Spec {
	t.Helper()
	i32 := &btf.Int{Name: "int", Size: 4, Encoding: btf.Signed}
	u32 := &btf.Int{Name: "unsigned int", Size: 4}
	ulong := &btf.Int{Name: "long unsigned int", Size: 8}
	sb := &btf.Struct{Name: "super_block", Size: 64, Members: []btf.Member{
		{Name: "s_list", Type: ulong, Offset: 0},
		{Name: "s_dev", Type: &btf.Typedef{Name: "dev_t", Type: u32}, Offset: 16 * 8},
	}}
	inode := &btf.Struct{Name: "inode", Size: 128, Members: []btf.Member{
		{Name: "i_sb", Type: &btf.Pointer{Target: sb}, Offset: 40 * 8},
		{Name: "i_ino", Type: ulong, Offset: 64 * 8},
	}}
	file := &btf.Struct{Name: "file", Size: 64, Members: []btf.Member{
		{Name: "f_inode", Type: &btf.Pointer{Target: inode}, Offset: 32 * 8},
	}}
	structs := map[string]btf.Type{"file": file, "inode": inode}
	fn := func(name string, ret btf.Type, params ...btf.Type) *btf.Func {
		var ps []btf.FuncParam
		for i, p := range params {
			ps = append(ps, btf.FuncParam{Name: fmt.Sprintf("a%d", i), Type: p})
		}
		return &btf.Func{Name: name, Linkage: btf.GlobalFunc, Type: &btf.FuncProto{Return: ret, Params: ps}}
	}
	types := []btf.Type{
		fn("security_file_open", i32, &btf.Pointer{Target: structs[fileOpenParam]}),
		fn("bpf_lsm_file_open", i32, &btf.Pointer{Target: file}),
		fn("security_inode_free", &btf.Void{}, &btf.Pointer{Target: inode}),
		fn("security_socket_create", i32, i32, i32, i32, i32),
		fn("vfs_read", i32),
	}
	b, err := btf.NewBuilder(types, nil)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := b.Marshal(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	spec, err := btf.LoadSpecFromReader(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	return spec
}

func fakeEnv(t *testing.T, fileOpenParam string, lsms ...string) *Env {
	kb := fakeKernel(t, fileOpenParam)
	return &Env{
		KernelBTF: func() (*btf.Spec, error) { return kb, nil },
		CgroupID: func(p string) (uint64, error) {
			if p == "/cg" {
				return 4242, nil
			}
			return 0, fmt.Errorf("cgroup %s is not a cgroup2 directory", p)
		},
		FileID:     func(string) (uint32, uint64, error) { return 8<<20 | 1, 777, nil },
		ActiveLSMs: func() ([]string, error) { return lsms, nil },
	}
}

func mustPlan(t *testing.T, env *Env, text string) *Plan {
	t.Helper()
	s, err := ParseSpec(text)
	if err != nil {
		t.Fatal(err)
	}
	p, err := Prepare(env, s)
	if err != nil {
		t.Fatalf("Prepare(%s): %v", text, err)
	}
	return p
}

func hasConstant(insns asm.Instructions, c int64) bool {
	for _, ins := range insns {
		if ins.Constant == c {
			return true
		}
	}
	return false
}

func TestPrepareTrampolineFixes(t *testing.T) {
	env := fakeEnv(t, "file", "lockdown", "bpf")

	p := mustPlan(t, env, "open-deny:path=/etc/shadow,comm=cat")
	if len(p.Programs) != 1 || p.Programs[0].Mechanism != MechFmodRet || p.Programs[0].Target != "security_file_open" {
		t.Fatalf("open-deny plan: %+v", p.Programs)
	}
	ps := p.Programs[0].spec
	if ps.Type != ebpf.Tracing || ps.AttachType != ebpf.AttachModifyReturn || ps.AttachTo != "security_file_open" {
		t.Fatalf("open-deny program spec: %v %v %q", ps.Type, ps.AttachType, ps.AttachTo)
	}
	// The condition uses the inode and the offsets from the BTF, and returns -EPERM.
	for _, c := range []int64{777, 8<<20 | 1, -1} {
		if !hasConstant(ps.Instructions, c) {
			t.Errorf("open-deny program lacks constant %d", c)
		}
	}
	offsets := map[int16]bool{}
	for _, ins := range ps.Instructions {
		if ins.OpCode.Class().IsLoad() {
			offsets[ins.Offset] = true
		}
	}
	for _, off := range []int16{32, 40, 64, 16} {
		if !offsets[off] {
			t.Errorf("open-deny program does not load at BTF offset %d", off)
		}
	}

	p = mustPlan(t, env, "open-deny:path=/etc/shadow,mech=lsm,errno=EACCES")
	if ps := p.Programs[0].spec; ps.Type != ebpf.LSM || ps.AttachTo != "file_open" || p.Programs[0].Target != "bpf_lsm_file_open" {
		t.Fatalf("lsm plan: %v %q %q", ps.Type, ps.AttachTo, p.Programs[0].Target)
	}

	p = mustPlan(t, env, "hook-deny:hook=socket_create,cgroup=/cg")
	if p.Programs[0].Target != "security_socket_create" || !hasConstant(p.Programs[0].spec.Instructions, 4242) {
		t.Fatalf("hook-deny plan: %+v", p.Programs[0])
	}

	p = mustPlan(t, env, "count:func=vfs_read,mech=fexit")
	if ps := p.Programs[0].spec; ps.AttachType != ebpf.AttachTraceFExit || ps.AttachTo != "vfs_read" {
		t.Fatalf("count plan: %v %q", ps.AttachType, ps.AttachTo)
	}
}

func TestPrepareRefusesBadTargetsBeforeLoading(t *testing.T) {
	good := fakeEnv(t, "file", "bpf")
	for _, tc := range []struct {
		env  *Env
		spec string
		want string
	}{
		{fakeEnv(t, "inode", "bpf"), "open-deny:path=/etc/shadow", "wrong signature: parameter 1 of security_file_open is not a struct file pointer"},
		{good, "hook-deny:hook=inode_free,comm=x", "wrong signature: security_inode_free returns void, want int"},
		{good, "hook-deny:hook=no_such_hook,comm=x", "unknown target: the kernel BTF has no function security_no_such_hook"},
		{good, "hook-deny:hook=no_such_hook,comm=x,mech=lsm", "no function bpf_lsm_no_such_hook"},
		{good, "count:func=no_such_function", "unknown target"},
		{good, "hook-deny:hook=socket_create,cgroup=/not-cgroup2", "not a cgroup2 directory"},
		{good, "sock-create-deny:family=inet,cgroup=/elsewhere", "not a cgroup2 directory"},
	} {
		s, err := ParseSpec(tc.spec)
		if err != nil {
			t.Fatal(err)
		}
		_, err = Prepare(tc.env, s)
		if err == nil || !errors.Is(err, ErrBadSpec) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Prepare(%s) = %v, want a bad-spec error containing %q", tc.spec, err, tc.want)
		}
	}

	// BPF LSM not active: the mechanism is unsupported, said before loading.
	s, _ := ParseSpec("open-deny:path=/etc/shadow,mech=lsm")
	_, err := Prepare(fakeEnv(t, "file", "lockdown", "capability"), s)
	if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "BPF LSM is not active") {
		t.Errorf("lsm without bpf in the LSM list: %v", err)
	}
}

func TestPrepareCgroupFixes(t *testing.T) {
	env := fakeEnv(t, "file")
	for _, tc := range []struct {
		spec  string
		mechs []Mechanism
	}{
		{"sock-create-deny:family=inet6,type=dgram,cgroup=/cg", []Mechanism{MechSockCreate}},
		{"connect-deny:port=443,cgroup=/cg", []Mechanism{MechConnect4, MechConnect6}},
		{"connect-deny:addr=10.1.2.3,cgroup=/cg", []Mechanism{MechConnect4, MechConnect6}},
		{"connect-deny:addr=2001:db8::1,port=53,cgroup=/cg", []Mechanism{MechConnect6}},
		{"bind-deny:port=22,cgroup=/cg", []Mechanism{MechBind4, MechBind6}},
		{"sysctl-deny:name=kernel.domainname,cgroup=/cg", []Mechanism{MechSysctl}},
		{"device-deny:type=c,major=1,minor=3,cgroup=/cg", []Mechanism{MechDevice}},
	} {
		p := mustPlan(t, env, tc.spec)
		var got []Mechanism
		for _, pp := range p.Programs {
			got = append(got, pp.Mechanism)
			if pp.Target != "/cg" {
				t.Errorf("%s: target %q", tc.spec, pp.Target)
			}
			typ, at := pp.Mechanism.kernelTypes()
			if pp.spec.Type != typ || pp.spec.AttachType != at {
				t.Errorf("%s: program type %v/%v", tc.spec, pp.spec.Type, pp.spec.AttachType)
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.mechs) {
			t.Errorf("%s: mechanisms %v, want %v", tc.spec, got, tc.mechs)
		}
	}
	// Port 443 in network byte order as the u32 the kernel shows the program: 0xBB01.
	p := mustPlan(t, env, "connect-deny:port=443,cgroup=/cg")
	if !hasConstant(p.Programs[0].spec.Instructions, 0xBB01) {
		t.Errorf("connect-deny does not compare the port in network byte order:\n%v", p.Programs[0].spec.Instructions)
	}
	// 10.1.2.3 as the little-endian u32 of its network-order bytes, and v4-mapped in connect6.
	p = mustPlan(t, env, "connect-deny:addr=10.1.2.3,cgroup=/cg")
	if !hasConstant(p.Programs[0].spec.Instructions, 0x0302010a) || !hasConstant(p.Programs[1].spec.Instructions, int64(int32(-65536))) {
		t.Errorf("connect-deny address constants wrong:\n%v\n%v", p.Programs[0].spec.Instructions, p.Programs[1].spec.Instructions)
	}
}
