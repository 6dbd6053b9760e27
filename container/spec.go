package container

import (
	"fmt"
	"os"
	"strings"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// defaultPath is the PATH of a container whose image sets none.
const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// specInput is what BuildSpec needs beyond the image config and the user's options.
type specInput struct {
	Rootfs    string // host path of the mounted overlay
	NetnsPath string // empty: a fresh network namespace (network mode none)
	Hostname  string
	Cgroup    string // cgroups.Create name, recorded as linux.cgroupsPath
	Resources Resources
}

// buildSpec turns the image's config and the run options into an OCI runtime-spec config. It
// is pure: no file system or kernel access, so it is unit tested. Security settings
// (capabilities, seccomp, masked paths) are not set yet; they belong to a later step that edits
// the same Spec before it is written.
func buildSpec(img ocispec.ImageConfig, o RunOptions, in specInput) (*specs.Spec, error) {
	entry := img.Entrypoint
	if o.Entrypoint != nil {
		entry = o.Entrypoint
	}
	cmd := img.Cmd
	if len(o.Command) > 0 || o.Entrypoint != nil {
		// An explicit entrypoint drops the image's Cmd, as in Docker.
		cmd = o.Command
	}
	args := append(append([]string{}, entry...), cmd...)
	if len(args) == 0 {
		return nil, fmt.Errorf("image %s has no entrypoint or command: give the command after the image name (hot run %s CMD...)", o.Image, o.Image)
	}
	env := mergeEnv(img.Env, o.Env)
	if !hasEnv(env, "PATH") {
		env = append([]string{defaultPath}, env...)
	}
	if !hasEnv(env, "HOSTNAME") && in.Hostname != "" {
		env = append(env, "HOSTNAME="+in.Hostname)
	}
	cwd := img.WorkingDir
	if o.Workdir != "" {
		cwd = o.Workdir
	}
	if cwd == "" {
		cwd = "/"
	}
	if !strings.HasPrefix(cwd, "/") {
		return nil, fmt.Errorf("working directory %q: give an absolute path inside the container", cwd)
	}
	user := o.User
	if user == "" {
		user = img.User
	}
	var uid, gid uint32
	if user != "" {
		var err error
		if uid, gid, err = ParseUser(user); err != nil {
			if o.User == "" {
				return nil, fmt.Errorf("image %s: %w (named users are not supported yet: pass --user UID[:GID])", o.Image, err)
			}
			return nil, err
		}
	}

	nsList := []specs.LinuxNamespace{
		{Type: specs.MountNamespace}, {Type: specs.PIDNamespace}, {Type: specs.UTSNamespace},
		{Type: specs.IPCNamespace}, {Type: specs.NetworkNamespace, Path: in.NetnsPath},
	}
	var res *specs.LinuxResources
	if in.Resources.MemoryBytes > 0 || in.Resources.PidsMax > 0 {
		res = &specs.LinuxResources{}
		if in.Resources.MemoryBytes > 0 {
			m := in.Resources.MemoryBytes
			res.Memory = &specs.LinuxMemory{Limit: &m}
		}
		if in.Resources.PidsMax > 0 {
			p := in.Resources.PidsMax
			res.Pids = &specs.LinuxPids{Limit: &p}
		}
	}
	mode := func(m os.FileMode) *os.FileMode { return &m }
	zero := uint32(0)
	dev := func(path string, major, minor int64) specs.LinuxDevice {
		return specs.LinuxDevice{Path: path, Type: "c", Major: major, Minor: minor, FileMode: mode(0o666), UID: &zero, GID: &zero}
	}
	s := &specs.Spec{
		Version:  specs.Version,
		Hostname: in.Hostname,
		Root:     &specs.Root{Path: in.Rootfs},
		Process: &specs.Process{
			Args: args,
			Env:  env,
			Cwd:  cwd,
			User: specs.User{UID: uid, GID: gid},
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		},
		Linux: &specs.Linux{
			CgroupsPath: in.Cgroup,
			Namespaces:  nsList,
			Resources:   res,
			Devices: []specs.LinuxDevice{
				dev("/dev/null", 1, 3), dev("/dev/zero", 1, 5), dev("/dev/full", 1, 7),
				dev("/dev/random", 1, 8), dev("/dev/urandom", 1, 9), dev("/dev/tty", 5, 0),
			},
		},
		Annotations: map[string]string{"hot.image": o.Image},
	}
	return s, nil
}

// mergeEnv returns base with every K=V of over replacing the same key or appended.
func mergeEnv(base, over []string) []string {
	out := append([]string{}, base...)
	for _, kv := range over {
		k, _, _ := strings.Cut(kv, "=")
		replaced := false
		for i, e := range out {
			if ek, _, _ := strings.Cut(e, "="); ek == k {
				out[i], replaced = kv, true
			}
		}
		if !replaced {
			out = append(out, kv)
		}
	}
	return out
}

func hasEnv(env []string, key string) bool {
	for _, e := range env {
		if k, _, _ := strings.Cut(e, "="); k == key {
			return true
		}
	}
	return false
}

// lookEnv returns the value of key in env.
func lookEnv(env []string, key string) string {
	for _, e := range env {
		if k, v, _ := strings.Cut(e, "="); k == key {
			return v
		}
	}
	return ""
}

// setNetnsPath points the spec's network namespace at path.
func setNetnsPath(s *specs.Spec, path string) {
	for i := range s.Linux.Namespaces {
		if s.Linux.Namespaces[i].Type == specs.NetworkNamespace {
			s.Linux.Namespaces[i].Path = path
		}
	}
}
