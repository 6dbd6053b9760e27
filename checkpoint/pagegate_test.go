package checkpoint

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// psi builds one page_server_iov request as CRIU's lazy-pages daemon sends it.
func psi(cmd uint32, nrPages, vaddr, dstID uint64) []byte {
	b := make([]byte, psiSize)
	binary.LittleEndian.PutUint32(b[0:], cmd)
	binary.LittleEndian.PutUint64(b[8:], nrPages)
	binary.LittleEndian.PutUint64(b[16:], vaddr)
	binary.LittleEndian.PutUint64(b[24:], dstID)
	return b
}

// fakePageServer accepts one connection and sends everything it reads to got.
func fakePageServer(t *testing.T) (addr string, got chan []byte) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	got = make(chan []byte, 16)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		for {
			b := make([]byte, psiSize)
			if _, err := io.ReadFull(c, b); err != nil {
				close(got)
				return
			}
			got <- b
			if binary.LittleEndian.Uint32(b)&psCmdMask == psIOVClose {
				c.Write([]byte{0, 0, 0, 0}) // the status CRIU answers a close with
			}
		}
	}()
	return l.Addr().String(), got
}

// gateWithDaemon starts a gate towards a fake page server and connects a fake daemon to it.
func gateWithDaemon(t *testing.T) (*PageGate, net.Conn, chan []byte) {
	t.Helper()
	addr, got := fakePageServer(t)
	g, err := NewPageGate(addr)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", g.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return g, c, got
}

func next(t *testing.T, got chan []byte) []byte {
	t.Helper()
	select {
	case b, ok := <-got:
		if !ok {
			return nil
		}
		return b
	case <-time.After(5 * time.Second):
		t.Fatal("the page server got nothing")
		return nil
	}
}

// The gate forwards requests, holds the close until Commit, then lets it through.
func TestPageGateHoldsCloseUntilCommit(t *testing.T) {
	g, c, got := gateWithDaemon(t)
	get := psi(7, 4, 0x7f0000000000, 1) // PS_IOV_GET
	c.Write(get)
	if b := next(t, got); string(b) != string(get) {
		t.Fatalf("forwarded %x, want %x", b, get)
	}
	c.Write(psi(psIOVClose, 0, 0, 0))
	select {
	case <-g.AllIn():
	case <-time.After(5 * time.Second):
		t.Fatal("AllIn not closed after the daemon's close request")
	}
	select {
	case b := <-got:
		t.Fatalf("the close reached the page server before Commit: %x", b)
	case <-time.After(100 * time.Millisecond):
	}
	done := make(chan error, 1)
	go func() { done <- g.Commit(5 * time.Second) }()
	if b := next(t, got); binary.LittleEndian.Uint32(b)&psCmdMask != psIOVClose {
		t.Fatalf("after Commit the page server got %x, want the close", b)
	}
	status := make([]byte, 4)
	if _, err := io.ReadFull(c, status); err != nil {
		t.Fatalf("the daemon got no status back: %v", err)
	}
	c.Close()
	if err := <-done; err != nil {
		t.Fatalf("Commit: %v", err)
	}
}

// Abort must make CRIU fail the transfer: an end of stream would count as success for a lazy
// transfer (and CRIU would kill the originals), so the page server must get an invalid request.
func TestPageGateAbortSendsInvalidRequest(t *testing.T) {
	g, c, got := gateWithDaemon(t)
	c.Write(psi(7, 1, 0x1000, 1))
	next(t, got)
	g.Abort()
	b := next(t, got)
	if b == nil {
		t.Fatal("the page server saw an end of stream, want an invalid request")
	}
	if cmd := binary.LittleEndian.Uint32(b) & psCmdMask; cmd == psIOVClose || cmd == psIOVForceClose || cmd == 7 {
		t.Fatalf("abort sent a valid command %#x", cmd)
	}
}

// A daemon that disconnects without closing must not end the transfer cleanly either.
func TestPageGateDaemonGoneIsNoClose(t *testing.T) {
	g, c, got := gateWithDaemon(t)
	c.Write(psi(7, 1, 0x1000, 1))
	next(t, got)
	c.Close()
	b := next(t, got)
	if b == nil {
		t.Fatal("the page server saw an end of stream, want an invalid request")
	}
	select {
	case <-g.AllIn():
		t.Fatal("AllIn closed although the daemon never asked to close")
	default:
	}
}
