// Package loadclient drives the httpcount test app from the host: N goroutines, each holding ONE
// keep-alive TCP connection for its whole life and never reconnecting, send requests back to
// back. A request that fails is counted and ends that client, so "zero failures and every
// client still answering" proves that the same connections survived, and the counter values
// prove that the server's memory did.
//
// With Options.Reconnect a client behaves like an ordinary HTTP client facing a restart
// instead: a failed request is counted, and the client retries it on a new connection every
// RetryInterval until it is answered (benchmarks of restart-based updates).
package loadclient

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Report is what the clients saw.
type Report struct {
	Requests  int           // answered requests
	Failures  int           // failed requests (each ends its client)
	Errors    []string      // the failures
	MaxGap    time.Duration // longest wait for one answer: the client-visible pause
	LastValue int64         // highest counter value seen
	// Regressions counts answers whose value was not above the previous answer on the same
	// connection: the server's state went backwards (lost).
	Regressions int
	// Versions counts answers per server version, for servers that say theirs ("demo v2 …").
	Versions    map[string]int
	LastVersion string   // version in the latest answer
	LocalAddrs  []string // each client's local address (the connection identity)
	PerClient   []int    // answered requests per client, in LocalAddrs order
}

// Options change how clients react to failures.
type Options struct {
	// Reconnect retries a failed request on a new connection instead of ending the client.
	// Every failed attempt counts as a failure; the wait for the answer (MaxGap) runs from the
	// first attempt.
	Reconnect bool
	// RetryInterval is the pause before a retry; default 50 ms.
	RetryInterval time.Duration
}

// Load is a running set of clients.
type Load struct {
	opts   Options
	addr   string
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	rep    Report
}

// Start opens n connections to addr (host:port) and starts sending requests on each, pausing
// interval between a client's requests. It returns once every connection answered one
// request, or the first error.
func Start(ctx context.Context, addr string, n int, interval time.Duration) (*Load, error) {
	return StartWith(ctx, addr, n, interval, Options{})
}

// StartWith is Start with options.
func StartWith(ctx context.Context, addr string, n int, interval time.Duration, o Options) (*Load, error) {
	if o.RetryInterval <= 0 {
		o.RetryInterval = 50 * time.Millisecond
	}
	ctx, cancel := context.WithCancel(ctx)
	l := &Load{cancel: cancel, opts: o, addr: addr}
	conns := make([]net.Conn, 0, n)
	for i := 0; i < n; i++ {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			cancel()
			return nil, fmt.Errorf("connect client %d to %s: %w", i, addr, err)
		}
		conns = append(conns, c)
		l.rep.LocalAddrs = append(l.rep.LocalAddrs, c.LocalAddr().String())
	}
	l.rep.PerClient = make([]int, n)
	ready := make(chan error, n)
	for i, c := range conns {
		l.wg.Add(1)
		go l.run(ctx, i, c, interval, ready)
	}
	for i := 0; i < n; i++ {
		if err := <-ready; err != nil {
			l.Stop()
			return nil, err
		}
	}
	return l, nil
}

func (l *Load) run(ctx context.Context, idx int, c net.Conn, interval time.Duration, ready chan<- error) {
	defer l.wg.Done()
	cur := c
	defer func() { cur.Close() }()
	stop := context.AfterFunc(ctx, func() {
		l.mu.Lock()
		cur.SetDeadline(time.Now())
		l.mu.Unlock()
	})
	defer stop()
	br := bufio.NewReader(c)
	var prev int64
	first := true
	for ctx.Err() == nil {
		t0 := time.Now()
		v, ver, err := request(cur, br)
		for err != nil && l.opts.Reconnect && !first && ctx.Err() == nil {
			l.fail(cur, err)
			select {
			case <-ctx.Done():
			case <-time.After(l.opts.RetryInterval):
			}
			var nc net.Conn
			if nc, err = l.redial(ctx, &cur); err == nil {
				br = bufio.NewReader(nc)
				v, ver, err = request(nc, br)
			}
		}
		gap := time.Since(t0)
		if ctx.Err() != nil {
			break // stopped mid-request: not a failure
		}
		if err != nil {
			l.fail(cur, err)
		}
		l.mu.Lock()
		if err == nil {
			l.rep.Requests++
			l.rep.PerClient[idx]++
			if gap > l.rep.MaxGap {
				l.rep.MaxGap = gap
			}
			if v > l.rep.LastValue {
				l.rep.LastValue = v
			}
			if v <= prev {
				l.rep.Regressions++
			}
			if ver != "" {
				if l.rep.Versions == nil {
					l.rep.Versions = map[string]int{}
				}
				l.rep.Versions[ver]++
				l.rep.LastVersion = ver
			}
			prev = v
		}
		l.mu.Unlock()
		if first {
			first = false
			ready <- err
		}
		if err != nil {
			return
		}
		if interval > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(interval):
			}
		}
	}
}

// maxErrors bounds the failures kept verbatim in the report (a restart can cause hundreds).
const maxErrors = 32

func (l *Load) fail(c net.Conn, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.rep.Failures++
	if len(l.rep.Errors) < maxErrors {
		l.rep.Errors = append(l.rep.Errors, fmt.Sprintf("%s: %v", c.LocalAddr(), err))
	}
}

// redial replaces *cur with a new connection to the same address.
func (l *Load) redial(ctx context.Context, cur *net.Conn) (net.Conn, error) {
	d := net.Dialer{Timeout: time.Second}
	nc, err := d.DialContext(ctx, "tcp", l.addr)
	if err != nil {
		return nil, fmt.Errorf("reconnect: %w", err)
	}
	l.mu.Lock()
	(*cur).Close()
	*cur = nc
	l.mu.Unlock()
	return nc, nil
}

func request(c net.Conn, br *bufio.Reader) (int64, string, error) {
	c.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: counter\r\n\r\n"); err != nil {
		return 0, "", fmt.Errorf("send: %w", err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return 0, "", fmt.Errorf("read answer: %w", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return 0, "", fmt.Errorf("read body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return 0, "", fmt.Errorf("status %s", resp.Status)
	}
	return parseAnswer(string(body))
}

// parseAnswer reads a counter answer: httpcount's "count N" or the demo app's
// "demo VERSION count=N pid=P".
func parseAnswer(body string) (int64, string, error) {
	f := strings.Fields(body)
	for i, w := range f {
		var num string
		switch {
		case w == "count" && i+1 < len(f):
			num = f[i+1]
		case strings.HasPrefix(w, "count="):
			num = strings.TrimPrefix(w, "count=")
		default:
			continue
		}
		v, err := strconv.ParseInt(num, 10, 64)
		if err != nil {
			break
		}
		ver := ""
		if len(f) > 1 && f[0] == "demo" {
			ver = f[1]
		}
		return v, ver, nil
	}
	return 0, "", fmt.Errorf("answer %q is not a counter value", body)
}

// Snapshot returns the report so far.
func (l *Load) Snapshot() Report {
	l.mu.Lock()
	defer l.mu.Unlock()
	r := l.rep
	r.Errors = append([]string(nil), r.Errors...)
	r.LocalAddrs = append([]string(nil), r.LocalAddrs...)
	r.PerClient = append([]int(nil), r.PerClient...)
	if r.Versions != nil {
		vs := make(map[string]int, len(r.Versions))
		for k, v := range r.Versions {
			vs[k] = v
		}
		r.Versions = vs
	}
	return r
}

// Stop ends the clients and returns the final report.
func (l *Load) Stop() Report {
	l.cancel()
	l.wg.Wait()
	return l.Snapshot()
}

// WaitProgress waits until every client answered at least min more requests than in before.
// It fails at once when a request failed (unless clients reconnect), and when timeout passes
// first.
func (l *Load) WaitProgress(before Report, min int, timeout time.Duration) (Report, error) {
	deadline := time.Now().Add(timeout)
	for {
		now := l.Snapshot()
		if now.Failures > 0 && !l.opts.Reconnect {
			return now, fmt.Errorf("client requests failed: %v", now.Errors)
		}
		ok := true
		for i := range now.PerClient {
			if i >= len(before.PerClient) || now.PerClient[i] < before.PerClient[i]+min {
				ok = false
			}
		}
		if ok {
			return now, nil
		}
		if time.Now().After(deadline) {
			return now, fmt.Errorf("clients stopped answering: %v answers before, %v now", before.PerClient, now.PerClient)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
