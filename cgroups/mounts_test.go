package cgroups

import (
	"strings"
	"testing"
)

const hybridMountinfo = `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
99 41 0:38 /sub /mnt/cg\040two rw,relatime - cgroup2 cgroup2 rw
`

func TestParseMountinfoHybrid(t *testing.T) {
	l, err := parseMountinfo(strings.NewReader(hybridMountinfo))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"cpu": "/sys/fs/cgroup/cpu,cpuacct", "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
		"memory": "/sys/fs/cgroup/memory", "freezer": "/sys/fs/cgroup/freezer", "pids": "/sys/fs/cgroup/pids",
	}
	if len(l.v1) != len(want) {
		t.Errorf("v1 = %v, want %v (cpuset and name=systemd are not used)", l.v1, want)
	}
	for k, v := range want {
		if l.v1[k] != v {
			t.Errorf("v1[%s] = %q, want %q", k, l.v1[k], v)
		}
	}
	if l.unified != "/sys/fs/cgroup/unified" {
		t.Errorf("unified = %q (the bind mount of a subtree must not win)", l.unified)
	}
	if m, _ := l.mode(); m != ModeHybrid {
		t.Errorf("mode = %q, want hybrid", m)
	}
}

func TestParseMountinfoModes(t *testing.T) {
	v2 := "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
	l, _ := parseMountinfo(strings.NewReader(v2))
	if m, _ := l.mode(); m != ModeV2 || l.unified != "/sys/fs/cgroup" {
		t.Errorf("v2 host: mode %q unified %q", m, l.unified)
	}
	v1 := "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
	l, _ = parseMountinfo(strings.NewReader(v1))
	if m, _ := l.mode(); m != ModeV1 {
		t.Errorf("v1 host: mode %q", m)
	}
	l, _ = parseMountinfo(strings.NewReader("22 1 0:1 / / rw - ext4 /dev/sda rw\n"))
	if _, err := l.mode(); err == nil {
		t.Error("no cgroup mounts: want an error")
	}
}

func TestUnescapeOctal(t *testing.T) {
	if got := unescapeOctal(`/mnt/cg\040two\134x`); got != `/mnt/cg two\x` {
		t.Errorf("got %q", got)
	}
	if got := unescapeOctal(`/a\04`); got != `/a\04` {
		t.Errorf("truncated escape: got %q", got)
	}
}

func TestValidName(t *testing.T) {
	for _, ok := range []string{"hot/abc", "hot", "a/b/c"} {
		if err := validName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "/hot/x", "hot/../x", "..", "hot/", "hot//x", "./hot", "hot/.."} {
		if err := validName(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestParseStatState(t *testing.T) {
	if s := parseStatState("123 (a (b) c) S 1 2 3"); s != "S" {
		t.Errorf("got %q", s)
	}
	if s := parseStatState("garbage"); s != "?" {
		t.Errorf("got %q", s)
	}
}

func TestEventsFrozen(t *testing.T) {
	if !eventsFrozen([]byte("populated 1\nfrozen 1\n")) || eventsFrozen([]byte("populated 1\nfrozen 0\n")) {
		t.Error("eventsFrozen misreads cgroup.events")
	}
}
