package network

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParsePortMapping(t *testing.T) {
	good := map[string]PortMapping{
		"8080:80":      {8080, 80, "tcp"},
		"8080:80/udp":  {8080, 80, "udp"},
		"1:65535/TCP":  {1, 65535, "tcp"},
		"65535:1/tcp":  {65535, 1, "tcp"},
		"443:8443/tcp": {443, 8443, "tcp"},
	}
	for in, want := range good {
		got, err := ParsePortMapping(in)
		if err != nil || got != want {
			t.Errorf("ParsePortMapping(%q) = %v, %v; want %v", in, got, err, want)
		}
		if again, err := ParsePortMapping(got.String()); err != nil || again != got {
			t.Errorf("round trip of %v: %v, %v", got, again, err)
		}
	}
	for _, bad := range []string{"", "80", "8080:", ":80", "0:80", "8080:0", "65536:80", "a:80", "8080:80/sctp",
		"8080:80/", "127.0.0.1:8080:80", "-1:80", "8080:80/tcp/udp", " 8080:80"} {
		_, err := ParsePortMapping(bad)
		if err == nil {
			t.Errorf("ParsePortMapping(%q) accepted", bad)
			continue
		}
		if !strings.Contains(err.Error(), "HOSTPORT:PORT") || strings.Contains(err.Error(), "\n") {
			t.Errorf("ParsePortMapping(%q): error does not name the fix on one line: %v", bad, err)
		}
	}
}

func TestValidatePorts(t *testing.T) {
	if err := validatePorts([]PortMapping{{8080, 80, "tcp"}, {8080, 80, "udp"}}); err != nil {
		t.Errorf("same port, two protocols: %v", err)
	}
	if err := validatePorts([]PortMapping{{8080, 80, "tcp"}, {8080, 81, "tcp"}}); err == nil {
		t.Error("duplicate host port accepted")
	}
	if err := validatePorts([]PortMapping{{0, 80, "tcp"}}); err == nil {
		t.Error("host port 0 accepted")
	}
}

func TestIPAM(t *testing.T) {
	st := &state{Bridge: "b", Subnet: netip.MustParsePrefix("10.1.2.0/29"), Leases: map[string]*lease{}}
	if g, b := gateway(st.Subnet), broadcast(st.Subnet); g.String() != "10.1.2.1" || b.String() != "10.1.2.7" {
		t.Fatalf("gateway %s broadcast %s", g, b)
	}
	var got []string
	for i := 0; i < 5; i++ { // .2 .. .6
		ip, err := st.allocate()
		if err != nil {
			t.Fatal(err)
		}
		st.Leases[ip.String()] = &lease{IP: ip}
		st.Last = ip
		got = append(got, ip.String())
	}
	if strings.Join(got, " ") != "10.1.2.2 10.1.2.3 10.1.2.4 10.1.2.5 10.1.2.6" {
		t.Errorf("allocated %v", got)
	}
	if _, err := st.allocate(); err == nil || !strings.Contains(err.Error(), "no free address") {
		t.Errorf("full subnet: %v", err)
	}
	// Freed addresses are reused round robin, after the last one handed out.
	delete(st.Leases, "10.1.2.3")
	delete(st.Leases, "10.1.2.5")
	st.Last = netip.MustParseAddr("10.1.2.3")
	if ip, _ := st.allocate(); ip.String() != "10.1.2.5" {
		t.Errorf("after .3 want .5, got %s", ip)
	}
	for addr, want := range map[string]string{
		"10.1.2.4": "in use by container 10.1.2.4",
		"10.1.2.1": "in use by the bridge",
		"10.1.2.0": "network or broadcast",
		"10.1.2.7": "network or broadcast",
		"10.1.3.4": "not in the network's subnet",
	} {
		err := st.checkRequested(netip.MustParseAddr(addr))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("request %s: %v, want %q", addr, err, want)
		}
	}
	if err := st.checkRequested(netip.MustParseAddr("10.1.2.3")); err != nil {
		t.Errorf("free address refused: %v", err)
	}
}

func TestNewValidates(t *testing.T) {
	for _, cfg := range []Config{
		{Bridge: "this-name-is-too-long", StateDir: "/s", RunRoot: "/r"},
		{Bridge: "a b", StateDir: "/s", RunRoot: "/r"},
		{Subnet: netip.MustParsePrefix("fd00::/64"), StateDir: "/s", RunRoot: "/r"},
		{Subnet: netip.MustParsePrefix("10.0.0.0/31"), StateDir: "/s", RunRoot: "/r"},
		{},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("New(%+v) accepted", cfg)
		}
	}
	n, err := New(Config{StateDir: "/s", RunRoot: "/r"})
	if err != nil {
		t.Fatal(err)
	}
	if c := n.Config(); c.Bridge != DefaultBridge || c.Subnet.String() != DefaultSubnet {
		t.Errorf("defaults: %+v", c)
	}
	if v := hostVethName("hot0", "x"); len(v) > 15 || v == hostVethName("hot1", "x") {
		t.Errorf("veth name %q", v)
	}
}
