package network

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"runtime"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Announce sends gratuitous ARP for ip from the container interface (eth0) of the network
// namespace at netnsPath: count broadcasts of an ARP request and an ARP reply whose sender and
// target address are both ip, interval apart. Peers on the segment (and bridges learning
// where the MAC address lives) update their caches, so an address that moved to another host
// is reached there at once instead of after the peers' neighbour entries expire. Linux peers
// accept the update for an entry they already have (what matters for open connections).
//
// The frame is written to an AF_PACKET socket created inside the namespace; no ARP library
// is needed for two fixed 42-byte frames.
func Announce(netnsPath string, ip netip.Addr, count int, interval time.Duration) error {
	if !ip.Is4() {
		return fmt.Errorf("announce %s: only IPv4 addresses are announced with ARP", ip)
	}
	nsh, err := netns.GetFromPath(netnsPath)
	if err != nil {
		return fmt.Errorf("announce %s: open netns %s: %w", ip, netnsPath, err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return fmt.Errorf("announce %s: netlink in %s: %w", ip, netnsPath, err)
	}
	defer h.Close()
	link, err := h.LinkByName(containerIface)
	if err != nil {
		return fmt.Errorf("announce %s: find %s in %s: %w", ip, containerIface, netnsPath, err)
	}
	mac := link.Attrs().HardwareAddr
	if len(mac) != 6 {
		return fmt.Errorf("announce %s: %s has no Ethernet address", ip, containerIface)
	}
	fd, err := packetSocketIn(nsh)
	if err != nil {
		return fmt.Errorf("announce %s: %w", ip, err)
	}
	defer unix.Close(fd)
	sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: link.Attrs().Index, Halen: 6,
		Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	for i := 0; i < max(count, 1); i++ {
		if i > 0 {
			time.Sleep(interval)
		}
		for _, op := range []uint16{1, 2} { // request, reply
			if err := unix.Sendto(fd, garpFrame(mac, ip, op), 0, sa); err != nil {
				return fmt.Errorf("announce %s on %s: send: %w", ip, containerIface, err)
			}
		}
	}
	return nil
}

// packetSocketIn creates a raw packet socket in the namespace nsh; a socket keeps the
// namespace it was created in, so the thread switches back at once.
func packetSocketIn(nsh netns.NsHandle) (int, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return -1, fmt.Errorf("current netns: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(nsh); err != nil {
		return -1, fmt.Errorf("enter netns: %w", err)
	}
	fd, serr := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ARP)))
	if err := netns.Set(orig); err != nil {
		// The thread is in the wrong namespace: let it die with the goroutine.
		if serr == nil {
			unix.Close(fd)
		}
		runtime.Goexit()
	}
	if serr != nil {
		return -1, fmt.Errorf("packet socket: %w", serr)
	}
	return fd, nil
}

// garpFrame is an Ethernet broadcast carrying an ARP packet (RFC 826) with sender and target
// protocol address ip: op 1 (request, target hardware address zero) or 2 (reply, target
// hardware address the broadcast).
func garpFrame(mac []byte, ip netip.Addr, op uint16) []byte {
	b := make([]byte, 42)
	copy(b[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(b[6:12], mac)
	binary.BigEndian.PutUint16(b[12:], unix.ETH_P_ARP)
	binary.BigEndian.PutUint16(b[14:], 1)      // hardware: Ethernet
	binary.BigEndian.PutUint16(b[16:], 0x0800) // protocol: IPv4
	b[18], b[19] = 6, 4
	binary.BigEndian.PutUint16(b[20:], op)
	a := ip.As4()
	copy(b[22:28], mac)
	copy(b[28:32], a[:])
	if op == 2 {
		copy(b[32:38], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	}
	copy(b[38:42], a[:])
	return b
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// SetHostLink brings the host end of a container's veth pair (Attachment.HostVeth) down or
// up. Down takes the container off the bridge without removing anything: its address stops
// answering on the segment (e.g. while it moves to another host), and up puts it back.
func SetHostLink(hostVeth string, up bool) error {
	link, err := netlink.LinkByName(hostVeth)
	if err != nil {
		return fmt.Errorf("find veth %s: %w", hostVeth, err)
	}
	if up {
		err = netlink.LinkSetUp(link)
	} else {
		err = netlink.LinkSetDown(link)
	}
	if err != nil {
		return fmt.Errorf("set veth %s up=%v: %w", hostVeth, up, err)
	}
	return nil
}
