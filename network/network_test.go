package network

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/internal/testutil"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// testNetwork returns a Network on a bridge and subnet of its own (bridge "hott<hex>",
// subnet 10.213.X.0/24) and removes every trace of it when the test ends.
func testNetwork(t *testing.T) *Network {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireCommand(t, "nft")
	var n *Network
	for range 20 {
		x := rand.IntN(256)
		subnet := netip.MustParsePrefix(fmt.Sprintf("10.213.%d.0/24", x))
		if checkOverlap(subnet, 0) != nil {
			continue
		}
		var err error
		n, err = New(Config{
			Bridge:   fmt.Sprintf("hott%06x", rand.Uint32()&0xffffff),
			Subnet:   subnet,
			StateDir: t.TempDir(),
			RunRoot:  t.TempDir(),
		})
		if err != nil {
			t.Fatal(err)
		}
		break
	}
	if n == nil {
		t.Fatal("no free 10.213.X.0/24 subnet for the test")
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if list, err := n.List(); err == nil {
			for _, a := range list {
				if err := n.Detach(ctx, a.ID); err != nil {
					t.Errorf("cleanup: %v", err)
				}
			}
		}
		if err := n.Teardown(ctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return n
}

// inNetns runs fn on a thread that has joined the network namespace at path. Sockets made by
// fn stay in that namespace whichever thread uses them later. The thread is discarded.
func inNetns(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with this goroutine
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", path, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// serve starts a TCP server in the container's netns on :port that answers every connection
// with name and closes it.
func serve(t *testing.T, a *Attachment, port int, name string) net.Listener {
	t.Helper()
	var l net.Listener
	err := inNetns(a.NetnsPath, func() (err error) {
		l, err = net.Listen("tcp4", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, name)
			c.Close()
		}
	}()
	return l
}

// fetch connects to addr (from the netns at nsPath, or from the host if "") and returns what
// the server said.
func fetch(nsPath, addr string) (string, error) {
	var c net.Conn
	dial := func() (err error) {
		c, err = net.DialTimeout("tcp4", addr, 3*time.Second)
		return err
	}
	var err error
	if nsPath == "" {
		err = dial()
	} else {
		err = inNetns(nsPath, dial)
	}
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

func expectReply(t *testing.T, what, nsPath, addr, want string) {
	t.Helper()
	got, err := fetch(nsPath, addr)
	if err != nil || got != want {
		t.Errorf("%s (%s): got %q, %v; want %q", what, addr, got, err, want)
	}
}

func freePort(t *testing.T) uint16 {
	t.Helper()
	l, err := net.Listen("tcp4", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return uint16(l.Addr().(*net.TCPAddr).Port)
}

// hostAddr returns a global IPv4 address of the host outside the test bridge, if any.
func hostAddr(bridge string) (netip.Addr, bool) {
	links, _ := netlink.LinkList()
	for _, l := range links {
		if l.Attrs().Name == bridge || l.Attrs().Flags&net.FlagUp == 0 || l.Attrs().Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, _ := netlink.AddrList(l, netlink.FAMILY_V4)
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && ip.IsGlobalUnicast() {
				return ip, true
			}
		}
	}
	return netip.Addr{}, false
}

// assertNoTrace checks that nothing of container id is left on the host.
func assertNoTrace(t *testing.T, n *Network, id string) {
	t.Helper()
	if _, err := netlink.LinkByName(hostVethName(n.cfg.Bridge, id)); err == nil {
		t.Errorf("%s: veth %s still exists", id, hostVethName(n.cfg.Bridge, id))
	}
	if _, err := os.Stat(n.NetnsPath(id)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s: netns file %s still exists (%v)", id, n.NetnsPath(id), err)
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mi), n.NetnsPath(id)) {
		t.Errorf("%s: netns still mounted", id)
	}
	out, _ := exec.Command("nft", "list", "map", "ip", tableName(n.cfg.Bridge), "ports").CombinedOutput()
	if strings.Contains(string(out), `"hot:`+id+`"`) {
		t.Errorf("%s: nft ports map still has its elements:\n%s", id, out)
	}
	if _, err := n.Lookup(id); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s: lease still recorded (%v)", id, err)
	}
	st, _ := os.ReadFile(n.statePath())
	if strings.Contains(string(st), `"`+id+`"`) {
		t.Errorf("%s: state file still names it:\n%s", id, st)
	}
}

func TestAttachConnectivity(t *testing.T) {
	n := testNetwork(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	hp := freePort(t)
	a1, err := n.Attach(ctx, "c1", AttachRequest{Ports: []PortMapping{{HostPort: hp, ContainerPort: 80, Proto: "tcp"}}})
	if err != nil {
		t.Fatal(err)
	}
	want2 := n.cfg.Subnet.Addr().Next().Next().Next().Next().Next() // .5
	a2, err := n.Attach(ctx, "c2", AttachRequest{IP: want2})
	if err != nil {
		t.Fatal(err)
	}
	if a2.IP != want2 || a1.IP == a2.IP || !a1.Prefix.Contains(a1.IP) || a1.Gateway != gateway(n.cfg.Subnet) {
		t.Errorf("addresses: c1 %s c2 %s (asked %s) prefix %s gw %s", a1.IP, a2.IP, want2, a1.Prefix, a1.Gateway)
	}
	if got, err := n.Lookup("c1"); err != nil || got.IP != a1.IP || len(got.Ports) != 1 {
		t.Errorf("Lookup c1 = %+v, %v", got, err)
	}
	serve(t, a1, 80, "c1")
	serve(t, a2, 80, "c2")

	expectReply(t, "host to c1 by IP", "", net.JoinHostPort(a1.IP.String(), "80"), "c1")
	expectReply(t, "host to c2 by IP", "", net.JoinHostPort(a2.IP.String(), "80"), "c2")
	hostPort := fmt.Sprint(hp)
	expectReply(t, "published port on the bridge address", "", net.JoinHostPort(a1.Gateway.String(), hostPort), "c1")
	expectReply(t, "published port on 127.0.0.1", "", net.JoinHostPort("127.0.0.1", hostPort), "c1")
	if ip, ok := hostAddr(n.cfg.Bridge); ok {
		expectReply(t, "published port on the host's address", "", net.JoinHostPort(ip.String(), hostPort), "c1")
	}
	expectReply(t, "c2 to c1 by IP", a2.NetnsPath, net.JoinHostPort(a1.IP.String(), "80"), "c1")
	expectReply(t, "c1 to c2 by IP", a1.NetnsPath, net.JoinHostPort(a2.IP.String(), "80"), "c2")
	expectReply(t, "c2 to c1's published port (hairpin)", a2.NetnsPath, net.JoinHostPort(a1.Gateway.String(), hostPort), "c1")
	expectReply(t, "c1 to its own published port (hairpin)", a1.NetnsPath, net.JoinHostPort(a1.Gateway.String(), hostPort), "c1")

	// A requested address in use is refused clearly, and nothing of c3 is left.
	_, err = n.Attach(ctx, "c3", AttachRequest{IP: a2.IP})
	if err == nil || !strings.Contains(err.Error(), "in use by container c2") {
		t.Errorf("Attach with c2's address: %v", err)
	}
	assertNoTrace(t, n, "c3")
	// So is a host port another container publishes, and one a host process listens on.
	_, err = n.Attach(ctx, "c3", AttachRequest{Ports: []PortMapping{{HostPort: hp, ContainerPort: 81, Proto: "tcp"}}})
	if err == nil || !strings.Contains(err.Error(), "already published by container c1") {
		t.Errorf("Attach with c1's host port: %v", err)
	}
	assertNoTrace(t, n, "c3")
	busy, err := net.Listen("tcp4", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	bp := uint16(busy.Addr().(*net.TCPAddr).Port)
	_, err = n.Attach(ctx, "c3", AttachRequest{Ports: []PortMapping{{HostPort: bp, ContainerPort: 80, Proto: "tcp"}}})
	if err == nil || !strings.Contains(err.Error(), "in use by a process on the host") {
		t.Errorf("Attach with a host port in use: %v", err)
	}
	assertNoTrace(t, n, "c3")
	// Attaching the same id twice is refused without touching the first.
	if _, err := n.Attach(ctx, "c1", AttachRequest{}); err == nil || !strings.Contains(err.Error(), "already attached") {
		t.Errorf("second Attach of c1: %v", err)
	}
	expectReply(t, "c1 after refused re-attach", "", net.JoinHostPort(a1.IP.String(), "80"), "c1")

	for _, id := range []string{"c1", "c2"} {
		if err := n.Detach(ctx, id); err != nil {
			t.Fatal(err)
		}
		if err := n.Detach(ctx, id); err != nil {
			t.Errorf("second Detach of %s: %v", id, err)
		}
		assertNoTrace(t, n, id)
	}
	if _, err := fetch("", net.JoinHostPort("127.0.0.1", hostPort)); err == nil {
		t.Error("published port still answers after Detach")
	}

	if err := n.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByName(n.cfg.Bridge); err == nil {
		t.Errorf("bridge %s still exists after Teardown", n.cfg.Bridge)
	}
	if out, _ := exec.Command("nft", "list", "tables").CombinedOutput(); strings.Contains(string(out), tableName(n.cfg.Bridge)) {
		t.Errorf("nft table %s still exists after Teardown", tableName(n.cfg.Bridge))
	}
}

// TestDetachFromStateAlone simulates a crash: the netns has a process in it that was killed,
// and the caller has nothing but the id; Detach still removes everything.
func TestDetachFromStateAlone(t *testing.T) {
	n := testNetwork(t)
	ctx := context.Background()
	hp := freePort(t)
	a, err := n.Attach(ctx, "crashed", AttachRequest{Ports: []PortMapping{{HostPort: hp, ContainerPort: 80, Proto: "udp"}}})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("nsenter", "--net="+a.NetnsPath, "sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Skipf("requires nsenter (util-linux, installed by `make deps`): %v", err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	// A fresh Network value, as `hot rm -f` in a new process would have.
	n2, err := New(n.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := n2.Detach(ctx, "crashed"); err != nil {
		t.Fatal(err)
	}
	assertNoTrace(t, n, "crashed")
	// An id that was never attached is fine too.
	if err := n2.Detach(ctx, "never"); err != nil {
		t.Errorf("Detach of an unknown id: %v", err)
	}
}

// TestAttachDetachCycles checks that 20 attach/detach cycles leak no interface, mount,
// nftables element, lease or file descriptor.
func TestAttachDetachCycles(t *testing.T) {
	n := testNetwork(t)
	ctx := context.Background()
	// The first Attach makes the bridge and the table; count after it.
	if _, err := n.Attach(ctx, "warm", AttachRequest{}); err != nil {
		t.Fatal(err)
	}
	if err := n.Detach(ctx, "warm"); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, n)
	hp := freePort(t)
	for i := range 20 {
		id := fmt.Sprintf("cyc%d", i)
		a, err := n.Attach(ctx, id, AttachRequest{Ports: []PortMapping{{HostPort: hp, ContainerPort: 80, Proto: "tcp"}}})
		if err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if i == 0 || i == 19 {
			l := serve(t, a, 80, id)
			expectReply(t, "published port in cycle", "", net.JoinHostPort("127.0.0.1", fmt.Sprint(hp)), id)
			l.Close()
		}
		if err := n.Detach(ctx, id); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
	}
	after := snapshot(t, n)
	if before != after {
		t.Errorf("leak after 20 cycles:\nbefore %s\nafter  %s", before, after)
	}
	for i := range 20 {
		assertNoTrace(t, n, fmt.Sprintf("cyc%d", i))
	}
}

// snapshot summarises what the host holds: ports of the bridge, mounts under the run root,
// elements of the ports map, leases, open fds of this process.
func snapshot(t *testing.T, n *Network) string {
	t.Helper()
	// Only this test's links count: other tests on the host may add and remove their own.
	all, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	br, err := netlink.LinkByName(n.cfg.Bridge)
	if err != nil {
		t.Fatal(err)
	}
	var links []string
	for _, l := range all {
		if l.Attrs().MasterIndex == br.Attrs().Index {
			links = append(links, l.Attrs().Name)
		}
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	mounts := strings.Count(string(mi), n.cfg.RunRoot)
	out, _ := exec.Command("nft", "list", "map", "ip", tableName(n.cfg.Bridge), "ports").CombinedOutput()
	elems := strings.Count(string(out), "hot:")
	list, _ := n.List()
	fds, _ := os.ReadDir("/proc/self/fd")
	nsFiles, _ := os.ReadDir(n.NetnsPath(""))
	return fmt.Sprintf("links=%q mounts=%d nft-elements=%d leases=%d fds=%d netns-files=%d",
		links, mounts, elems, len(list), len(fds), len(nsFiles))
}

// TestLocalnetGuard: route_localnet on the bridge must not let a container send packets to
// services the host binds to 127.0.0.1 (CVE-2020-8558). The container routes 127.0.0.1 to the
// gateway itself (it is root in its netns), as an attacker would, and sends a UDP datagram
// (one-way, so no reply path is needed). Without the guard rule the host socket receives it.
func TestLocalnetGuard(t *testing.T) {
	n := testNetwork(t)
	testutil.RequireCommand(t, "ip")
	testutil.RequireCommand(t, "nsenter")
	ctx := context.Background()
	a, err := n.Attach(ctx, "evil", AttachRequest{})
	if err != nil {
		t.Fatal(err)
	}
	secret, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer secret.Close()
	for _, args := range [][]string{
		{"ip", "route", "del", "local", "127.0.0.0/8", "dev", "lo", "table", "local"},
		{"ip", "route", "del", "local", "127.0.0.1", "dev", "lo", "table", "local"},
		{"ip", "route", "add", "127.0.0.1/32", "via", a.Gateway.String(), "dev", "eth0"},
		{"sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1"},
		{"sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"},
	} {
		out, err := exec.Command("nsenter", append([]string{"--net=" + a.NetnsPath}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	err = inNetns(a.NetnsPath, func() error {
		c, err := net.Dial("udp4", secret.LocalAddr().String())
		if err != nil {
			return err
		}
		defer c.Close()
		for range 3 {
			if _, err := c.Write([]byte("attack")); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("send from the container: %v", err)
	}
	secret.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 64)
	if nb, from, err := secret.ReadFrom(buf); err == nil {
		t.Fatalf("the host's 127.0.0.1 service received %q from %s in container %s", buf[:nb], from, a.IP)
	}
}

// TestConcurrentAttachAndUDP: attaches from several goroutines at once get distinct addresses
// (the flock serialises them), and a published UDP port reaches the container.
func TestConcurrentAttachAndUDP(t *testing.T) {
	n := testNetwork(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const k = 6
	udpPort := freePort(t)
	atts := make([]*Attachment, k)
	errs := make(chan error, k)
	for i := range k {
		go func() {
			var req AttachRequest
			if i == 0 {
				req.Ports = []PortMapping{{HostPort: udpPort, ContainerPort: 5353, Proto: "udp"}}
			}
			a, err := n.Attach(ctx, fmt.Sprintf("p%d", i), req)
			atts[i] = a
			errs <- err
		}()
	}
	for range k {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	seen := map[netip.Addr]string{}
	for _, a := range atts {
		if other, dup := seen[a.IP]; dup {
			t.Errorf("%s and %s both got %s", a.ID, other, a.IP)
		}
		seen[a.IP] = a.ID
	}

	var pc net.PacketConn
	if err := inNetns(atts[0].NetnsPath, func() (err error) {
		pc, err = net.ListenPacket("udp4", ":5353")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 512)
		for {
			nb, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(append([]byte("echo:"), buf[:nb]...), from)
		}
	}()
	c, err := net.Dial("udp4", fmt.Sprintf("127.0.0.1:%d", udpPort))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	nb, err := c.Read(buf)
	if err != nil || string(buf[:nb]) != "echo:ping" {
		t.Errorf("UDP through published port %d/udp: %q, %v", udpPort, buf[:nb], err)
	}

	for i := range k {
		go func() { errs <- n.Detach(ctx, fmt.Sprintf("p%d", i)) }()
	}
	for range k {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	for i := range k {
		assertNoTrace(t, n, fmt.Sprintf("p%d", i))
	}
}

// BenchmarkAttachDetach measures one Attach (with one published port) plus one Detach on an
// existing bridge and table, and reports the medians in ms.
func BenchmarkAttachDetach(b *testing.B) {
	testutil.RequireRoot(b)
	testutil.RequireCommand(b, "nft")
	n, err := New(Config{Bridge: fmt.Sprintf("hotb%06x", rand.Uint32()&0xffffff),
		Subnet: netip.MustParsePrefix(fmt.Sprintf("10.213.%d.0/24", rand.IntN(256))), StateDir: b.TempDir(), RunRoot: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.Cleanup(func() { _ = n.Teardown(ctx) })
	if _, err := n.Attach(ctx, "warm", AttachRequest{}); err != nil {
		b.Fatal(err)
	}
	if err := n.Detach(ctx, "warm"); err != nil {
		b.Fatal(err)
	}
	var attach, detach []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := n.Attach(ctx, "bench", AttachRequest{Ports: []PortMapping{{HostPort: 45000, ContainerPort: 80, Proto: "tcp"}}}); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := n.Detach(ctx, "bench"); err != nil {
			b.Fatal(err)
		}
		attach, detach = append(attach, t1.Sub(t0)), append(detach, time.Since(t1))
	}
	b.StopTimer()
	b.ReportMetric(medianMs(attach), "attach-median-ms")
	b.ReportMetric(medianMs(detach), "detach-median-ms")
}

func medianMs(d []time.Duration) float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	return float64(s[len(s)/2].Microseconds()) / 1e3
}

// TestSubnetChangeAndRepair: with no container attached, a new subnet for an existing bridge
// replaces the bridge's address and the table's rules, and a table damaged by hand is rebuilt
// by the next first Attach. With a container attached, changing the subnet is refused.
func TestSubnetChangeAndRepair(t *testing.T) {
	n := testNetwork(t)
	ctx := context.Background()
	if _, err := n.Attach(ctx, "a", AttachRequest{}); err != nil {
		t.Fatal(err)
	}
	var other netip.Prefix
	for range 20 {
		p := netip.MustParsePrefix(fmt.Sprintf("10.213.%d.0/24", rand.IntN(256)))
		if p != n.cfg.Subnet && checkOverlap(p, 0) == nil {
			other = p
			break
		}
	}
	if !other.IsValid() {
		t.Skip("requires a second free 10.213.X.0/24 subnet on this host (all taken by routes)")
	}
	cfg2 := n.cfg
	cfg2.Subnet = other
	n2, err := New(cfg2)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n2.Attach(ctx, "b", AttachRequest{}); err == nil || !strings.Contains(err.Error(), "remove them before changing the subnet") {
		t.Errorf("subnet change with a container attached: %v", err)
	}
	if err := n.Detach(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("nft", "delete", "chain", "ip", tableName(n.cfg.Bridge), "input").CombinedOutput(); err != nil {
		t.Fatalf("damage the table: %v: %s", err, out)
	}
	b, err := n2.Attach(ctx, "b", AttachRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if !other.Contains(b.IP) {
		t.Errorf("b got %s, not in the new subnet %s", b.IP, other)
	}
	br, _ := netlink.LinkByName(n.cfg.Bridge)
	addrs, _ := netlink.AddrList(br, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IP.String() != gateway(other).String() {
		t.Errorf("bridge addresses %v, want only %s", addrs, gateway(other))
	}
	out, _ := exec.Command("nft", "list", "table", "ip", tableName(n.cfg.Bridge)).CombinedOutput()
	if !strings.Contains(string(out), "chain input") || !strings.Contains(string(out), other.String()) || strings.Contains(string(out), n.cfg.Subnet.String()) {
		t.Errorf("table not rebuilt for %s:\n%s", other, out)
	}
	if err := n2.Detach(ctx, "b"); err != nil {
		t.Fatal(err)
	}
}
