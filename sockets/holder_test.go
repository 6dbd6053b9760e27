package sockets

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/internal/testutil"
)

// pause is how long the tests hold or drop traffic: the length of a short CRIU dump+restore,
// and below the 200 ms minimum retransmission timeout, so that holding shows no retransmission.
const pause = 150 * time.Millisecond

// slack is how much longer than the pause a held request may take to be answered: far above
// the sub-millisecond release measured on an idle host (the 2 cores are shared with other test
// suites), below the 200 ms a retransmission costs.
const slack = 120 * time.Millisecond

func newTestHolder(t testing.TB, n *testNet) *Holder {
	t.Helper()
	return newTestHolderOpts(t, n, HoldOptions{})
}

func newTestHolderOpts(t testing.TB, n *testNet, opts HoldOptions) *Holder {
	t.Helper()
	h, err := NewHolder(context.Background(), n.Path, opts)
	if errors.Is(err, ErrNotSupported) {
		t.Skipf("requires NFQUEUE packet holding (kernel feature), not supported here: %v", err)
	}
	if err != nil {
		t.Fatalf("NewHolder: %v", err)
	}
	t.Cleanup(func() {
		if err := h.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return h
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

func roundTrips(t testing.TB, c *client, count int) []time.Duration {
	t.Helper()
	var ds []time.Duration
	for range count {
		d, err := c.roundTrip(2 * time.Second)
		if err != nil {
			t.Fatalf("round trip %d: %v", c.n, err)
		}
		ds = append(ds, d)
	}
	return ds
}

func TestHoldSupported(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireCommand(t, "iptables")
	start := time.Now()
	if err := HoldSupported(context.Background()); err != nil {
		t.Fatalf("HoldSupported: %v (this host has NFQUEUE and nfnetlink_queue; see docs/hold.md)", err)
	}
	t.Logf("HoldSupported: ok in %v", time.Since(start).Round(time.Millisecond))
}

// (a) Between holds every packet goes straight through the reader.
func TestHolderPassThrough(t *testing.T) {
	n := newTestNet(t)
	srv := startEchoServer(t, n)
	c := dialClient(t, srv.Addr)
	direct := median(roundTrips(t, c, 200))

	h := newTestHolder(t, n)
	rules, err := HoldRules(context.Background(), n.Path)
	if err != nil || len(rules) == 0 {
		t.Fatalf("HoldRules with an open holder = %q, %v; want the NFQUEUE rule", rules, err)
	}
	through := median(roundTrips(t, c, 200))
	st := h.Stats()
	if st.PassedPackets < 200 {
		t.Errorf("reader accepted %d packets, want >= 200 (one request each)", st.PassedPackets)
	}
	if st.HeldPackets != 0 {
		t.Errorf("held %d packets without a hold", st.HeldPackets)
	}
	t.Logf("median round trip: direct %v, through the holder's reader %v (queue %d, %s): +%v",
		direct, through, st.Queue, st.Backend, through-direct)
}

// (b) During a hold the request does not reach the server; after Release it does, at once,
// on the same connection, with nothing retransmitted.
func TestHoldThenRelease(t *testing.T) {
	n := newTestNet(t)
	srv := startEchoServer(t, n)
	c := dialClient(t, srv.Addr)
	roundTrips(t, c, 5)
	h := newTestHolder(t, n)
	r := holdCycle(t, h, c, func(req int) { c.expectNoAnswer(t, srv, req, pause) })
	if r.Stats.Packets < 1 {
		t.Errorf("stats counted %d held packets, want >= 1: %+v", r.Stats.Packets, r.Stats)
	}
	if r.Retransmits != 0 {
		t.Errorf("client retransmitted %d segments during a %v hold, want 0", r.Retransmits, pause)
	}
	if r.AfterRelease > slack {
		t.Errorf("answer came %v after release: not released promptly", r.AfterRelease)
	}
	if _, err := c.roundTrip(2 * time.Second); err != nil {
		t.Fatalf("same connection after release: %v", err)
	}
	if h.Holding() {
		t.Error("still holding after Release")
	}
	t.Logf("held %d packets for %v (longest packet wait %v); release took %v; client waited %v, answer %v after release",
		r.Stats.Packets, r.Stats.HoldDuration.Round(time.Microsecond), r.Stats.MaxPacketWait.Round(time.Microsecond),
		r.Stats.ReleaseDuration, r.Wait.Round(time.Microsecond), r.AfterRelease.Round(time.Microsecond))
}

// (c) The same pause with a DROP rule, as CRIU's network lock does it: the client only gets its
// answer after its retransmission timer (>= 200 ms, doubling) fires. Held, it gets it at the
// end of the pause.
func TestHoldVersusDrop(t *testing.T) {
	n := newTestNet(t)
	srv := startEchoServer(t, n)
	c := dialClient(t, srv.Addr)
	roundTrips(t, c, 20)
	h := newTestHolder(t, n)
	for _, p := range []time.Duration{pause, 450 * time.Millisecond} {
		dropWait, dropRetrans := dropCycle(t, n, c, p)
		r := holdCycle(t, h, c, func(int) { time.Sleep(p) })
		holdWait, holdRetrans, st := r.Wait, r.Retransmits, r.Stats
		t.Logf("pause %v dropped (CRIU's lock): client waited %v, %d retransmissions", p, dropWait.Round(time.Millisecond), dropRetrans)
		t.Logf("pause %v held (NFQUEUE):       client waited %v, %d retransmissions, %d packets held, release took %v",
			p, holdWait.Round(time.Millisecond), holdRetrans, st.Packets, st.ReleaseDuration)
		if dropRetrans == 0 {
			t.Errorf("dropping for %v caused no retransmission: the comparison is void", p)
		}
		if p < 200*time.Millisecond && holdRetrans != 0 {
			t.Errorf("holding for %v caused %d retransmissions, want 0", p, holdRetrans)
		}
		if dropWait < 200*time.Millisecond {
			t.Errorf("dropped request answered after %v, before the 200 ms minimum retransmission timeout", dropWait)
		}
		if holdWait >= dropWait {
			t.Errorf("holding did not shorten the client's wait: held %v, dropped %v", holdWait, dropWait)
		}
		if holdWait > p+slack {
			t.Errorf("held request answered %v after it was sent, pause was %v", holdWait, p)
		}
	}
}

// dropCycle drops the netns's incoming traffic for p while one request is outstanding and
// returns how long the client waited for the answer and how many segments it retransmitted.
// The pause runs from the request until the DROP rule is gone (iptables takes a few ms).
func dropCycle(t *testing.T, n *testNet, c *client, p time.Duration) (time.Duration, uint32) {
	t.Helper()
	roundTrips(t, c, 5)
	retrans := c.hostRetransmits(t)
	spec := []string{"-m", "comment", "--comment", "hot-test-drop", "-j", "DROP"}
	if _, err := runIn(context.Background(), n.Path, "", "iptables", append([]string{"-w", "-I", "INPUT", "1"}, spec...)...); err != nil {
		t.Fatal(err)
	}
	sent := time.Now()
	req, err := c.send()
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(p - 10*time.Millisecond) // the rule removal below takes about 10 ms
	if _, err := runIn(context.Background(), n.Path, "", "iptables", append([]string{"-w", "-D", "INPUT"}, spec...)...); err != nil {
		t.Fatal(err)
	}
	if err := c.await(req, 10*time.Second); err != nil {
		t.Fatalf("answer after the drop rule went: %v", err)
	}
	return time.Since(sent), c.hostRetransmits(t) - retrans
}

// cycle is what a client saw of one hold.
type cycle struct {
	Wait         time.Duration // request sent to answer received
	AfterRelease time.Duration // Release called to answer received
	Retransmits  uint32        // segments the client retransmitted meanwhile
	Stats        HoldStats
}

// holdCycle holds, sends one request, runs during (which makes the pause), releases and
// waits for the answer.
func holdCycle(t testing.TB, h *Holder, c *client, during func(req int)) cycle {
	t.Helper()
	roundTrips(t, c, 5)
	retrans := c.hostRetransmits(t)
	if err := h.Hold(); err != nil {
		t.Fatal(err)
	}
	sent := time.Now()
	req, err := c.send()
	if err != nil {
		t.Fatal(err)
	}
	during(req)
	released := time.Now()
	st, err := h.Release()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.await(req, 10*time.Second); err != nil {
		t.Fatalf("answer after release: %v", err)
	}
	return cycle{Wait: time.Since(sent), AfterRelease: time.Since(released), Retransmits: c.hostRetransmits(t) - retrans, Stats: st}
}

// (d) Close removes every rule (also on context cancel) and traffic flows without the reader.
func TestHolderCloseLeavesNoRules(t *testing.T) {
	n := newTestNet(t)
	srv := startEchoServer(t, n)
	c := dialClient(t, srv.Addr)
	h := newTestHolder(t, n)
	roundTrips(t, c, 3)
	if err := h.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := h.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	assertNoHoldRules(t, n)
	if err := h.Hold(); err == nil {
		t.Error("Hold after Close succeeded")
	}
	roundTrips(t, c, 3)

	ctx, cancel := context.WithCancel(context.Background())
	h2, err := NewHolder(ctx, n.Path, HoldOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := h2.Hold(); err != nil {
		t.Fatal(err)
	}
	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for {
		rules, err := HoldRules(context.Background(), n.Path)
		if err != nil {
			t.Fatal(err)
		}
		if len(rules) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rules still there 5 s after ctx cancel: %q", rules)
		}
		time.Sleep(20 * time.Millisecond)
	}
	h2.Close()
	assertNoHoldRules(t, n)
	roundTrips(t, c, 3)
}

func assertNoHoldRules(t *testing.T, n *testNet) {
	t.Helper()
	rules, err := HoldRules(context.Background(), n.Path)
	if err != nil {
		t.Fatal(err)
	}
	if len(rules) != 0 {
		t.Fatalf("hold rules left after Close: %q", rules)
	}
	for _, t6 := range allTools() {
		if out, _ := saveAll(context.Background(), n.Path, t6); strings.Contains(out, "NFQUEUE") {
			t.Fatalf("%s shows an NFQUEUE rule after Close:\n%s", t6.Save, out)
		}
	}
}

// A hot killed while holding leaves a rule with no reader: packets are dropped (never passed
// to a socket under restore), and Cleanup brings traffic back.
func TestCleanupAfterCrash(t *testing.T) {
	n := newTestNet(t)
	srv := startEchoServer(t, n)
	c := dialClient(t, srv.Addr)
	roundTrips(t, c, 3)
	args := append([]string{"-w", "-t", holdTable, "-I", "PREROUTING", "1"}, holdRuleSpec(47123, "PREROUTING")...)
	if _, err := runIn(context.Background(), n.Path, "", "iptables", args...); err != nil {
		t.Fatal(err)
	}
	req, err := c.send()
	if err != nil {
		t.Fatal(err)
	}
	// An orphaned hold rule must drop (no --queue-bypass), never let a packet through.
	c.expectNoAnswer(t, srv, req, 300*time.Millisecond)
	if err := Cleanup(context.Background(), n.Path); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	assertNoHoldRules(t, n)
	if err := c.await(req, 5*time.Second); err != nil {
		t.Fatalf("answer after Cleanup (client retransmission): %v", err)
	}
	if err := Cleanup(context.Background(), n.Path); err != nil {
		t.Fatalf("second Cleanup: %v", err)
	}
}

func TestBadNetnsPath(t *testing.T) {
	ctx := context.Background()
	for _, p := range []string{"", "/nonexistent/netns"} {
		if _, err := NewHolder(ctx, p, HoldOptions{}); err == nil || errors.Is(err, ErrNotSupported) {
			t.Errorf("NewHolder(%q) = %v, want a plain path error", p, err)
		}
		if _, err := ListTCP(ctx, p); err == nil {
			t.Errorf("ListTCP(%q) succeeded", p)
		}
		if err := CleanupCRIULock(ctx, p); err == nil {
			t.Errorf("CleanupCRIULock(%q) succeeded", p)
		}
	}
}

// Many connections sending pipelined requests, and a new connection opened, during one hold:
// nothing reaches the server until Release, then everything is answered in order, nothing lost.
func TestHoldManyConnections(t *testing.T) {
	n := newTestNet(t)
	srv := startEchoServer(t, n)
	var clients []*client
	for range 8 {
		c := dialClient(t, srv.Addr)
		roundTrips(t, c, 2)
		clients = append(clients, c)
	}
	h := newTestHolder(t, n)
	if err := h.Hold(); err != nil {
		t.Fatal(err)
	}
	seen := srv.lines.Load()
	const perClient = 20
	first := make([]int, len(clients))
	for i, c := range clients {
		for j := range perClient {
			req, err := c.send()
			if err != nil {
				t.Fatal(err)
			}
			if j == 0 {
				first[i] = req
			}
		}
	}
	type dialResult struct {
		c   net.Conn
		err error
	}
	dialed := make(chan dialResult, 1)
	go func() {
		c, err := net.DialTimeout("tcp4", srv.Addr.String(), 5*time.Second)
		dialed <- dialResult{c, err}
	}()
	time.Sleep(pause)
	select {
	case r := <-dialed:
		t.Fatalf("a new connection completed during the hold: %v", r.err)
	default:
	}
	if got := srv.lines.Load(); got != seen {
		t.Fatalf("server received %d requests during the hold, want 0", got-seen)
	}
	st, err := h.Release()
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range clients {
		for j := range perClient {
			if err := c.await(first[i]+j, 2*time.Second); err != nil {
				t.Fatalf("client %d request %d after release: %v", i, first[i]+j, err)
			}
		}
	}
	r := <-dialed
	if r.err != nil {
		t.Fatalf("connection opened during the hold: %v", r.err)
	}
	r.c.Close()
	if st.Packets < len(clients)+1 || st.Overflows != 0 {
		t.Errorf("stats %+v: want >= %d packets held and no overflow", st, len(clients)+1)
	}
	t.Logf("%d connections x %d requests + 1 new connection: %d packets held, released in %v", len(clients), perClient, st.Packets, st.ReleaseDuration)
}

// The legacy xtables backend (iptables-legacy, called explicitly) holds just as well.
func TestHoldLegacyBackend(t *testing.T) {
	testutil.RequireCommand(t, "iptables-legacy")
	n := newTestNet(t)
	srv := startEchoServer(t, n)
	c := dialClient(t, srv.Addr)
	h := newTestHolderOpts(t, n, HoldOptions{Legacy: true})
	if got := h.Stats().Backend; got != "iptables-legacy" {
		t.Fatalf("backend %q, want iptables-legacy", got)
	}
	r := holdCycle(t, h, c, func(int) { time.Sleep(pause) })
	if r.Retransmits != 0 || r.Stats.Packets < 1 || r.Wait > pause+slack {
		t.Errorf("legacy hold: %+v", r)
	}
	t.Logf("legacy backend: pause %v held, client waited %v, %d packets held", pause, r.Wait.Round(time.Millisecond), r.Stats.Packets)
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	assertNoHoldRules(t, n)
	roundTrips(t, c, 2)
}

// While holding, the application may still run (Hold comes just before the freeze): new data it
// sends goes out, while retransmissions — what a socket being dumped would send with a too
// new TCP timestamp — are dropped. Nothing is lost: after Release the stream continues.
func TestHoldPassesNewDataDropsRetransmissions(t *testing.T) {
	n := newTestNet(t)
	var ln net.Listener
	inNetns(t, n.Path, func() (err error) {
		ln, err = net.Listen("tcp4", net.JoinHostPort(n.NsIP.String(), "0"))
		return err
	})
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		for i := 1; ; i++ {
			if _, err := fmt.Fprintf(c, "tick %d\n", i); err != nil {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	h := newTestHolder(t, n)
	c := dialClient(t, netip.MustParseAddrPort(ln.Addr().String()))
	next := 1
	readTicks := func(d time.Duration) int {
		t.Helper()
		got := 0
		deadline := time.Now().Add(d)
		for {
			c.conn.SetReadDeadline(deadline)
			line, err := c.r.ReadString('\n')
			if err != nil {
				return got
			}
			if want := fmt.Sprintf("tick %d\n", next); line != want {
				t.Fatalf("got %q, want %q: the stream lost or reordered data", line, want)
			}
			next++
			got++
		}
	}
	readTicks(100 * time.Millisecond)
	if err := h.Hold(); err != nil {
		t.Fatal(err)
	}
	during := readTicks(500 * time.Millisecond)
	st, err := h.Release()
	if err != nil {
		t.Fatal(err)
	}
	after := readTicks(time.Second)
	t.Logf("hold 500 ms: %d ticks received during the hold, %d outgoing segments dropped, %d incoming held; %d ticks in the second after", during, st.OutputDropped, st.Packets, after)
	if during < 3 {
		t.Errorf("only %d ticks arrived during the hold: new data from a running application must pass", during)
	}
	if st.OutputDropped < 1 {
		t.Errorf("no outgoing segment dropped: the server's retransmission (its ACKs were held for 500 ms) went out")
	}
	if after < 10 {
		t.Errorf("only %d ticks in the second after release", after)
	}
}
