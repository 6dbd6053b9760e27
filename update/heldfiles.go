package update

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// HeldFile is a regular file on the container's root filesystem that a process has open or
// mapped (its executable, shared libraries, data files). CRIU reopens these by path on
// restore and refuses (or, worse, silently accepts) a different file there.
type HeldFile struct {
	Path   string `json:"path"` // path inside the container
	PIDs   []int  `json:"pids"` // host PIDs of the holders
	Mapped bool   `json:"mapped"`
	Exe    bool   `json:"exe"`
}

// heldFiles lists the files on the container's root mount that processes pids hold open or
// mapped. Files already deleted are skipped: CRIU saves those as ghost files itself.
func heldFiles(pids []int) ([]HeldFile, error) {
	byPath := map[string]*HeldFile{}
	add := func(pid int, path string, mapped, exe bool) {
		h := byPath[path]
		if h == nil {
			h = &HeldFile{Path: path}
			byPath[path] = h
		}
		if !slices.Contains(h.PIDs, pid) {
			h.PIDs = append(h.PIDs, pid)
		}
		h.Mapped = h.Mapped || mapped
		h.Exe = h.Exe || exe
	}
	for _, pid := range pids {
		rootMnt, err := rootMountID(pid)
		if err != nil {
			return nil, err
		}
		proc := "/proc/" + strconv.Itoa(pid)
		if p, ok, err := linkOnMount(proc+"/exe", rootMnt); err != nil {
			return nil, err
		} else if ok {
			add(pid, p, true, true)
		}
		for _, kind := range []string{"fd", "map_files"} {
			ents, err := os.ReadDir(proc + "/" + kind)
			if err != nil {
				if os.IsNotExist(err) {
					continue // process exited
				}
				return nil, fmt.Errorf("list %s/%s: %w", proc, kind, err)
			}
			for _, e := range ents {
				p, ok, err := linkOnMount(proc+"/"+kind+"/"+e.Name(), rootMnt)
				if err != nil {
					return nil, err
				}
				if ok {
					add(pid, p, kind == "map_files", false)
				}
			}
		}
	}
	out := make([]HeldFile, 0, len(byPath))
	for _, h := range byPath {
		slices.Sort(h.PIDs)
		out = append(out, *h)
	}
	slices.SortFunc(out, func(a, b HeldFile) int { return strings.Compare(a.Path, b.Path) })
	return out, nil
}

// linkOnMount opens a /proc magic link and reports the path it names when it is a regular,
// not deleted file on the mount with id mnt.
func linkOnMount(link string, mnt int) (string, bool, error) {
	target, err := os.Readlink(link)
	if err != nil || !strings.HasPrefix(target, "/") || strings.HasSuffix(target, " (deleted)") {
		return "", false, nil // gone, a socket/pipe/anon inode, or deleted
	}
	fd, err := unix.Open(link, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", false, nil // raced with close/exit
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return "", false, nil
	}
	id, err := fdMountID(fd)
	if err != nil {
		return "", false, err
	}
	return target, id == mnt, nil
}

func fdMountID(fd int) (int, error) {
	f, err := os.Open("/proc/self/fdinfo/" + strconv.Itoa(fd))
	if err != nil {
		return 0, fmt.Errorf("read fdinfo: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "mnt_id:"); ok {
			return strconv.Atoi(strings.TrimSpace(v))
		}
	}
	return 0, fmt.Errorf("fdinfo of fd %d has no mnt_id", fd)
}

// rootMountID returns the id of the mount that is "/" for pid.
func rootMountID(pid int) (int, error) {
	path := "/proc/" + strconv.Itoa(pid) + "/mountinfo"
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", path, err)
	}
	defer f.Close()
	return parseRootMountID(bufio.NewScanner(f), path)
}

// parseRootMountID finds the last mount mounted on "/" in a mountinfo listing (later mounts
// on the same point hide earlier ones).
func parseRootMountID(sc *bufio.Scanner, name string) (int, error) {
	id := -1
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || fields[4] != "/" {
			continue
		}
		n, err := strconv.Atoi(fields[0])
		if err != nil {
			return 0, fmt.Errorf("parse %s: mount id %q", name, fields[0])
		}
		id = n
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("read %s: %w", name, err)
	}
	if id < 0 {
		return 0, fmt.Errorf("%s has no root mount", name)
	}
	return id, nil
}

// hostPathIn joins a container path under a host directory holding that root.
func hostPathIn(root, p string) string { return filepath.Join(root, filepath.Clean("/"+p)) }
