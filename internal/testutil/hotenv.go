package testutil

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// HotEnv is an isolated hot installation for one end-to-end test: its own --root and
// --run-root under t.TempDir(), and its own bridge and subnet, all removed in t.Cleanup
// (containers first, then the bridge and its nftables table).
type HotEnv struct {
	T              testing.TB
	Root, RunRoot  string
	Bridge, Subnet string
}

// NewHotEnv skips unless the test runs as root with nsenter, nft and ip available.
func NewHotEnv(t testing.TB) *HotEnv {
	t.Helper()
	RequireRoot(t)
	for _, c := range []string{"nsenter", "nft", "ip"} {
		RequireCommand(t, c)
	}
	b := make([]byte, 4)
	rand.Read(b)
	// Not t.TempDir(): with a long test name the monitor's socket path
	// (<run-root>/<32 hex id>/monitor.sock) exceeds what a unix socket address allows (108 bytes).
	dir, err := os.MkdirTemp("", "hotenv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &HotEnv{T: t, Root: dir + "/root", RunRoot: dir + "/run",
		Bridge: "hote" + hex.EncodeToString(b[:3]), Subnet: fmt.Sprintf("10.194.%d.0/24", 10+int(b[3])%240)} // 10.194/16: no other test uses it
	t.Cleanup(func() {
		out := RunHot(t, time.Minute, e.Args("ps", "-aq")...)
		for _, id := range strings.Fields(out.Stdout) {
			RunHot(t, time.Minute, e.Args("rm", "-f", id)...)
		}
		exec.Command("ip", "link", "del", e.Bridge).Run()
		exec.Command("nft", "delete", "table", "ip", "hot-"+e.Bridge).Run()
	})
	return e
}

// Args prefixes a with this environment's --root and --run-root.
func (e *HotEnv) Args(a ...string) []string {
	return append([]string{"--root", e.Root, "--run-root", e.RunRoot}, a...)
}

// Hot runs hot in this environment.
func (e *HotEnv) Hot(a ...string) Result {
	e.T.Helper()
	return RunHot(e.T, 3*time.Minute, e.Args(a...)...)
}

// MustHot runs hot and fails the test unless it exits 0; it returns stdout.
func (e *HotEnv) MustHot(a ...string) string {
	e.T.Helper()
	r := e.Hot(a...)
	if r.ExitCode != 0 {
		e.T.Fatalf("hot %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(a, " "), r.ExitCode, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

// Run starts a detached container on this environment's bridge and returns its id.
func (e *HotEnv) Run(a ...string) string {
	e.T.Helper()
	return strings.TrimSpace(e.MustHot(append([]string{"run", "-d", "--bridge", e.Bridge, "--subnet", e.Subnet}, a...)...))
}
