package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"github.com/hotctl/hot/cowfs"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/runtime-spec/specs-go"
)

// runcPeer checkpoints and restores the demo app with runc: an OCI bundle over the v1 root
// file system, in a network namespace of its own joined to the host by a veth pair.
type runcPeer struct {
	criu, rootfs string
	dir          string // bundle, runc state, images (tmpfs), work dir
	ready        bool
	setupErr     string
	netns, veth  string
	hostIP, ip   string
}

func newRuncPeer(workDir, criu, rootfs string) *runcPeer {
	b := make([]byte, 3)
	rand.Read(b)
	id := hex.EncodeToString(b)
	return &runcPeer{criu: criu, rootfs: rootfs, dir: filepath.Join(workDir, "runc"),
		netns: "hotbench-" + id, veth: "hbr" + id,
		hostIP: fmt.Sprintf("10.195.%d.1", 10+int(b[0])%240), ip: fmt.Sprintf("10.195.%d.2", 10+int(b[0])%240)}
}

// unavailable says why runc cannot be measured here, or "" when it can; the first call sets
// up the bundle and network.
func (p *runcPeer) unavailable(ctx context.Context) string {
	if p.ready || p.setupErr != "" {
		return p.setupErr
	}
	if _, err := exec.LookPath("runc"); err != nil {
		p.setupErr = "runc is not installed"
		return p.setupErr
	}
	if p.criu == "" {
		p.setupErr = "no CRIU >= 4.2 to hand to runc"
		return p.setupErr
	}
	if err := p.setup(ctx); err != nil {
		p.setupErr = err.Error()
		return p.setupErr
	}
	p.ready = true
	return ""
}

func (p *runcPeer) setup(ctx context.Context) error {
	for _, d := range []string{"bundle", "state", "images", "work"} {
		if err := os.MkdirAll(filepath.Join(p.dir, d), 0o700); err != nil {
			return fmt.Errorf("runc bundle: %w", err)
		}
	}
	// Images on tmpfs, like hot's run root: the dump writes memory, not disk blocks.
	if err := mountTmpfs(filepath.Join(p.dir, "images")); err != nil {
		return err
	}
	if out, err := exec.CommandContext(ctx, "runc", "spec", "--bundle", filepath.Join(p.dir, "bundle")).CombinedOutput(); err != nil {
		return fmt.Errorf("runc spec: %w: %s", err, out)
	}
	steps := [][]string{
		{"netns", "add", p.netns},
		{"link", "add", p.veth + "h", "type", "veth", "peer", "name", p.veth + "c"},
		{"link", "set", p.veth + "c", "netns", p.netns},
		{"addr", "add", p.hostIP + "/30", "dev", p.veth + "h"},
		{"link", "set", p.veth + "h", "up"},
		{"-n", p.netns, "link", "set", "lo", "up"},
		{"-n", p.netns, "link", "set", p.veth + "c", "name", "eth0"},
		{"-n", p.netns, "addr", "add", p.ip + "/30", "dev", "eth0"},
		{"-n", p.netns, "link", "set", "eth0", "up"},
	}
	for _, s := range steps {
		if out, err := exec.CommandContext(ctx, "ip", s...).CombinedOutput(); err != nil {
			return fmt.Errorf("runc network: ip %s: %w: %s", strings.Join(s, " "), err, bytes.TrimSpace(out))
		}
	}
	return nil
}

func (p *runcPeer) close() {
	exec.Command("ip", "link", "del", p.veth+"h").Run()
	exec.Command("ip", "netns", "del", p.netns).Run()
	cowfs.Unmount(filepath.Join(p.dir, "images"))
}

// writeConfig writes the bundle's config.json for the demo app with mb MB resident.
func (p *runcPeer) writeConfig(mb int) error {
	path := filepath.Join(p.dir, "bundle", "config.json")
	raw, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("runc bundle: %w", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(raw, &spec); err != nil {
		return fmt.Errorf("runc bundle: decode %s: %w", path, err)
	}
	spec.Root = &specs.Root{Path: p.rootfs, Readonly: true}
	spec.Process.Terminal = false
	spec.Process.Args = append([]string{"/app"}, appArgs(mb)...)
	for i, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			spec.Linux.Namespaces[i].Path = filepath.Join("/run/netns", p.netns)
		}
	}
	out, err := json.MarshalIndent(&spec, "", "\t")
	if err != nil {
		return err
	}
	return os.WriteFile(path, out, 0o644)
}

func (p *runcPeer) runc(ctx context.Context, args ...string) error {
	return p.runcStdio(ctx, nil, args...)
}

// runcDetached runs `runc run -d` or `runc restore -d`: the container gets pipes as stdio
// (what CRIU and runc know how to carry over: runc re-attaches them with inherit-fd on
// restore), drained until the container closes them.
func (p *runcPeer) runcDetached(ctx context.Context, args ...string) error {
	var theirs []*os.File
	defer func() {
		for _, f := range theirs {
			f.Close()
		}
	}()
	for i := 0; i < 3; i++ {
		r, w, err := os.Pipe()
		if err != nil {
			return err
		}
		if i == 0 {
			w.Close() // stdin: at end of file at once, the demo app does not read it
			theirs = append(theirs, r)
		} else {
			theirs = append(theirs, w)
			go func() { io.Copy(io.Discard, r); r.Close() }()
		}
	}
	return p.runcStdio(ctx, theirs, args...)
}

func (p *runcPeer) runcStdio(ctx context.Context, stdio []*os.File, args ...string) error {
	full := append([]string{"--root", filepath.Join(p.dir, "state")}, args...)
	cmd := exec.CommandContext(ctx, "runc", full...)
	cmd.Dir = filepath.Join(p.dir, "bundle")
	if stdio != nil {
		// runc's own messages go to its log file, the container's to the pipes.
		logf := filepath.Join(p.dir, "runc.log")
		cmd.Args = append([]string{"runc", "--log", logf}, full...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = stdio[0], stdio[1], stdio[2]
		os.Remove(logf)
		if err := cmd.Run(); err != nil {
			b, _ := os.ReadFile(logf)
			return fmt.Errorf("runc %s: %w: %s", strings.Join(args, " "), err, lastLines(string(b), 3))
		}
		return nil
	}
	// A file, not a pipe: a detached container inherits runc's stdio and would keep a pipe
	// open (cmd.Wait would never return).
	out, err := os.CreateTemp(p.dir, "runc-out-")
	if err != nil {
		return err
	}
	defer os.Remove(out.Name())
	defer out.Close()
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		b, _ := os.ReadFile(out.Name())
		return fmt.Errorf("runc %s: %w: %s", strings.Join(args, " "), err, lastLines(string(b), 3))
	}
	return nil
}

// trial runs the demo app under runc, then checkpoints and restores it under load.
func (p *runcPeer) trial(ctx context.Context, c Config, mb, i int) (Sample, error) {
	var s Sample
	if err := p.writeConfig(mb); err != nil {
		return s, err
	}
	id := fmt.Sprintf("hotbench-%d-%d", mb, i)
	images := filepath.Join(p.dir, "images", id)
	work := filepath.Join(p.dir, "work", id)
	if err := p.runcDetached(ctx, "run", "-d", "--bundle", filepath.Join(p.dir, "bundle"), id); err != nil {
		return s, err
	}
	defer func() {
		ctx := context.WithoutCancel(ctx)
		p.runc(ctx, "kill", id, "KILL")
		p.runc(ctx, "delete", "-f", id)
		os.RemoveAll(images)
	}()
	addr := net.JoinHostPort(p.ip, "8080")
	if err := waitHTTP(ctx, "http://"+addr+"/healthz", 60*time.Second); err != nil {
		return s, err
	}
	lr, err := underLoad(ctx, c, addr, false, func() error {
		t0 := time.Now()
		if err := p.runc(ctx, "--criu", p.criu, "checkpoint", "--tcp-established", "--image-path", images, "--work-path", work, id); err != nil {
			return explainRunc(err, work)
		}
		t1 := time.Now()
		if err := p.runcDetached(ctx, "--criu", p.criu, "restore", "-d", "--tcp-established", "--image-path", images, "--work-path", work, "--bundle", filepath.Join(p.dir, "bundle"), id); err != nil {
			return explainRunc(err, work)
		}
		t2 := time.Now()
		s.DumpMS, s.RestoreMS, s.FreezeMS = ms(t1.Sub(t0)), ms(t2.Sub(t1)), ms(t2.Sub(t0))
		return nil
	})
	if err != nil {
		return s, err
	}
	sampleFromLoad(&s, lr)
	return s, nil
}

// explainRunc adds the first error line of CRIU's log in the work dir to a runc failure.
func explainRunc(err error, work string) error {
	for _, log := range []string{"dump.log", "restore.log"} {
		b, rerr := os.ReadFile(filepath.Join(work, log))
		if rerr != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "Error") && !strings.Contains(l, "RLIMIT_NOFILE") {
				return fmt.Errorf("%w (CRIU %s: %s)", err, log, strings.TrimSpace(l))
			}
		}
	}
	return err
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " / ")
}
