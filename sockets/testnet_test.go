package sockets

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hotctl/hot/internal/testutil"
	"github.com/vishvananda/netns"
)

// testNet is a network namespace made for one test, joined to the host by a veth pair.
type testNet struct {
	Name   string // ip netns name
	Path   string // bind-mounted netns file
	HostIP netip.Addr
	NsIP   netip.Addr
}

// newTestNet creates a netns with a veth to the host, with unique names and a random /30
// out of 10.231.0.0/16 (traffic stays between the host and this namespace), removed at cleanup.
func newTestNet(t testing.TB) *testNet {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireCommand(t, "ip")
	testutil.RequireCommand(t, "nsenter")
	testutil.RequireCommand(t, "iptables")
	b := make([]byte, 3)
	rand.Read(b)
	id := hex.EncodeToString(b)
	name := "hotsk-" + id
	hostIf, nsIf := "hsk"+id+"h", "hsk"+id+"n"
	sub := 4 * int(b[2]%63)
	n := &testNet{
		Name:   name,
		Path:   "/run/netns/" + name,
		HostIP: netip.AddrFrom4([4]byte{10, 231, b[1], byte(sub + 1)}),
		NsIP:   netip.AddrFrom4([4]byte{10, 231, b[1], byte(sub + 2)}),
	}
	sh(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		exec.Command("ip", "link", "del", hostIf).Run()
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Logf("remove netns %s: %v: %s", name, err, out)
		}
	})
	sh(t, "ip", "link", "add", hostIf, "type", "veth", "peer", "name", nsIf, "netns", name)
	sh(t, "ip", "addr", "add", n.HostIP.String()+"/30", "dev", hostIf)
	sh(t, "ip", "link", "set", hostIf, "up")
	sh(t, "ip", "-n", name, "addr", "add", n.NsIP.String()+"/30", "dev", nsIf)
	sh(t, "ip", "-n", name, "link", "set", nsIf, "up")
	sh(t, "ip", "-n", name, "link", "set", "lo", "up")
	return n
}

func sh(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// inNetns runs fn on a thread that entered the netns at path, then puts the thread back.
func inNetns(t testing.TB, path string, fn func() error) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		ns, err := netns.GetFromPath(path)
		if err != nil {
			errc <- err
			return
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			errc <- err
			return
		}
		errc <- fn()
		// Back to the original netns before the thread serves other goroutines; if that fails
		// the thread stays locked and ends with this goroutine.
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
	}()
	if err := <-errc; err != nil {
		t.Fatalf("in netns %s: %v", path, err)
	}
}

// echoServer answers every line "ping N" with "pong N" on each connection. It counts the
// lines it received, so a test can tell whether a request reached it.
type echoServer struct {
	Addr  netip.AddrPort
	ln    net.Listener
	lines atomic.Int64
	wg    sync.WaitGroup // the accept loop
}

// startEchoServer listens inside the test netns (the listening socket is created there and
// stays there; accepting and serving run on any thread).
func startEchoServer(t testing.TB, n *testNet) *echoServer {
	t.Helper()
	s := &echoServer{}
	inNetns(t, n.Path, func() error {
		ln, err := net.Listen("tcp4", net.JoinHostPort(n.NsIP.String(), "0"))
		s.ln = ln
		return err
	})
	s.Addr = netip.MustParseAddrPort(s.ln.Addr().String())
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		serveEcho(s.ln, &s.lines)
	}()
	t.Cleanup(func() { s.ln.Close() })
	return s
}

// serveEcho answers "ping N" with "pong N" on every connection of ln until ln is closed,
// counting the lines received.
func serveEcho(ln net.Listener, lines *atomic.Int64) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				lines.Add(1)
				if _, err := c.Write([]byte("pong" + strings.TrimPrefix(line, "ping"))); err != nil {
					return
				}
			}
		}()
	}
}

// client is a keep-alive connection from the host to the echo server.
type client struct {
	conn net.Conn
	r    *bufio.Reader
	n    int
}

func dialClient(t testing.TB, addr netip.AddrPort) *client {
	t.Helper()
	c, err := net.DialTimeout("tcp4", addr.String(), 2*time.Second)
	if err != nil {
		t.Fatalf("dial echo server %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return &client{conn: c, r: bufio.NewReader(c)}
}

// send writes the next request and returns its number.
func (c *client) send() (int, error) {
	c.n++
	_, err := fmt.Fprintf(c.conn, "ping %d\n", c.n)
	return c.n, err
}

// await reads the answer to request n, waiting at most d.
func (c *client) await(n int, d time.Duration) error {
	c.conn.SetReadDeadline(time.Now().Add(d))
	line, err := c.r.ReadString('\n')
	if err != nil {
		return err
	}
	if want := fmt.Sprintf("pong %d\n", n); line != want {
		return fmt.Errorf("answer %q, want %q", line, want)
	}
	return nil
}

// roundTrip sends one request and waits for its answer, returning the time it took.
func (c *client) roundTrip(d time.Duration) (time.Duration, error) {
	start := time.Now()
	n, err := c.send()
	if err != nil {
		return 0, err
	}
	err = c.await(n, d)
	return time.Since(start), err
}

// expectNoAnswer fails the test unless request req stays unanswered for d and the server
// receives nothing meanwhile (not even the request, wherever it got stuck).
func (c *client) expectNoAnswer(t testing.TB, srv *echoServer, req int, d time.Duration) {
	t.Helper()
	seen := srv.lines.Load()
	var ne net.Error
	if err := c.await(req, d); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("request %d was answered or failed while traffic should be stopped: %v", req, err)
	}
	if got := srv.lines.Load(); got != seen {
		t.Fatalf("server received %d requests while traffic should be stopped, want 0", got-seen)
	}
}

// local returns the client's local address.
func (c *client) local() netip.AddrPort { return netip.MustParseAddrPort(c.conn.LocalAddr().String()) }

// hostRetransmits returns the client socket's lifetime retransmission count (sock_diag in the
// netns of this test process: /proc/thread-self, as a wedged main thread may sit elsewhere).
func (c *client) hostRetransmits(t testing.TB) uint32 {
	t.Helper()
	conns, err := ListTCP(context.Background(), "/proc/thread-self/ns/net")
	if err != nil {
		t.Fatalf("list host TCP sockets: %v", err)
	}
	for _, tc := range conns {
		if tc.Local == c.local() {
			return tc.Retransmits
		}
	}
	t.Fatalf("client socket %s not found in host sock_diag", c.local())
	return 0
}
