// Package container is hot's own container runtime: it turns an image from cowfs into a
// running container with its own mount, pid, uts, ipc and network namespaces, an overlay root,
// a cgroup (package cgroups) and a network attachment (package network), and keeps one monitor
// process per container that outlives the CLI.
//
// # Processes
//
//	hot run ──fork/exec, setsid──▶ hot __monitor ID   (child subreaper; owns the log; monitor.sock)
//	                                  └─clone(NEWNS|NEWPID|NEWUTS|NEWIPC)─▶ hot __init CONFIG
//	                                        setns(net) · mounts · pivot_root · execve ─▶ entrypoint (PID 1)
//
// The monitor places the init in the cgroup before the init does anything (a sync pipe
// releases it), and the init reports setup errors through a CLOEXEC pipe, which a successful
// execve closes; `hot run` gets the outcome from the monitor through a third pipe. See
// docs/runtime.md.
//
// # API for other packages
//
//   - Manager (NewManager) does everything the CLI offers: Run, List, Get, Stop, Signal, Wait,
//     Pause, Resume, Remove, Exec, Logs. Every call re-reads the files and the host, so any
//     number of hot processes may share a root; a per-container flock (containers/<id>/lock)
//     serialises commands on one container, a global one guards name uniqueness.
//   - Container is the reconciled view: the persisted State plus the Status the host really
//     shows (a dead monitor is never "running": it is "unknown" with Reason), the Exit status
//     and the cgroup paths. State holds pid, monitor pid, rootfs, cgroup name, network
//     attachment and the list of root file system Generations with Current.
//   - For multi-step operations of other packages (checkpoint, update): WithLock (lock, load,
//     fn, save), CallMonitor (any op, including ones added through MonitorOptions.Ops),
//     StartMonitor (a fresh monitor without an init, for a container whose monitor is gone).
//     Container.Dir, RunDir, MonitorSock, ConfigPath and LogPath name the container's files.
//   - RunMonitor / Monitor: the monitor side. MonitorOptions.Ops registers more operations on
//     the monitor socket (e.g. "restore": run `criu restore` as the monitor's child with
//     Monitor.StartProcess, then Monitor.AdoptInit(pid) so the restored tree's exit is
//     recorded). The monitor reaps every child itself: use StartProcess's channel, or wrap code
//     that waits for its own children (go-criu waits for `criu swrk`; restore.Restore) in
//     Monitor.HoldReaper, or their Wait fails with ECHILD.
//     The container's stdout/stderr is a pipe the monitor copies to the log: a restore passes
//     Monitor.NewOutputPipe()'s write end with --inherit-fd fd[N]:pipe:[INODE] (the inode
//     /proc/<pid>/fd/1 showed at dump time), or the restored tree gets SIGPIPE on its next write.
//   - Request / Response / MonitorStatus: the JSON protocol on <run-root>/<id>/monitor.sock.
//
// # Files
//
//	<root>/containers/<id>/config.json        OCI runtime-spec config the init follows
//	<root>/containers/<id>/state.json         State (atomic writes, under the lock)
//	<root>/containers/<id>/exit.json          ExitStatus, written by the monitor only
//	<root>/containers/<id>/lock               flock
//	<root>/containers/<id>/log, monitor.log   container stdout+stderr; monitor's own messages
//	<root>/containers/<id>/rootfs/            overlay mount of the current generation
//	<root>/containers/<id>/generations/<n>/{upper,work}
//	<run-root>/<id>/monitor.sock              monitor socket
//	<run-root>/netns/<id>                     network namespace (package network)
//
// Isolation (capabilities, no_new_privs, masked and read-only paths, seccomp) comes from
// package isolation: Run calls isolation.Apply on the spec, the init calls ProtectPaths after
// pivot_root and a Restrictor around the user switch (docs/isolation.md).
// Not done yet: user namespaces, symlink-safe mount targets inside the image.
package container
