// Package seccompbpf compiles a runtime-spec seccomp configuration (specs.LinuxSeccomp, as
// config.json carries it) into a classic BPF seccomp program for x86_64 and loads it into the
// calling thread, in pure Go (hot is built with CGO_ENABLED=0, so libseccomp is out).
//
// Contract:
//   - Compile is pure. It refuses what it cannot express faithfully (unknown actions,
//     SCMP_ACT_NOTIFY, which needs a seccomp agent, unknown operators or flags, more than 4096
//     instructions) with an error naming the rule. Syscall names that do not exist on x86_64
//     (profiles list arm, s390 and 32-bit names too) are skipped and reported in
//     Program.Skipped, as libseccomp and runc do.
//   - Semantics follow libseccomp/runc: the arguments of one rule are ANDed, except that a rule
//     comparing the same argument more than once is split into one rule per comparison (ORed),
//     as runc does; rules for the same syscall are tried conditional ones first, then in profile
//     order, first match wins; anything unmatched gets the default action. Comparisons are on
//     the full 64-bit argument, unsigned, as libseccomp's SCMP_CMP_* are.
//   - Architecture: only native x86_64 syscalls are matched against the rules. A syscall made
//     through another ABI (i386 int 0x80, or x32 numbers with bit 30 set) gets ENOSYS whatever
//     the profile says, because its numbers mean other syscalls and a denylist profile could
//     otherwise be bypassed. 32-bit programs therefore do not run in a filtered container.
//   - Load installs the program with seccomp(SECCOMP_SET_MODE_FILTER) on the calling thread
//     only (no SECCOMP_FILTER_FLAG_TSYNC unless the profile's flags ask for it). The container
//     init calls it on its locked OS thread right before execve: execve ends every other
//     thread and the new program inherits the calling thread's filter, so the other Go
//     runtime threads never need it. Without no_new_privs the caller needs CAP_SYS_ADMIN.
//
// Why our own generator: libseccomp-golang needs cgo. github.com/elastic/go-seccomp-bpf
// (v1.6.0) is pure Go and has the six comparisons, but no general SCMP_CMP_MASKED_EQ (only
// "bits set"/"bits not set"), its errno action always returns EPERM (the default profile
// answers clone3 with ENOSYS so that libc falls back to clone), and its model (groups of names
// with one action) would need a translation layer as large as this generator.
// golang.org/x/net/bpf gives us typed instructions, the assembler and a VM that the tests run
// the programs in. The syscall table is generated from golang.org/x/sys/unix (mksysnum.go).
package seccompbpf

//go:generate go run mksysnum.go
