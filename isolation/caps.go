package isolation

import (
	"fmt"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// capNames lists every capability this build knows, indexed by number (capabilities(7)).
// Names are spelled as runtime-spec config.json spells them.
var capNames = [...]string{
	unix.CAP_CHOWN:              "CAP_CHOWN",
	unix.CAP_DAC_OVERRIDE:       "CAP_DAC_OVERRIDE",
	unix.CAP_DAC_READ_SEARCH:    "CAP_DAC_READ_SEARCH",
	unix.CAP_FOWNER:             "CAP_FOWNER",
	unix.CAP_FSETID:             "CAP_FSETID",
	unix.CAP_KILL:               "CAP_KILL",
	unix.CAP_SETGID:             "CAP_SETGID",
	unix.CAP_SETUID:             "CAP_SETUID",
	unix.CAP_SETPCAP:            "CAP_SETPCAP",
	unix.CAP_LINUX_IMMUTABLE:    "CAP_LINUX_IMMUTABLE",
	unix.CAP_NET_BIND_SERVICE:   "CAP_NET_BIND_SERVICE",
	unix.CAP_NET_BROADCAST:      "CAP_NET_BROADCAST",
	unix.CAP_NET_ADMIN:          "CAP_NET_ADMIN",
	unix.CAP_NET_RAW:            "CAP_NET_RAW",
	unix.CAP_IPC_LOCK:           "CAP_IPC_LOCK",
	unix.CAP_IPC_OWNER:          "CAP_IPC_OWNER",
	unix.CAP_SYS_MODULE:         "CAP_SYS_MODULE",
	unix.CAP_SYS_RAWIO:          "CAP_SYS_RAWIO",
	unix.CAP_SYS_CHROOT:         "CAP_SYS_CHROOT",
	unix.CAP_SYS_PTRACE:         "CAP_SYS_PTRACE",
	unix.CAP_SYS_PACCT:          "CAP_SYS_PACCT",
	unix.CAP_SYS_ADMIN:          "CAP_SYS_ADMIN",
	unix.CAP_SYS_BOOT:           "CAP_SYS_BOOT",
	unix.CAP_SYS_NICE:           "CAP_SYS_NICE",
	unix.CAP_SYS_RESOURCE:       "CAP_SYS_RESOURCE",
	unix.CAP_SYS_TIME:           "CAP_SYS_TIME",
	unix.CAP_SYS_TTY_CONFIG:     "CAP_SYS_TTY_CONFIG",
	unix.CAP_MKNOD:              "CAP_MKNOD",
	unix.CAP_LEASE:              "CAP_LEASE",
	unix.CAP_AUDIT_WRITE:        "CAP_AUDIT_WRITE",
	unix.CAP_AUDIT_CONTROL:      "CAP_AUDIT_CONTROL",
	unix.CAP_SETFCAP:            "CAP_SETFCAP",
	unix.CAP_MAC_OVERRIDE:       "CAP_MAC_OVERRIDE",
	unix.CAP_MAC_ADMIN:          "CAP_MAC_ADMIN",
	unix.CAP_SYSLOG:             "CAP_SYSLOG",
	unix.CAP_WAKE_ALARM:         "CAP_WAKE_ALARM",
	unix.CAP_BLOCK_SUSPEND:      "CAP_BLOCK_SUSPEND",
	unix.CAP_AUDIT_READ:         "CAP_AUDIT_READ",
	unix.CAP_PERFMON:            "CAP_PERFMON",
	unix.CAP_BPF:                "CAP_BPF",
	unix.CAP_CHECKPOINT_RESTORE: "CAP_CHECKPOINT_RESTORE",
}

// DefaultCapabilities is the capability set of a container that asks for nothing else. It is
// Podman's default (containers.conf since Podman 4): Docker's 14 minus three.
//   - CAP_NET_RAW: raw and packet sockets let a container forge packets and sniff its network.
//   - CAP_MKNOD: hot does not program a device cgroup allow-list yet, so a container that can
//     mknod could create a node for a host disk and open it.
//   - CAP_AUDIT_WRITE: only sshd/login-style programs need it; it writes to the host's audit log.
//
// All three come back with --cap-add.
func DefaultCapabilities() []string {
	return []string{
		"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
		"CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID",
		"CAP_SYS_CHROOT",
	}
}

// AllCapabilities returns every capability this build knows, in number order.
func AllCapabilities() []string {
	return append([]string(nil), capNames[:]...)
}

// CanonicalCap turns "net_admin", "NET_ADMIN" or "cap_net_admin" into "CAP_NET_ADMIN" and
// refuses names that are not capabilities.
func CanonicalCap(name string) (string, error) {
	n := strings.ToUpper(strings.TrimSpace(name))
	if !strings.HasPrefix(n, "CAP_") {
		n = "CAP_" + n
	}
	if slices.Contains(capNames[:], n) {
		return n, nil
	}
	return "", fmt.Errorf("unknown capability %q: use a name from capabilities(7) such as NET_ADMIN or CAP_NET_ADMIN, or ALL", name)
}

// capNumber returns the number of a canonical capability name.
func capNumber(name string) (int, bool) {
	i := slices.Index(capNames[:], name)
	return i, i >= 0
}

// resolveCaps applies --cap-drop, then --cap-add, to base: "ALL" in adds starts from every
// capability, "ALL" in drops removes everything before the adds are applied. A capability
// both added and dropped ends up added. The result is sorted by capability number.
func resolveCaps(base, adds, drops []string) ([]string, error) {
	set := map[string]bool{}
	for _, c := range base {
		set[c] = true
	}
	var addList, dropList []string
	addAll, dropAll := false, false
	for _, c := range adds {
		if strings.EqualFold(strings.TrimSpace(c), "ALL") {
			addAll = true
			continue
		}
		n, err := CanonicalCap(c)
		if err != nil {
			return nil, fmt.Errorf("--cap-add: %w", err)
		}
		addList = append(addList, n)
	}
	for _, c := range drops {
		if strings.EqualFold(strings.TrimSpace(c), "ALL") {
			dropAll = true
			continue
		}
		n, err := CanonicalCap(c)
		if err != nil {
			return nil, fmt.Errorf("--cap-drop: %w", err)
		}
		dropList = append(dropList, n)
	}
	if addAll {
		for _, c := range capNames {
			set[c] = true
		}
	}
	if dropAll {
		clear(set)
	}
	for _, c := range dropList {
		delete(set, c)
	}
	for _, c := range addList {
		set[c] = true
	}
	var out []string
	for _, c := range capNames {
		if set[c] {
			out = append(out, c)
		}
	}
	return out, nil
}
