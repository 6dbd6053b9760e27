// Package doctor finds out, by trying, what this host allows hot to do: CRIU, cgroup freezers,
// overlayfs, namespaces, firewall CLIs, holding packets (NFQUEUE), userfaultfd, soft-dirty
// tracking, pipe sizes, BPF and kernel live patching. Each check reports ok, limited or
// missing with the reason and the fix.
//
// Checks never guess from version numbers: a freezer is "ok" because a scratch cgroup was
// frozen and thawed, overlayfs because a scratch overlay was mounted, and so on. Scratch
// objects are created under a temporary directory and removed before a check returns.
package doctor
