package sockets

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ErrNotSupported is matched (errors.Is) by every error that says holding packets cannot work
// on this host; the caller then falls back to CRIU's network lock (which drops packets).
var ErrNotSupported = errors.New("holding packets is not supported on this host")

// NotSupportedError names what is missing for holding packets and how to get it.
type NotSupportedError struct {
	Missing string // "iptables CLI", "nsenter", "nfnetlink_queue", "NFQUEUE target"
	Fix     string // what the operator can do
	Err     error  // the failure that showed it, if any
}

func (e *NotSupportedError) Error() string {
	msg := fmt.Sprintf("hold packets: %s is missing", e.Missing)
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	if e.Fix != "" {
		msg += " (" + e.Fix + ")"
	}
	return msg
}

// Is makes errors.Is(err, ErrNotSupported) true.
func (e *NotSupportedError) Is(target error) bool { return target == ErrNotSupported }

// Unwrap returns the underlying failure.
func (e *NotSupportedError) Unwrap() error { return e.Err }

// HoldSupported finds out, by trying, whether this host can hold packets: in a scratch network
// namespace it starts a Holder (nsenter, iptables with an NFQUEUE target, nfnetlink_queue) and
// checks that a UDP datagram to loopback passes through the reader. nil means it works; an
// error matching ErrNotSupported names what is missing. Takes some tens of milliseconds.
func HoldSupported(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()))
		if err != nil {
			errc <- fmt.Errorf("hold probe: open own network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("hold probe: create scratch network namespace: %w", err)
			return
		}
		errc <- holdProbe(ctx)
		// Back to the original netns before the thread serves other goroutines (the scratch
		// namespace then goes away); if that fails the thread stays locked and ends with us.
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
	}()
	return <-errc
}

func holdProbe(ctx context.Context) error {
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		return fmt.Errorf("hold probe: bring up loopback in scratch network namespace: %w", err)
	}
	path := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
	h, err := NewHolder(ctx, path, HoldOptions{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	defer h.Close()
	// The hold rules leave loopback alone, and the probe can only talk over loopback: queue
	// that too, for the probe (the scratch namespace and its rules go away afterwards).
	probeRule := []string{"-w", "-t", holdTable, "-I", "PREROUTING", "1", "-i", "lo", "-j", "NFQUEUE", "--queue-num", fmt.Sprint(h.Queue())}
	if _, err := runIn(ctx, path, "", h.rules[0].tool.Cmd, probeRule...); err != nil {
		return &NotSupportedError{Missing: "NFQUEUE target", Fix: "a kernel with CONFIG_NETFILTER_XT_TARGET_NFQUEUE", Err: err}
	}
	// Sockets created on this thread live in the scratch namespace.
	rx, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("hold probe: listen: %w", err)
	}
	defer rx.Close()
	tx, err := net.Dial("udp4", rx.LocalAddr().String())
	if err != nil {
		return fmt.Errorf("hold probe: dial: %w", err)
	}
	defer tx.Close()
	if _, err := tx.Write([]byte("hot hold probe")); err != nil {
		return fmt.Errorf("hold probe: send: %w", err)
	}
	if err := rx.SetReadDeadline(time.Now().Add(2 * time.Second)); err != nil {
		return err
	}
	buf := make([]byte, 64)
	if _, _, err := rx.ReadFrom(buf); err != nil {
		return &NotSupportedError{Missing: "NFQUEUE target", Fix: "a kernel whose NFQUEUE delivers packets to nfnetlink_queue readers",
			Err: fmt.Errorf("probe datagram never passed the queue: %w", err)}
	}
	if h.Stats().PassedPackets == 0 {
		return &NotSupportedError{Missing: "NFQUEUE target", Fix: "check that the iptables rule reaches the kernel",
			Err: errors.New("probe datagram arrived without passing the queue")}
	}
	return h.Close()
}
