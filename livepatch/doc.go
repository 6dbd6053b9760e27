// Package livepatch manages kernel livepatch modules: it validates a module file before the
// kernel sees it, loads it with finit_module(2), follows the patch's transition in
// /sys/kernel/livepatch, names the tasks that block a transition, and disables and unloads
// patches. It is what `hot livepatch` runs.
//
// # Contract
//
//   - [Supported] (and [System.Supported]) returns nil or an error matching [ErrNotSupported]
//     whose message says exactly what the kernel lacks: module loading (no /proc/modules,
//     kernel.modules_disabled=1, finit_module answering ENOSYS/EPERM) or CONFIG_LIVEPATCH (no
//     /sys/kernel/livepatch). Only nil and ErrNotSupported are conclusive, as in cilium/ebpf's
//     features package; other errors mean the probe itself failed. Every operation of
//     [System] calls it first, so on a kernel without livepatch each fails fast with that one
//     line.
//   - [Inspect] reads a module file with debug/elf (ELF relocatable for this machine, every
//     section inside the file, .modinfo and .gnu.linkonce.this_module present) and
//     [Module.Validate] refuses what the kernel must not get: a module without livepatch=Y,
//     a vermagic for another kernel release. Refusals are [*ModuleError] values matching
//     [ErrInvalidModule] and one of [ErrNotModule], [ErrTruncated], [ErrNotLivepatch],
//     [ErrVermagic]. The name the patch gets in sysfs is the module name with dashes turned
//     into underscores.
//   - The transition is followed by polling `transition` (the kernel itself retries once a
//     second). When it does not finish within the timeout, the tasks still on the old side
//     are read from /proc/PID/task/TID/patch_state (with comm and the kernel stack from
//     .../stack), reported, and signalled with the kernel's own mechanism (writing 1 to
//     /sys/kernel/livepatch/NAME/signal). If that does not help the result is a
//     [*StalledError] naming the tasks, never a silent hang. `force` is written only when
//     the caller asks for it ([WaitOptions.Force]): it bypasses the consistency model, and
//     the module of a patch forced while being disabled or replaced can never be removed.
//   - A disabled patch cannot be enabled again (the kernel removes its sysfs directory);
//     [System.Enable] only reverses a disable that is still in transition and otherwise says
//     to unload and load again. [System.Unload] refuses while the sysfs directory exists and
//     refuses modules that are not livepatches (no K taint).
//
// All kernel paths are fields of [System], so tests point them at a fake tree; [Host]
// returns the real one. finit_module and delete_module come from golang.org/x/sys/unix.
package livepatch
