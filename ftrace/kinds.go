package ftrace

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
)

// Kind is one built-in, parameterised fix: what it does, through which mechanisms, and
// the parameters it takes.
type Kind struct {
	Name       string
	Summary    string
	Mechanisms []Mechanism // the mechanisms it may use; the "mech" parameter picks one where there is a choice
	Example    string
	Params     []Param

	check func(Spec) error                      // cross-parameter checks, pure
	plan  func(env *Env, s Spec) (*Plan, error) // pre-flight and program generation
}

// Param is one parameter of a fix kind.
type Param struct {
	Name     string
	Help     string
	Required bool
	Default  string

	normalize func(string) (string, error)
}

// Kinds returns the built-in fix kinds.
func Kinds() []Kind {
	cgroupParam := Param{Name: "cgroup", Required: true, normalize: normPath,
		Help: "cgroup2 directory the fix applies to, e.g. /sys/fs/cgroup/unified/web"}
	optCgroup := Param{Name: "cgroup", normalize: normPath,
		Help: "only for tasks in this cgroup2 directory (matched by cgroup id)"}
	comm := Param{Name: "comm", normalize: normComm, Help: "only for tasks whose command name (comm, <= 15 bytes) is this"}
	sockAddrParams := []Param{
		{Name: "addr", normalize: normAddr, Help: "IPv4 or IPv6 address"},
		{Name: "port", normalize: normPort, Help: "port 1-65535"},
		cgroupParam,
	}
	errno := Param{Name: "errno", Default: "EPERM", normalize: normErrno, Help: "error to return: EPERM, EACCES, ENOENT, EBUSY or EAGAIN"}
	return []Kind{
		{
			Name:       "sock-create-deny",
			Summary:    "deny creating inet sockets of a family (and optionally type/protocol) in a cgroup",
			Mechanisms: []Mechanism{MechSockCreate},
			Example:    "sock-create-deny:family=inet6,cgroup=/sys/fs/cgroup/unified/web",
			Params: []Param{
				{Name: "family", Required: true, normalize: normFamily, Help: "inet or inet6 (AF_INET, AF_INET6)"},
				{Name: "type", normalize: normSockType, Help: "stream, dgram, raw or seqpacket"},
				{Name: "protocol", normalize: normProtocol, Help: "tcp, udp, icmp, icmpv6, sctp or a number 0-255"},
				cgroupParam,
			},
			plan: planSockCreate,
		},
		{
			Name:       "connect-deny",
			Summary:    "deny connect() to an address and/or port from a cgroup (TCP and UDP, IPv4, IPv6 and v4-mapped)",
			Mechanisms: []Mechanism{MechConnect4, MechConnect6},
			Example:    "connect-deny:addr=127.0.0.1,port=6379,cgroup=/sys/fs/cgroup/unified/web",
			Params:     sockAddrParams,
			check:      needAddrOrPort,
			plan:       func(env *Env, s Spec) (*Plan, error) { return planSockAddr(env, s, MechConnect4, MechConnect6) },
		},
		{
			Name:       "bind-deny",
			Summary:    "deny bind() to an address and/or port in a cgroup (IPv4, IPv6 and v4-mapped)",
			Mechanisms: []Mechanism{MechBind4, MechBind6},
			Example:    "bind-deny:port=22,cgroup=/sys/fs/cgroup/unified/web",
			Params:     sockAddrParams,
			check:      needAddrOrPort,
			plan:       func(env *Env, s Spec) (*Plan, error) { return planSockAddr(env, s, MechBind4, MechBind6) },
		},
		{
			Name:       "sysctl-deny",
			Summary:    "deny writing (or reading and writing) a sysctl through /proc/sys from a cgroup",
			Mechanisms: []Mechanism{MechSysctl},
			Example:    "sysctl-deny:name=kernel.domainname,cgroup=/sys/fs/cgroup/unified/web",
			Params: []Param{
				{Name: "name", Required: true, normalize: normSysctl, Help: "sysctl name, dotted (net.ipv4.ip_forward) or as under /proc/sys (net/ipv4/ip_forward)"},
				{Name: "access", Default: "write", normalize: oneOf("write", "rw"), Help: "write or rw"},
				cgroupParam,
			},
			plan: planSysctl,
		},
		{
			Name:       "device-deny",
			Summary:    "deny opening or creating device nodes in a cgroup",
			Mechanisms: []Mechanism{MechDevice},
			Example:    "device-deny:type=c,major=1,minor=3,access=rw,cgroup=/sys/fs/cgroup/unified/web",
			Params: []Param{
				{Name: "type", Default: "a", normalize: oneOf("a", "b", "c"), Help: "c (char), b (block) or a (both)"},
				{Name: "major", Default: "*", normalize: normDevNum, Help: "major number or * (any)"},
				{Name: "minor", Default: "*", normalize: normDevNum, Help: "minor number or * (any)"},
				{Name: "access", Default: "rwm", normalize: normDevAccess, Help: "any of r (read), w (write), m (mknod)"},
				cgroupParam,
			},
			plan: planDevice,
		},
		{
			Name:       "open-deny",
			Summary:    "deny opening a file (matched by inode at apply time) via fmod_ret on security_file_open or the BPF LSM file_open hook; needs BPF trampolines",
			Mechanisms: []Mechanism{MechFmodRet, MechLSM},
			Example:    "open-deny:path=/etc/shadow,comm=cat",
			Params: []Param{
				{Name: "path", Required: true, normalize: normPath, Help: "absolute path of an existing file"},
				comm, optCgroup, errno,
				{Name: "mech", Default: string(MechFmodRet), normalize: oneOf(string(MechFmodRet), string(MechLSM)), Help: "fmod_ret (security_file_open) or lsm (BPF LSM file_open)"},
			},
			plan: planOpenDeny,
		},
		{
			Name:       "hook-deny",
			Summary:    "make an LSM hook (security_<hook>) return an error for a comm and/or cgroup via fmod_ret or BPF LSM; needs BPF trampolines",
			Mechanisms: []Mechanism{MechFmodRet, MechLSM},
			Example:    "hook-deny:hook=socket_create,comm=curl",
			Params: []Param{
				{Name: "hook", Required: true, normalize: normHook, Help: "LSM hook name, e.g. socket_create, file_open, bpf (security_ prefix optional)"},
				comm, optCgroup, errno,
				{Name: "mech", Default: string(MechFmodRet), normalize: oneOf(string(MechFmodRet), string(MechLSM)), Help: "fmod_ret (security_<hook>) or lsm (BPF LSM hook)"},
			},
			check: func(s Spec) error {
				if s.Params["comm"] == "" && s.Params["cgroup"] == "" {
					return errors.New("hook-deny needs a condition: comm= and/or cgroup= (denying a hook for every task would break the host)")
				}
				return nil
			},
			plan: planHookDeny,
		},
		{
			Name:       "count",
			Summary:    "count calls of a kernel function with an fentry or fexit program (proves a code path is hit); needs BPF trampolines",
			Mechanisms: []Mechanism{MechFentry, MechFexit},
			Example:    "count:func=security_file_open",
			Params: []Param{
				{Name: "func", Required: true, normalize: normFuncName, Help: "kernel function present in the kernel BTF"},
				{Name: "mech", Default: string(MechFentry), normalize: oneOf(string(MechFentry), string(MechFexit)), Help: "fentry or fexit"},
			},
			plan: planCount,
		},
	}
}

func needAddrOrPort(s Spec) error {
	if s.Params["addr"] == "" && s.Params["port"] == "" {
		return errors.New("give addr= and/or port=")
	}
	return nil
}

func oneOf(allowed ...string) func(string) (string, error) {
	return func(v string) (string, error) {
		for _, a := range allowed {
			if strings.EqualFold(v, a) {
				return a, nil
			}
		}
		return "", fmt.Errorf("want one of %s", strings.Join(allowed, ", "))
	}
}

func normPath(v string) (string, error) {
	if !filepath.IsAbs(v) {
		return "", errors.New("want an absolute path")
	}
	return filepath.Clean(v), nil
}

func normFamily(v string) (string, error) {
	switch strings.ToLower(v) {
	case "inet", "af_inet", "ipv4", "2":
		return "inet", nil
	case "inet6", "af_inet6", "ipv6", "10":
		return "inet6", nil
	}
	return "", errors.New("want inet or inet6 (the cgroup sock_create hook only sees inet sockets)")
}

// sockTypes, protocols and errnos are fresh maps per call: no package-level mutable state.
func sockTypes() map[string]uint32 {
	return map[string]uint32{"stream": syscall.SOCK_STREAM, "dgram": syscall.SOCK_DGRAM, "raw": syscall.SOCK_RAW, "seqpacket": syscall.SOCK_SEQPACKET}
}

func normSockType(v string) (string, error) {
	v = strings.TrimPrefix(strings.ToLower(v), "sock_")
	if _, ok := sockTypes()[v]; ok {
		return v, nil
	}
	return "", errors.New("want stream, dgram, raw or seqpacket")
}

func protocols() map[string]uint32 {
	return map[string]uint32{"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
}

func normProtocol(v string) (string, error) {
	v = strings.TrimPrefix(strings.ToLower(v), "ipproto_")
	if _, ok := protocols()[v]; ok {
		return v, nil
	}
	n, err := strconv.ParseUint(v, 10, 8)
	if err != nil {
		return "", errors.New("want tcp, udp, icmp, icmpv6, sctp or a number 0-255")
	}
	for name, num := range protocols() {
		if uint64(num) == n {
			return name, nil
		}
	}
	return strconv.FormatUint(n, 10), nil
}

func protocolNumber(v string) uint32 {
	if n, ok := protocols()[v]; ok {
		return n
	}
	n, _ := strconv.ParseUint(v, 10, 8)
	return uint32(n)
}

func normAddr(v string) (string, error) {
	a, err := netip.ParseAddr(strings.Trim(v, "[]"))
	if err != nil || a.Zone() != "" {
		return "", errors.New("want an IPv4 or IPv6 address without zone")
	}
	return a.String(), nil
}

func normPort(v string) (string, error) {
	n, err := strconv.ParseUint(v, 10, 16)
	if err != nil || n == 0 {
		return "", errors.New("want a port number 1-65535")
	}
	return strconv.FormatUint(n, 10), nil
}

var sysctlName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.:@+-]*(/[A-Za-z0-9_.:@+-]+)*$`)

// maxSysctlName bounds the name buffer of the sysctl program (bytes, without the NUL).
const maxSysctlName = 127

func normSysctl(v string) (string, error) {
	v = strings.TrimPrefix(v, "/proc/sys/")
	if !strings.Contains(v, "/") {
		v = strings.ReplaceAll(v, ".", "/")
	}
	if !sysctlName.MatchString(v) {
		return "", errors.New("want a sysctl name like net.ipv4.ip_forward or net/ipv4/conf/eth0.5/forwarding")
	}
	if len(v) > maxSysctlName {
		return "", fmt.Errorf("name longer than %d bytes", maxSysctlName)
	}
	return v, nil
}

func normDevNum(v string) (string, error) {
	if v == "*" {
		return v, nil
	}
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil || n >= 1<<20 {
		return "", errors.New("want a device number below 1048576 or *")
	}
	return strconv.FormatUint(n, 10), nil
}

func normDevAccess(v string) (string, error) {
	var out strings.Builder
	for _, c := range "rwm" {
		if strings.ContainsRune(v, c) {
			out.WriteRune(c)
		}
	}
	if out.Len() == 0 || strings.Trim(v, "rwm") != "" {
		return "", errors.New("want a combination of r, w and m")
	}
	return out.String(), nil
}

func normComm(v string) (string, error) {
	if len(v) > 15 {
		return "", errors.New("comm is at most 15 bytes (the kernel truncates task names to 15)")
	}
	return v, nil
}

func errnos() map[string]syscall.Errno {
	return map[string]syscall.Errno{"EPERM": syscall.EPERM, "EACCES": syscall.EACCES, "ENOENT": syscall.ENOENT, "EBUSY": syscall.EBUSY, "EAGAIN": syscall.EAGAIN}
}

func normErrno(v string) (string, error) {
	v = strings.ToUpper(v)
	if _, ok := errnos()[v]; ok {
		return v, nil
	}
	return "", errors.New("want EPERM, EACCES, ENOENT, EBUSY or EAGAIN")
}

var identifier = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.]*$`)

func normHook(v string) (string, error) {
	v = strings.TrimPrefix(strings.TrimPrefix(v, "security_"), "bpf_lsm_")
	if !identifier.MatchString(v) || strings.Contains(v, ".") {
		return "", errors.New("want an LSM hook name like socket_create")
	}
	return v, nil
}

func normFuncName(v string) (string, error) {
	if !identifier.MatchString(v) {
		return "", errors.New("want a kernel function name")
	}
	return v, nil
}
