package ftrace

import "github.com/cilium/ebpf"

// Mechanism names one way of attaching a BPF program to the kernel.
type Mechanism string

// The mechanisms hot uses. The cgroup ones are named like libbpf's section names.
const (
	MechSockCreate Mechanism = "cgroup/sock_create"
	MechConnect4   Mechanism = "cgroup/connect4"
	MechConnect6   Mechanism = "cgroup/connect6"
	MechBind4      Mechanism = "cgroup/bind4"
	MechBind6      Mechanism = "cgroup/bind6"
	MechSysctl     Mechanism = "cgroup/sysctl"
	MechDevice     Mechanism = "cgroup/dev"
	MechFentry     Mechanism = "fentry"
	MechFexit      Mechanism = "fexit"
	MechFmodRet    Mechanism = "fmod_ret"
	MechLSM        Mechanism = "lsm"
)

// Mechanisms lists every mechanism in the order Probe reports them.
func Mechanisms() []Mechanism {
	return []Mechanism{MechSockCreate, MechConnect4, MechConnect6, MechBind4, MechBind6,
		MechSysctl, MechDevice, MechFentry, MechFexit, MechFmodRet, MechLSM}
}

// Trampoline reports whether the mechanism attaches through a BPF trampoline (ftrace).
func (m Mechanism) Trampoline() bool {
	switch m {
	case MechFentry, MechFexit, MechFmodRet, MechLSM:
		return true
	}
	return false
}

// kernelTypes returns the program type and attach type of the mechanism.
func (m Mechanism) kernelTypes() (ebpf.ProgramType, ebpf.AttachType) {
	switch m {
	case MechSockCreate:
		return ebpf.CGroupSock, ebpf.AttachCGroupInetSockCreate
	case MechConnect4:
		return ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Connect
	case MechConnect6:
		return ebpf.CGroupSockAddr, ebpf.AttachCGroupInet6Connect
	case MechBind4:
		return ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Bind
	case MechBind6:
		return ebpf.CGroupSockAddr, ebpf.AttachCGroupInet6Bind
	case MechSysctl:
		return ebpf.CGroupSysctl, ebpf.AttachCGroupSysctl
	case MechDevice:
		return ebpf.CGroupDevice, ebpf.AttachCGroupDevice
	case MechFentry:
		return ebpf.Tracing, ebpf.AttachTraceFEntry
	case MechFexit:
		return ebpf.Tracing, ebpf.AttachTraceFExit
	case MechFmodRet:
		return ebpf.Tracing, ebpf.AttachModifyReturn
	case MechLSM:
		return ebpf.LSM, ebpf.AttachLSMMac
	}
	return ebpf.UnspecifiedProgram, ebpf.AttachNone
}
