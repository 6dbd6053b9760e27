package network

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// lease is what the state file records per container: enough to undo every host object the
// container's attachment made, with no other source of truth.
type lease struct {
	IP       netip.Addr    `json:"ip"`
	HostVeth string        `json:"hostVeth"`
	Netns    string        `json:"netns"`
	Ports    []PortMapping `json:"ports,omitempty"`
	Created  time.Time     `json:"created"`
}

// state is the persistent IPAM of one bridge: <StateDir>/<bridge>.json.
type state struct {
	Bridge string            `json:"bridge"`
	Subnet netip.Prefix      `json:"subnet"`
	Last   netip.Addr        `json:"last,omitzero"` // last address handed out; allocation continues after it
	Leases map[string]*lease `json:"leases"`
}

func (n *Network) statePath() string { return filepath.Join(n.cfg.StateDir, n.cfg.Bridge+".json") }
func (n *Network) lockPath() string  { return filepath.Join(n.cfg.StateDir, n.cfg.Bridge+".lock") }

// lock takes the bridge's exclusive lock (flock), serialising Attach and Detach across hot
// processes. The returned function releases it.
func (n *Network) lock(ctx context.Context) (func(), error) {
	if err := os.MkdirAll(n.cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("lock network %s: %w", n.cfg.Bridge, err)
	}
	f, err := os.OpenFile(n.lockPath(), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock network %s: %w", n.cfg.Bridge, err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock network %s: %w", n.cfg.Bridge, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock network %s (held by another hot process): %w", n.cfg.Bridge, ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// load reads the state file; a missing file is an empty state for the configured subnet.
func (n *Network) load() (*state, error) {
	b, err := os.ReadFile(n.statePath())
	if errors.Is(err, fs.ErrNotExist) {
		return &state{Bridge: n.cfg.Bridge, Subnet: n.cfg.Subnet, Leases: map[string]*lease{}}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read network state %s: %w", n.statePath(), err)
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("read network state %s: %w (move the file away to start afresh)", n.statePath(), err)
	}
	if st.Leases == nil {
		st.Leases = map[string]*lease{}
	}
	return &st, nil
}

// save writes the state atomically: temp file, fsync, rename, fsync of the directory.
func (n *Network) save(st *state) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode network state: %w", err)
	}
	if err := writeFileAtomic(n.statePath(), append(b, '\n')); err != nil {
		return fmt.Errorf("write network state: %w", err)
	}
	return nil
}

func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// gateway is the bridge's own address: the first host address of the subnet.
func gateway(subnet netip.Prefix) netip.Addr { return subnet.Masked().Addr().Next() }

// broadcast is the last address of an IPv4 subnet.
func broadcast(subnet netip.Prefix) netip.Addr {
	a := subnet.Masked().Addr().As4()
	host := uint32(1)<<(32-subnet.Bits()) - 1
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// owner returns the container holding ip, or "".
func (st *state) owner(ip netip.Addr) string {
	for id, l := range st.Leases {
		if l.IP == ip {
			return id
		}
	}
	return ""
}

// checkRequested says why ip cannot be given to a container, or nil.
func (st *state) checkRequested(ip netip.Addr) error {
	switch {
	case !ip.Is4() || !st.Subnet.Contains(ip):
		return fmt.Errorf("address %s is not in the network's subnet %s: pick an address inside it or omit --ip", ip, st.Subnet)
	case ip == st.Subnet.Masked().Addr() || ip == broadcast(st.Subnet):
		return fmt.Errorf("address %s is the subnet's network or broadcast address: pick another --ip", ip)
	case ip == gateway(st.Subnet):
		return fmt.Errorf("address %s is in use by the bridge %s (gateway): pick another --ip or omit it", ip, st.Bridge)
	}
	if id := st.owner(ip); id != "" {
		return fmt.Errorf("address %s is in use by container %s: pick another --ip or omit it", ip, id)
	}
	return nil
}

// allocate hands out the next free address after the last one given, wrapping around, so a
// just-released address is not reused at once (stale ARP entries and conntrack state).
func (st *state) allocate() (netip.Addr, error) {
	first, last := gateway(st.Subnet).Next(), broadcast(st.Subnet).Prev()
	start := first
	if st.Last.IsValid() && st.Subnet.Contains(st.Last) && st.Last.Less(last) && !st.Last.Less(first) {
		start = st.Last.Next()
	}
	ip := start
	for {
		if st.owner(ip) == "" {
			return ip, nil
		}
		ip = ip.Next()
		if last.Less(ip) {
			ip = first
		}
		if ip == start {
			return netip.Addr{}, fmt.Errorf("no free address left in %s (%d containers): remove containers or configure a larger subnet", st.Subnet, len(st.Leases))
		}
	}
}
