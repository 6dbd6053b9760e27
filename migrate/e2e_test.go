package migrate_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/internal/testapps/loadclient"
	"github.com/hotctl/hot/internal/testutil"
	"github.com/vishvananda/netns"
)

// lab models two hosts and a client with network namespaces, all on one Ethernet segment
// (a bridge in a fourth namespace, "the switch"):
//
//	client ns: eth "up" 10.Q.0.250/24 ─────────┐
//	host A ns: bridge BR (containers) ─ "up" ──┤ switch ns: bridge sw0
//	           "mg" 10.M.0.1/24 (agent) ───────┤
//	host B ns: bridge BR (containers) ─ "up" ──┤
//	           "mg" 10.M.0.2/24 (agent) ───────┘
//
// Both hosts use the same bridge name and container subnet, so a container's address is
// valid on either; hot in each host namespace has its own --root and --run-root.
type lab struct {
	t              testing.TB
	sfx            string
	bridge, subnet string
	client         string // netns name
	a, b           *host
	token, wrong   string // token files
}

type host struct {
	l       *lab
	name    string // netns name
	root    string
	runRoot string
	mgmt    string // agent address (ip)
	agent   *exec.Cmd
	agentMu sync.Mutex
	log     bytes.Buffer // the agent's stderr
}

func ip(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func newLab(t testing.TB) *lab {
	testutil.RequireRoot(t)
	for _, c := range []string{"nsenter", "nft", "ip", "iptables"} {
		testutil.RequireCommand(t, c)
	}
	b := make([]byte, 3)
	rand.Read(b)
	sfx := hex.EncodeToString(b)
	q := 10 + int(b[0])%200
	l := &lab{t: t, sfx: sfx, bridge: "hotm" + sfx, subnet: fmt.Sprintf("10.196.%d.0/24", q)}
	sw := "hms" + sfx
	l.client = "hmc" + sfx
	l.a = &host{l: l, name: "hma" + sfx, mgmt: fmt.Sprintf("10.195.%d.1", q)}
	l.b = &host{l: l, name: "hmb" + sfx, mgmt: fmt.Sprintf("10.195.%d.2", q)}
	for _, ns := range []string{sw, l.client, l.a.name, l.b.name} {
		ip(t, "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		ip(t, "-n", ns, "link", "set", "lo", "up")
	}
	ip(t, "-n", sw, "link", "add", "sw0", "type", "bridge")
	ip(t, "-n", sw, "link", "set", "sw0", "up")
	plug := func(ns, port, peer string) {
		ip(t, "-n", sw, "link", "add", port, "type", "veth", "peer", "name", peer, "netns", ns)
		ip(t, "-n", sw, "link", "set", port, "master", "sw0", "up")
		ip(t, "-n", ns, "link", "set", "dev", peer, "up")
	}
	plug(l.client, "pc", "uplink")
	ip(t, "-n", l.client, "addr", "add", fmt.Sprintf("10.196.%d.250/24", q), "dev", "uplink")
	for i, h := range []*host{l.a, l.b} {
		dir := t.TempDir()
		h.root, h.runRoot = filepath.Join(dir, "root"), filepath.Join(dir, "run")
		plug(h.name, fmt.Sprintf("pu%d", i), "uplink")
		plug(h.name, fmt.Sprintf("pm%d", i), "mg")
		ip(t, "-n", h.name, "addr", "add", h.mgmt+"/24", "dev", "mg")
		// The container bridge exists before hot's first attach, with the uplink in it.
		ip(t, "-n", h.name, "link", "add", l.bridge, "type", "bridge")
		ip(t, "-n", h.name, "link", "set", "uplink", "master", l.bridge)
		ip(t, "-n", h.name, "link", "set", l.bridge, "up")
		t.Cleanup(func() {
			h.stopAgent()
			out := h.hot("ps", "-aq")
			for _, id := range strings.Fields(out.Stdout) {
				h.hot("rm", "-f", id)
			}
		})
	}
	dir := t.TempDir()
	l.token, l.wrong = filepath.Join(dir, "token"), filepath.Join(dir, "wrong")
	os.WriteFile(l.token, []byte("0123456789abcdef0123456789abcdef\n"), 0o600)
	os.WriteFile(l.wrong, []byte("not-the-token-but-long-enough\n"), 0o600)
	return l
}

// hot runs hot inside the host's network namespace (only the network namespace: mounts and
// cgroups are the machine's, as for a hot running on that host).
func (h *host) hot(args ...string) testutil.Result {
	h.l.t.Helper()
	return h.hotEnv(nil, args...)
}

func (h *host) hotEnv(env []string, args ...string) testutil.Result {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	full := append([]string{"--net=/run/netns/" + h.name, testutil.HotBinary(h.l.t), "--root", h.root, "--run-root", h.runRoot}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", full...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := testutil.Result{Stdout: stdout.String(), Stderr: stderr.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.ExitCode = ee.ExitCode()
	} else if err != nil {
		h.l.t.Fatalf("run hot: %v", err)
	}
	return r
}

func (h *host) mustHot(args ...string) string {
	h.l.t.Helper()
	r := h.hot(args...)
	if r.ExitCode != 0 {
		h.l.t.Fatalf("hot %s on %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), h.name, r.ExitCode, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

func (h *host) addr() string { return net.JoinHostPort(h.mgmt, "7777") }

// startAgent runs `hot agent` in the host's namespace and waits until it listens.
func (h *host) startAgent(env ...string) { h.startAgentArgs(env) }

func (h *host) startAgentArgs(env []string, extra ...string) {
	t := h.l.t
	t.Helper()
	h.stopAgent()
	args := append([]string{"--net=/run/netns/" + h.name, testutil.HotBinary(t), "--root", h.root, "--run-root", h.runRoot,
		"--log-level", "info", "agent", "--listen", h.addr(), "--token-file", h.l.token}, extra...)
	cmd := exec.Command("nsenter", args...)
	cmd.Env = append(os.Environ(), env...)
	h.agentMu.Lock()
	h.log.Reset()
	h.agentMu.Unlock()
	cmd.Stderr = &lockedWriter{mu: &h.agentMu, w: &h.log}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start agent: %v", err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.Contains(line, "listening") {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("agent on %s did not start: %q %v\n%s", h.name, line, err, h.agentLog())
	}
	go io.Copy(io.Discard, out)
	h.agent = cmd
}

func (h *host) stopAgent() {
	if h.agent == nil {
		return
	}
	h.agent.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { h.agent.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		h.agent.Process.Kill()
		<-done
	}
	h.agent = nil
}

func (h *host) agentLog() string {
	h.agentMu.Lock()
	defer h.agentMu.Unlock()
	return h.log.String()
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func (h *host) inspect(name string) (*container.Container, bool) {
	h.l.t.Helper()
	r := h.hot("inspect", "--json", name)
	if r.ExitCode != 0 {
		return nil, false
	}
	var c container.Container
	if err := json.Unmarshal([]byte(r.Stdout), &c); err != nil {
		h.l.t.Fatalf("decode inspect: %v", err)
	}
	return &c, true
}

// inNetns runs fn on a thread in the named namespace (sockets it opens stay there).
func inNetns(t testing.TB, name string, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	if err := netns.Set(ns); err != nil {
		t.Fatal(err)
	}
	defer netns.Set(orig)
	fn()
}

// migration is one container under keep-alive load from the client namespace.
type migration struct {
	l    *lab
	name string
	ip   string
	load *loadclient.Load
	iso  map[string]string // the init's isolation as first seen (issue 9: migration must not widen it)
}

func startServer(t *testing.T, l *lab) *migration {
	rootfs := testutil.DemoRootfs(t, "v1", nil)
	l.a.mustHot("image", "import", "--rootfs", rootfs, "--tag", "demo:v1",
		"--entrypoint", "/app", "--cmd", "-listen", "--cmd", ":8080")
	return l.serve(l.a, "web", "demo:v1")
}

// serve runs image as a container named name on h and starts 4 keep-alive clients on it
// from the client namespace.
func (l *lab) serve(h *host, name, image string) *migration {
	t := l.t
	t.Helper()
	h.mustHot("run", "-d", "--name", name, "--bridge", l.bridge, "--subnet", l.subnet, image)
	c, ok := h.inspect(name)
	if !ok {
		t.Fatalf("container %s not found after run", name)
	}
	m := &migration{l: l, name: name, ip: c.Network.IP.String()}
	m.startLoad(t)
	return m
}

// startLoad starts 4 keep-alive clients from the client namespace on m's address.
func (m *migration) startLoad(t testing.TB) {
	t.Helper()
	l := m.l
	addr := net.JoinHostPort(m.ip, "8080")
	deadline := time.Now().Add(20 * time.Second)
	for {
		var err error
		inNetns(t, l.client, func() {
			m.load, err = loadclient.Start(context.Background(), addr, 4, 5*time.Millisecond)
		})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("load from the client namespace: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Cleanup(func() { m.load.Stop() })
}

// runsOn checks that the container runs on h (same name and address) and not on the other
// host, and that every client kept getting answers on its connection with the counter going on.
func (m *migration) runsOn(h, other *host) {
	t := m.l.t
	t.Helper()
	c, ok := h.inspect(m.name)
	if !ok || c.Status != container.StatusRunning {
		var detail string
		if c != nil {
			for _, f := range []string{"exit.json", "monitor.log", "log"} {
				b, _ := os.ReadFile(filepath.Join(c.Dir, f))
				detail += fmt.Sprintf("\n--- %s:\n%s", f, b)
			}
			t.Fatalf("%s on %s is %s (%s), want running%s", m.name, h.name, c.Status, c.Reason, detail)
		}
		t.Fatalf("%s is not on %s", m.name, h.name)
	}
	if got := c.Network.IP.String(); got != m.ip {
		t.Fatalf("%s on %s has address %s, want %s (the address must move with it)", m.name, h.name, got, m.ip)
	}
	if c, ok := other.inspect(m.name); ok {
		t.Fatalf("%s is still on %s: %s", m.name, other.name, c.Status)
	}
	// The same capabilities, no_new_privs and seccomp filter wherever it runs.
	iso := isolationOf(t, c.Pid)
	if m.iso == nil {
		if iso["NoNewPrivs"] != "1" || iso["Seccomp"] != "2" {
			t.Fatalf("container init is not confined: %v", iso)
		}
		m.iso = iso
	} else if fmt.Sprint(iso) != fmt.Sprint(m.iso) {
		t.Fatalf("isolation changed on %s: %v, was %v", h.name, iso, m.iso)
	}
	before := m.load.Snapshot()
	rep, err := m.load.WaitProgress(before, 3, 30*time.Second)
	if err != nil {
		t.Fatalf("load after the step: %v", err)
	}
	if rep.Failures != 0 || rep.Regressions != 0 {
		t.Fatalf("clients saw %d failures, %d counter regressions: %v", rep.Failures, rep.Regressions, rep.Errors)
	}
	t.Logf("clients: %d answers, longest wait %v, counter at %d", rep.Requests, rep.MaxGap, rep.LastValue)
}

// isolationOf reads the isolation fields of /proc/PID/status.
func isolationOf(t testing.TB, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("read status of the container init: %v", err)
	}
	out := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		switch k {
		case "CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp", "Seccomp_filters":
			if ok {
				out[k] = strings.TrimSpace(v)
			}
		}
	}
	return out
}

func TestMigrate(t *testing.T) {
	l := newLab(t)
	l.a.startAgent()
	l.b.startAgent()
	m := startServer(t, l)
	m.runsOn(l.a, l.b)

	t.Run("bad input changes nothing", func(t *testing.T) {
		short := filepath.Join(t.TempDir(), "short")
		os.WriteFile(short, []byte("tooshort\n"), 0o600)
		for _, tc := range []struct {
			args []string
			code int
			want string
		}{
			{[]string{"migrate", m.name, "--token-file", l.token}, 2, "--to"},
			{[]string{"migrate", m.name, "--to", "nohostport", "--token-file", l.token}, 2, "ADDR:PORT"},
			{[]string{"migrate", m.name, "--to", l.b.addr()}, 2, "--token-file"},
			{[]string{"migrate", m.name, "--to", l.b.addr(), "--token-file", short}, 2, "at least 16"},
			{[]string{"migrate", "nosuch", "--to", l.b.addr(), "--token-file", l.token}, 1, "nosuch"},
			{[]string{"migrate", m.name, "--to", l.b.mgmt + ":1", "--token-file", l.token}, 1, "preflight"},
			{[]string{"agent", "--listen", "nohostport", "--token-file", l.token}, 2, "ADDR:PORT"},
		} {
			r := l.a.hot(tc.args...)
			if r.ExitCode != tc.code || !strings.Contains(r.Stderr, tc.want) {
				t.Errorf("hot %s: exit %d, stderr %q; want exit %d naming %q", strings.Join(tc.args, " "), r.ExitCode, r.Stderr, tc.code, tc.want)
			}
		}
		m.runsOn(l.a, l.b)
	})

	t.Run("A to B and back", func(t *testing.T) {
		out := l.a.mustHot("migrate", m.name, "--to", l.b.addr(), "--token-file", l.token)
		t.Logf("A→B:\n%s", out)
		if !strings.Contains(out, "image pushed") {
			t.Errorf("B had no image, but no push was reported:\n%s", out)
		}
		m.runsOn(l.b, l.a)
		out = l.b.mustHot("migrate", m.name, "--to", l.a.addr(), "--token-file", l.token)
		t.Logf("B→A:\n%s", out)
		if strings.Contains(out, "image pushed") {
			t.Errorf("A has the image, but it was pushed again:\n%s", out)
		}
		m.runsOn(l.a, l.b)
	})

	t.Run("wrong token is refused and logged", func(t *testing.T) {
		r := l.a.hot("migrate", m.name, "--to", l.b.addr(), "--token-file", l.wrong)
		if r.ExitCode == 0 || !strings.Contains(r.Stderr, "401") {
			t.Fatalf("migrate with a wrong token: exit %d, stderr %q; want a refusal (401)", r.ExitCode, r.Stderr)
		}
		if !strings.Contains(l.b.agentLog(), "refused request") {
			t.Errorf("the agent did not log the refused request:\n%s", l.b.agentLog())
		}
		m.runsOn(l.a, l.b)
	})

	t.Run("tampered stream is refused", func(t *testing.T) {
		r := l.a.hotEnv([]string{"HOT_FAILPOINT=migrate-tamper"}, "migrate", m.name, "--to", l.b.addr(), "--token-file", l.token)
		if r.ExitCode == 0 || !strings.Contains(r.Stderr, "refused") || !strings.Contains(r.Stderr, "runs here again") {
			t.Fatalf("tampered migration: exit %d, stderr %q; want a refusal and the container back on A", r.ExitCode, r.Stderr)
		}
		m.runsOn(l.a, l.b)
		left, _ := filepath.Glob(filepath.Join(l.b.root, "migrate-in", "*"))
		if len(left) > 0 {
			t.Errorf("refused stream left staging on the target: %v", left)
		}
	})

	t.Run("target killed mid-transfer", func(t *testing.T) {
		l.b.startAgent("HOT_FAILPOINT=agent-exit-after-bytes:200000")
		r := l.a.hot("migrate", m.name, "--to", l.b.addr(), "--token-file", l.token)
		if r.ExitCode == 0 || !strings.Contains(r.Stderr, "runs here again") {
			t.Fatalf("migration to a dying agent: exit %d, stderr %q; want failure and the container back on A", r.ExitCode, r.Stderr)
		}
		m.runsOn(l.a, l.b)
		l.b.startAgent()
		out := l.a.mustHot("migrate", m.name, "--to", l.b.addr(), "--token-file", l.token)
		t.Logf("A→B after the failures:\n%s", out)
		m.runsOn(l.b, l.a)
	})

	t.Run("hot migrate killed after the dump", func(t *testing.T) {
		r := l.b.hotEnv([]string{"HOT_FAILPOINT=migrate-kill-after-dump"}, "migrate", m.name, "--to", l.a.addr(), "--token-file", l.token)
		if r.ExitCode != -1 && r.ExitCode != 137 {
			t.Fatalf("migrate with the kill failpoint exited %d, want killed\n%s", r.ExitCode, r.Stderr)
		}
		c, ok := l.b.inspect(m.name)
		if !ok || c.Status != container.StatusCheckpointed {
			t.Fatalf("after the kill the container is %v, want checkpointed on B", c)
		}
		// What docs/migration.md tells the operator to do: the images are still there.
		l.b.mustHot("restore", m.name)
		m.runsOn(l.b, l.a)
	})

	t.Run("lazy B to A and back", func(t *testing.T) {
		out := l.b.mustHot("migrate", m.name, "--lazy", "--to", l.a.addr(), "--token-file", l.token)
		t.Logf("B→A --lazy:\n%s", out)
		if !strings.Contains(out, "lazy") || !strings.Contains(out, "memory in") {
			t.Errorf("lazy migration summary lacks the mode or the memory time:\n%s", out)
		}
		m.runsOn(l.a, l.b)
		out = l.a.mustHot("migrate", m.name, "--lazy", "--to", l.b.addr(), "--token-file", l.token)
		t.Logf("A→B --lazy:\n%s", out)
		m.runsOn(l.b, l.a)
	})

	t.Run("lazy with a tampered stream resumes on the source", func(t *testing.T) {
		r := l.b.hotEnv([]string{"HOT_FAILPOINT=migrate-tamper"}, "migrate", m.name, "--lazy", "--to", l.a.addr(), "--token-file", l.token)
		if r.ExitCode == 0 || !strings.Contains(r.Stderr, "refused") || !strings.Contains(r.Stderr, "runs here again") {
			t.Fatalf("tampered lazy migration: exit %d, stderr %q; want a refusal and the container still on B", r.ExitCode, r.Stderr)
		}
		m.runsOn(l.b, l.a)
	})

	t.Run("mutual TLS", func(t *testing.T) {
		dir := t.TempDir()
		ca := newCA(t, dir, "ca")
		other := newCA(t, dir, "other-ca")
		ca.issue(t, dir, "agent", net.ParseIP(l.a.mgmt))
		ca.issue(t, dir, "client", nil)
		other.issue(t, dir, "intruder", nil)
		pem := func(n string) string { return filepath.Join(dir, n) }
		l.a.startAgentArgs(nil, "--tls-cert", pem("agent.crt"), "--tls-key", pem("agent.key"), "--tls-ca", pem("ca.crt"))
		defer l.a.startAgent()
		// A client certificate from another CA is refused during the handshake.
		r := l.b.hot("migrate", m.name, "--to", l.a.addr(), "--token-file", l.token,
			"--tls-cert", pem("intruder.crt"), "--tls-key", pem("intruder.key"), "--tls-ca", pem("ca.crt"))
		if r.ExitCode == 0 || !strings.Contains(r.Stderr, "preflight") {
			t.Fatalf("migration with a foreign client certificate: exit %d, stderr %q; want a refusal at preflight", r.ExitCode, r.Stderr)
		}
		// Plain HTTP to a TLS agent gets nowhere either.
		if r := l.b.hot("migrate", m.name, "--to", l.a.addr(), "--token-file", l.token); r.ExitCode == 0 {
			t.Fatalf("plain HTTP to a TLS agent succeeded: %s", r.Stdout)
		}
		m.runsOn(l.b, l.a)
		out := l.b.mustHot("migrate", m.name, "--to", l.a.addr(), "--token-file", l.token,
			"--tls-cert", pem("client.crt"), "--tls-key", pem("client.key"), "--tls-ca", pem("ca.crt"))
		t.Logf("B→A over mutual TLS:\n%s", out)
		m.runsOn(l.a, l.b)
	})

	rep := m.load.Snapshot()
	if rep.Failures != 0 {
		t.Fatalf("failed requests over the whole test: %v", rep.Errors)
	}
	t.Logf("whole test: %d answers, longest wait %v", rep.Requests, rep.MaxGap)
}

// testCA issues certificates for the mutual TLS test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newCA(t testing.TB, dir, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	writePEM(t, filepath.Join(dir, name+".crt"), "CERTIFICATE", der)
	return &testCA{cert: cert, key: key}
}

// issue writes NAME.crt and NAME.key, valid for ip when given (a server), as a client otherwise.
func (ca *testCA) issue(t testing.TB, dir, name string, ip net.IP) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	if ip != nil {
		tmpl.IPAddresses, tmpl.ExtKeyUsage = []net.IP{ip}, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, filepath.Join(dir, name+".crt"), "CERTIFICATE", der)
	kd, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, filepath.Join(dir, name+".key"), "PRIVATE KEY", kd)
}

func writePEM(t testing.TB, path, kind string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
