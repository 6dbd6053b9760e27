package container

import (
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

func TestParseSize(t *testing.T) {
	good := map[string]int64{"512M": 512 << 20, "1G": 1 << 30, "1g": 1 << 30, "64k": 64 << 10, "1048576": 1 << 20,
		"1.5G": 3 << 29, "2MiB": 2 << 20, "2mb": 2 << 20, "100b": 100, "1T": 1 << 40}
	for in, want := range good {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"12Q", "", "M", "-1M", "0", "abc", "1.2.3G", "0.1b", "1e30G"} {
		if _, err := ParseSize(in); err == nil || !strings.Contains(err.Error(), "512M") {
			t.Errorf("ParseSize(%q): want an error naming the format, got %v", in, err)
		}
	}
}

func TestParseUser(t *testing.T) {
	for in, want := range map[string][2]uint32{"0": {0, 0}, "1000": {1000, 1000}, "1000:50": {1000, 50}} {
		u, g, err := ParseUser(in)
		if err != nil || u != want[0] || g != want[1] {
			t.Errorf("ParseUser(%q) = %d:%d, %v; want %v", in, u, g, err, want)
		}
	}
	for _, in := range []string{"", "root", "1000:", ":1", "-1", "1:2:3"} {
		if _, _, err := ParseUser(in); err == nil {
			t.Errorf("ParseUser(%q): want error", in)
		}
	}
}

func TestValidateName(t *testing.T) {
	for _, ok := range []string{"web", "web-1", "a.b_c", "W3"} {
		if err := ValidateName(ok); err != nil {
			t.Errorf("ValidateName(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-web", "a b", "a/b", strings.Repeat("x", 64), "0123456789ab"} {
		if err := ValidateName(bad); err == nil {
			t.Errorf("ValidateName(%q): want error", bad)
		}
	}
}

func TestBuildSpec(t *testing.T) {
	img := ocispec.ImageConfig{Entrypoint: []string{"/bin/app"}, Cmd: []string{"serve"},
		Env: []string{"PATH=/bin", "A=1"}, WorkingDir: "/srv", User: "100:101"}
	in := specInput{Rootfs: "/r", NetnsPath: "/run/hot/netns/x", Hostname: "h", Cgroup: "hot/x",
		Resources: Resources{MemoryBytes: 1 << 20, PidsMax: 10}}
	s, err := buildSpec(img, RunOptions{Image: "app:1", Env: []string{"A=2", "B=3"}}, in)
	if err != nil {
		t.Fatal(err)
	}
	p := s.Process
	if strings.Join(p.Args, " ") != "/bin/app serve" || p.Cwd != "/srv" || p.User.UID != 100 || p.User.GID != 101 {
		t.Errorf("process = %+v", p)
	}
	if strings.Join(p.Env, " ") != "PATH=/bin A=2 B=3 HOSTNAME=h" {
		t.Errorf("env = %v", p.Env)
	}
	if *s.Linux.Resources.Memory.Limit != 1<<20 || *s.Linux.Resources.Pids.Limit != 10 || s.Linux.CgroupsPath != "hot/x" {
		t.Errorf("linux = %+v", s.Linux)
	}
	var netns string
	for _, ns := range s.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			netns = ns.Path
		}
	}
	if netns != "/run/hot/netns/x" {
		t.Errorf("netns path = %q", netns)
	}
	dests := map[string]bool{}
	for _, m := range s.Mounts {
		dests[m.Destination] = true
	}
	for _, d := range []string{"/proc", "/dev", "/dev/pts", "/dev/shm", "/sys"} {
		if !dests[d] {
			t.Errorf("no mount at %s", d)
		}
	}

	// Arguments replace Cmd; an explicit entrypoint drops Cmd; defaults fill PATH and cwd.
	s, _ = buildSpec(ocispec.ImageConfig{Entrypoint: []string{"/e"}, Cmd: []string{"c"}}, RunOptions{Command: []string{"x", "y"}}, in)
	if strings.Join(s.Process.Args, " ") != "/e x y" || s.Process.Cwd != "/" || !hasEnv(s.Process.Env, "PATH") {
		t.Errorf("override: %+v", s.Process)
	}
	s, _ = buildSpec(ocispec.ImageConfig{Entrypoint: []string{"/e"}, Cmd: []string{"c"}}, RunOptions{Entrypoint: []string{"/f"}}, in)
	if strings.Join(s.Process.Args, " ") != "/f" {
		t.Errorf("entrypoint override: %v", s.Process.Args)
	}
	if _, err := buildSpec(ocispec.ImageConfig{}, RunOptions{Image: "empty:1"}, in); err == nil || !strings.Contains(err.Error(), "give the command") {
		t.Errorf("no command: %v", err)
	}
	if _, err := buildSpec(img, RunOptions{Workdir: "rel"}, in); err == nil {
		t.Error("relative workdir accepted")
	}
	if _, err := buildSpec(ocispec.ImageConfig{Cmd: []string{"x"}, User: "nobody"}, RunOptions{Image: "u:1"}, in); err == nil || !strings.Contains(err.Error(), "--user") {
		t.Errorf("named user: %v", err)
	}
}

func TestParseMountOptions(t *testing.T) {
	f, data := parseMountOptions([]string{"nosuid", "noexec", "mode=755", "ro", "size=1k", "rw"})
	if f != unix.MS_NOSUID|unix.MS_NOEXEC || data != "mode=755,size=1k" {
		t.Errorf("flags %#x data %q", f, data)
	}
}

func TestInRoot(t *testing.T) {
	for in, want := range map[string]string{"/dev/null": "/r/dev/null", "../../etc": "/r/etc", "/": "/r"} {
		if got, err := inRoot("/r", in); err != nil || got != want {
			t.Errorf("inRoot(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}
