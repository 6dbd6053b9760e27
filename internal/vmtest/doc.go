// Package vmtest boots a Linux kernel under qemu (TCG) with a generated busybox initramfs,
// runs a shell script inside the guest and returns the script's exit status. Tests use it for
// kernel features the host kernel lacks (livepatch, module loading, BPF trampolines).
//
// # Contract
//
//   - [FindKernel] locates the kernel cached by scripts/vm-kernel.sh (Debian 12's own
//     linux-image, unpacked, never installed) under $HOT_VM_KERNEL_CACHE or
//     /var/cache/hot/vm-kernel, and the matching headers under /lib/modules/RELEASE/build.
//   - [Require] is the test-side wrapper: it skips the test, naming what is missing (qemu,
//     busybox-static, the kernel cache, the headers, root, -short mode), and returns the kernel.
//   - [BuildModules] builds out-of-tree modules from a source directory against those headers
//     into a fresh directory (`make -C /lib/modules/RELEASE/build M=DIR`), so build products
//     never land in the source tree.
//   - [Run] writes an initramfs (cpio newc, written here in Go so that /dev/console can be
//     created without mknod on the host): /bin/busybox from busybox-static with its applet
//     links, the caller's files (Config.Files; Config.Hot is installed as /bin/hot and must be
//     a static binary, i.e. built with CGO_ENABLED=0), the guest script as /vmtest/script.sh,
//     and an /init that mounts proc, sysfs, devtmpfs and tmpfs, runs the script with busybox
//     sh (add `set -e` in the script if you want it), and reports its exit status through qemu's
//     isa-debug-exit device at I/O port 0xf4 (written via /dev/port). qemu then exits with
//     (status<<1)|1, which Run decodes back into Result.Status.
//   - qemu runs with `-accel tcg` (the reference hosts' /dev/kvm is paravirtual and unusable),
//     `-nographic -nic none -no-reboot`, and `panic=-1 oops=panic` on the kernel command line,
//     so a guest panic ends the VM at once. A qemu exit status of 0 means panic or poweroff:
//     Run returns an error then, never a verdict. Config.Timeout (default 5 min) kills qemu.
//   - The console (serial ttyS0) is captured whole in Result.Console and, when Config.Console
//     is set, copied there live (e.g. a t.Log writer) so slow boots are visible.
//
// # Use
//
//	func TestSomethingInVM(t *testing.T) {
//		k := vmtest.Require(t, false) // true when the test builds modules
//		res, err := vmtest.Run(context.Background(), vmtest.Config{
//			Kernel: k.Image,
//			Hot:    testutil.HotBinary(t), // CGO_ENABLED=0 build
//			Files:  []vmtest.File{{Src: "testdata/fix.json", Dst: "/data/fix.json"}},
//			Script: "set -e\nhot hotfix probe\necho '@@BEGIN out'; cat /tmp/out; echo '@@END out'\n",
//		})
//		if err != nil { t.Fatal(err) }         // no verdict: boot failure, panic, timeout
//		if res.Status != 0 { t.Fatalf("guest failed:\n%s", res.Console) }
//	}
//
// The guest has busybox (sh, insmod, rmmod, dd, grep, ...), /proc, /sys, /dev (devtmpfs) and
// a tmpfs /tmp; there is no network (-nic none). Frame what the host should parse with
// markers, as livepatch/vm_test.go does, since kernel messages can interleave on the console.
// The kernel's .config is at Kernel.Config ([Kernel.ConfigEnabled] checks an option).
//
// Statuses 0..127 travel through the port unchanged; larger ones are reported as 127.
// One boot takes 6–12 s of TCG on the reference machine: put a whole scenario in one script.
package vmtest
