package checkpoint

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"
)

// CRIU's page-server protocol (criu/page-xfer.c): the lazy-pages daemon sends fixed-size
// requests (struct page_server_iov: u32 cmd, 4 bytes padding, u64 nr_pages, u64 vaddr,
// u64 dst_id) and ends with PS_IOV_CLOSE, answered by a 32-bit status; the page server
// answers each PS_IOV_GET with a header and the pages.
const (
	psiSize          = 32
	psIOVClose       = 0x1023
	psIOVForceClose  = 0x1024
	psCmdMask        = 0xffff
	pageGateDialWait = 5 * time.Second
)

// PageGate sits between a `criu lazy-pages` daemon and a lazy dump's page server and forwards
// everything, except the daemon's final close request: it keeps that until Commit. CRIU's
// dump kills the original processes once the transfer is closed, so until then they stay
// frozen under CRIU, whole, while their copy already runs with every page pulled: a failure
// found then (a health probe) is rolled back by Abort, which makes the transfer fail, and
// CRIU resumes the originals.
type PageGate struct {
	l        net.Listener
	upstream string
	allIn    chan struct{} // closed when the daemon asked to close: every page was pulled
	decided  chan bool     // true: forward the close (Commit); false: drop everything (Abort)
	done     chan error    // the forwarding's end
	once     sync.Once
	mu       sync.Mutex
	down, up net.Conn
}

// NewPageGate listens on a free port of 127.0.0.1 for the lazy-pages daemon and forwards to
// the page server at upstream (ADDR:PORT).
func NewPageGate(upstream string) (*PageGate, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("page gate: listen: %w", err)
	}
	g := &PageGate{l: l, upstream: upstream, allIn: make(chan struct{}), decided: make(chan bool, 1), done: make(chan error, 1)}
	go func() { g.done <- g.serve() }()
	return g, nil
}

// Addr is where the lazy-pages daemon connects (its --page-server --address/--port).
func (g *PageGate) Addr() string { return g.l.Addr().String() }

// AllIn is closed once the daemon has pulled every page and asks to close the transfer.
func (g *PageGate) AllIn() <-chan struct{} { return g.allIn }

// Commit forwards the close: CRIU ends the dump and the original processes go. It returns
// once the transfer is closed on both sides.
func (g *PageGate) Commit(timeout time.Duration) error {
	g.decide(true)
	select {
	case err := <-g.done:
		return err
	case <-time.After(timeout):
		return fmt.Errorf("page gate: transfer not closed within %v", timeout)
	}
}

// Abort ends the transfer without the close: CRIU's page server gets an invalid request (a
// plain end of stream would count as success for a lazy transfer and CRIU would kill the
// originals), its transfer fails and it resumes the original processes; the daemon sees its
// transfer fail.
func (g *PageGate) Abort() {
	g.decide(false)
	g.l.Close()
	g.mu.Lock()
	down, up := g.down, g.up
	g.mu.Unlock()
	if up == nil {
		// Nobody connected (yet): tell CRIU directly, if it listens (LazyDump.Abort retries
		// for a page server about to listen).
		if c, err := net.DialTimeout("tcp", g.upstream, time.Second); err == nil {
			up = c
		}
	}
	if up != nil {
		up.Write(invalidRequest)
		up.Close()
	}
	if down != nil {
		down.Close()
	}
	<-g.done
}

// invalidRequest is a request CRIU's page server refuses ("Unknown command").
var invalidRequest = bytes.Repeat([]byte{0xff}, psiSize)

func (g *PageGate) decide(commit bool) {
	g.once.Do(func() { g.decided <- commit })
}

func (g *PageGate) track(down, up net.Conn) {
	g.mu.Lock()
	g.down, g.up = down, up
	g.mu.Unlock()
}

func (g *PageGate) serve() error {
	down, err := g.l.Accept()
	g.l.Close()
	if err != nil {
		return fmt.Errorf("page gate: accept: %w", err)
	}
	g.track(down, nil)
	defer down.Close()
	up, err := dialPageServer(g.upstream, pageGateDialWait)
	if err != nil {
		return fmt.Errorf("page gate: connect to the page server %s: %w", g.upstream, err)
	}
	// If this process dies, the kernel resets the connection instead of ending it: CRIU
	// fails the transfer and resumes the originals (an end of stream would count as done).
	upTCP := up.(*net.TCPConn)
	upTCP.SetLinger(0)
	g.track(down, up)
	defer up.Close()
	committed := false
	fail := func(err error) error {
		if !committed {
			up.Write(invalidRequest)
		}
		return err
	}
	// Pages and answers flow back unchanged (spliced by the kernel where it can).
	back := make(chan error, 1)
	go func() {
		_, err := io.Copy(down, up)
		down.(*net.TCPConn).CloseWrite()
		back <- err
	}()
	buf := make([]byte, psiSize)
	for {
		if _, err := io.ReadFull(down, buf); err != nil {
			if committed && errors.Is(err, io.EOF) {
				upTCP.CloseWrite()
				return <-back
			}
			return fail(fmt.Errorf("page gate: the lazy-pages daemon ended the transfer before closing it: %w", err))
		}
		cmd := binary.LittleEndian.Uint32(buf[0:4]) & psCmdMask
		if cmd == psIOVClose || cmd == psIOVForceClose {
			select {
			case <-g.allIn:
			default:
				close(g.allIn)
			}
			if !<-g.decided {
				return fail(errors.New("page gate: transfer aborted"))
			}
			committed = true
			upTCP.SetLinger(-1) // from now on a normal end of stream is what CRIU waits for
		}
		if _, err := up.Write(buf); err != nil {
			return fmt.Errorf("page gate: forward request: %w", err)
		}
	}
}

// dialPageServer connects to a page server that may be a moment from listening (see
// LazyDump.WaitImages): a refused connection is retried until wait has passed.
func dialPageServer(addr string, wait time.Duration) (net.Conn, error) {
	deadline := time.Now().Add(wait)
	for {
		c, err := net.DialTimeout("tcp", addr, wait)
		if err == nil || !errors.Is(err, syscall.ECONNREFUSED) || time.Now().After(deadline) {
			return c, err
		}
		time.Sleep(200 * time.Microsecond)
	}
}
