package vmtest

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
)

// A cpio "newc" archive writer: the format the kernel unpacks as an initramfs. It is small
// enough to write here, and writing it ourselves lets us add device nodes (/dev/console)
// without creating them on the host (which needs mknod rights and leaves files behind).

// cpioEntry is one archive member.
type cpioEntry struct {
	name     string // without leading slash
	mode     uint32 // type bits | permission bits
	data     []byte // regular files and symlink targets
	src      string // regular file content read from this host path when data is nil
	devMajor uint32 // device nodes
	devMinor uint32
}

const (
	modeDir  = 0o040000
	modeReg  = 0o100000
	modeLink = 0o120000
	modeChr  = 0o020000
)

// writeCPIO writes entries (plus the parent directories they need) and the trailer to w.
func writeCPIO(w io.Writer, entries []cpioEntry) error {
	bw := bufio.NewWriter(w)
	dirs := map[string]bool{}
	var all []cpioEntry
	for _, e := range entries {
		e.name = strings.TrimPrefix(path.Clean("/"+e.name), "/")
		for d := path.Dir(e.name); d != "." && !dirs[d]; d = path.Dir(d) {
			dirs[d] = true
			all = append(all, cpioEntry{name: d, mode: modeDir | 0o755})
		}
		if e.mode&0o170000 == modeDir {
			if dirs[e.name] {
				continue
			}
			dirs[e.name] = true
		}
		all = append(all, e)
	}
	// Parents before children: sort by depth, then name, keeping it deterministic.
	sort.SliceStable(all, func(i, j int) bool {
		di, dj := strings.Count(all[i].name, "/"), strings.Count(all[j].name, "/")
		if di != dj {
			return di < dj
		}
		return all[i].name < all[j].name
	})
	ino := uint32(1)
	for _, e := range all {
		data := e.data
		if data == nil && e.src != "" {
			b, err := os.ReadFile(e.src)
			if err != nil {
				return fmt.Errorf("read %s for initramfs entry /%s: %w", e.src, e.name, err)
			}
			data = b
		}
		if _, err := writeCPIORecord(bw, ino, e, data); err != nil {
			return fmt.Errorf("write initramfs entry /%s: %w", e.name, err)
		}
		ino++
	}
	if _, err := writeCPIORecord(bw, 0, cpioEntry{name: "TRAILER!!!"}, nil); err != nil {
		return fmt.Errorf("write initramfs trailer: %w", err)
	}
	return bw.Flush()
}

func writeCPIORecord(w io.Writer, ino uint32, e cpioEntry, data []byte) (int64, error) {
	name := e.name + "\x00"
	nlink := uint32(1)
	if e.mode&0o170000 == modeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, e.mode, 0, 0, nlink, 0, len(data), 0, 0, e.devMajor, e.devMinor, len(name), 0)
	var n int64
	for _, part := range [][]byte{[]byte(hdr), []byte(name), pad4(len(hdr) + len(name)), data, pad4(len(data))} {
		m, err := w.Write(part)
		n += int64(m)
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func pad4(n int) []byte { return make([]byte, (4-n%4)%4) }
