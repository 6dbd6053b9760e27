package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// hotEnv is a private hot installation: its own state and runtime roots, bridge and subnet.
type hotEnv struct {
	bin, root, runRoot string
	bridge, subnet     string
}

func newHotEnv(bin, dir string) *hotEnv {
	b := make([]byte, 4)
	rand.Read(b)
	return &hotEnv{bin: bin, root: filepath.Join(dir, "root"), runRoot: filepath.Join(dir, "run"),
		bridge: "hotb" + hex.EncodeToString(b[:3]), subnet: fmt.Sprintf("10.196.%d.0/24", 10+int(b[3])%240)}
}

// hot runs the hot binary in this installation and returns its stdout; a non-zero exit is an
// error quoting stderr.
func (e *hotEnv) hot(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.bin, append([]string{"--root", e.root, "--run-root", e.runRoot}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("hot %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// run starts a detached container and returns its IP.
func (e *hotEnv) run(ctx context.Context, args ...string) (net.IP, error) {
	a := append([]string{"run", "-d", "--bridge", e.bridge, "--subnet", e.subnet}, args...)
	if _, err := e.hot(ctx, a...); err != nil {
		return nil, err
	}
	name := ""
	for i, s := range args {
		if s == "--name" && i+1 < len(args) {
			name = args[i+1]
		}
	}
	out, err := e.hot(ctx, "inspect", "--json", name)
	if err != nil {
		return nil, err
	}
	var c struct {
		Network struct {
			IP net.IP `json:"ip"`
		} `json:"network"`
	}
	if err := json.Unmarshal([]byte(out), &c); err != nil || c.Network.IP == nil {
		return nil, fmt.Errorf("inspect %s: no IP in %q: %v", name, out, err)
	}
	return c.Network.IP, nil
}

// close removes every container and the bridge of this installation.
func (e *hotEnv) close(ctx context.Context) {
	out, _ := e.hot(ctx, "ps", "-aq")
	for _, id := range strings.Fields(out) {
		e.hot(ctx, "rm", "-f", id)
	}
	exec.Command("ip", "link", "del", e.bridge).Run()
	exec.Command("nft", "delete", "table", "ip", "hot-"+e.bridge).Run()
}

// waitHTTP waits until url answers 200.
func waitHTTP(ctx context.Context, url string, timeout time.Duration) error {
	c := http.Client{Timeout: time.Second}
	deadline := time.Now().Add(timeout)
	for {
		resp, err := c.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("status %s", resp.Status)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not answer within %s: %w", url, timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}
