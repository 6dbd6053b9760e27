package sockets

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TCPState is a TCP socket state as the kernel numbers it (TCP_ESTABLISHED = 1 ...).
type TCPState uint8

// TCP states (include/net/tcp_states.h).
const (
	TCPEstablished TCPState = 1 + iota
	TCPSynSent
	TCPSynRecv
	TCPFinWait1
	TCPFinWait2
	TCPTimeWait
	TCPClose
	TCPCloseWait
	TCPLastAck
	TCPListen
	TCPClosing
	TCPNewSynRecv
)

func (s TCPState) String() string {
	tcpStateNames := [...]string{"", "ESTABLISHED", "SYN-SENT", "SYN-RECV", "FIN-WAIT-1", "FIN-WAIT-2",
		"TIME-WAIT", "CLOSE", "CLOSE-WAIT", "LAST-ACK", "LISTEN", "CLOSING", "NEW-SYN-RECV"}
	if int(s) < len(tcpStateNames) && s != 0 {
		return tcpStateNames[s]
	}
	return fmt.Sprintf("STATE-%d", uint8(s))
}

// MarshalText prints the state's name in JSON.
func (s TCPState) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// TCPConn is one TCP socket of a network namespace, as sock_diag reports it.
type TCPConn struct {
	Local       netip.AddrPort `json:"local"`
	Remote      netip.AddrPort `json:"remote"`
	State       TCPState       `json:"state"`
	Inode       uint32         `json:"inode"` // 0 for sockets no process holds (TIME-WAIT, orphans)
	UID         uint32         `json:"uid"`
	RecvQ       uint32         `json:"recv_q"`
	SendQ       uint32         `json:"send_q"`
	Retransmits uint32         `json:"retransmits"` // segments retransmitted over the connection's life
	RTT         time.Duration  `json:"rtt"`         // smoothed round-trip time
}

// ListTCP returns every TCP socket (IPv4 and IPv6, all states) of the network namespace at
// netnsPath. IPv4-mapped IPv6 addresses are reported as IPv4.
func ListTCP(ctx context.Context, netnsPath string) ([]TCPConn, error) {
	if err := checkNetns(netnsPath); err != nil {
		return nil, err
	}
	ns, err := netns.GetFromPath(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("list TCP sockets: open network namespace %s: %w", netnsPath, err)
	}
	defer ns.Close()
	// The handle's sock_diag socket is created on a thread locked into ns and stays there.
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("list TCP sockets in %s: sock_diag socket: %w", netnsPath, err)
	}
	defer h.Close()
	var conns []TCPConn
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		var resp []*netlink.InetDiagTCPInfoResp
		for try := 0; ; try++ {
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("list TCP sockets in %s: %w", netnsPath, err)
			}
			resp, err = h.SocketDiagTCPInfo(fam)
			// A dump interrupted by a concurrent change is retried a few times.
			if errors.Is(err, netlink.ErrDumpInterrupted) && try < 5 {
				continue
			}
			break
		}
		if err != nil {
			if fam == unix.AF_INET6 && errors.Is(err, unix.ENOENT) {
				break // kernel without IPv6
			}
			return nil, fmt.Errorf("list TCP sockets in %s: sock_diag: %w", netnsPath, err)
		}
		for _, r := range resp {
			conns = append(conns, tcpConnFrom(r))
		}
	}
	return conns, nil
}

func tcpConnFrom(r *netlink.InetDiagTCPInfoResp) TCPConn {
	s := r.InetDiagMsg
	c := TCPConn{
		Local:  netip.AddrPortFrom(addrFrom(s.ID.Source), s.ID.SourcePort),
		Remote: netip.AddrPortFrom(addrFrom(s.ID.Destination), s.ID.DestinationPort),
		State:  TCPState(s.State),
		Inode:  s.INode,
		UID:    s.UID,
		RecvQ:  s.RQueue,
		SendQ:  s.WQueue,
	}
	if r.TCPInfo != nil {
		c.Retransmits = r.TCPInfo.Total_retrans
		c.RTT = time.Duration(r.TCPInfo.Rtt) * time.Microsecond
	}
	return c
}

func addrFrom(ip []byte) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

// Established returns the connections in the ESTABLISHED state.
func Established(conns []TCPConn) []TCPConn {
	var out []TCPConn
	for _, c := range conns {
		if c.State == TCPEstablished {
			out = append(out, c)
		}
	}
	return out
}

// CountEstablished returns how many TCP connections are established in the network namespace
// at netnsPath (the "TCP connections established before and after" of an update summary).
func CountEstablished(ctx context.Context, netnsPath string) (int, error) {
	conns, err := ListTCP(ctx, netnsPath)
	if err != nil {
		return 0, err
	}
	return len(Established(conns)), nil
}
