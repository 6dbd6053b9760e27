package sockets

import (
	"encoding/binary"
	"net/netip"
)

// headerBytes is how much of each packet the reader asks the kernel to copy: enough for an
// IPv6 header and a TCP header with options (an IPv4 header with options and TCP fit too).
const headerBytes = 128

// flow identifies one direction of a TCP connection.
type flow struct {
	src, dst netip.AddrPort
}

// segment is what the reader needs to know of an outgoing TCP segment.
type segment struct {
	flow   flow
	seq    uint32 // first sequence number
	endSeq uint32 // seq + payload length (+1 for SYN and for FIN)
	syn    bool
}

// parseSegment reads the IP and TCP headers at the start of pkt; total is the packet's full
// length (the kernel copies only the first headerBytes). ok is false for anything that is not
// a TCP segment with complete headers.
func parseSegment(pkt []byte, total int) (seg segment, ok bool) {
	if len(pkt) < 1 {
		return seg, false
	}
	var src, dst netip.Addr
	var l4 []byte
	var payload int
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < 20 {
			return seg, false
		}
		ihl := int(pkt[0]&0x0f) * 4
		if ihl < 20 || len(pkt) < ihl || pkt[9] != 6 {
			return seg, false
		}
		src = netip.AddrFrom4([4]byte(pkt[12:16]))
		dst = netip.AddrFrom4([4]byte(pkt[16:20]))
		l4 = pkt[ihl:]
		payload = total - ihl
	case 6:
		// Extension headers are not followed: hot's traffic carries none, and a segment the
		// reader cannot parse is treated as new data (accepted).
		if len(pkt) < 40 || pkt[6] != 6 {
			return seg, false
		}
		src = netip.AddrFrom16([16]byte(pkt[8:24]))
		dst = netip.AddrFrom16([16]byte(pkt[24:40]))
		l4 = pkt[40:]
		payload = total - 40
	default:
		return seg, false
	}
	if len(l4) < 20 {
		return seg, false
	}
	doff := int(l4[12]>>4) * 4
	if doff < 20 {
		return seg, false
	}
	payload -= doff
	if payload < 0 {
		payload = 0
	}
	flags := l4[13]
	if flags&0x02 != 0 { // SYN
		payload++
		seg.syn = true
	}
	if flags&0x01 != 0 { // FIN
		payload++
	}
	seg.flow = flow{
		src: netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:2])),
		dst: netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:4])),
	}
	seg.seq = binary.BigEndian.Uint32(l4[4:8])
	seg.endSeq = seg.seq + uint32(payload)
	return seg, true
}

// seqAfter reports whether sequence number a comes after b (modulo 2^32).
func seqAfter(a, b uint32) bool { return int32(a-b) > 0 }

// sentTracker remembers, per flow, the highest sequence number sent so far. During a hold it
// tells new data (the application was still running: pass it) from segments that carry
// nothing new — retransmissions, probes, ACKs — which a socket being dumped sends with a TCP
// timestamp newer than the one CRIU saves (see holdTable): those are dropped.
type sentTracker map[flow]uint32

// observe records seg and reports whether it carries sequence space not sent before.
//
// On a flow not seen before only a SYN counts as new: anything else may be the retransmission
// of data sent before the Holder existed (seen with real CRIU: the last answer before the
// hold, its ACK riding on the held request, retransmitted during the dump). The price is that
// a connection silent since NewHolder that sends between Hold and the freeze has that segment
// dropped and resent after restore. The map grows by one entry per connection that sends
// during the Holder's life (one update).
func (t sentTracker) observe(seg segment) bool {
	high, seen := t[seg.flow]
	beyond := !seen || seqAfter(seg.endSeq, high)
	if beyond {
		t[seg.flow] = seg.endSeq
	}
	if !seen {
		return seg.syn
	}
	return beyond && seqAfter(seg.endSeq, seg.seq)
}
