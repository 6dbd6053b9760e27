package update

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Health is how the update checks that the restored container serves: nothing, a TCP
// connect, or an HTTP GET answered with a 2xx/3xx status. Probes run from inside the
// container's network namespace (over its loopback), so they work while client traffic is
// still held and they never show up as client traffic.
type Health struct {
	TCPPort  uint16 // --health-tcp PORT
	HTTPPort uint16 // --health-http PORT/PATH
	HTTPPath string
	Timeout  time.Duration // how long the probe may keep failing before the update rolls back
}

// ParseHealthHTTP parses PORT/PATH (e.g. 8080/healthz).
func ParseHealthHTTP(s string) (port uint16, path string, err error) {
	p, rest, _ := strings.Cut(s, "/")
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		return 0, "", fmt.Errorf("--health-http %q: want PORT/PATH, e.g. 8080/healthz", s)
	}
	return uint16(n), "/" + rest, nil
}

// Enabled reports whether a probe is configured.
func (h Health) Enabled() bool { return h.TCPPort != 0 || h.HTTPPort != 0 }

func (h Health) String() string {
	switch {
	case h.HTTPPort != 0:
		return fmt.Sprintf("http :%d%s", h.HTTPPort, h.HTTPPath)
	case h.TCPPort != 0:
		return fmt.Sprintf("tcp :%d", h.TCPPort)
	}
	return "none"
}

// wait probes until it passes or the timeout ends; it returns the number of attempts.
func (h Health) wait(ctx context.Context, netnsPath string, ip netip.Addr) (int, error) {
	if !h.Enabled() {
		return 0, nil
	}
	timeout := h.Timeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for n := 1; ; n++ {
		last = h.once(ctx, netnsPath, ip)
		if last == nil {
			return n, nil
		}
		select {
		case <-ctx.Done():
			return n, fmt.Errorf("health probe %s failed for %s: %w", h, timeout, last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (h Health) once(ctx context.Context, netnsPath string, ip netip.Addr) error {
	port := h.TCPPort
	if h.HTTPPort != 0 {
		port = h.HTTPPort
	}
	conn, err := dialInNetns(ctx, netnsPath, netip.AddrPortFrom(ip, port))
	if err != nil {
		return err
	}
	defer conn.Close()
	if h.HTTPPort == 0 {
		return nil
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nUser-Agent: hot-update-probe\r\n\r\n", h.HTTPPath, ip)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return fmt.Errorf("GET %s: %w", h.HTTPPath, err)
	}
	resp.Body.Close()
	if resp.StatusCode >= 400 {
		return fmt.Errorf("GET %s: %s", h.HTTPPath, resp.Status)
	}
	return nil
}

// dialInNetns opens a TCP connection from inside the network namespace at netnsPath. The
// socket is created on an OS thread switched into that namespace (a socket stays in the
// namespace it was created in); the thread is switched back before it is released.
func dialInNetns(ctx context.Context, netnsPath string, to netip.AddrPort) (net.Conn, error) {
	type result struct {
		conn net.Conn
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("open own netns: %w", err)}
			return
		}
		target, err := unix.Open(netnsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			unix.Close(orig)
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("open netns %s: %w", netnsPath, err)}
			return
		}
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			unix.Close(orig)
			unix.Close(target)
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("enter netns %s: %w", netnsPath, err)}
			return
		}
		unix.Close(target)
		var d net.Dialer
		d.Timeout = time.Second
		// Dial creates the socket on this thread; the connect may finish elsewhere, which is
		// fine: the socket belongs to the namespace it was made in.
		c, derr := d.DialContext(ctx, "tcp", to.String())
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			// Never hand a thread in the wrong namespace back to the scheduler: let it die.
			unix.Close(orig)
			ch <- result{conn: c, err: derr}
			return
		}
		unix.Close(orig)
		runtime.UnlockOSThread()
		ch <- result{conn: c, err: derr}
	}()
	r := <-ch
	if r.err != nil {
		return nil, r.err
	}
	if r.conn == nil {
		return nil, errors.New("dial: no connection")
	}
	return r.conn, nil
}
