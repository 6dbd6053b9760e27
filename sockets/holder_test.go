package sockets

import (
	"context"
	"errors"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/internal/testutil"
)

// pause is how long the tests hold or drop traffic: the length of a short CRIU dump+restore,
// and below the 200 ms minimum retransmission timeout, so that holding shows no retransmission.
const pause = 150 * time.Millisecond

func newTestHolder(t testing.TB, n *testNet) *Holder {
	t.Helper()
	h, err := NewHolder(context.Background(), n.Path, HoldOptions{})
	if errors.Is(err, ErrNotSupported) {
		t.Skipf("holding packets is not possible here: %v", err)
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
	c := dialClient(t, srv)
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
	c := dialClient(t, srv)
	roundTrips(t, c, 5)
	h := newTestHolder(t, n)
	roundTrips(t, c, 5)
	retrans := c.hostRetransmits(t)
	seen := srv.lines.Load()

	if err := h.Hold(); err != nil {
		t.Fatal(err)
	}
	sent := time.Now()
	req, err := c.send()
	if err != nil {
		t.Fatal(err)
	}
	var ne net.Error
	if err := c.await(req, pause); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("during the hold the request was answered or failed: %v", err)
	}
	if got := srv.lines.Load(); got != seen {
		t.Fatalf("server received %d requests during the hold, want 0", got-seen)
	}
	released := time.Now()
	st, err := h.Release()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.await(req, 2*time.Second); err != nil {
		t.Fatalf("answer after release: %v", err)
	}
	answered := time.Now()
	if st.Packets < 1 {
		t.Errorf("stats counted %d held packets, want >= 1: %+v", st.Packets, st)
	}
	if got := c.hostRetransmits(t) - retrans; got != 0 {
		t.Errorf("client retransmitted %d segments during a %v hold, want 0", got, pause)
	}
	if afterRelease := answered.Sub(released); afterRelease > 100*time.Millisecond {
		t.Errorf("answer came %v after release: not released promptly", afterRelease)
	}
	if _, err := c.roundTrip(2 * time.Second); err != nil {
		t.Fatalf("same connection after release: %v", err)
	}
	if h.Holding() {
		t.Error("still holding after Release")
	}
	t.Logf("held %d packets for %v (longest packet wait %v); release took %v; client waited %v, answer %v after release",
		st.Packets, st.HoldDuration.Round(time.Microsecond), st.MaxPacketWait.Round(time.Microsecond),
		st.ReleaseDuration, answered.Sub(sent).Round(time.Microsecond), answered.Sub(released).Round(time.Microsecond))
}

// (c) The same pause with a DROP rule, as CRIU's network lock does it: the client only gets its
// answer after its retransmission timer (>= 200 ms) fires, and it retransmits.
func TestHoldVersusDrop(t *testing.T) {
	n := newTestNet(t)
	srv := startEchoServer(t, n)
	c := dialClient(t, srv)
	roundTrips(t, c, 20)

	// Dropped.
	retrans := c.hostRetransmits(t)
	dropSpec := []string{"-m", "comment", "--comment", "hot-test-drop", "-j", "DROP"}
	if _, err := runIn(context.Background(), n.Path, "", "iptables", append([]string{"-w", "-I", "INPUT", "1"}, dropSpec...)...); err != nil {
		t.Fatal(err)
	}
	dropSent := time.Now()
	req, err := c.send()
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(pause)
	if _, err := runIn(context.Background(), n.Path, "", "iptables", append([]string{"-w", "-D", "INPUT"}, dropSpec...)...); err != nil {
		t.Fatal(err)
	}
	dropPause := time.Since(dropSent)
	if err := c.await(req, 5*time.Second); err != nil {
		t.Fatalf("answer after the drop rule went: %v", err)
	}
	dropWait := time.Since(dropSent)
	dropRetrans := c.hostRetransmits(t) - retrans

	// Held.
	roundTrips(t, c, 20)
	h := newTestHolder(t, n)
	roundTrips(t, c, 20)
	retrans = c.hostRetransmits(t)
	if err := h.Hold(); err != nil {
		t.Fatal(err)
	}
	holdSent := time.Now()
	if req, err = c.send(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(pause)
	st, err := h.Release()
	if err != nil {
		t.Fatal(err)
	}
	holdPause := time.Since(holdSent)
	if err := c.await(req, 5*time.Second); err != nil {
		t.Fatalf("answer after release: %v", err)
	}
	holdWait := time.Since(holdSent)
	holdRetrans := c.hostRetransmits(t) - retrans

	t.Logf("pause %v dropped (CRIU's lock): client waited %v, %d retransmissions", dropPause.Round(time.Millisecond), dropWait.Round(time.Millisecond), dropRetrans)
	t.Logf("pause %v held (NFQUEUE): client waited %v, %d retransmissions, %d packets held, release %v",
		holdPause.Round(time.Millisecond), holdWait.Round(time.Millisecond), holdRetrans, st.Packets, st.ReleaseDuration)
	if dropRetrans == 0 {
		t.Errorf("dropping for %v caused no retransmission: the comparison is void", pause)
	}
	if holdRetrans != 0 {
		t.Errorf("holding for %v caused %d retransmissions, want 0", pause, holdRetrans)
	}
	if dropWait < 200*time.Millisecond {
		t.Errorf("dropped request answered after %v, before the 200 ms minimum retransmission timeout", dropWait)
	}
	if holdWait >= dropWait {
		t.Errorf("holding did not shorten the client's wait: held %v, dropped %v", holdWait, dropWait)
	}
}

// (d) Close removes every rule (also on context cancel) and traffic flows without the reader.
func TestHolderCloseLeavesNoRules(t *testing.T) {
	n := newTestNet(t)
	srv := startEchoServer(t, n)
	c := dialClient(t, srv)
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
		if out, _ := saveFilter(context.Background(), n.Path, t6); strings.Contains(out, "NFQUEUE") {
			t.Fatalf("%s shows an NFQUEUE rule after Close:\n%s", t6.Save, out)
		}
	}
}

// A hot killed while holding leaves a rule with no reader: packets are dropped (never passed
// to a socket under restore), and Cleanup brings traffic back.
func TestCleanupAfterCrash(t *testing.T) {
	n := newTestNet(t)
	srv := startEchoServer(t, n)
	c := dialClient(t, srv)
	roundTrips(t, c, 3)
	args := append([]string{"-w", "-I", "INPUT", "1"}, holdRuleSpec(47123)...)
	if _, err := runIn(context.Background(), n.Path, "", "iptables", args...); err != nil {
		t.Fatal(err)
	}
	seen := srv.lines.Load()
	req, err := c.send()
	if err != nil {
		t.Fatal(err)
	}
	var ne net.Error
	if err := c.await(req, 300*time.Millisecond); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("with an orphaned hold rule the request was answered or failed: %v", err)
	}
	if srv.lines.Load() != seen {
		t.Fatal("an orphaned hold rule let a packet through (it must drop, no --queue-bypass)")
	}
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
