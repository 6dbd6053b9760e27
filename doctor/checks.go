package doctor

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/isolation/seccompbpf"
	"github.com/hotctl/hot/sockets"
	"golang.org/x/sys/unix"
)

// postCopyPipeBytes is the pipe size CRIU's page server asks for during post-copy
// (measured: 3.3 MB; facts.md). Below it, lazy migration fails with "page-pipe: splice".
const postCopyPipeBytes = 4 << 20

func builtinCheckers() []Checker {
	return []Checker{
		{Name: "kernel", Run: checkKernel},
		{Name: "criu", Required: true, Run: checkCRIU},
		{Name: "cgroups", Run: checkCgroupMode},
		{Name: "freezer", Required: true, Run: checkFreezer},
		{Name: "overlayfs", Required: true, Run: checkOverlay},
		{Name: "namespaces", Required: true, Run: checkNamespaces},
		{Name: "nftables", Run: checkCLI("nft", "--version", "apt-get install nftables")},
		{Name: "iptables", Run: checkCLI("iptables", "--version", "apt-get install iptables")},
		{Name: "userfaultfd", Run: checkUserfaultfd},
		{Name: "soft-dirty", Run: checkSoftDirty},
		{Name: "pipe-max-size", Run: checkPipeMax},
		{Name: "btf", Run: checkBTF},
		{Name: "seccomp", Run: checkSeccomp},
		{Name: "packet-hold", Run: checkPacketHold},
		{Name: "criu-kdat-cache", Run: checkKdatCache},
		{Name: "conntrack-table", Run: checkConntrackTable},
	}
}

// conntrackBucketsFile is the size of the host's conntrack hash table.
const conntrackBucketsFile = "/proc/sys/net/netfilter/nf_conntrack_buckets"

// conntrackQuickBuckets is the table size up to which CRIU's walk costs a dump little.
const conntrackQuickBuckets = 65536

// checkConntrackTable: every CRIU dump of a network namespace, even one CRIU keeps as
// external (as hot's containers'), dumps the conntrack and expectation tables through
// ctnetlink, which walks the whole global hash table each time: ~12 ms per walk at 262144
// buckets on the reference host, ~24 ms of every update's pause. Sized by the kernel from RAM;
// hot does not change it.
func checkConntrackTable(ctx context.Context, o *Options) Result {
	s, err := readTrim(conntrackBucketsFile)
	if err != nil {
		return ok("no conntrack table loaded: nothing for CRIU to walk at a dump")
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return missing("", "parse %s %q: %v", conntrackBucketsFile, s, err)
	}
	if n > conntrackQuickBuckets {
		return limited("sysctl -w net.netfilter.nf_conntrack_buckets=16384 (if this host tracks few connections)",
			"the conntrack table has %d buckets: CRIU walks all of them twice in every dump (~24 ms of each update's pause at 262144 here; ~20 ms less at 16384, docs/benchmarks.md)", n)
	}
	return ok("the conntrack table has %d buckets: CRIU's two walks per dump are short", n)
}

// checkKdatCache: CRIU keeps its kernel-feature cache in /run/criu.kdat only when /run is a
// tmpfs; elsewhere hot keeps it itself (criubin.Binary.EnsureKdatCache, bound to the boot id),
// else every CRIU call (dump, restore, lazy-pages) would probe the kernel again, ~40 ms each on
// the reference host, inside every update's pause.
func checkKdatCache(ctx context.Context, o *Options) Result {
	var st unix.Statfs_t
	if err := unix.Statfs("/run", &st); err != nil {
		return missing("", "statfs /run: %v", err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		return ok("/run is a tmpfs: CRIU caches its kernel checks in %s", criubin.KdatCachePath)
	}
	b, err := criubin.Find(ctx, o.CRIUPath)
	if err != nil {
		return limited("see the criu line", "/run is not a tmpfs: hot keeps CRIU's kernel-check cache %s itself, but found no CRIU (%v)", criubin.KdatCachePath, err)
	}
	ks, err := b.KdatCacheStatus()
	if err != nil {
		return limited("check that hot runs as root and /run is writable", "/run is not a tmpfs and hot cannot keep CRIU's kernel-check cache there: %v", err)
	}
	const kept = "/run is not a tmpfs, so CRIU keeps no kernel-check cache; hot keeps %s itself, bound to this boot (boot id %s) and CRIU %s: "
	switch ks.State {
	case criubin.KdatCurrent:
		return ok(kept+"current", criubin.KdatCachePath, ks.BootID, b.Version)
	case criubin.KdatNotRoot:
		return limited("run hot as root", "/run is not a tmpfs: only root can keep CRIU's kernel-check cache %s there", criubin.KdatCachePath)
	case criubin.KdatStale:
		return ok(kept+"stale (%s), rewritten before hot's next CRIU dump or restore", criubin.KdatCachePath, ks.BootID, b.Version, ks.Reason)
	default:
		return ok(kept+"none yet, written before hot's next CRIU dump or restore (~60 ms, once per boot)", criubin.KdatCachePath, ks.BootID, b.Version)
	}
}

func allCheckers() []Checker {
	cs := builtinCheckers()
	cs = append(cs, bpfCheckers()...)
	return append(cs, Checker{Name: "livepatch", Run: checkLivepatch})
}

func checkKernel(ctx context.Context, _ *Options) Result {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return missing("", "uname: %v", err)
	}
	return ok("Linux %s %s", unix.ByteSliceToString(u.Release[:]), unix.ByteSliceToString(u.Machine[:]))
}

func checkCRIU(ctx context.Context, o *Options) Result {
	b, err := criubin.Find(ctx, o.CRIUPath)
	if err != nil {
		return missing("run `make deps` (installs CRIU 4.2 privately) or pass --criu PATH", "%v", err)
	}
	last, err := b.Check(ctx)
	if err != nil {
		return missing("see `"+b.Path+" check` for details", "criu %s at %s (%s): %v", b.Version, b.Path, b.Source, err)
	}
	return ok("criu %s at %s (%s); criu check: %s", b.Version, b.Path, b.Source, last)
}

// cgroupMounts returns mount point → fstype/options for cgroup filesystems.
func cgroupMounts() (map[string]string, error) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m := map[string]string{}
	s := bufio.NewScanner(f)
	for s.Scan() {
		fs := strings.Fields(s.Text())
		if len(fs) >= 4 && (fs[2] == "cgroup" || fs[2] == "cgroup2") {
			m[fs[1]] = fs[2] + " " + fs[3]
		}
	}
	return m, s.Err()
}

func checkCgroupMode(ctx context.Context, _ *Options) Result {
	m, err := cgroupMounts()
	if err != nil {
		return missing("", "read mounts: %v", err)
	}
	var v1, v2 []string
	for mp, desc := range m {
		if strings.HasPrefix(desc, "cgroup2") {
			v2 = append(v2, mp)
		} else {
			v1 = append(v1, filepath.Base(mp))
		}
	}
	switch {
	case len(v1) > 0 && len(v2) > 0:
		return ok("hybrid: v1 controllers %s; cgroup2 at %s", strings.Join(sortStrings(v1), ","), strings.Join(v2, ","))
	case len(v2) > 0:
		return ok("v2 (unified) at %s", strings.Join(v2, ","))
	case len(v1) > 0:
		return ok("v1: %s", strings.Join(sortStrings(v1), ","))
	}
	return missing("mount cgroup2 on /sys/fs/cgroup", "no cgroup filesystem mounted")
}

func sortStrings(s []string) []string {
	slices.Sort(s)
	return s
}

// checkFreezer freezes and thaws a scratch cgroup in every hierarchy that offers a freezer.
func checkFreezer(ctx context.Context, _ *Options) Result {
	m, err := cgroupMounts()
	if err != nil {
		return missing("", "read mounts: %v", err)
	}
	var works, broken []string
	for mp, desc := range m {
		switch {
		case strings.HasPrefix(desc, "cgroup2"):
			if err := tryFreezeV2(ctx, mp); err != nil {
				broken = append(broken, fmt.Sprintf("v2 %s: %v", mp, err))
			} else {
				works = append(works, "v2 cgroup.freeze at "+mp)
			}
		case hasOption(desc, "freezer"):
			if err := tryFreezeV1(ctx, mp); err != nil {
				broken = append(broken, fmt.Sprintf("v1 %s: %v", mp, err))
			} else {
				works = append(works, "v1 freezer at "+mp)
			}
		}
	}
	switch {
	case len(works) > 0 && len(broken) == 0:
		return ok("%s (scratch cgroup frozen and thawed)", strings.Join(sortStrings(works), "; "))
	case len(works) > 0:
		return ok("%s work; %s does not", strings.Join(sortStrings(works), "; "), strings.Join(broken, "; "))
	case len(broken) > 0:
		return missing("enable the freezer controller (CONFIG_CGROUP_FREEZER) or cgroup2", "%s", strings.Join(broken, "; "))
	}
	return missing("mount a freezer hierarchy or cgroup2", "no freezer hierarchy mounted")
}

func hasOption(desc, opt string) bool {
	_, opts, _ := strings.Cut(desc, " ")
	for _, o := range strings.Split(opts, ",") {
		if o == opt {
			return true
		}
	}
	return false
}

func scratchName() string { return fmt.Sprintf("hot-doctor-%d", os.Getpid()) }

func tryFreezeV1(ctx context.Context, mount string) error {
	dir := filepath.Join(mount, scratchName())
	if err := os.Mkdir(dir, 0o755); err != nil {
		return err
	}
	defer os.Remove(dir)
	state := filepath.Join(dir, "freezer.state")
	if err := os.WriteFile(state, []byte("FROZEN"), 0); err != nil {
		return err
	}
	if err := waitFile(ctx, state, "FROZEN"); err != nil {
		return err
	}
	if err := os.WriteFile(state, []byte("THAWED"), 0); err != nil {
		return err
	}
	return waitFile(ctx, state, "THAWED")
}

func tryFreezeV2(ctx context.Context, mount string) error {
	dir := filepath.Join(mount, scratchName())
	if err := os.Mkdir(dir, 0o755); err != nil {
		return err
	}
	defer os.Remove(dir)
	if err := os.WriteFile(filepath.Join(dir, "cgroup.freeze"), []byte("1"), 0); err != nil {
		return err
	}
	if err := waitEvent(ctx, filepath.Join(dir, "cgroup.events"), "frozen 1"); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "cgroup.freeze"), []byte("0"), 0)
}

func waitFile(ctx context.Context, path, want string) error {
	deadline := time.Now().Add(2 * time.Second)
	for {
		got, err := readTrim(path)
		if err != nil {
			return err
		}
		if got == want {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s stayed %q, want %q", path, got, want)
		}
		time.Sleep(time.Millisecond)
	}
}

func waitEvent(ctx context.Context, path, line string) error {
	deadline := time.Now().Add(2 * time.Second)
	for {
		got, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if strings.Contains(string(got), line) {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s never showed %q", path, line)
		}
		time.Sleep(time.Millisecond)
	}
}

func checkOverlay(ctx context.Context, o *Options) Result {
	base, err := os.MkdirTemp(o.ScratchDir, "hot-doctor-overlay-")
	if err != nil {
		return missing("", "scratch dir: %v", err)
	}
	defer os.RemoveAll(base)
	for _, d := range []string{"lower", "upper", "work", "merged"} {
		if err := os.Mkdir(filepath.Join(base, d), 0o755); err != nil {
			return missing("", "scratch dir: %v", err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s/lower,upperdir=%s/upper,workdir=%s/work", base, base, base)
	if err := unix.Mount("overlay", filepath.Join(base, "merged"), "overlay", 0, opts); err != nil {
		return missing("load/enable overlayfs (CONFIG_OVERLAY_FS); scratch dirs must not be on overlayfs themselves", "mount a scratch overlay: %v", err)
	}
	if err := unix.Unmount(filepath.Join(base, "merged"), 0); err != nil {
		return limited("", "mounted, but unmount failed: %v", err)
	}
	return ok("scratch overlay mounted and unmounted")
}

func checkNamespaces(ctx context.Context, _ *Options) Result {
	kinds := []struct {
		name string
		flag uintptr
	}{
		{"mnt", unix.CLONE_NEWNS}, {"pid", unix.CLONE_NEWPID}, {"net", unix.CLONE_NEWNET},
		{"uts", unix.CLONE_NEWUTS}, {"ipc", unix.CLONE_NEWIPC}, {"user", unix.CLONE_NEWUSER},
		{"cgroup", unix.CLONE_NEWCGROUP},
	}
	truePath, err := exec.LookPath("true")
	if err != nil {
		return missing("", "need the `true` program to test namespace creation: %v", err)
	}
	var have, lack []string
	required := map[string]bool{"mnt": true, "pid": true, "net": true, "uts": true, "ipc": true}
	var requiredMissing bool
	for _, k := range kinds {
		cmd := exec.CommandContext(ctx, truePath)
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: k.flag}
		if err := cmd.Run(); err != nil {
			lack = append(lack, fmt.Sprintf("%s (%v)", k.name, err))
			requiredMissing = requiredMissing || required[k.name]
			continue
		}
		have = append(have, k.name)
	}
	switch {
	case requiredMissing:
		return missing("enable CONFIG_NAMESPACES and the mnt/pid/net/uts/ipc namespaces", "created: %s; failed: %s", strings.Join(have, ","), strings.Join(lack, ", "))
	case len(lack) > 0:
		return limited("", "created: %s; failed: %s", strings.Join(have, ","), strings.Join(lack, ", "))
	}
	return ok("created %s", strings.Join(have, ","))
}

func checkCLI(name, versionFlag, fix string) func(context.Context, *Options) Result {
	return func(ctx context.Context, _ *Options) Result {
		p, err := exec.LookPath(name)
		if err != nil {
			return missing(fix, "%s not on PATH", name)
		}
		out, err := exec.CommandContext(ctx, p, versionFlag).CombinedOutput()
		if err != nil {
			return missing(fix, "%s %s: %v", p, versionFlag, err)
		}
		return ok("%s (%s)", strings.TrimSpace(firstLine(string(out))), p)
	}
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

func checkUserfaultfd(ctx context.Context, _ *Options) Result {
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if errno != 0 {
		return missing("enable CONFIG_USERFAULTFD; lazy restore and post-copy migration need it", "userfaultfd(): %v", errno)
	}
	unix.Close(int(fd))
	return ok("userfaultfd() works: lazy restore and post-copy migration possible")
}

// checkSoftDirty dirties a page after clearing soft-dirty bits and reads bit 55 of its
// pagemap entry: set means the kernel tracks soft-dirty pages (needed for pre-copy).
func checkSoftDirty(ctx context.Context, _ *Options) Result {
	const fix = "a kernel with CONFIG_MEM_SOFT_DIRTY; until then migrations use stop-and-copy or post-copy (--lazy)"
	page := os.Getpagesize()
	mem, err := unix.Mmap(-1, 0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return missing(fix, "mmap: %v", err)
	}
	defer unix.Munmap(mem)
	mem[0] = 1
	if err := os.WriteFile("/proc/self/clear_refs", []byte("4"), 0); err != nil {
		return missing(fix, "clear soft-dirty bits: %v", err)
	}
	mem[0] = 2
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return missing(fix, "open pagemap: %v", err)
	}
	defer f.Close()
	var entry [8]byte
	addr := uintptr(unsafe.Pointer(&mem[0]))
	if _, err := f.ReadAt(entry[:], int64(addr/uintptr(page))*8); err != nil {
		return missing(fix, "read pagemap: %v", err)
	}
	v := uint64(entry[0]) | uint64(entry[1])<<8 | uint64(entry[2])<<16 | uint64(entry[3])<<24 |
		uint64(entry[4])<<32 | uint64(entry[5])<<40 | uint64(entry[6])<<48 | uint64(entry[7])<<56
	if v&(1<<55) == 0 {
		return missing(fix, "a page written after clearing soft-dirty bits is not marked dirty: no soft-dirty tracking (CRIU pre-dump and --track-mem fail)")
	}
	return ok("soft-dirty tracking works: pre-copy migration possible")
}

func checkPipeMax(ctx context.Context, _ *Options) Result {
	s, err := readTrim("/proc/sys/fs/pipe-max-size")
	if err != nil {
		return missing("", "read fs.pipe-max-size: %v", err)
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return missing("", "parse fs.pipe-max-size %q: %v", s, err)
	}
	if n < postCopyPipeBytes {
		return limited(fmt.Sprintf("sysctl -w fs.pipe-max-size=%d", postCopyPipeBytes),
			"fs.pipe-max-size is %d; CRIU's post-copy page server needs about 3.3 MB pipes (root lacks CAP_SYS_RESOURCE to exceed the limit)", n)
	}
	return ok("fs.pipe-max-size is %d (post-copy needs ~3.3 MB)", n)
}

func checkBTF(ctx context.Context, _ *Options) Result {
	f, err := os.Open("/sys/kernel/btf/vmlinux")
	if err != nil {
		return missing("a kernel with CONFIG_DEBUG_INFO_BTF", "kernel BTF: %v", err)
	}
	defer f.Close()
	var hdr [4]byte
	if _, err := f.Read(hdr[:]); err != nil {
		return missing("a kernel with CONFIG_DEBUG_INFO_BTF", "read kernel BTF: %v", err)
	}
	if hdr[0] != 0x9f || hdr[1] != 0xeb {
		return missing("", "/sys/kernel/btf/vmlinux has no BTF magic")
	}
	return ok("/sys/kernel/btf/vmlinux readable")
}

// checkSeccomp asks the kernel whether it has the seccomp filter actions containers use.
func checkSeccomp(ctx context.Context, _ *Options) Result {
	if err := seccompbpf.Available(); err != nil {
		return missing("a kernel with CONFIG_SECCOMP_FILTER; until then run containers with --security-opt seccomp=unconfined", "%v", err)
	}
	return ok("seccomp filters with ERRNO, KILL_PROCESS and LOG actions: containers get Docker's default profile")
}

// checkPacketHold tries holding packets in a scratch netns (package sockets). Without it hot
// update falls back to CRIU's network lock, whose dropped packets cost clients a retransmission.
func checkPacketHold(ctx context.Context, _ *Options) Result {
	if err := sockets.HoldSupported(ctx); err != nil {
		return limited("hot update falls back to CRIU's network lock (drops packets: clients wait for a TCP retransmission, >= 200 ms); see docs/hold.md", "%v", err)
	}
	return ok("NFQUEUE hold works: packets are held during the pause and released after restore, no retransmission penalty")
}
