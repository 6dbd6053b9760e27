package isolation

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func newSpec() *specs.Spec {
	return &specs.Spec{Process: &specs.Process{Args: []string{"/app"}}, Linux: &specs.Linux{}}
}

func TestApplyDefaults(t *testing.T) {
	s := newSpec()
	if err := Apply(s, Options{}); err != nil {
		t.Fatal(err)
	}
	c := s.Process.Capabilities
	want := DefaultCapabilities()
	slices.SortFunc(want, func(a, b string) int { x, _ := capNumber(a); y, _ := capNumber(b); return x - y })
	if !slices.Equal(c.Bounding, want) || !slices.Equal(c.Effective, want) || !slices.Equal(c.Permitted, want) {
		t.Errorf("caps = %+v, want %v in bounding/effective/permitted", c, want)
	}
	if len(c.Inheritable) != 0 || len(c.Ambient) != 0 {
		t.Errorf("inheritable/ambient = %v/%v, want empty", c.Inheritable, c.Ambient)
	}
	for _, forbidden := range []string{"CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_SYS_TIME", "CAP_SYS_BOOT", "CAP_MKNOD", "CAP_BPF", "CAP_SYS_RAWIO"} {
		if slices.Contains(c.Bounding, forbidden) {
			t.Errorf("default bounding set has %s", forbidden)
		}
	}
	if !slices.Contains(c.Bounding, "CAP_NET_BIND_SERVICE") || !slices.Contains(c.Bounding, "CAP_CHOWN") {
		t.Errorf("default set lacks what servers need: %v", c.Bounding)
	}
	if !s.Process.NoNewPrivileges {
		t.Error("no_new_privs off by default")
	}
	if !slices.Contains(s.Linux.MaskedPaths, "/proc/kcore") || !slices.Contains(s.Linux.ReadonlyPaths, "/proc/sys") {
		t.Errorf("masked %v readonly %v", s.Linux.MaskedPaths, s.Linux.ReadonlyPaths)
	}
	sc := s.Linux.Seccomp
	if sc == nil || sc.DefaultAction != specs.ActErrno || len(sc.Syscalls) < 10 {
		t.Fatalf("seccomp = %+v, want the default profile", sc)
	}
	// The profile opens mount only to CAP_SYS_ADMIN holders: it must not be allowed here.
	for _, sys := range sc.Syscalls {
		if slices.Contains(sys.Names, "mount") && sys.Action == specs.ActAllow {
			t.Errorf("default profile allows mount without CAP_SYS_ADMIN: %+v", sys)
		}
	}
	// Everything lands in config.json.
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"noNewPrivileges":true`, `"maskedPaths"`, `"readonlyPaths"`, `"seccomp"`, `"bounding"`} {
		if !strings.Contains(string(b), key) {
			t.Errorf("config.json lacks %s", key)
		}
	}
}

func TestApplyCapAddDrop(t *testing.T) {
	for _, tc := range []struct {
		add, drop []string
		priv      bool
		has, not  []string
		count     int
	}{
		{add: []string{"net_raw"}, has: []string{"CAP_NET_RAW", "CAP_CHOWN"}, count: len(DefaultCapabilities()) + 1},
		{add: []string{"CAP_SYS_TIME"}, drop: []string{"chown"}, has: []string{"CAP_SYS_TIME"}, not: []string{"CAP_CHOWN"}, count: len(DefaultCapabilities())},
		{drop: []string{"ALL"}, add: []string{"NET_BIND_SERVICE"}, has: []string{"CAP_NET_BIND_SERVICE"}, count: 1},
		{add: []string{"ALL"}, drop: []string{"SYS_ADMIN"}, not: []string{"CAP_SYS_ADMIN"}, count: len(capNames) - 1},
		{add: []string{"NET_ADMIN"}, drop: []string{"NET_ADMIN"}, has: []string{"CAP_NET_ADMIN"}, count: len(DefaultCapabilities()) + 1},
		{priv: true, count: len(capNames)},
		{priv: true, drop: []string{"SYS_MODULE"}, not: []string{"CAP_SYS_MODULE"}, count: len(capNames) - 1},
	} {
		s := newSpec()
		if err := Apply(s, Options{Privileged: tc.priv, CapAdd: tc.add, CapDrop: tc.drop}); err != nil {
			t.Fatalf("%+v: %v", tc, err)
		}
		b := s.Process.Capabilities.Bounding
		if len(b) != tc.count {
			t.Errorf("add %v drop %v privileged %v: %d caps %v, want %d", tc.add, tc.drop, tc.priv, len(b), b, tc.count)
		}
		for _, c := range tc.has {
			if !slices.Contains(b, c) {
				t.Errorf("add %v drop %v: lacks %s", tc.add, tc.drop, c)
			}
		}
		for _, c := range tc.not {
			if slices.Contains(b, c) {
				t.Errorf("add %v drop %v: has %s", tc.add, tc.drop, c)
			}
		}
	}
	if err := Apply(newSpec(), Options{CapAdd: []string{"SYS_WIZARD"}}); err == nil || !strings.Contains(err.Error(), "SYS_WIZARD") {
		t.Errorf("unknown capability: err = %v", err)
	}
}

func TestApplyCapAddOpensProfile(t *testing.T) {
	s := newSpec()
	if err := Apply(s, Options{CapAdd: []string{"SYS_TIME"}}); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, sys := range s.Linux.Seccomp.Syscalls {
		found = found || (slices.Contains(sys.Names, "settimeofday") && sys.Action == specs.ActAllow)
	}
	if !found {
		t.Error("--cap-add SYS_TIME did not open settimeofday in the seccomp profile")
	}
}

func TestApplyPrivileged(t *testing.T) {
	s := newSpec()
	if err := Apply(s, Options{Privileged: true}); err != nil {
		t.Fatal(err)
	}
	if s.Linux.Seccomp != nil || s.Linux.MaskedPaths != nil || s.Linux.ReadonlyPaths != nil || s.Process.NoNewPrivileges {
		t.Errorf("privileged kept restrictions: seccomp %v masked %v ro %v nnp %v", s.Linux.Seccomp != nil, s.Linux.MaskedPaths, s.Linux.ReadonlyPaths, s.Process.NoNewPrivileges)
	}
	yes := true
	if err := Apply(s, Options{Privileged: true, NoNewPrivileges: &yes}); err != nil || !s.Process.NoNewPrivileges {
		t.Errorf("privileged with no-new-privileges: nnp=%v err=%v", s.Process.NoNewPrivileges, err)
	}
}

func TestSecurityOpts(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "p.json")
	os.WriteFile(good, []byte(`{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}`), 0o644)
	notify := filepath.Join(dir, "notify.json")
	os.WriteFile(notify, []byte(`{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_NOTIFY"}]}`), 0o644)
	garbage := filepath.Join(dir, "garbage.json")
	os.WriteFile(garbage, []byte(`{"defaultAction":`), 0o644)

	var o Options
	if err := o.AddSecurityOpt("seccomp=" + good); err != nil {
		t.Fatal(err)
	}
	s := newSpec()
	if err := Apply(s, o); err != nil {
		t.Fatal(err)
	}
	if s.Linux.Seccomp.DefaultAction != specs.ActAllow || len(s.Linux.Seccomp.Syscalls) != 1 {
		t.Errorf("custom profile not used: %+v", s.Linux.Seccomp)
	}

	o = Options{}
	if err := o.AddSecurityOpt("seccomp=unconfined"); err != nil {
		t.Fatal(err)
	}
	if err := o.AddSecurityOpt("no-new-privileges=false"); err != nil {
		t.Fatal(err)
	}
	s = newSpec()
	if err := Apply(s, o); err != nil || s.Linux.Seccomp != nil || s.Process.NoNewPrivileges {
		t.Errorf("unconfined/no-new-privileges=false: seccomp %v nnp %v err %v", s.Linux.Seccomp, s.Process.NoNewPrivileges, err)
	}
	if len(s.Linux.MaskedPaths) == 0 {
		t.Error("seccomp=unconfined must not drop masked paths")
	}

	for _, bad := range []string{"apparmor=unconfined", "seccomp=", "seccomp=" + filepath.Join(dir, "missing.json"), "no-new-privileges=maybe"} {
		var o Options
		if err := o.AddSecurityOpt(bad); err == nil {
			t.Errorf("%q accepted", bad)
		} else {
			t.Logf("%s: %v", bad, err)
		}
	}
	for _, f := range []string{notify, garbage} {
		var o Options
		if err := o.AddSecurityOpt("seccomp=" + f); err != nil {
			t.Fatal(err)
		}
		if err := Apply(newSpec(), o); err == nil || !strings.Contains(err.Error(), f) {
			t.Errorf("profile %s: err = %v, want one naming the file", f, err)
		} else {
			t.Logf("%v", err)
		}
	}
}

func TestCapMask(t *testing.T) {
	m, err := capMask([]string{"CAP_CHOWN", "CAP_KILL", "CAP_CHECKPOINT_RESTORE"}, 40)
	if err != nil || m != 1|1<<5|1<<40 {
		t.Errorf("mask %#x err %v", m, err)
	}
	m, _ = capMask([]string{"CAP_CHECKPOINT_RESTORE"}, 37) // an older kernel
	if m != 0 {
		t.Errorf("capability above cap_last_cap kept: %#x", m)
	}
}
