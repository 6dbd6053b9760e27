package cgroups

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// The cgroup layouts Mode reports.
const (
	ModeV1     = "v1"
	ModeV2     = "v2"
	ModeHybrid = "hybrid"
)

// unifiedKey is the Paths key of the cgroup2 directory.
const unifiedKey = "unified"

// v1Controllers are the v1 controllers a container's group is created in (when mounted).
// cpuset is left out on purpose: see the package doc.
var v1Controllers = []string{"freezer", "memory", "pids", "cpu", "cpuacct", "blkio", "devices"}

// layout says where the hierarchies of this host are mounted.
type layout struct {
	v1      map[string]string // controller -> mount point
	unified string            // cgroup2 mount point, "" if none
}

func (l layout) mode() (string, error) {
	switch {
	case len(l.v1) == 0 && l.unified != "":
		return ModeV2, nil
	case len(l.v1) > 0 && l.unified != "":
		return ModeHybrid, nil
	case len(l.v1) > 0:
		return ModeV1, nil
	}
	return "", fmt.Errorf("detect cgroup layout: no cgroup or cgroup2 file system is mounted (mount cgroup2 on /sys/fs/cgroup)")
}

// Mode reports the cgroup layout of this host, read from /proc/self/mountinfo: "v2" (only
// cgroup2), "v1" (only v1 hierarchies) or "hybrid" (v1 controllers plus a cgroup2 mount).
func Mode() (string, error) {
	l, err := readLayout()
	if err != nil {
		return "", err
	}
	return l.mode()
}

func readLayout() (layout, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return layout{}, fmt.Errorf("read cgroup mounts: %w", err)
	}
	defer f.Close()
	l, err := parseMountinfo(f)
	if err != nil {
		return layout{}, fmt.Errorf("read cgroup mounts: %w", err)
	}
	return l, nil
}

// parseMountinfo finds the cgroup mounts in a /proc/<pid>/mountinfo stream. Where a hierarchy
// is mounted more than once, the first mount of its root wins.
func parseMountinfo(r io.Reader) (layout, error) {
	l := layout{v1: map[string]string{}}
	rootOf := map[string]string{} // mount point -> mount root, to prefer root "/"
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 64*1024), 1024*1024)
	for s.Scan() {
		line := s.Text()
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		pf := strings.Fields(pre)
		sf := strings.Fields(post)
		if len(pf) < 5 || len(sf) < 3 {
			continue
		}
		root, mnt := unescapeOctal(pf[3]), unescapeOctal(pf[4])
		switch sf[0] {
		case "cgroup2":
			if l.unified == "" || (rootOf[l.unified] != "/" && root == "/") {
				l.unified = mnt
				rootOf[mnt] = root
			}
		case "cgroup":
			for _, opt := range strings.Split(sf[2], ",") {
				if !isV1Controller(opt) {
					continue
				}
				if prev, ok := l.v1[opt]; ok && (rootOf[prev] == "/" || root != "/") {
					continue
				}
				l.v1[opt] = mnt
				rootOf[mnt] = root
			}
		}
	}
	if err := s.Err(); err != nil {
		return layout{}, err
	}
	return l, nil
}

func isV1Controller(opt string) bool {
	for _, c := range v1Controllers {
		if c == opt {
			return true
		}
	}
	return false
}

// unescapeOctal undoes mountinfo's \040-style escapes of spaces, tabs, newlines and backslashes.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
