package network

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Defaults of Config.
const (
	DefaultBridge = "hot0"
	// DefaultSubnet avoids the usual container and VM ranges: docker 172.17-31.0.0/16 and
	// 192.168.0.0/16 pools, podman 10.88.0.0/16 and 10.89.x, libvirt 192.168.122.0/24,
	// kubernetes 10.244.0.0/16 (flannel), 10.96.0.0/12 (services), 10.42/10.43 (k3s),
	// Parallels 10.211.55.0/24, VirtualBox 192.168.56.0/24.
	DefaultSubnet = "10.199.0.0/24"
)

// Config describes one bridge network.
type Config struct {
	Bridge   string       // bridge device, DefaultBridge if empty
	Subnet   netip.Prefix // IPv4 subnet of the bridge, DefaultSubnet if zero
	StateDir string       // IPAM state: <StateDir>/<bridge>.json (under hot's --root)
	RunRoot  string       // netns bind mounts: <RunRoot>/netns/<id> (under hot's --run-root)
}

// AttachRequest is what a container asks for.
type AttachRequest struct {
	IP    netip.Addr    // zero: allocate the next free address
	Ports []PortMapping // host ports to publish
	// HostLinkDown leaves the host end of the veth down: the container is off the bridge
	// until SetHostLink(HostVeth, true). For a namespace whose processes are restored later
	// (import, migration): a client packet must not meet the address before its sockets.
	HostLinkDown bool
}

// Attachment is a container's place on the network.
type Attachment struct {
	ID        string        `json:"id"`
	NetnsPath string        `json:"netnsPath"` // bind-mounted network namespace; setns into it
	IP        netip.Addr    `json:"ip"`
	Prefix    netip.Prefix  `json:"prefix"`  // the subnet IP belongs to, e.g. 10.199.0.0/24
	Gateway   netip.Addr    `json:"gateway"` // the bridge's address, the container's default route
	HostVeth  string        `json:"hostVeth"`
	Ports     []PortMapping `json:"ports,omitempty"`
}

// Network manages containers on one bridge.
type Network struct {
	cfg Config
}

// containerIface is the name of the container's end of its veth pair.
const containerIface = "eth0"

var validBridge = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_.-]{0,14}$`)

var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// New checks cfg and fills in defaults. It touches nothing on the host: the bridge and the
// nftables table are made by the first Attach.
func New(cfg Config) (*Network, error) {
	if cfg.Bridge == "" {
		cfg.Bridge = DefaultBridge
	}
	if !cfg.Subnet.IsValid() {
		cfg.Subnet = netip.MustParsePrefix(DefaultSubnet)
	}
	cfg.Subnet = cfg.Subnet.Masked()
	switch {
	case !validBridge.MatchString(cfg.Bridge):
		return nil, fmt.Errorf("network: bridge name %q is not usable: use a letter, then up to 14 letters, digits, '_', '.' or '-'", cfg.Bridge)
	case !cfg.Subnet.Addr().Is4():
		return nil, fmt.Errorf("network: subnet %s is not IPv4: only IPv4 subnets are supported", cfg.Subnet)
	case cfg.Subnet.Bits() > 29 || cfg.Subnet.Bits() < 8:
		return nil, fmt.Errorf("network: subnet %s: use a prefix length from /8 to /29", cfg.Subnet)
	case cfg.StateDir == "" || cfg.RunRoot == "":
		return nil, fmt.Errorf("network: StateDir and RunRoot are required")
	}
	return &Network{cfg: cfg}, nil
}

// Config returns the configuration with defaults filled in.
func (n *Network) Config() Config { return n.cfg }

// NetnsPath is where the container's network namespace is bind-mounted.
func (n *Network) NetnsPath(id string) string { return filepath.Join(n.cfg.RunRoot, "netns", id) }

// hostVethName derives the host end's name from bridge and id (IFNAMSIZ allows 15 bytes), so
// that Detach finds it even when no state was written.
func hostVethName(bridge, id string) string {
	sum := sha256.Sum256([]byte(bridge + "/" + id))
	return "hv" + hex.EncodeToString(sum[:])[:11]
}

func checkID(id string) error {
	if !validID.MatchString(id) {
		return fmt.Errorf("invalid container id %q: use letters, digits, '_', '.' and '-' (at most 128)", id)
	}
	return nil
}

// Attach gives container id a network namespace on the bridge: netns bind-mounted at
// NetnsPath(id), a veth pair (host end on the bridge, container end eth0 with the address),
// loopback up, a default route via the bridge, and its published ports. It creates the bridge
// and the nftables table if missing. On any error everything it made is undone.
func (n *Network) Attach(ctx context.Context, id string, req AttachRequest) (*Attachment, error) {
	if err := checkID(id); err != nil {
		return nil, fmt.Errorf("attach %s: %w", id, err)
	}
	if err := validatePorts(req.Ports); err != nil {
		return nil, fmt.Errorf("attach %s: %w", id, err)
	}
	unlock, err := n.lock(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	st, err := n.load()
	if err != nil {
		return nil, err
	}
	if st.Subnet != n.cfg.Subnet {
		if len(st.Leases) > 0 {
			return nil, fmt.Errorf("attach %s: bridge %s is in use with subnet %s (%d containers): remove them before changing the subnet to %s, or keep %s", id, n.cfg.Bridge, st.Subnet, len(st.Leases), n.cfg.Subnet, st.Subnet)
		}
		st.Subnet, st.Last = n.cfg.Subnet, netip.Addr{}
	}
	if l, ok := st.Leases[id]; ok {
		return nil, fmt.Errorf("attach %s: already attached with address %s: detach it first (hot rm -f cleans leftovers)", id, l.IP)
	}

	// Decide everything that can be refused before touching the host.
	ip := req.IP
	if ip.IsValid() {
		if err := st.checkRequested(ip.Unmap()); err != nil {
			return nil, fmt.Errorf("attach %s: %w", id, err)
		}
		ip = ip.Unmap()
	} else if ip, err = st.allocate(); err != nil {
		return nil, fmt.Errorf("attach %s: %w", id, err)
	}
	if err := st.checkPorts(req.Ports); err != nil {
		return nil, fmt.Errorf("attach %s: %w", id, err)
	}

	// Record the lease first: from here on Detach can undo whatever exists.
	l := &lease{IP: ip, HostVeth: hostVethName(n.cfg.Bridge, id), Netns: n.NetnsPath(id),
		Ports: append([]PortMapping(nil), req.Ports...), Created: time.Now().UTC()}
	st.Leases[id] = l
	st.Last = ip
	if err := n.save(st); err != nil {
		return nil, fmt.Errorf("attach %s: %w", id, err)
	}
	if err := n.setUp(ctx, id, l, len(st.Leases) == 1, !req.HostLinkDown); err != nil {
		if uerr := n.detachLocked(context.WithoutCancel(ctx), id); uerr != nil {
			err = fmt.Errorf("%w; undo also failed: %v", err, uerr)
		}
		return nil, fmt.Errorf("attach %s: %w", id, err)
	}
	return attachment(id, l, st.Subnet), nil
}

// attachment describes a lease; subnet is the one recorded in the state file.
func attachment(id string, l *lease, subnet netip.Prefix) *Attachment {
	return &Attachment{ID: id, NetnsPath: l.Netns, IP: l.IP, Prefix: subnet, Gateway: gateway(subnet),
		HostVeth: l.HostVeth, Ports: append([]PortMapping(nil), l.Ports...)}
}

// checkPorts refuses host ports another container publishes or a host process listens on
// (DNAT would silently steal its traffic).
func (st *state) checkPorts(ports []PortMapping) error {
	for _, p := range ports {
		for id, l := range st.Leases {
			for _, q := range l.Ports {
				if q.HostPort == p.HostPort && q.Proto == p.Proto {
					return fmt.Errorf("host port %d/%s is already published by container %s: choose another host port", p.HostPort, p.Proto, id)
				}
			}
		}
		if err := probePort(p); err != nil {
			return err
		}
	}
	return nil
}

// probePort binds the host port on all addresses for a moment to see whether a host
// process uses it.
func probePort(p PortMapping) error {
	addr := fmt.Sprintf(":%d", p.HostPort)
	var err error
	if p.Proto == "udp" {
		var c net.PacketConn
		if c, err = net.ListenPacket("udp4", addr); err == nil {
			return c.Close()
		}
	} else {
		var l net.Listener
		if l, err = net.Listen("tcp4", addr); err == nil {
			return l.Close()
		}
	}
	if errors.Is(err, unix.EADDRINUSE) {
		return fmt.Errorf("host port %d/%s is in use by a process on the host: choose another host port", p.HostPort, p.Proto)
	}
	return fmt.Errorf("check host port %d/%s: %w", p.HostPort, p.Proto, err)
}

// setUp makes the host objects of a recorded lease. first: no other container is on the
// bridge, so its address and the table may be rebuilt from the configuration.
func (n *Network) setUp(ctx context.Context, id string, l *lease, first, linkUp bool) error {
	br, err := n.ensureBridge(first)
	if err != nil {
		return err
	}
	if err := ensureTable(ctx, n.cfg.Bridge, n.cfg.Subnet, first); err != nil {
		return err
	}
	if err := createNetns(l.Netns); err != nil {
		return err
	}
	nsh, err := netns.GetFromPath(l.Netns)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", l.Netns, err)
	}
	defer nsh.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: l.HostVeth, MasterIndex: br.Attrs().Index, MTU: br.Attrs().MTU},
		PeerName:      containerIface,
		PeerNamespace: netlink.NsFd(int(nsh)),
		PeerMTU:       uint32(br.Attrs().MTU),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth %s: %w", l.HostVeth, err)
	}
	host, err := netlink.LinkByName(l.HostVeth)
	if err != nil {
		return fmt.Errorf("find veth %s: %w", l.HostVeth, err)
	}
	// Hairpin lets a container reach its own published port through the host.
	if err := netlink.LinkSetHairpin(host, true); err != nil {
		return fmt.Errorf("set hairpin on %s: %w", l.HostVeth, err)
	}
	if linkUp {
		if err := netlink.LinkSetUp(host); err != nil {
			return fmt.Errorf("bring up %s: %w", l.HostVeth, err)
		}
	}
	if err := configureInside(nsh, l.IP, n.cfg.Subnet, gateway(n.cfg.Subnet)); err != nil {
		return fmt.Errorf("configure netns %s: %w", l.Netns, err)
	}
	if err := disableMPTCP(nsh); err != nil {
		return fmt.Errorf("configure netns %s: %w", l.Netns, err)
	}
	return addPorts(ctx, n.cfg.Bridge, id, l.IP, l.Ports)
}

// configureInside brings up lo and eth0 with ip in the namespace and routes through gw.
func configureInside(nsh netns.NsHandle, ip netip.Addr, subnet netip.Prefix, gw netip.Addr) error {
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fmt.Errorf("bring up lo: %w", err)
	}
	eth, err := h.LinkByName(containerIface)
	if err != nil {
		return fmt.Errorf("find %s: %w", containerIface, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(subnet.Bits(), 32)}}
	if err := h.AddrAdd(eth, addr); err != nil {
		return fmt.Errorf("add %s to %s: %w", addr, containerIface, err)
	}
	if err := h.LinkSetUp(eth); err != nil {
		return fmt.Errorf("bring up %s: %w", containerIface, err)
	}
	route := &netlink.Route{LinkIndex: eth.Attrs().Index, Gw: gw.AsSlice()}
	if err := h.RouteAdd(route); err != nil {
		return fmt.Errorf("add default route via %s: %w", gw, err)
	}
	return nil
}

// ensureBridge returns the bridge, creating it with the gateway address when missing. A new
// bridge's subnet must not overlap a route the host already has, and the host must forward.
func (n *Network) ensureBridge(first bool) (netlink.Link, error) {
	name := n.cfg.Bridge
	gwNet := &net.IPNet{IP: gateway(n.cfg.Subnet).AsSlice(), Mask: net.CIDRMask(n.cfg.Subnet.Bits(), 32)}
	link, err := netlink.LinkByName(name)
	if err == nil {
		if link.Type() != "bridge" {
			return nil, fmt.Errorf("interface %s exists and is a %s, not a bridge: choose another bridge name", name, link.Type())
		}
		if first {
			// No container uses the bridge: drop addresses of an earlier subnet.
			if err := checkOverlap(n.cfg.Subnet, link.Attrs().Index); err != nil {
				return nil, err
			}
			addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
			if err != nil {
				return nil, fmt.Errorf("list addresses of bridge %s: %w", name, err)
			}
			for _, a := range addrs {
				if a.IPNet.String() != gwNet.String() {
					if err := netlink.AddrDel(link, &a); err != nil {
						return nil, fmt.Errorf("remove old address %s from bridge %s: %w", a.IPNet, name, err)
					}
				}
			}
		}
	} else {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return nil, fmt.Errorf("find bridge %s: %w", name, err)
		}
		if err := checkOverlap(n.cfg.Subnet, 0); err != nil {
			return nil, err
		}
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("create bridge %s: %w", name, err)
		}
		if link, err = netlink.LinkByName(name); err != nil {
			return nil, fmt.Errorf("find bridge %s: %w", name, err)
		}
	}
	if err := netlink.AddrAdd(link, &netlink.Addr{IPNet: gwNet}); err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, fmt.Errorf("add %s to bridge %s: %w", gwNet, name, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("bring up bridge %s: %w", name, err)
	}
	// route_localnet lets connections to 127.0.0.1:<published port> be DNATed out of the
	// bridge; ip_forward lets published ports answer other hosts and containers reach out.
	for file, val := range map[string]string{
		"/proc/sys/net/ipv4/conf/" + name + "/route_localnet": "1",
		"/proc/sys/net/ipv4/ip_forward":                       "1",
	} {
		if err := os.WriteFile(file, []byte(val), 0o644); err != nil {
			return nil, fmt.Errorf("set %s: %w", file, err)
		}
	}
	return link, nil
}

// checkOverlap refuses a subnet that overlaps a route the host has on an interface other than
// the one with index skip.
func checkOverlap(subnet netip.Prefix, skip int) error {
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list host routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil || (skip != 0 && r.LinkIndex == skip) {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		if ones == 0 {
			continue
		}
		a, ok := netip.AddrFromSlice(r.Dst.IP.To4())
		if !ok {
			continue
		}
		dst := netip.PrefixFrom(a, ones).Masked()
		if dst.Overlaps(subnet) {
			dev := fmt.Sprintf("index %d", r.LinkIndex)
			if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
				dev = l.Attrs().Name
			}
			return fmt.Errorf("subnet %s overlaps the host's route %s on %s: configure another subnet", subnet, dst, dev)
		}
	}
	return nil
}

// Detach removes everything Attach made for id: published ports, the veth pair, the netns
// bind mount and file, and the address lease. It works from the state file alone, finds the
// veth and netns by their derived names even without a lease, and is idempotent. The bridge
// and the table stay (Teardown removes them).
func (n *Network) Detach(ctx context.Context, id string) error {
	if err := checkID(id); err != nil {
		return fmt.Errorf("detach %s: %w", id, err)
	}
	unlock, err := n.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	return n.detachLocked(ctx, id)
}

func (n *Network) detachLocked(ctx context.Context, id string) error {
	st, err := n.load()
	if err != nil {
		return fmt.Errorf("detach %s: %w", id, err)
	}
	l := st.Leases[id]
	if l == nil {
		l = &lease{HostVeth: hostVethName(n.cfg.Bridge, id), Netns: n.NetnsPath(id)}
	}
	var errs []error
	if len(l.Ports) > 0 {
		errs = append(errs, deletePorts(ctx, n.cfg.Bridge, l.Ports))
	}
	if link, err := netlink.LinkByName(l.HostVeth); err == nil {
		if err := netlink.LinkDel(link); err != nil {
			errs = append(errs, fmt.Errorf("delete veth %s: %w", l.HostVeth, err))
		}
	} else if !errors.As(err, new(netlink.LinkNotFoundError)) {
		errs = append(errs, fmt.Errorf("find veth %s: %w", l.HostVeth, err))
	}
	errs = append(errs, removeNetns(l.Netns))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("detach %s: %w", id, err)
	}
	if _, ok := st.Leases[id]; ok {
		delete(st.Leases, id)
		if err := n.save(st); err != nil {
			return fmt.Errorf("detach %s: %w", id, err)
		}
	}
	return nil
}

// Lookup returns the recorded attachment of id; the error wraps fs.ErrNotExist if there is none.
func (n *Network) Lookup(id string) (*Attachment, error) {
	st, err := n.load()
	if err != nil {
		return nil, err
	}
	l, ok := st.Leases[id]
	if !ok {
		return nil, fmt.Errorf("network %s: container %s is not attached: %w", n.cfg.Bridge, id, fs.ErrNotExist)
	}
	return attachment(id, l, st.Subnet), nil
}

// List returns all recorded attachments, sorted by id.
func (n *Network) List() ([]*Attachment, error) {
	st, err := n.load()
	if err != nil {
		return nil, err
	}
	out := make([]*Attachment, 0, len(st.Leases))
	for id, l := range st.Leases {
		out = append(out, attachment(id, l, st.Subnet))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Teardown removes the bridge, its nftables table and the state file once no container is
// attached (for tests, and for an operator removing hot). It refuses while leases remain.
func (n *Network) Teardown(ctx context.Context) error {
	unlock, err := n.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	st, err := n.load()
	if err != nil {
		return err
	}
	if len(st.Leases) > 0 {
		ids := make([]string, 0, len(st.Leases))
		for id := range st.Leases {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		return fmt.Errorf("tear down network %s: containers %s are still attached: remove them first", n.cfg.Bridge, strings.Join(ids, ", "))
	}
	var errs []error
	errs = append(errs, deleteTable(ctx, n.cfg.Bridge))
	if link, err := netlink.LinkByName(n.cfg.Bridge); err == nil {
		if err := netlink.LinkDel(link); err != nil {
			errs = append(errs, fmt.Errorf("delete bridge %s: %w", n.cfg.Bridge, err))
		}
	}
	if err := os.Remove(n.statePath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tear down network %s: %w", n.cfg.Bridge, err)
	}
	return nil
}

// disableMPTCP sets net.mptcp.enabled=0 in the namespace. Go >= 1.24 listens with MPTCP by
// default where the kernel offers it, and CRIU cannot checkpoint MPTCP sockets ("inet:
// Unsupported proto 262"); with MPTCP off in the container's namespace, programs fall back to
// plain TCP and stay checkpointable. Kernels without MPTCP have nothing to disable.
func disableMPTCP(nsh netns.NsHandle) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return fmt.Errorf("disable MPTCP: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(nsh); err != nil {
		return fmt.Errorf("disable MPTCP: enter netns: %w", err)
	}
	// /proc/sys/net shows the namespace of the thread that opens it.
	werr := os.WriteFile("/proc/sys/net/mptcp/enabled", []byte("0"), 0o644)
	if err := netns.Set(orig); err != nil {
		// This thread is in the wrong namespace now: let it die with the goroutine.
		runtime.LockOSThread()
		return fmt.Errorf("disable MPTCP: return to the host netns: %w", err)
	}
	if werr != nil && !errors.Is(werr, os.ErrNotExist) {
		return fmt.Errorf("disable MPTCP: %w", werr)
	}
	return nil
}
