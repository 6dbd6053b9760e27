package container

import (
	"fmt"
	"math"
	"net/netip"
	"regexp"
	"strconv"
	"strings"

	"github.com/hotctl/hot/isolation"
	"github.com/hotctl/hot/network"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// RunOptions is everything `hot run` takes from the command line.
type RunOptions struct {
	Name    string   // empty: derived from the id
	Image   string   // image reference (name:tag or digest), resolved by cowfs
	Command []string // replaces the image's Cmd (arguments after the image name)
	// Entrypoint, when non-nil, replaces the image's Entrypoint.
	Entrypoint []string
	Env        []string // K=V, added to (and overriding) the image's Env
	Workdir    string
	User       string // UID[:GID], numeric
	Hostname   string
	Resources  Resources
	// Isolation: capabilities, seccomp, masked paths, no_new_privs (package isolation).
	Isolation isolation.Options

	// Network: Mode "none" gives the container only a loopback device; otherwise it is
	// attached to Bridge/Subnet through the network package.
	NetworkMode string
	Bridge      string
	Subnet      netip.Prefix
	IP          netip.Addr // zero: allocated by IPAM
	Ports       []network.PortMapping

	// For containers recreated from a checkpoint archive (restore.Import):
	// Spec replaces the config built from the image (root path, cgroup and network namespace
	// are set for the new container); PrepareUpper fills the new upper directory before the
	// root is mounted; NoStart creates everything and a monitor, but no init: the container is
	// "checkpointed" until a restore op adopts the restored tree.
	Spec         *specs.Spec
	PrepareUpper func(upperDir string) error
	NoStart      bool
}

// ParseSize parses a memory size such as 512M, 1G, 1.5g, 64k or 1048576 (bytes), in powers of
// 1024.
func ParseSize(s string) (int64, error) {
	bad := fmt.Errorf("size %q: want a positive number with an optional unit K, M, G or T (e.g. 512M)", s)
	t := strings.ToLower(strings.TrimSpace(s))
	t = strings.TrimSuffix(t, "b")
	t = strings.TrimSuffix(t, "i")
	mult := float64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'k':
			mult = 1 << 10
		case 'm':
			mult = 1 << 20
		case 'g':
			mult = 1 << 30
		case 't':
			mult = 1 << 40
		}
		if mult > 1 {
			t = t[:n-1]
		}
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || !(f > 0) || f*mult > math.MaxInt64/2 || f*mult < 1 {
		return 0, bad
	}
	return int64(f * mult), nil
}

// ParseUser parses UID[:GID] (numeric). A missing GID defaults to the UID.
func ParseUser(s string) (uid, gid uint32, err error) {
	u, g, hasG := strings.Cut(s, ":")
	uu, err := strconv.ParseUint(u, 10, 32)
	if err != nil {
		return 0, 0, fmt.Errorf("user %q: want numeric UID[:GID] such as 1000 or 1000:1000", s)
	}
	gg := uu
	if hasG {
		if gg, err = strconv.ParseUint(g, 10, 32); err != nil {
			return 0, 0, fmt.Errorf("user %q: want numeric UID[:GID] such as 1000 or 1000:1000", s)
		}
	}
	return uint32(uu), uint32(gg), nil
}

var nameRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$`)

// ValidateName checks a container name.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("container name %q: use 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit", name)
	}
	if isHexID(name) && len(name) >= 12 {
		return fmt.Errorf("container name %q looks like a container id: choose a name that is not 12+ hex digits", name)
	}
	return nil
}

// ValidateEnv checks K=V entries.
func ValidateEnv(env []string) error {
	for _, e := range env {
		k, _, ok := strings.Cut(e, "=")
		if !ok || k == "" || strings.ContainsAny(k, " \t\n\x00") {
			return fmt.Errorf("environment entry %q: want KEY=VALUE", e)
		}
	}
	return nil
}

func isHexID(s string) bool {
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return s != ""
}
