package migrate

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/sockets"
)

// Post-copy (--lazy): CRIU dumps everything but the memory pages and keeps those in its page
// pipes, served by a page server on the source; the target restores first and its
// `criu lazy-pages --page-server` pulls the pages while the processes already run. CRIU's
// dump returns only once the pages are gone, so it runs in the background here.

// pipeMaxSizeFile is fs.pipe-max-size. CRIU's page server asks for pipes of about 3.3 MB;
// the kernel default is 1 MB, and then the transfer fails with "page-pipe: splice: -1: Bad
// file descriptor" (without CAP_SYS_RESOURCE CRIU cannot exceed the limit itself).
const (
	pipeMaxSizeFile = "/proc/sys/fs/pipe-max-size"
	pipeMaxForCRIU  = 4 << 20
)

// raisePipeMaxSize raises fs.pipe-max-size to what CRIU's page server needs and returns a
// function that puts the old value back, and a note saying what was done ("" if nothing).
func raisePipeMaxSize() (undo func(), note string, err error) {
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

// lazyDump is a lazy dump running in the background.
type lazyDump struct {
	addr string // page server ADDR:PORT as the target reaches it
	done chan lazyDumpResult
	res  *lazyDumpResult
}

type lazyDumpResult struct {
	res *checkpoint.ContainerResult
	err error
}

// pageServerAddr picks the local address the target reaches us by (the route towards it) and
// a free port on it.
func pageServerAddr(to string) (string, error) {
	c, err := net.Dial("udp", to) // no packet is sent: this only asks for the route
	if err != nil {
		return "", fmt.Errorf("find the local address towards %s: %w", to, err)
	}
	ip := c.LocalAddr().(*net.UDPAddr).IP
	c.Close()
	l, err := net.Listen("tcp", net.JoinHostPort(ip.String(), "0"))
	if err != nil {
		return "", fmt.Errorf("find a free port for the page server: %w", err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr, nil
}

// waitListening waits until the page server listens (CRIU wrote every image but the pages),
// or the dump ended (an error, or a dump that did not start a page server).
func (d *lazyDump) waitListening(ctx context.Context, timeout time.Duration) error {
	want, err := netip.ParseAddrPort(d.addr)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for {
		select {
		case r := <-d.done:
			d.res = &r
			if r.err != nil {
				return r.err
			}
			return errors.New("the lazy dump ended before its page server listened")
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
		if time.Now().After(deadline) {
			return fmt.Errorf("CRIU's page server did not listen on %s within %v", d.addr, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// wait returns the dump's result once CRIU is done (all pages served, or the transfer failed).
func (d *lazyDump) wait(timeout time.Duration) (*checkpoint.ContainerResult, error) {
	if d.res == nil {
		select {
		case r := <-d.done:
			d.res = &r
		case <-time.After(timeout):
			return nil, fmt.Errorf("CRIU's page server on %s still runs after %v", d.addr, timeout)
		}
	}
	return d.res.res, d.res.err
}

// abort ends a page server nobody will pull from: a connection that sends no valid request
// makes CRIU's page server fail, and a lazy dump whose transfer failed resumes the processes
// (as any failed dump does), so the container runs on here.
func (d *lazyDump) abort() (*checkpoint.ContainerResult, error) {
	if d.res == nil {
		if c, err := net.DialTimeout("tcp", d.addr, 2*time.Second); err == nil {
			c.Write([]byte(strings.Repeat("\xff", 64)))
			c.Close()
		}
	}
	return d.wait(30 * time.Second)
}

// precopyNote says whether pre-copy (iterative dumps while the container runs, tracking the
// pages it dirties) could shorten the pause here: it needs the kernel's soft-dirty bits,
// which `criu check --feature mem_dirty_track` probes.
func precopyNote(ctx context.Context, criu string) string {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := exec.CommandContext(cctx, criu, "check", "--feature", "mem_dirty_track").Run(); err != nil {
		return "pre-copy unavailable: this kernel has no soft-dirty page tracking (MEM_SOFT_DIRTY); post-copy only"
	}
	return "pre-copy possible on this kernel (soft-dirty tracking), not used: post-copy only"
}
