// Package isolation gives a container the isolation users expect from Docker and Podman
// defaults and writes all of it into the container's runtime-spec config.json:
// capabilities, no_new_privs, masked and read-only paths and a seccomp filter.
//
// Spec side (pure, run by `hot run`): Apply fills spec.Process.Capabilities (bounding,
// effective and permitted; inheritable and ambient empty), spec.Process.NoNewPrivileges,
// spec.Linux.MaskedPaths/ReadonlyPaths and spec.Linux.Seccomp from Options (--privileged,
// --cap-add, --cap-drop, --security-opt). The default seccomp profile is Docker's, taken from
// github.com/moby/profiles/seccomp, which resolves its capability-dependent rules against the
// spec's bounding set (so --cap-add SYS_TIME also opens settimeofday); a custom profile
// (Docker or OCI JSON) goes through the same loader. Apply compiles the result once so a
// profile hot cannot load is refused at `hot run`, not at container start.
//
// Init side (run by the container init, on the locked OS thread that will call execve):
//  1. ProtectPaths, after pivot_root in the container's mount namespace, while the init still
//     has CAP_SYS_ADMIN: /dev/null over masked files, a read-only bind of the empty directory
//     /dev/.masked over masked directories (an empty read-only tmpfs where /dev is not a
//     tmpfs), read-only bind remounts of read-only paths.
//  2. NewRestrictor, before anything is dropped: parses capabilities, compiles seccomp.
//  3. Restrictor.BeforeSetuid: PR_CAPBSET_DROP for every capability outside the bounding set,
//     PR_SET_KEEPCAPS for a non-root user.
//  4. the init switches user and group (setgroups, setresgid, setresuid).
//  5. Restrictor.BeforeExec: capset (effective, permitted, inheritable), ambient raise,
//     PR_SET_NO_NEW_PRIVS, then the seccomp filter as the very last step.
//
// Without no_new_privs the kernel only lets a CAP_SYS_ADMIN holder load a filter, so the
// filter is then loaded in step 3 instead (as runc does), and it must allow the remaining
// steps; the default profile does. Everything here is per thread; execve keeps the calling
// thread's credentials, no_new_privs and filter and ends the other threads, so the Go
// runtime's other threads do not need them (see package seccompbpf on TSYNC).
//
// CRIU restores capabilities, no_new_privs and seccomp filters from its images, so a
// checkpoint, restore, update or migration keeps them; the end-to-end tests verify that.
package isolation
