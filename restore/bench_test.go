package restore_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/internal/testapps/loadclient"
	"github.com/hotctl/hot/internal/testutil"
	"github.com/hotctl/hot/restore"
	"golang.org/x/sys/unix"
)

// BenchmarkCheckpointRestore measures checkpoint + restore in place of a container running
// httpcount with -rss MB of resident memory and 4 keep-alive clients, with hot (plain and
// --lazy) and, when runc is installed, with runc checkpoint/restore of the same workload in
// the same kind of network namespace. Metrics per operation: dump-s, restore-s, MB/s (resident
// MB / dump time), gap-ms (the longest a client waited for an answer), and for --lazy
// running-ms / memin-ms (until the tree runs / until all memory is in).
//
//	go test -run '^$' -bench CheckpointRestore -benchtime 3x ./restore/
//
// HOT_BENCH_RSS selects the sizes in MB (default "10,256,1024").
func BenchmarkCheckpointRestore(b *testing.B) {
	sizes := []int{10, 256, 1024}
	if v := os.Getenv("HOT_BENCH_RSS"); v != "" {
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				b.Fatalf("HOT_BENCH_RSS %q: %v", v, err)
			}
			sizes = append(sizes, n)
		}
	}
	for _, mb := range sizes {
		b.Run(fmt.Sprintf("hot/rss=%dMB", mb), func(b *testing.B) { benchHot(b, mb, false) })
		b.Run(fmt.Sprintf("hot-lazy/rss=%dMB", mb), func(b *testing.B) { benchHot(b, mb, true) })
		b.Run(fmt.Sprintf("runc/rss=%dMB", mb), func(b *testing.B) { benchRunc(b, mb) })
	}
}

func benchHot(b *testing.B, mb int, lazy bool) {
	e := newEnv(b, "serve", "-addr", ":8080", "-rss", strconv.Itoa(mb))
	load := e.clients()
	progress(b, load, load.Snapshot())
	var dump, rest, running, memin time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		var cres checkpoint.ContainerResult
		if err := json.Unmarshal([]byte(e.mustHot("checkpoint", "--json", "web")), &cres); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		args := []string{"restore", "--json", "web"}
		if lazy {
			args = append(args, "--lazy")
		}
		var rres restore.ContainerResult
		if err := json.Unmarshal([]byte(e.mustHot(args...)), &rres); err != nil {
			b.Fatal(err)
		}
		dump += t1.Sub(t0)
		rest += time.Since(t1)
		running += rres.Running
		memin += rres.MemoryIn
		b.StopTimer()
		progress(b, load, load.Snapshot())
		b.StartTimer()
	}
	b.StopTimer()
	rep := load.Stop()
	if rep.Failures > 0 {
		b.Fatalf("client failures: %v", rep.Errors)
	}
	report(b, mb, dump, rest, rep.MaxGap)
	if lazy {
		b.ReportMetric(float64(running.Milliseconds())/float64(b.N), "running-ms")
		b.ReportMetric(float64(memin.Milliseconds())/float64(b.N), "memin-ms")
	}
}

func report(b *testing.B, mb int, dump, rest, gap time.Duration) {
	n := float64(b.N)
	b.ReportMetric(dump.Seconds()/n, "dump-s")
	b.ReportMetric(rest.Seconds()/n, "restore-s")
	b.ReportMetric(float64(mb)/(dump.Seconds()/n), "MB/s")
	b.ReportMetric(float64(gap.Milliseconds()), "gap-ms")
	b.ReportMetric(0, "ns/op") // wall time per op is dump-s + restore-s
}

// benchRunc runs the same workload with runc: an OCI bundle holding the static httpcount,
// in a network namespace of ours with a veth to the host, checkpointed and restored with
// --tcp-established (runc keeps a netns given by path as external itself).
func benchRunc(b *testing.B, mb int) {
	testutil.RequireRoot(b)
	runc := testutil.RequireCommand(b, "runc")
	crb, err := criubin.Find(context.Background(), "")
	if err != nil {
		b.Skipf("CRIU: %v", err)
	}
	dir, err := os.MkdirTemp("", "hotbr")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	// runc looks for "criu" on PATH: point it at the same CRIU hot uses.
	pathDir := filepath.Join(dir, "path")
	os.MkdirAll(pathDir, 0o755)
	if err := os.Symlink(crb.Path, filepath.Join(pathDir, "criu")); err != nil {
		b.Fatal(err)
	}
	env := append(os.Environ(), "PATH="+pathDir+":"+os.Getenv("PATH"))
	var rnd [3]byte
	rand.Read(rnd[:])
	id := "hotbench" + hex.EncodeToString(rnd[:])
	netns := "hotb" + hex.EncodeToString(rnd[:])
	hostIP := fmt.Sprintf("10.195.%d.1", 10+int(rnd[0])%240)
	ctrIP := fmt.Sprintf("10.195.%d.2", 10+int(rnd[0])%240)
	sh := func(args ...string) {
		b.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			b.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	sh("ip", "netns", "add", netns)
	b.Cleanup(func() { exec.Command("ip", "netns", "del", netns).Run() })
	veth := "hb" + hex.EncodeToString(rnd[:])
	sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
	sh("ip", "addr", "add", hostIP+"/24", "dev", veth)
	sh("ip", "link", "set", veth, "up")
	sh("ip", "-n", netns, "addr", "add", ctrIP+"/24", "dev", "eth0")
	sh("ip", "-n", netns, "link", "set", "eth0", "up")
	sh("ip", "-n", netns, "link", "set", "lo", "up")

	bundle := filepath.Join(dir, "bundle")
	os.MkdirAll(filepath.Join(bundle, "rootfs", "bin"), 0o755)
	sh("cp", appBinary(b), filepath.Join(bundle, "rootfs", "bin", "httpcount"))
	sh(runc, "spec", "--bundle", bundle)
	var spec map[string]any
	raw, _ := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err := json.Unmarshal(raw, &spec); err != nil {
		b.Fatal(err)
	}
	proc := spec["process"].(map[string]any)
	proc["terminal"] = false
	proc["args"] = []string{"/bin/httpcount", "serve", "-addr", ":8080", "-rss", strconv.Itoa(mb)}
	// CRIU's restore needs a writable root (runc's default is read-only).
	spec["root"].(map[string]any)["readonly"] = false
	linux := spec["linux"].(map[string]any)
	for _, ns := range linux["namespaces"].([]any) {
		if m := ns.(map[string]any); m["type"] == "network" {
			m["path"] = "/run/netns/" + netns
		}
	}
	raw, _ = json.Marshal(spec)
	os.WriteFile(filepath.Join(bundle, "config.json"), raw, 0o644)

	runcRoot := filepath.Join(dir, "runc")
	images := filepath.Join(dir, "images")
	os.MkdirAll(images, 0o700)
	if err := unix.Mount("tmpfs", images, "tmpfs", 0, "mode=0700"); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { unix.Unmount(images, unix.MNT_DETACH) })
	// stdio: pipes drained here (runc records them and hands new ones over on restore).
	runcCmd := func(args ...string) {
		b.Helper()
		r, w, err := os.Pipe()
		if err != nil {
			b.Fatal(err)
		}
		var out syncBuffer
		go io.Copy(&out, r)
		cmd := exec.Command(runc, append([]string{"--root", runcRoot}, args...)...)
		cmd.Env = env
		cmd.Stdout, cmd.Stderr = w, w
		err = cmd.Run()
		w.Close()
		if err != nil {
			time.Sleep(50 * time.Millisecond) // let the copier catch up
			msg := out.String()
			logs, _ := filepath.Glob(filepath.Join(images, "*", "*.log"))
			for _, l := range logs {
				c, _ := os.ReadFile(l)
				msg += "\n" + l + ": " + criubin.FirstError(string(c))
			}
			b.Fatalf("runc %s: %v: %s", strings.Join(args, " "), err, msg)
		}
	}
	runcCmd("run", "-d", "--bundle", bundle, id)
	b.Cleanup(func() {
		exec.Command(runc, "--root", runcRoot, "delete", "-f", id).Run()
	})
	addr := ctrIP + ":8080"
	var load *loadclient.Load
	deadline := time.Now().Add(10 * time.Second)
	for {
		if load, err = loadclient.Start(context.Background(), addr, 4, 5*time.Millisecond); err == nil {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("runc container unreachable: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	defer load.Stop()
	progress(b, load, load.Snapshot())
	var dump, rest time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		img := filepath.Join(images, strconv.Itoa(i))
		t0 := time.Now()
		runcCmd("checkpoint", "--tcp-established", "--image-path", img, "--work-path", img, id)
		t1 := time.Now()
		runcCmd("restore", "-d", "--tcp-established", "--image-path", img, "--work-path", img, "--bundle", bundle, id)
		dump += t1.Sub(t0)
		rest += time.Since(t1)
		b.StopTimer()
		progress(b, load, load.Snapshot())
		os.RemoveAll(img)
		b.StartTimer()
	}
	b.StopTimer()
	rep := load.Stop()
	if rep.Failures > 0 {
		b.Fatalf("client failures: %v", rep.Errors)
	}
	report(b, mb, dump, rest, rep.MaxGap)
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}
