package livepatch_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/internal/testutil"
	"github.com/hotctl/hot/internal/vmtest"
	"github.com/hotctl/hot/livepatch"
)

// guestScript runs the whole livepatch scenario in one boot of Debian's 6.1 kernel. Each
// step prints "=== step"; results the Go side parses are framed by "@@BEGIN name"/"@@END".
const guestScript = `
set -u
fail() { echo "FAIL: $*"; exit 1; }
step() { echo "=== $*"; }
show() { echo "@@BEGIN $1"; cat "$2"; echo "@@END $1"; }
orig=$(cat /proc/cmdline)

step "refusals: each file must be refused before the kernel sees it"
for spec in "plain-mod.ko:not a livepatch module" "lp-wrong-vermagic.ko:module built for another kernel" "lp-truncated.ko:truncated module file"; do
	f=${spec%%:*} want=${spec#*:}
	if hot livepatch load /lp/$f --wait >/tmp/out 2>&1; then cat /tmp/out; fail "$f was loaded"; fi
	cat /tmp/out
	grep -q "$want" /tmp/out || fail "$f: refusal does not say '$want'"
	[ -z "$(cat /proc/modules)" ] || fail "$f: a module was loaded anyway: $(cat /proc/modules)"
done

step "load lp-cmdline"
hot livepatch load /lp/lp-cmdline.ko --wait --timeout 30s --json >/tmp/load.json || fail "load"
show load /tmp/load.json
[ "$(cat /proc/cmdline)" = "hot-livepatch: cmdline patched" ] || fail "/proc/cmdline not patched: $(cat /proc/cmdline)"

step "list"
hot livepatch list --json >/tmp/list.json || fail "list"
show list /tmp/list.json
hot livepatch list
hot livepatch status lp_cmdline
ls /sys/kernel/livepatch/lp_cmdline

step "disable"
hot livepatch disable lp_cmdline --wait --timeout 30s >/tmp/disable.out || fail "disable"
show disable /tmp/disable.out
[ "$(cat /proc/cmdline)" = "$orig" ] || fail "/proc/cmdline not restored: $(cat /proc/cmdline)"
hot livepatch unload lp_cmdline || fail "unload"
[ ! -e /sys/kernel/livepatch/lp_cmdline ] || fail "sysfs entry left after unload"
[ ! -e /sys/module/lp_cmdline ] || fail "module left after unload"

step "atomic replace: lp-cmdline-v2 --replace replaces lp-cmdline and unloads it"
hot livepatch load /lp/lp-cmdline.ko --wait >/dev/null || fail "load lp-cmdline again"
hot livepatch load /lp/lp-cmdline-v2.ko --replace --timeout 30s || fail "load v2 --replace"
[ "$(cat /proc/cmdline)" = "hot-livepatch: cmdline patched v2" ] || fail "v2 text missing: $(cat /proc/cmdline)"
[ ! -e /sys/module/lp_cmdline ] || fail "replaced lp_cmdline still loaded"
hot livepatch disable lp_cmdline_v2 --wait >/dev/null || fail "disable v2"
hot livepatch unload lp-cmdline-v2 || fail "unload v2"
[ "$(cat /proc/cmdline)" = "$orig" ] || fail "/proc/cmdline not restored after v2: $(cat /proc/cmdline)"

step "stalled transition: a task sleeps in the function being patched"
insmod /lp/stall-target.ko || fail "insmod stall-target"
cat /proc/hot_stall >/tmp/stall-reader.out &
reader=$!
i=0
until grep -q hot_stall_wait /proc/$reader/stack 2>/dev/null; do
	i=$((i + 1)); [ $i -lt 100 ] || fail "reader never got into hot_stall_wait"; sleep 0.2
done
if hot livepatch load /lp/lp-stall.ko --wait --timeout 2s >/tmp/stall.out 2>&1; then cat /tmp/stall.out; fail "stalled load reported success"; fi
cat /tmp/stall.out
grep -q "cat pid $reader" /tmp/stall.out || fail "blocked reader (pid $reader) not reported"
grep -q "hot_stall_wait" /tmp/stall.out || fail "blocked reader's stack not reported"
grep -q "signal" /tmp/stall.out || fail "no signal attempt reported"
hot livepatch status lp_stall --json >/tmp/stall-status.json || fail "status during stall"
show stall-status /tmp/stall-status.json
step "reverse the stalled patch while the task still sleeps"
hot livepatch disable lp_stall --wait --timeout 20s || fail "disable (reverse) stalled patch"
hot livepatch unload lp_stall || fail "unload reversed lp_stall"
echo 1 >/proc/hot_stall
wait $reader
rmmod stall_target || fail "rmmod stall_target"

step "unload refuses an ordinary module"
insmod /lp/plain-mod.ko || fail "insmod plain-mod"
if hot livepatch unload plain_mod >/tmp/out 2>&1; then fail "unloaded an ordinary module"; fi
cat /tmp/out
grep -q "not a livepatch" /tmp/out || fail "unload refusal does not say why"
rmmod plain_mod

step "--force finishes a disable stalled by a task in the new code; the module then stays for good (last step)"
insmod /lp/stall-target.ko || fail "insmod stall-target again"
hot livepatch load /lp/lp-stall.ko --wait >/dev/null || fail "load lp-stall with no reader"
cat /proc/hot_stall >/dev/null &
i=0
until grep -q hot_stall_wait_patched /proc/$!/stack 2>/dev/null; do
	i=$((i + 1)); [ $i -lt 100 ] || fail "reader never got into hot_stall_wait_patched"; sleep 0.2
done
hot livepatch disable lp_stall --wait --timeout 1s --force >/tmp/force.out 2>&1 || { cat /tmp/force.out; fail "disable --force"; }
cat /tmp/force.out
grep -q "warning: --force" /tmp/force.out || fail "no warning before forcing"
grep -q "hot_stall_wait_patched" /tmp/force.out || fail "the task in the new code was not reported"
grep -q "FORCED: the module can never be unloaded" /tmp/force.out || fail "result does not say the transition was forced"
[ ! -e /sys/kernel/livepatch/lp_stall ] || fail "patch still in sysfs after the forced disable"
if hot livepatch unload lp_stall >/tmp/out 2>&1; then fail "unloaded the module of a force-disabled patch"; fi
cat /tmp/out
grep -q "forced" /tmp/out || fail "unload refusal does not mention the forced transition"
echo "ALL OK"
exit 0
`

func TestLivepatchInVM(t *testing.T) {
	k := vmtest.Require(t, true)
	if ok, err := k.ConfigEnabled("CONFIG_LIVEPATCH"); err != nil || !ok {
		t.Skipf("VM kernel %s has no CONFIG_LIVEPATCH (err %v)", k.Release, err)
	}
	ctx := context.Background()
	build := t.TempDir()
	start := time.Now()
	if err := vmtest.BuildModules(ctx, k, filepath.Join("testdata", "modules"), build); err != nil {
		t.Fatal(err)
	}
	t.Logf("built test modules against %s in %s", k.Headers, time.Since(start).Round(time.Millisecond))
	ko := func(name string) string { return filepath.Join(build, name+".ko") }

	good, err := os.ReadFile(ko("lp-cmdline"))
	if err != nil {
		t.Fatal(err)
	}
	// Same length, other release: with MODVERSIONS the kernel itself might accept it.
	wrongRel := "0" + k.Release[1:]
	wrong := bytes.Replace(good, []byte("vermagic="+k.Release), []byte("vermagic="+wrongRel), 1)
	if bytes.Equal(wrong, good) {
		t.Fatalf("vermagic=%s not found in lp-cmdline.ko", k.Release)
	}
	fixtures := map[string][]byte{"lp-wrong-vermagic.ko": wrong, "lp-truncated.ko": good[:len(good)/2]}
	for name, data := range fixtures {
		if err := os.WriteFile(filepath.Join(build, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var files []vmtest.File
	for _, name := range []string{"lp-cmdline", "lp-cmdline-v2", "plain-mod", "stall-target", "lp-stall", "lp-wrong-vermagic", "lp-truncated"} {
		files = append(files, vmtest.File{Src: ko(name), Dst: "/lp/" + name + ".ko"})
	}

	// HOT_VM_CPUS=1 measures transitions on one CPU (facts.md: < 10 ms there vs ~1 s on 2).
	cpus := 2
	if n, err := strconv.Atoi(os.Getenv("HOT_VM_CPUS")); err == nil && n > 0 {
		cpus = n
	}
	res, err := vmtest.Run(ctx, vmtest.Config{
		Kernel:  k.Image,
		CPUs:    cpus,
		Hot:     testutil.HotBinary(t),
		Files:   files,
		Script:  guestScript,
		Timeout: 6 * time.Minute,
	})
	if res != nil {
		t.Logf("guest console:\n%s", strings.ReplaceAll(res.Console, "\r", ""))
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("VM run (boot + scenario) took %s", res.Duration.Round(100*time.Millisecond))
	if res.Status != 0 {
		t.Fatalf("guest scenario failed with status %d (see the console above)", res.Status)
	}
	console := strings.ReplaceAll(res.Console, "\r", "")

	var load livepatch.LoadResult
	if err := json.Unmarshal([]byte(framed(t, console, "load")), &load); err != nil {
		t.Fatalf("parse load result: %v", err)
	}
	if load.Transition == nil || load.Transition.Signalled || load.Transition.Forced {
		t.Fatalf("load transition = %+v, want a plain finished transition", load.Transition)
	}
	var list []livepatch.Patch
	if err := json.Unmarshal([]byte(framed(t, console, "list")), &list); err != nil {
		t.Fatalf("parse list: %v", err)
	}
	if len(list) != 1 || list[0].Name != "lp_cmdline" || !list[0].Enabled || list[0].Transition {
		t.Fatalf("list = %+v, want lp_cmdline enabled with the transition finished", list)
	}
	if len(list[0].Objects) != 1 || list[0].Objects[0].Name != "vmlinux" || len(list[0].Objects[0].Functions) != 1 ||
		list[0].Objects[0].Functions[0].Name != "cmdline_proc_show" {
		t.Errorf("list shows objects %+v, want vmlinux:cmdline_proc_show", list[0].Objects)
	}
	var stall livepatch.Status
	if err := json.Unmarshal([]byte(framed(t, console, "stall-status")), &stall); err != nil {
		t.Fatalf("parse stall status: %v", err)
	}
	if stall.Patch == nil || !stall.Patch.Transition || len(stall.BlockedTasks) == 0 {
		t.Errorf("status during the stall = %+v, want a transition with blocked tasks", stall)
	}
	t.Logf("transition times in the VM (-smp %d, TCG): enable %s (finit_module %s); %s",
		cpus, load.Transition.Duration.Round(time.Millisecond), load.LoadTime.Round(time.Millisecond),
		strings.TrimSpace(framed(t, console, "disable")))
}

// framed returns the text the guest printed between "@@BEGIN name" and "@@END name".
func framed(t *testing.T, console, name string) string {
	t.Helper()
	_, rest, ok := strings.Cut(console, "@@BEGIN "+name+"\n")
	if !ok {
		t.Fatalf("guest printed no %s result", name)
	}
	body, _, ok := strings.Cut(rest, "@@END "+name+"\n")
	if !ok {
		t.Fatalf("guest's %s result is not terminated", name)
	}
	return body
}
