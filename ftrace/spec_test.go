package ftrace

import (
	"errors"
	"strings"
	"testing"
)

func TestParseSpecCanonical(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"sock-create-deny:family=AF_INET6,cgroup=/sys/fs/cgroup/unified/x/",
			"sock-create-deny:cgroup=/sys/fs/cgroup/unified/x,family=inet6"},
		{"sock-create-deny:cgroup=/c,family=10,type=SOCK_STREAM,protocol=6",
			"sock-create-deny:cgroup=/c,family=inet6,protocol=tcp,type=stream"},
		{"connect-deny: port = 0080 , addr=[::ffff:127.0.0.1],cgroup=/c",
			"connect-deny:addr=::ffff:127.0.0.1,cgroup=/c,port=80"},
		{"sysctl-deny:name=net.ipv4.ip_forward,cgroup=/c", "sysctl-deny:access=write,cgroup=/c,name=net/ipv4/ip_forward"},
		{"sysctl-deny:name=/proc/sys/net/ipv4/conf/eth0.5/forwarding,access=RW,cgroup=/c",
			"sysctl-deny:access=rw,cgroup=/c,name=net/ipv4/conf/eth0.5/forwarding"},
		{"device-deny:cgroup=/c,access=wr", "device-deny:access=rw,cgroup=/c,major=*,minor=*,type=a"},
		{"open-deny:path=/etc//shadow,comm=cat", "open-deny:comm=cat,errno=EPERM,mech=fmod_ret,path=/etc/shadow"},
		{"hook-deny:hook=security_socket_create,cgroup=/c,errno=eacces,mech=LSM",
			"hook-deny:cgroup=/c,errno=EACCES,hook=socket_create,mech=lsm"},
		{"count:func=vfs_read", "count:func=vfs_read,mech=fentry"},
	} {
		s, err := ParseSpec(tc.in)
		if err != nil {
			t.Errorf("ParseSpec(%q): %v", tc.in, err)
			continue
		}
		if got := s.String(); got != tc.want {
			t.Errorf("ParseSpec(%q) = %q, want %q", tc.in, got, tc.want)
		}
		// The canonical form parses to itself.
		again, err := ParseSpec(s.String())
		if err != nil || again.String() != s.String() {
			t.Errorf("canonical %q does not round-trip: %v %q", s.String(), err, again.String())
		}
	}
}

func TestParseSpecRefusesBadSpecs(t *testing.T) {
	for _, tc := range []struct{ in, wantMsg string }{
		{"", "empty spec"},
		{"frobnicate:x=1", `unknown fix kind "frobnicate"`},
		{"sock-create-deny:family=inet6", `needs parameter "cgroup"`},
		{"sock-create-deny:family=unix,cgroup=/c", "want inet or inet6"},
		{"sock-create-deny:family=inet,cgroup=relative/dir", "absolute path"},
		{"sock-create-deny:family=inet,family=inet6,cgroup=/c", "given twice"},
		{"sock-create-deny:family=inet,cgroup=/c,colour=red", `unknown parameter "colour"`},
		{"sock-create-deny:family,cgroup=/c", "has no value"},
		{"sock-create-deny:family=,cgroup=/c", "is empty"},
		{"connect-deny:cgroup=/c", "addr= and/or port="},
		{"connect-deny:port=70000,cgroup=/c", "port number"},
		{"connect-deny:addr=fe80::1%eth0,cgroup=/c", "without zone"},
		{"sysctl-deny:name=../../etc,cgroup=/c", "sysctl name"},
		{"sysctl-deny:name=" + strings.Repeat("a", 200) + ",cgroup=/c", "longer than"},
		{"device-deny:access=x,cgroup=/c", "r, w and m"},
		{"device-deny:major=-1,cgroup=/c", "device number"},
		{"open-deny:path=/etc/shadow,comm=averyveryverylongcomm", "at most 15 bytes"},
		{"open-deny:path=/etc/shadow,mech=kprobe", "want one of fmod_ret, lsm"},
		{"open-deny:path=/etc/shadow,errno=EIO", "want EPERM"},
		{"hook-deny:hook=socket_create", "needs a condition"},
		{"count:func=vfs_read,mech=fmod_ret", "want one of fentry, fexit"},
		{"count:func=vfs read", "kernel function name"},
	} {
		_, err := ParseSpec(tc.in)
		if err == nil {
			t.Errorf("ParseSpec(%q) succeeded, want error containing %q", tc.in, tc.wantMsg)
			continue
		}
		if !errors.Is(err, ErrBadSpec) {
			t.Errorf("ParseSpec(%q) error %v does not match ErrBadSpec", tc.in, err)
		}
		if !strings.Contains(err.Error(), tc.wantMsg) {
			t.Errorf("ParseSpec(%q) = %v, want it to mention %q", tc.in, err, tc.wantMsg)
		}
	}
}

func TestDefaultNameStableAndValid(t *testing.T) {
	a, _ := ParseSpec("sock-create-deny:family=inet6,cgroup=/c")
	b, _ := ParseSpec("sock-create-deny:cgroup=/c/,family=AF_INET6")
	if DefaultName(a) != DefaultName(b) {
		t.Fatalf("equivalent specs got different names %s, %s", DefaultName(a), DefaultName(b))
	}
	if err := ValidName(DefaultName(a)); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "A", "-x", "x.y", "_staging", strings.Repeat("a", 64), "a/b"} {
		if ValidName(bad) == nil {
			t.Errorf("ValidName(%q) accepted a bad name", bad)
		}
	}
}

func TestEveryKindHasWorkingExample(t *testing.T) {
	for _, k := range Kinds() {
		s, err := ParseSpec(k.Example)
		if err != nil {
			t.Errorf("%s: example %q: %v", k.Name, k.Example, err)
			continue
		}
		if s.Kind != k.Name {
			t.Errorf("%s: example parses as kind %s", k.Name, s.Kind)
		}
	}
}
