package sockets

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/internal/testutil"
)

// (e) sock_diag in the server's netns sees the client's connection with the right addresses.
func TestListTCP(t *testing.T) {
	n := newTestNet(t)
	srv := startEchoServer(t, n)
	c := dialClient(t, srv.Addr)
	roundTrips(t, c, 3)
	conns, err := ListTCP(context.Background(), n.Path)
	if err != nil {
		t.Fatalf("ListTCP: %v", err)
	}
	var est, listen int
	for _, tc := range conns {
		switch {
		case tc.State == TCPListen && tc.Local == srv.Addr:
			listen++
		case tc.State == TCPEstablished && tc.Local == srv.Addr && tc.Remote == c.local():
			est++
			if tc.Inode == 0 {
				t.Errorf("established server socket has no inode: %+v", tc)
			}
		}
	}
	if listen != 1 || est != 1 {
		t.Fatalf("want the listener %s and the connection %s<-%s, got %d/%d in %+v", srv.Addr, srv.Addr, c.local(), listen, est, conns)
	}
	if got, err := CountEstablished(context.Background(), n.Path); err != nil || got != 1 {
		t.Errorf("CountEstablished = %d, %v; want 1", got, err)
	}
	c2 := dialClient(t, srv.Addr)
	roundTrips(t, c2, 1)
	if got, err := CountEstablished(context.Background(), n.Path); err != nil || got != 2 {
		t.Errorf("CountEstablished with a second client = %d, %v; want 2", got, err)
	}
}

// criuNftLock is what CRIU 4.2 runs (criu/net.c, nftables_lock_network_internal) to lock a
// netns with --network-lock nftables; the table is named after the run's UUID.
const criuNftLock = `create table inet CRIU-3f1c2b6a-6a4e-4c11-9a53-0d7e0f4b8d2e
add chain inet CRIU-3f1c2b6a-6a4e-4c11-9a53-0d7e0f4b8d2e output { type filter hook output priority 0; policy drop; }
add rule inet CRIU-3f1c2b6a-6a4e-4c11-9a53-0d7e0f4b8d2e output meta mark 0xC114 accept
add chain inet CRIU-3f1c2b6a-6a4e-4c11-9a53-0d7e0f4b8d2e input { type filter hook input priority 0; policy drop; }
add rule inet CRIU-3f1c2b6a-6a4e-4c11-9a53-0d7e0f4b8d2e input meta mark 0xC114 accept
`

// criuIptablesLock is CRIU's --network-lock iptables script (iptables_network_lock_internal).
const criuIptablesLock = `*filter
:CRIU - [0:0]
-I INPUT -j CRIU
-I OUTPUT -j CRIU
-A CRIU -m mark --mark 0xC114 -j ACCEPT
-A CRIU -j DROP
COMMIT
`

// (f) CleanupCRIULock removes the lock a killed CRIU dump leaves, and traffic flows again.
func TestCleanupCRIULock(t *testing.T) {
	testutil.RequireCommand(t, "nft")
	n := newTestNet(t)
	srv := startEchoServer(t, n)
	ctx := context.Background()
	for _, tc := range []struct {
		name, tool, script string
		want               []string
	}{
		{"nftables", "nft", criuNftLock, []string{"nft: table inet CRIU-3f1c2b6a-6a4e-4c11-9a53-0d7e0f4b8d2e"}},
		{"iptables", "iptables-restore", criuIptablesLock, []string{"iptables: chain CRIU", "iptables: -A INPUT -j CRIU", "iptables: -A OUTPUT -j CRIU"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialClient(t, srv.Addr)
			roundTrips(t, c, 2)
			args := []string{"-f", "-"}
			if tc.tool != "nft" {
				args = []string{"-w", "--noflush"}
			}
			if _, err := runIn(ctx, n.Path, tc.script, tc.tool, args...); err != nil {
				t.Fatalf("install CRIU-style lock: %v", err)
			}
			locks, err := CRIULocks(ctx, n.Path)
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range tc.want {
				if !containsPrefix(locks, w) {
					t.Errorf("CRIULocks = %q, missing %q", locks, w)
				}
			}
			req, err := c.send()
			if err != nil {
				t.Fatal(err)
			}
			c.expectNoAnswer(t, srv, req, 300*time.Millisecond)
			start := time.Now()
			if err := CleanupCRIULock(ctx, n.Path); err != nil {
				t.Fatalf("CleanupCRIULock: %v", err)
			}
			t.Logf("CleanupCRIULock took %v", time.Since(start).Round(time.Millisecond))
			if locks, err := CRIULocks(ctx, n.Path); err != nil || len(locks) != 0 {
				t.Fatalf("after cleanup CRIULocks = %q, %v; want none", locks, err)
			}
			if err := c.await(req, 5*time.Second); err != nil {
				t.Fatalf("no answer after the lock was removed: %v", err)
			}
			t.Logf("answer %v after cleanup (client retransmission)", time.Since(start).Round(time.Millisecond))
			if err := CleanupCRIULock(ctx, n.Path); err != nil {
				t.Fatalf("CleanupCRIULock with nothing to do: %v", err)
			}
		})
	}
}

func containsPrefix(items []string, prefix string) bool {
	for _, it := range items {
		if strings.HasPrefix(it, prefix) {
			return true
		}
	}
	return false
}
