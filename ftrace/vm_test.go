package ftrace_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/internal/testutil"
	"github.com/hotctl/hot/internal/vmtest"
)

// vmScript runs inside a qemu guest booted with Debian 12's 6.1 kernel, which allows BPF
// trampolines and has BPF LSM active. Every step prints a marker; the first failing check
// exits with its own status so the Go side can say which one broke.
const vmScript = `
fail() { echo "VMTEST-FAIL: $2"; hot hotfix list; exit $1; }
hot hotfix probe || fail 10 "probe"
hot hotfix probe --json | grep -A1 '"mechanism": "fmod_ret"' | grep -q '"supported": true' || fail 11 "fmod_ret not supported in the VM"

# fentry counter: every open goes through security_file_open.
hot hotfix apply count:func=security_file_open --name opens || fail 20 "apply fentry counter"
cat /proc/version >/dev/null; cat /proc/cmdline >/dev/null
hot hotfix list --json | grep -q '"hits": [1-9]' || fail 21 "fentry counter did not count"
echo VMTEST-OK: fentry counts
hot hotfix remove opens || fail 22 "remove counter"
hot hotfix apply count:func=security_file_open,mech=fexit --name opens-exit || fail 23 "apply fexit counter"
cat /proc/version >/dev/null
hot hotfix list --json | grep -q '"hits": [1-9]' || fail 24 "fexit counter did not count"
hot hotfix remove opens-exit || fail 25 "remove fexit counter"
echo VMTEST-OK: fexit counts

echo secret > /tmp/secret
for mech in fmod_ret lsm; do
	hot hotfix apply open-deny:path=/tmp/secret,comm=cat,mech=$mech --name nocat || fail 30 "apply open-deny $mech"
	if cat /tmp/secret; then fail 31 "cat could open /tmp/secret under open-deny $mech"; fi
	head -n1 /tmp/secret | grep -q secret || fail 32 "head could not read /tmp/secret (fix not narrow) $mech"
	cat /proc/version >/dev/null || fail 33 "cat could not open another file $mech"
	hot hotfix list --json | grep -q '"hits": [1-9]' || fail 34 "open-deny $mech counted no hit"
	hot hotfix remove nocat || fail 35 "remove open-deny $mech"
	cat /tmp/secret | grep -q secret || fail 36 "cat still denied after remove ($mech)"
	echo "VMTEST-OK: open-deny via $mech denies, is narrow, reverts"
done

# hook-deny on an LSM hook chosen by name (security_path_mkdir), for one comm.
hot hotfix apply hook-deny:hook=path_mkdir,comm=mkdir,errno=EACCES --name nomkdir || fail 40 "apply hook-deny"
if mkdir /tmp/d1; then fail 41 "mkdir succeeded under hook-deny"; fi
hot hotfix remove nomkdir || fail 42 "remove hook-deny"
mkdir /tmp/d1 || fail 43 "mkdir still denied after remove"
echo VMTEST-OK: hook-deny

# Bad specs are refused before loading: exit status 2.
hot hotfix apply hook-deny:hook=inode_free,comm=x; [ $? -eq 2 ] || fail 50 "void hook not refused"
hot hotfix apply count:func=hot_no_such_function; [ $? -eq 2 ] || fail 51 "unknown function not refused"
[ -z "$(ls /sys/fs/bpf/hot)" ] || fail 52 "pins left behind"
echo VMTEST-OK: all
exit 0
`

// TestTrampolineFixesInVM proves the trampoline kinds on a kernel that allows them (this
// host's kernel refuses them): fentry and fexit counters count, open-deny through fmod_ret and
// through BPF LSM makes cat fail on one file while other commands and files are untouched
// and reverts on remove, and hook-deny changes an LSM hook's result for one comm.
func TestTrampolineFixesInVM(t *testing.T) {
	k := vmtest.Require(t, false)
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	res, err := vmtest.Run(ctx, vmtest.Config{
		Kernel:  k.Image,
		Hot:     testutil.HotBinary(t),
		Script:  vmScript,
		Timeout: 8 * time.Minute,
		Memory:  "1G",
	})
	if err != nil {
		t.Fatalf("boot VM: %v", err)
	}
	t.Logf("VM run: %s; console:\n%s", res.Duration.Round(time.Second), res.Console)
	if res.Status != 0 {
		t.Fatalf("guest script failed with status %d; console:\n%s", res.Status, res.Console)
	}
	for _, want := range []string{"VMTEST-OK: fentry counts", "VMTEST-OK: fexit counts", "VMTEST-OK: open-deny via fmod_ret", "VMTEST-OK: open-deny via lsm", "VMTEST-OK: hook-deny", "VMTEST-OK: all"} {
		if !strings.Contains(res.Console, want) {
			t.Errorf("console lacks %q:\n%s", want, res.Console)
		}
	}
}
