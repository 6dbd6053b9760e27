package checkpoint

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"

	"github.com/checkpoint-restore/go-criu/v8/crit"
	"github.com/checkpoint-restore/go-criu/v8/crit/images/fdinfo"
	"github.com/checkpoint-restore/go-criu/v8/crit/images/mnt"
)

// Summary is a human-readable description of a checkpoint's images, decoded with go-criu's
// crit package.
type Summary struct {
	ImagesDir   string     `json:"imagesDir"`
	Manifest    *Manifest  `json:"manifest,omitempty"` // archives only
	Record      *Record    `json:"record,omitempty"`   // a container's own checkpoint
	Processes   []Process  `json:"processes"`
	MemoryBytes int64      `json:"memoryBytes"` // resident pages saved in the images
	TCP         []TCPConn  `json:"tcp"`
	Files       []OpenFile `json:"files"`
	Mounts      []Mount    `json:"mounts"`
}

// Process is one task of the dumped tree.
type Process struct {
	PID   uint32 `json:"pid"` // in the container's PID namespace
	PPID  uint32 `json:"ppid"`
	Comm  string `json:"comm"`
	Depth int    `json:"depth"`
}

// TCPConn is one dumped inet socket.
type TCPConn struct {
	PID   uint32 `json:"pid"`
	FD    uint32 `json:"fd"`
	State string `json:"state"`
	Local string `json:"local"`
	Peer  string `json:"peer,omitempty"`
}

// OpenFile is one open descriptor (or cwd/root) of a task.
type OpenFile struct {
	PID  uint32 `json:"pid"`
	FD   string `json:"fd"`
	Type string `json:"type,omitempty"`
	Path string `json:"path"`
}

// Mount is one mount of the dumped mount namespace.
type Mount struct {
	ID         uint32 `json:"id"`
	Parent     uint32 `json:"parent"`
	Mountpoint string `json:"mountpoint"`
	FSType     string `json:"fstype"`
	Source     string `json:"source"`
}

// Inspect decodes the images in dir.
func Inspect(dir string) (*Summary, error) {
	if _, err := os.Stat(filepath.Join(dir, "inventory.img")); err != nil {
		return nil, fmt.Errorf("inspect: %s holds no checkpoint: %w", dir, err)
	}
	s := &Summary{ImagesDir: dir, Processes: []Process{}, TCP: []TCPConn{}, Files: []OpenFile{}, Mounts: []Mount{}}
	c := crit.New(nil, nil, dir, false, true)
	root, err := c.ExplorePs()
	if err != nil {
		return nil, fmt.Errorf("inspect %s: process tree: %w", dir, err)
	}
	var walk func(p *crit.PsTree, depth int)
	walk = func(p *crit.PsTree, depth int) {
		s.Processes = append(s.Processes, Process{PID: p.PID, PPID: p.Process.GetPpid(), Comm: p.Comm, Depth: depth})
		sort.Slice(p.Children, func(i, j int) bool { return p.Children[i].PID < p.Children[j].PID })
		for _, ch := range p.Children {
			walk(ch, depth+1)
		}
	}
	if root != nil {
		walk(root, 0)
	}
	rss, err := c.ExploreRss()
	if err != nil {
		return nil, fmt.Errorf("inspect %s: memory: %w", dir, err)
	}
	for _, r := range rss {
		for _, m := range r.Rsses {
			s.MemoryBytes += m.PhyPages * int64(os.Getpagesize())
		}
	}
	if s.TCP, err = tcpConns(c, dir); err != nil {
		return nil, fmt.Errorf("inspect %s: sockets: %w", dir, err)
	}
	fds, err := c.ExploreFds()
	if err != nil {
		return nil, fmt.Errorf("inspect %s: files: %w", dir, err)
	}
	for _, fd := range fds {
		for _, f := range fd.Files {
			s.Files = append(s.Files, OpenFile{PID: fd.PId, FD: f.Fd, Type: f.Type, Path: f.Path})
		}
	}
	mps, _ := filepath.Glob(filepath.Join(dir, "mountpoints-*.img"))
	for _, p := range mps {
		f, err := os.Open(p)
		if err != nil {
			return nil, err
		}
		img, err := crit.New(f, nil, "", false, true).Decode(&mnt.MntEntry{})
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("inspect %s: %w", p, err)
		}
		for _, e := range img.Entries {
			m, ok := e.Message.(*mnt.MntEntry)
			if !ok {
				continue
			}
			fstype := mnt.Fstype(m.GetFstype()).String()
			if m.GetFsname() != "" {
				fstype = m.GetFsname()
			}
			s.Mounts = append(s.Mounts, Mount{ID: m.GetMntId(), Parent: m.GetParentMntId(), Mountpoint: m.GetMountpoint(), FSType: fstype, Source: m.GetSource()})
		}
	}
	sort.Slice(s.Mounts, func(i, j int) bool { return s.Mounts[i].ID < s.Mounts[j].ID })
	return s, nil
}

// tcpConns lists the TCP sockets of the dump. Addresses are decoded here from files.img:
// crit's own formatting garbles IPv4-mapped IPv6 addresses (dual-stack sockets, as Go uses).
func tcpConns(c crit.Critter, dir string) ([]TCPConn, error) {
	f, err := os.Open(filepath.Join(dir, "files.img"))
	if err != nil {
		return nil, err
	}
	img, err := crit.New(f, nil, "", false, true).Decode(&fdinfo.FileEntry{})
	f.Close()
	if err != nil {
		return nil, err
	}
	type key struct{ sport, dport uint32 }
	addrs := map[key][2]string{}
	for _, e := range img.Entries {
		fe, ok := e.Message.(*fdinfo.FileEntry)
		if !ok || fe.GetIsk() == nil {
			continue
		}
		isk := fe.GetIsk()
		addrs[key{isk.GetSrcPort(), isk.GetDstPort()}] = [2]string{
			netip.AddrPortFrom(ipFromWords(isk.GetSrcAddr()), uint16(isk.GetSrcPort())).String(),
			netip.AddrPortFrom(ipFromWords(isk.GetDstAddr()), uint16(isk.GetDstPort())).String(),
		}
	}
	sks, err := c.ExploreSk()
	if err != nil {
		return nil, err
	}
	out := []TCPConn{}
	for _, sk := range sks {
		for _, so := range sk.Sockets {
			if so.FdType != "INETSK" || so.Protocol != "TCP" {
				continue
			}
			conn := TCPConn{PID: sk.PId, FD: so.Fd, State: so.State}
			a := addrs[key{so.SrcPort, so.DestPort}]
			conn.Local = a[0]
			if so.DestPort != 0 {
				conn.Peer = a[1]
			}
			out = append(out, conn)
		}
	}
	return out, nil
}

// ipFromWords turns CRIU's address words (the kernel's bytes, read as little-endian uint32s)
// into an address; IPv4-mapped IPv6 addresses become IPv4.
func ipFromWords(w []uint32) netip.Addr {
	b := make([]byte, 0, 16)
	for _, x := range w {
		b = binary.LittleEndian.AppendUint32(b, x)
	}
	switch len(b) {
	case 4:
		return netip.AddrFrom4([4]byte(b))
	case 16:
		return netip.AddrFrom16([16]byte(b)).Unmap()
	}
	return netip.Addr{}
}
