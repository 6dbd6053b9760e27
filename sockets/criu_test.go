package sockets

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/internal/testutil"
	"golang.org/x/sys/unix"
)

// echoEnv makes the test binary an echo server process listening on the address it holds
// (the process CRIU dumps and restores in TestCRIUHoldVersusLock).
const echoEnv = "HOT_SOCKETS_TEST_ECHO_ADDR"

func TestMain(m *testing.M) {
	if addr := os.Getenv(echoEnv); addr != "" {
		ln, err := net.Listen("tcp4", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "echo server:", err)
			os.Exit(1)
		}
		var lines atomic.Int64
		serveEcho(ln, &lines)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// criuServer is the echo server process in the test netns, dumped and restored by real CRIU.
type criuServer struct {
	t      *testing.T
	criu   string
	net    *testNet
	dir    string
	addr   netip.AddrPort
	pid    int
	reaped chan struct{} // closed when the first incarnation (our child) was reaped
}

// TestCRIUHoldVersusLock runs a real `criu dump` + `criu restore` (TCP connection kept) of a
// server in its own netns while a keep-alive client in the host netns has a request in
// flight: once with CRIU's nftables network lock (packets dropped), once with a Holder and
// --network-lock skip. Held, the client waits the pause and not a retransmission more.
func TestCRIUHoldVersusLock(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireCommand(t, "nft")
	ctx := context.Background()
	bin, err := criubin.Find(ctx, "")
	if err != nil {
		t.Skipf("CRIU >= 4.2 not available (make deps installs it): %v", err)
	}
	// Restored processes are reparented to the nearest child subreaper, else to PID 1, which
	// on some hosts never reaps them: then a dumped (killed) incarnation stays a zombie and
	// holds the PID the next restore needs. Be the subreaper and reap them ourselves.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatalf("become child subreaper: %v", err)
	}
	t.Cleanup(func() { unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) })
	n := newTestNet(t)
	s := startCRIUServer(t, bin.Path, n)
	c := dialClient(t, s.addr)
	roundTrips(t, c, 5)

	for _, mode := range []string{"nftables", "hold"} {
		roundTrips(t, c, 5)
		before, err := CountEstablished(ctx, n.Path)
		if err != nil {
			t.Fatal(err)
		}
		retrans := c.hostRetransmits(t)
		var h *Holder
		lock := "nftables"
		if mode == "hold" {
			lock = "skip"
			h = newTestHolder(t, n)
			if err := h.Hold(); err != nil {
				t.Fatal(err)
			}
		}
		dump := s.startDump(mode, lock)
		if mode == "nftables" {
			s.waitForCRIULock()
		}
		sent := time.Now()
		req, err := c.send()
		if err != nil {
			t.Fatal(err)
		}
		// A new client connects during the pause too: its SYN is dropped by the lock (next
		// try after the 1 s initial retransmission timeout) or held.
		connected := make(chan time.Duration, 1)
		go func() {
			start := time.Now()
			nc, err := net.DialTimeout("tcp4", s.addr.String(), 10*time.Second)
			if err != nil {
				connected <- -1
				return
			}
			connected <- time.Since(start)
			nc.Close()
		}()
		s.finishDump(dump, mode)
		s.restore(mode, lock)
		var st HoldStats
		if h != nil {
			if st, err = h.Release(); err != nil {
				t.Fatal(err)
			}
		}
		pause := time.Since(sent)
		if err := c.await(req, 10*time.Second); err != nil {
			log, _ := os.ReadFile(filepath.Join(s.dir, "server.log"))
			alive := syscall.Kill(s.pid, 0) == nil
			conns, _ := ListTCP(ctx, n.Path)
			t.Fatalf("%s: no answer on the same connection after restore: %v (server pid %d alive: %v; server log: %q; sockets: %+v)", mode, err, s.pid, alive, log, conns)
		}
		wait := time.Since(sent)
		connect := <-connected
		got := c.hostRetransmits(t) - retrans
		after, err := CountEstablished(ctx, n.Path)
		if err != nil {
			t.Fatal(err)
		}
		if h != nil {
			if err := h.Close(); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("%-8s pause (request sent -> restored%s) %v: client waited %v (+%v), %d retransmissions; new connection took %v; %d packets held, %d outgoing dropped; established before/after: %d/%d",
			mode, map[bool]string{true: " and released", false: ", unlocked"}[h != nil], pause.Round(time.Millisecond),
			wait.Round(time.Millisecond), (wait - pause).Round(time.Millisecond), got, connect.Round(time.Millisecond),
			st.Packets, st.OutputDropped, before, after)
		if connect < 0 {
			t.Errorf("%s: a connection opened during the pause failed", mode)
		}
		if before != 1 || after < 1 {
			t.Errorf("%s: established connections before/after = %d/%d, want 1/>=1", mode, before, after)
		}
		if locks, err := CRIULocks(ctx, n.Path); err != nil || len(locks) != 0 {
			t.Errorf("%s: CRIU lock left after restore: %q %v", mode, locks, err)
		}
		switch mode {
		case "nftables":
			if got == 0 {
				t.Errorf("the request sent under CRIU's lock was not retransmitted: was it sent inside the lock window?")
			}
		case "hold":
			if st.Packets < 1 {
				t.Errorf("nothing was held: %+v", st)
			}
			if wait-pause > slack {
				t.Errorf("held: client waited %v for a %v pause, want no retransmission penalty", wait, pause)
			}
			if connect > pause+slack {
				t.Errorf("held: a connection opened during the pause took %v (pause %v)", connect, pause)
			}
		}
		if _, err := c.roundTrip(2 * time.Second); err != nil {
			t.Fatalf("%s: same connection after restore: %v", mode, err)
		}
	}
}

func startCRIUServer(t *testing.T, criu string, n *testNet) *criuServer {
	t.Helper()
	s := &criuServer{t: t, criu: criu, net: n, dir: t.TempDir(), reaped: make(chan struct{})}
	s.addr = netip.AddrPortFrom(n.NsIP, uint16(20000+rand.IntN(20000)))
	log, err := os.Create(filepath.Join(s.dir, "server.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	// nsenter execs the server in place, so the whole process lives in the test netns; its own
	// session, so that CRIU dumps a self-contained tree.
	cmd := exec.Command("nsenter", "--net="+n.Path, "--", os.Args[0], "-test.run=^$")
	// Go listens with MPTCP by default since 1.24; CRIU 4.2 cannot dump MPTCP sockets
	// ("inet: Unsupported proto 262").
	cmd.Env = append(os.Environ(), echoEnv+"="+s.addr.String(), "GODEBUG=multipathtcp=0")
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.pid = cmd.Process.Pid
	go func() {
		cmd.Wait()
		close(s.reaped)
	}()
	t.Cleanup(func() {
		syscall.Kill(s.pid, syscall.SIGKILL)
		if s.reaped == nil {
			var ws syscall.WaitStatus
			syscall.Wait4(s.pid, &ws, 0, nil)
		}
	})
	for deadline := time.Now().Add(5 * time.Second); ; {
		c, err := net.DialTimeout("tcp4", s.addr.String(), time.Second)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(log.Name())
			t.Fatalf("echo server process did not start: %v: %s", err, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return s
}

func (s *criuServer) imagesDir(mode string) string { return filepath.Join(s.dir, mode) }

// startDump starts `criu dump` of the server with its external netns and TCP connections.
func (s *criuServer) startDump(mode, lock string) *exec.Cmd {
	s.t.Helper()
	img := s.imagesDir(mode)
	if err := os.MkdirAll(img, 0o700); err != nil {
		s.t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(s.net.Path, &st); err != nil {
		s.t.Fatal(err)
	}
	cmd := exec.Command(s.criu, "dump", "-t", strconv.Itoa(s.pid), "-D", img, "--tcp-established",
		"--external", fmt.Sprintf("net[%d]:hotnet", st.Ino), "--network-lock", lock, "-v4", "-o", "dump.log")
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	return cmd
}

// waitForCRIULock returns once CRIU's nftables lock drops input in the netns (CRIU creates
// the table first and adds its chains in separate steps).
func (s *criuServer) waitForCRIULock() {
	s.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		tables, err := criuTables(context.Background(), s.net.Path)
		if err != nil {
			s.t.Fatal(err)
		}
		if len(tables) > 0 {
			out, err := runIn(context.Background(), s.net.Path, "", "nft", "list", "table", tables[0])
			if err == nil && strings.Contains(out, "hook input") && strings.Contains(out, "0x0000c114") {
				return
			}
		}
		if time.Now().After(deadline) {
			s.t.Fatal("CRIU's network lock never appeared")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (s *criuServer) finishDump(dump *exec.Cmd, mode string) {
	s.t.Helper()
	if err := dump.Wait(); err != nil {
		s.t.Fatalf("criu dump: %v\n%s", err, logErrors(filepath.Join(s.imagesDir(mode), "dump.log")))
	}
	// The old PID must be free for restore: reap the dumped (killed) process.
	if s.reaped != nil {
		select {
		case <-s.reaped: // our child, reaped by cmd.Wait
		case <-time.After(5 * time.Second):
			s.t.Fatal("dumped server process was not reaped")
		}
		s.reaped = nil
		return
	}
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(s.pid, &ws, 0, nil); err != nil {
		s.t.Fatalf("reap dumped server %d: %v", s.pid, err)
	}
}

// restore runs `criu restore` detached, handing the netns in as fd 3.
func (s *criuServer) restore(mode, lock string) {
	s.t.Helper()
	img := s.imagesDir(mode)
	ns, err := os.Open(s.net.Path)
	if err != nil {
		s.t.Fatal(err)
	}
	defer ns.Close()
	pidfile := filepath.Join(img, "restored.pid")
	cmd := exec.Command(s.criu, "restore", "-D", img, "--tcp-established", "--inherit-fd", "fd[3]:hotnet",
		"-d", "--pidfile", pidfile, "--network-lock", lock, "-v4", "-o", "restore.log")
	cmd.ExtraFiles = []*os.File{ns}
	if out, err := cmd.CombinedOutput(); err != nil {
		s.t.Fatalf("criu restore: %v: %s\n%s", err, out, logErrors(filepath.Join(img, "restore.log")))
	}
	b, err := os.ReadFile(pidfile)
	if err != nil {
		s.t.Fatal(err)
	}
	if s.pid, err = strconv.Atoi(strings.TrimSpace(string(b))); err != nil {
		s.t.Fatal(err)
	}
}

// logErrors returns the error lines of a CRIU log (at most 20).
func logErrors(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(string(b), "\n")
	var errs []string
	for _, l := range lines {
		if strings.Contains(l, "Error") || strings.Contains(l, "rror (") {
			errs = append(errs, l)
		}
	}
	if len(errs) > 20 {
		errs = errs[:20]
	}
	return strings.Join(errs, "\n")
}
