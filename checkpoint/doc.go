// Package checkpoint dumps a running process tree (a container) with CRIU and describes the
// result.
//
// Dump freezes the tree through the caller's cgroup freezer and waits until it is really
// frozen before CRIU starts (CRIU's own --freeze-cgroup polls in 100 ms steps), then dumps
// through go-criu's swrk RPC (github.com/checkpoint-restore/go-criu/v8, the maintained Go
// binding of CRIU's RPC) with established TCP connections, the network namespace kept as an
// external namespace, the nftables network lock and ghost files for deleted-but-open files.
// A failed dump thaws the tree and removes the network lock CRIU may have left in the
// namespace, so the container keeps running and reachable.
//
// CRIU reports failures over RPC as one string that quotes the first error of its log, which
// on hosts without CAP_SYS_RESOURCE is the harmless RLIMIT_NOFILE line. Every failure is
// therefore returned as a *CRIUError carrying the log path and the first meaningful log line
// (criubin.FirstError).
//
// Stats are read from CRIU's stats-dump image (go-criu's crit package). Archive packs an
// image directory with the container's config and upper layer into one verifiable file;
// Inspect decodes images into a human-readable summary.
package checkpoint
