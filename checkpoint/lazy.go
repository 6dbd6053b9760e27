package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/sockets"
)

// Post-copy: a lazy dump (ContainerOptions.PageServer) writes every image but the memory
// pages, which CRIU keeps in its page pipes and serves from a page server; a restore with
// `criu lazy-pages --page-server` pulls them while the restored processes already run.
// CRIU's dump returns only once the pages are gone (or the transfer failed: then it resumes
// the original processes, as after any failed dump), so it runs in the background: LazyDump.

// pipeMaxSizeFile is fs.pipe-max-size. CRIU's page server asks for pipes of about 3.3 MB;
// the kernel default is 1 MB, and then the transfer fails with "page-pipe: splice: -1: Bad
// file descriptor" (without CAP_SYS_RESOURCE CRIU cannot exceed the limit itself).
const (
	pipeMaxSizeFile = "/proc/sys/fs/pipe-max-size"
	pipeMaxForCRIU  = 4 << 20
)

// RaisePipeMaxSize raises fs.pipe-max-size to what CRIU's page server needs and returns a
// function that puts the old value back, and a note saying what was done ("" if nothing).
func RaisePipeMaxSize() (undo func(), note string, err error) {
	b, err := os.ReadFile(pipeMaxSizeFile)
	if err != nil {
		return func() {}, "", fmt.Errorf("read %s: %w", pipeMaxSizeFile, err)
	}
	old, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return func() {}, "", fmt.Errorf("parse %s: %w", pipeMaxSizeFile, err)
	}
	if old >= pipeMaxForCRIU {
		return func() {}, "", nil
	}
	if err := os.WriteFile(pipeMaxSizeFile, []byte(strconv.Itoa(pipeMaxForCRIU)), 0o644); err != nil {
		return func() {}, "", fmt.Errorf("raise fs.pipe-max-size to %d for CRIU's page server: %w", pipeMaxForCRIU, err)
	}
	undo = func() { os.WriteFile(pipeMaxSizeFile, []byte(strconv.Itoa(old)), 0o644) }
	return undo, fmt.Sprintf("fs.pipe-max-size raised from %d to %d during the transfer (CRIU's page server needs ~3.3 MB pipes); put back afterwards", old, pipeMaxForCRIU), nil
}

// PipeMaxSize returns fs.pipe-max-size.
func PipeMaxSize() (int, error) {
	b, err := os.ReadFile(pipeMaxSizeFile)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", pipeMaxSizeFile, err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("parse %s: %w", pipeMaxSizeFile, err)
	}
	return n, nil
}

// RestorePipeMaxSize puts fs.pipe-max-size back to old if RaisePipeMaxSize's value is still
// set (for a recovery after the process that raised it died).
func RestorePipeMaxSize(old int) error {
	if old <= 0 || old >= pipeMaxForCRIU {
		return nil
	}
	if cur, err := PipeMaxSize(); err != nil || cur != pipeMaxForCRIU {
		return err
	}
	return os.WriteFile(pipeMaxSizeFile, []byte(strconv.Itoa(old)), 0o644)
}

// FreePort returns ip:port with a TCP port that was free on ip a moment ago.
func FreePort(ip string) (string, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		return "", fmt.Errorf("find a free port for the page server: %w", err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr, nil
}

// AbortPageServer makes the lazy dump serving at addr fail (an invalid request): CRIU then
// resumes the processes it holds. For a recovery that lost the LazyDump; a page server that
// is gone already is not an error.
func AbortPageServer(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil
		}
		return fmt.Errorf("abort page server %s: %w", addr, err)
	}
	defer c.Close()
	_, err = c.Write(invalidRequest)
	return err
}

// LazyDump is a lazy dump running in the background.
type LazyDump struct {
	// Addr is the page server's ADDR:PORT.
	Addr string
	// State is the copy of the container state the dump works on; once Wait returned
	// without error it says checkpointed (the processes are gone).
	State container.State
	done  chan lazyResult
	res   *lazyResult
	// dumped is closed by CRIU's post-dump notification: every image but the pages is
	// written and the page server is about to listen.
	dumped chan struct{}
}

type lazyResult struct {
	res *ContainerResult
	err error
}

// StartLazyDump starts a lazy dump of the running container st (held locked by the caller)
// with its page server on o.PageServer. It works on a copy of st (LazyDump.State): the
// caller's st is not touched.
func StartLazyDump(ctx context.Context, mgr *container.Manager, st *container.State, o ContainerOptions) *LazyDump {
	d := &LazyDump{Addr: o.PageServer, State: *st, done: make(chan lazyResult, 1), dumped: make(chan struct{})}
	o.afterDump = func() { close(d.dumped) }
	go func() {
		r, err := ContainerLocked(ctx, mgr, &d.State, o)
		d.done <- lazyResult{r, err}
	}()
	return d
}

// WaitImages waits until CRIU wrote every image but the pages (its post-dump notification);
// its page server starts listening a moment later: a client must retry a refused connection
// briefly (PageGate does). It returns the dump's error if the dump ended instead.
func (d *LazyDump) WaitImages(ctx context.Context, timeout time.Duration) error {
	select {
	case <-d.dumped:
		return nil
	case r := <-d.done:
		d.res = &r
		if r.err != nil {
			return r.err
		}
		return errors.New("the lazy dump ended before its page server started")
	case <-time.After(timeout):
		return fmt.Errorf("CRIU's lazy dump did not finish writing its images within %v", timeout)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// WaitServing waits until the page server listens (CRIU wrote every image but the pages),
// or the dump ended (an error, or a dump that did not start a page server).
func (d *LazyDump) WaitServing(ctx context.Context, timeout time.Duration) error {
	want, err := netip.ParseAddrPort(d.Addr)
	if err != nil {
		return err
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	// Until the post-dump notification nothing can listen: no need to poll.
	select {
	case <-d.dumped:
	case r := <-d.done:
		d.res = &r
		if r.err != nil {
			return r.err
		}
		return errors.New("the lazy dump ended before its page server listened")
	case <-deadline.C:
		return fmt.Errorf("CRIU's lazy dump did not finish writing its images within %v", timeout)
	case <-ctx.Done():
		return ctx.Err()
	}
	for {
		select {
		case r := <-d.done:
			d.res = &r
			if r.err != nil {
				return r.err
			}
			return errors.New("the lazy dump ended before its page server listened")
		case <-deadline.C:
			return fmt.Errorf("CRIU's page server did not listen on %s within %v", d.Addr, timeout)
		default:
		}
		conns, err := sockets.ListTCP(ctx, "/proc/self/ns/net")
		if err != nil {
			return err
		}
		for _, c := range conns {
			if c.State == sockets.TCPListen && c.Local.Port() == want.Port() {
				return nil
			}
		}
		time.Sleep(500 * time.Microsecond)
	}
}

// Wait returns the dump's result once CRIU is done (all pages served, or the transfer failed).
func (d *LazyDump) Wait(timeout time.Duration) (*ContainerResult, error) {
	if d.res == nil {
		select {
		case r := <-d.done:
			d.res = &r
		case <-time.After(timeout):
			return nil, fmt.Errorf("CRIU's page server on %s still runs after %v", d.Addr, timeout)
		}
	}
	return d.res.res, d.res.err
}

// Abort ends a page server nobody will pull from (any more): a connection that sends no valid
// request makes CRIU's page server fail, and a lazy dump whose transfer failed resumes the
// processes (as any failed dump does). It returns Wait's result: an error when the processes
// were resumed, nil when CRIU had completed (every page had been pulled: they are gone).
func (d *LazyDump) Abort() (*ContainerResult, error) {
	// The page server may not listen yet, or have ended already (a transfer another side
	// failed): retry a refused connection until the dump ends or a few seconds passed.
	deadline := time.Now().Add(5 * time.Second)
	for d.res == nil && time.Now().Before(deadline) {
		select {
		case r := <-d.done:
			d.res = &r
			continue
		default:
		}
		c, err := net.DialTimeout("tcp", d.Addr, time.Second)
		if err == nil {
			c.Write(invalidRequest)
			c.Close()
			break
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	return d.Wait(30 * time.Second)
}
