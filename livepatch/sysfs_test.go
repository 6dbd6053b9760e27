package livepatch

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeKernel is a System over a temp tree: /sys/kernel/livepatch, /sys/module and /proc.
type fakeKernel struct {
	t    *testing.T
	root string
	sys  *System
}

func newFakeKernel(t *testing.T) *fakeKernel {
	root := t.TempDir()
	k := &fakeKernel{t: t, root: root, sys: &System{
		LivepatchDir: filepath.Join(root, "sys/kernel/livepatch"),
		ModuleDir:    filepath.Join(root, "sys/module"),
		ProcDir:      filepath.Join(root, "proc"),
		Release:      testRelease,
		PollInterval: 5 * time.Millisecond,
		LoadModule:   func(*os.File, string) error { return errors.New("unexpected load") },
		DeleteModule: func(string) error { return errors.New("unexpected delete") },
	}}
	k.write("proc/modules", "")
	k.write("proc/sys/kernel/modules_disabled", "0\n")
	must(t, os.MkdirAll(k.sys.LivepatchDir, 0o755))
	must(t, os.MkdirAll(k.sys.ModuleDir, 0o755))
	return k
}

func (k *fakeKernel) write(rel, content string) {
	k.t.Helper()
	p := filepath.Join(k.root, rel)
	must(k.t, os.MkdirAll(filepath.Dir(p), 0o755))
	// Atomic, like a sysfs read: pollers never see a half-written value.
	must(k.t, os.WriteFile(p+".tmp", []byte(content), 0o644))
	must(k.t, os.Rename(p+".tmp", p))
}

func (k *fakeKernel) read(rel string) string {
	b, _ := os.ReadFile(filepath.Join(k.root, rel))
	return string(b)
}

// addPatch creates a patch directory the way the kernel lays it out, and its module.
func (k *fakeKernel) addPatch(name string, enabled, transition bool, objects map[string][]string) {
	d := "sys/kernel/livepatch/" + name + "/"
	k.write(d+"enabled", b01(enabled))
	k.write(d+"transition", b01(transition))
	k.write(d+"force", "")
	for obj, funcs := range objects {
		k.write(d+obj+"/patched", "1\n")
		for _, f := range funcs {
			must(k.t, os.MkdirAll(filepath.Join(k.root, d+obj, f), 0o755))
		}
	}
	k.write("sys/module/"+name+"/taint", "OEK\n")
}

func (k *fakeKernel) addTask(pid, tid int, comm string, state int, stack string) {
	d := filepath.Join("proc", strconv.Itoa(pid), "task", strconv.Itoa(tid))
	k.write(d+"/comm", comm+"\n")
	k.write(d+"/patch_state", strconv.Itoa(state)+"\n")
	k.write(d+"/stack", stack)
}

func b01(b bool) string {
	if b {
		return "1\n"
	}
	return "0\n"
}

func TestListParsesSysfs(t *testing.T) {
	k := newFakeKernel(t)
	k.addPatch("lp_b", false, true, map[string][]string{"stall_target": {"hot_stall_wait,1"}})
	k.write("sys/kernel/livepatch/lp_b/replace", "1\n")
	k.addPatch("lp_a", true, false, map[string][]string{"vmlinux": {"cmdline_proc_show,1", "meminfo_proc_show,2"}})
	ps, err := k.sys.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 2 || ps[0].Name != "lp_a" || ps[1].Name != "lp_b" {
		t.Fatalf("List = %+v, want lp_a, lp_b", ps)
	}
	a, b := ps[0], ps[1]
	if !a.Enabled || a.Transition || a.Replace != nil || a.Target() != Enabled {
		t.Errorf("lp_a = %+v", a)
	}
	if len(a.Objects) != 1 || a.Objects[0].Name != "vmlinux" || a.Objects[0].Patched == nil || !*a.Objects[0].Patched {
		t.Fatalf("lp_a objects = %+v", a.Objects)
	}
	if fs := a.Objects[0].Functions; len(fs) != 2 || fs[0] != (Function{"cmdline_proc_show", 1}) || fs[1] != (Function{"meminfo_proc_show", 2}) {
		t.Errorf("lp_a functions = %+v", fs)
	}
	if b.Enabled || !b.Transition || b.Replace == nil || !*b.Replace || b.Target() != Disabled {
		t.Errorf("lp_b = %+v", b)
	}
	if _, err := k.sys.Get("lp-c"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(missing) = %v, want ErrNotFound", err)
	}
	if p, err := k.sys.Get("lp-a"); err != nil || p.Name != "lp_a" {
		t.Errorf("Get(lp-a) = %v, %v: dashes should map to the sysfs name", p, err)
	}
}

const stallStack = "[<0>] __schedule+0x2f0/0x870\n[<0>] schedule+0x5a/0xd0\n[<0>] hot_stall_wait+0x81/0xc0 [stall_target]\n[<0>] hot_stall_read+0x24/0x74 [stall_target]\n"

func TestBlockedTasks(t *testing.T) {
	k := newFakeKernel(t)
	k.addTask(1, 1, "init", 1, "")
	k.addTask(55, 55, "cat", 0, stallStack)
	k.addTask(60, 60, "worker", 1, "")
	k.addTask(60, 61, "worker-t2", 0, "[<0>] do_nanosleep+0x1/0x2\n")
	k.addTask(70, 70, "idle-ish", -1, "")
	tasks, err := k.sys.BlockedTasks(Enabled)
	if err != nil {
		t.Fatal(err)
	}
	if len(tasks) != 2 || tasks[0].PID != 55 || tasks[0].Comm != "cat" || tasks[1].TID != 61 {
		t.Fatalf("BlockedTasks = %+v, want cat 55 and worker thread 61", tasks)
	}
	if len(tasks[0].Stack) != 4 || tasks[0].Stack[2] != "hot_stall_wait+0x81/0xc0 [stall_target]" {
		t.Errorf("stack = %q", tasks[0].Stack)
	}
	sum := TaskSummary(tasks, 5)
	if !strings.Contains(sum, "cat (pid 55) in hot_stall_wait+0x81/0xc0 [stall_target]") || !strings.Contains(sum, "worker-t2 (pid 60 tid 61)") {
		t.Errorf("summary %q", sum)
	}
	if back, _ := k.sys.BlockedTasks(Disabled); len(back) != 2 || back[0].PID != 1 {
		t.Errorf("BlockedTasks(Disabled) = %+v, want init and worker 60", back)
	}
}

func TestSupportedReasons(t *testing.T) {
	k := newFakeKernel(t)
	if err := k.sys.Supported(); err != nil {
		t.Fatalf("Supported on a complete fake = %v", err)
	}
	k.write("proc/sys/kernel/modules_disabled", "1\n")
	err := k.sys.Supported()
	if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "modules_disabled=1") {
		t.Errorf("modules_disabled: %v", err)
	}
	must(t, os.Remove(filepath.Join(k.root, "proc/modules")))
	must(t, os.RemoveAll(k.sys.LivepatchDir))
	err = k.sys.Supported()
	var nse *NotSupportedError
	if !errors.As(err, &nse) || len(nse.Reasons) != 2 {
		t.Fatalf("no modules, no livepatch: %v, want two reasons", err)
	}
	for _, want := range []string{"CONFIG_MODULES", "CONFIG_LIVEPATCH"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q lacks %s", err, want)
		}
	}
	if _, err := k.sys.List(); !errors.Is(err, ErrNotSupported) {
		t.Errorf("List on unsupported kernel = %v", err)
	}
	if err := k.sys.Unload(context.Background(), "x"); !errors.Is(err, ErrNotSupported) {
		t.Errorf("Unload on unsupported kernel = %v", err)
	}
}

func TestLoadFollowsTransition(t *testing.T) {
	k := newFakeKernel(t)
	ko := writeFile(t, "lp-cmdline.ko", goodModule(t))
	var gotParams string
	k.sys.LoadModule = func(f *os.File, params string) error {
		gotParams = params
		k.addPatch("lp_cmdline", true, true, map[string][]string{"vmlinux": {"cmdline_proc_show,1"}})
		go func() {
			time.Sleep(60 * time.Millisecond)
			k.write("sys/kernel/livepatch/lp_cmdline/transition", "0\n")
		}()
		return nil
	}
	var events []Event
	res, err := k.sys.Load(context.Background(), ko, LoadOptions{Params: "x=1", Wait: WaitOptions{Timeout: 5 * time.Second, Progress: func(e Event) { events = append(events, e) }}})
	if err != nil {
		t.Fatal(err)
	}
	if gotParams != "x=1" || res.Transition == nil || res.Transition.Duration < 50*time.Millisecond || res.Transition.Signalled {
		t.Errorf("Load = %+v (params %q)", res.Transition, gotParams)
	}
	if res.Patch == nil || !res.Patch.Enabled || res.Patch.Transition {
		t.Errorf("patch after load = %+v", res.Patch)
	}
	if len(events) == 0 || events[0].Kind != EventWaiting {
		t.Errorf("events = %+v, want waiting progress", events)
	}
	// Loading it again is refused before finit_module.
	if _, err := k.sys.Load(context.Background(), ko, LoadOptions{}); err == nil || !strings.Contains(err.Error(), "already loaded") {
		t.Errorf("second Load = %v, want already loaded", err)
	}
}

func TestLoadReplaceUnloadsReplacedPatches(t *testing.T) {
	k := newFakeKernel(t)
	k.addPatch("lp_old", true, false, nil)
	k.addPatch("lp_other", true, false, nil)
	ko := writeFile(t, "lp-cmdline.ko", goodModule(t))
	k.sys.LoadModule = func(*os.File, string) error {
		k.addPatch("lp_cmdline", true, true, nil)
		go func() {
			time.Sleep(30 * time.Millisecond)
			// What the kernel does when an atomic-replace transition completes: the replaced
			// patch is disabled at once and its directory removed a little later. (lp_other
			// plays a patch that stays, as if the new one were not a replace patch for it.)
			k.write("sys/kernel/livepatch/lp_old/enabled", "0\n")
			k.write("sys/kernel/livepatch/lp_cmdline/transition", "0\n")
			time.Sleep(30 * time.Millisecond)
			os.RemoveAll(filepath.Join(k.sys.LivepatchDir, "lp_old"))
		}()
		return nil
	}
	var deleted []string
	k.sys.DeleteModule = func(name string) error { deleted = append(deleted, name); return nil }
	res, err := k.sys.Load(context.Background(), ko, LoadOptions{Replace: true, Wait: WaitOptions{Timeout: 5 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Unloaded) != 1 || res.Unloaded[0] != "lp_old" || len(deleted) != 1 || deleted[0] != "lp_old" {
		t.Errorf("unloaded %v (delete_module %v), want lp_old only", res.Unloaded, deleted)
	}
}

func TestLoadRefusesBeforeLoading(t *testing.T) {
	k := newFakeKernel(t)
	k.sys.Release = "6.18.0-1-amd64"
	_, err := k.sys.Load(context.Background(), writeFile(t, "lp.ko", goodModule(t)), LoadOptions{})
	if !errors.Is(err, ErrVermagic) {
		t.Fatalf("Load = %v, want ErrVermagic (and LoadModule never called)", err)
	}
}

func TestLoadRefusesWhileAnotherPatchIsInTransition(t *testing.T) {
	k := newFakeKernel(t)
	k.addPatch("lp_old", false, true, nil)
	_, err := k.sys.Load(context.Background(), writeFile(t, "lp.ko", goodModule(t)), LoadOptions{})
	if err == nil || !strings.Contains(err.Error(), "lp_old is still in transition to disabled") {
		t.Fatalf("Load = %v, want a refusal naming lp_old (and LoadModule never called)", err)
	}
}

func TestStalledTransitionReportsSignalsAndForces(t *testing.T) {
	k := newFakeKernel(t)
	k.addPatch("lp_stall", true, true, map[string][]string{"stall_target": {"hot_stall_wait,1"}})
	k.write("sys/kernel/livepatch/lp_stall/signal", "")
	k.addTask(55, 55, "cat", 0, stallStack)
	var mu sync.Mutex
	var kinds []EventKind
	o := WaitOptions{Timeout: 30 * time.Millisecond, SignalGrace: 30 * time.Millisecond, Progress: func(e Event) {
		mu.Lock()
		kinds = append(kinds, e.Kind)
		mu.Unlock()
	}}
	tr, err := k.sys.WaitTransition(context.Background(), "lp_stall", Enabled, o)
	var se *StalledError
	if !errors.As(err, &se) || !errors.Is(err, ErrStalled) {
		t.Fatalf("WaitTransition = %v, want StalledError", err)
	}
	if len(se.Tasks) != 1 || se.Tasks[0].PID != 55 || !se.Signalled || !tr.Signalled || tr.Forced {
		t.Errorf("stalled = %+v, transition %+v", se, tr)
	}
	if !strings.Contains(err.Error(), "cat (pid 55) in hot_stall_wait") || !strings.Contains(err.Error(), "--force") {
		t.Errorf("message %q does not name the task and the way out", err)
	}
	if got := k.read("sys/kernel/livepatch/lp_stall/signal"); got != "1" {
		t.Errorf("signal file = %q, want 1 written", got)
	}
	if got := k.read("sys/kernel/livepatch/lp_stall/force"); got != "" {
		t.Errorf("force written without Force: %q", got)
	}
	mu.Lock()
	if !contains(kinds, EventBlocked) || !contains(kinds, EventSignalled) {
		t.Errorf("events %v, want blocked and signalled", kinds)
	}
	mu.Unlock()

	o.Force = true
	tr, err = k.sys.WaitTransition(context.Background(), "lp_stall", Enabled, o)
	if !errors.Is(err, ErrStalled) || !tr.Forced || k.read("sys/kernel/livepatch/lp_stall/force") != "1" {
		t.Errorf("with Force: err %v, transition %+v, force file %q", err, tr, k.read("sys/kernel/livepatch/lp_stall/force"))
	}
}

func contains(ks []EventKind, k EventKind) bool {
	for _, x := range ks {
		if x == k {
			return true
		}
	}
	return false
}

func TestDisableWaitsUntilGoneThenUnload(t *testing.T) {
	k := newFakeKernel(t)
	k.addPatch("lp_cmdline", true, false, map[string][]string{"vmlinux": {"cmdline_proc_show,1"}})
	ctx := context.Background()
	if err := k.sys.Unload(ctx, "lp_cmdline"); err == nil || !strings.Contains(err.Error(), "disable lp_cmdline --wait") {
		t.Fatalf("Unload of an enabled patch = %v, want a refusal naming disable", err)
	}
	go func() {
		time.Sleep(50 * time.Millisecond)
		os.RemoveAll(filepath.Join(k.sys.LivepatchDir, "lp_cmdline"))
	}()
	tr, err := k.sys.Disable(ctx, "lp-cmdline", &WaitOptions{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if tr.Target != Disabled || tr.Duration < 40*time.Millisecond {
		t.Errorf("Disable transition = %+v", tr)
	}
	if _, err := k.sys.Enable(ctx, "lp_cmdline", nil); err == nil || !strings.Contains(err.Error(), "unload lp_cmdline") {
		t.Errorf("Enable of a disabled patch = %v, want advice to unload and load", err)
	}
	var deleted string
	k.sys.DeleteModule = func(name string) error { deleted = name; return nil }
	if err := k.sys.Unload(ctx, "lp_cmdline"); err != nil || deleted != "lp_cmdline" {
		t.Errorf("Unload = %v, deleted %q", err, deleted)
	}
}

func TestDisableWritesEnabledZero(t *testing.T) {
	k := newFakeKernel(t)
	k.addPatch("lp_x", true, true, nil) // enable still in transition: disable reverses it
	if _, err := k.sys.Disable(context.Background(), "lp_x", nil); err != nil {
		t.Fatal(err)
	}
	if got := k.read("sys/kernel/livepatch/lp_x/enabled"); got != "0" {
		t.Errorf("enabled = %q, want 0 written", got)
	}
}

func TestUnloadRefusesOrdinaryModule(t *testing.T) {
	k := newFakeKernel(t)
	k.write("sys/module/plain_mod/taint", "OE\n")
	err := k.sys.Unload(context.Background(), "plain-mod")
	if err == nil || !strings.Contains(err.Error(), "not a livepatch") {
		t.Errorf("Unload(plain-mod) = %v, want refusal", err)
	}
	if err := k.sys.Unload(context.Background(), "nothing"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Unload(nothing) = %v, want ErrNotFound", err)
	}
}
