// Package ftrace provides BPF-based host fixes for kernels that cannot load modules:
// trampoline programs (fentry/fexit counters, fmod_ret on security_* functions, BPF LSM
// hooks) and, where trampolines are refused, the cgroup-BPF fallback (sock_create,
// connect4/6, sysctl, device hooks), with capability detection.
//
// Contract:
//   - A fix is data: a Spec ("KIND:key=value,...") names one of the built-in, parameterised
//     fix kinds (see Kinds). Parse validates the parameters; Prepare turns the spec into a
//     plan (programs, mechanism, target, condition) and runs the pre-flight checks: the
//     target of a trampoline fix must exist in the kernel BTF with the expected signature,
//     a cgroup must be a cgroup2 directory. Nothing is loaded into the kernel before the
//     plan is complete, so a bad spec leaves no trace.
//   - Fixes outlive the process that applied them: every fix lives in its own directory
//     of a bpffs (default /sys/fs/bpf/hot/<name>/) holding its pinned links, a counter map
//     and a metadata map with the canonical spec. List reads those pins back, Remove
//     unpins them (which detaches the programs). Apply is idempotent for an unchanged spec;
//     a changed spec under the same name attaches the new programs before the old ones
//     are dropped.
//   - Capability detection never looks at kernel versions: Probe loads (and for
//     trampolines attaches) a trivial program of each kind and reports the kernel's
//     answer. Only a nil error and errors matching ErrNotSupported are conclusive; an
//     UnsupportedError carries the errno and the reason.
//
// Programs are written with github.com/cilium/ebpf's asm package (no clang in the build or
// in CI); github.com/cilium/ebpf does loading, BTF, links and pinning because it is the
// maintained pure-Go BPF library with typed capability errors.
//
// The package is called ftrace because BPF trampolines are attached through the kernel's
// ftrace machinery; on kernels that refuse trampolines the cgroup-BPF kinds still work.
package ftrace
