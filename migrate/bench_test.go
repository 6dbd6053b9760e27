package migrate_test

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/internal/testapps"
	"github.com/hotctl/hot/internal/testutil"
	"github.com/hotctl/hot/migrate"
	"github.com/hotctl/hot/network"
)

// BenchmarkMigrate migrates a container running httpcount with -rss MB of resident memory
// and 4 keep-alive clients from host A to host B of the test lab (network namespaces on one
// segment, see newLab), stop-and-copy and --lazy, one fresh container per operation.
// Metrics: downtime-ms (freeze until the processes run on the target, as hot measures it),
// gap-ms (the longest a client waited for an answer), total-s (the whole `hot migrate`),
// stream-MB (what was sent) and, for --lazy, memin-ms (restore start until all pages are in).
//
//	go test -run '^$' -bench Migrate -benchtime 1x ./migrate/
//
// HOT_BENCH_RSS selects the sizes in MB (default "10,256,1024"). The peer row,
// runc-by-hand, moves the same workload with runc checkpoint/restore and a copy over the same
// link (benchRuncByHand).
func BenchmarkMigrate(b *testing.B) {
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
	l := newLab(b)
	l.a.startAgent()
	l.b.startAgent()
	app := testapps.Build(b, "github.com/hotctl/hot/internal/testapps/httpcount")
	rootfs := b.TempDir()
	os.MkdirAll(filepath.Join(rootfs, "bin"), 0o755)
	data, err := os.ReadFile(app)
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rootfs, "bin", "httpcount"), data, 0o755); err != nil {
		b.Fatal(err)
	}
	for _, mb := range sizes {
		tag := fmt.Sprintf("count:%d", mb)
		l.a.mustHot("image", "import", "--rootfs", rootfs, "--tag", tag, "--entrypoint", "/bin/httpcount",
			"--cmd", "serve", "--cmd", "-addr", "--cmd", ":8080", "--cmd", "-rss", "--cmd", strconv.Itoa(mb))
		for _, lazy := range []bool{false, true} {
			mode := "stop-and-copy"
			if lazy {
				mode = "lazy"
			}
			b.Run(fmt.Sprintf("%s/rss=%dMB", mode, mb), func(b *testing.B) {
				var down, gap, total, memin time.Duration
				var stream int64
				for i := 0; i < b.N; i++ {
					name := fmt.Sprintf("c%d%s%d", mb, mode[:1], i)
					m := l.serve(l.a, name, tag)
					args := []string{"migrate", name, "--json", "--to", l.b.addr(), "--token-file", l.token}
					if lazy {
						args = append(args, "--lazy")
					}
					t0 := time.Now()
					sum := lastSummary(b, l.a.mustHot(args...))
					total += time.Since(t0)
					// Progress is counted from the end of the command: answers before the
					// freeze must not count.
					rep, err := m.load.WaitProgress(m.load.Snapshot(), 3, time.Minute)
					if err != nil || rep.Failures > 0 {
						b.Fatalf("clients after migrating %s: %v %v", name, err, rep.Errors)
					}
					m.load.Stop()
					l.b.mustHot("rm", "-f", name)
					down += time.Duration(sum.DowntimeMS * float64(time.Millisecond))
					gap += rep.MaxGap
					stream += sum.StreamBytes
					if sum.Target != nil {
						memin += time.Duration(sum.Target.MemoryMS * float64(time.Millisecond))
					}
				}
				n := float64(b.N)
				b.ReportMetric(float64(down.Milliseconds())/n, "downtime-ms")
				b.ReportMetric(float64(gap.Milliseconds())/n, "gap-ms")
				b.ReportMetric(total.Seconds()/n, "total-s")
				b.ReportMetric(float64(stream)/1e6/n, "stream-MB")
				if lazy {
					b.ReportMetric(float64(memin.Milliseconds())/n, "memin-ms")
				}
			})
		}
		b.Run(fmt.Sprintf("runc-by-hand/rss=%dMB", mb), func(b *testing.B) { benchRuncByHand(b, l, app, mb) })
	}
}

// lastSummary decodes the summary, the last JSON object `hot migrate --json` prints.
func lastSummary(t testing.TB, out string) *migrate.Summary {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader([]byte(out)))
	var last *migrate.Summary
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("decode hot migrate --json: %v\n%s", err, out)
		}
		var s migrate.Summary
		if json.Unmarshal(raw, &s) == nil && s.Outcome != "" {
			last = &s
		}
	}
	if last == nil {
		t.Fatalf("no summary in hot migrate --json output:\n%s", out)
	}
	return last
}

// benchRuncByHand is the peer row: the same workload under runc, migrated the way one would
// by hand with runc alone: `runc checkpoint --tcp-established` on host A, A's end of the
// container's veth taken down, the images sent as a tar over the same link (A's management
// address to B's), `runc restore` on B into a network namespace prepared with the same
// address and MAC, and only then B's end of its veth up (the bridges learn the MAC from the
// restored server's first frames). The root file system is on both "hosts" already (same
// machine), as hot's image is after its push.
func benchRuncByHand(b *testing.B, l *lab, app string, mb int) {
	runc := testutil.RequireCommand(b, "runc")
	crb, err := criubin.Find(context.Background(), "")
	if err != nil {
		b.Skipf("CRIU: %v", err)
	}
	dir := b.TempDir()
	pathDir := filepath.Join(dir, "path") // runc looks for "criu" on PATH
	os.MkdirAll(pathDir, 0o755)
	if err := os.Symlink(crb.Path, filepath.Join(pathDir, "criu")); err != nil {
		b.Fatal(err)
	}
	env := append(os.Environ(), "PATH="+pathDir+":"+os.Getenv("PATH"))
	bundle := filepath.Join(dir, "bundle")
	os.MkdirAll(filepath.Join(bundle, "rootfs", "bin"), 0o755)
	data, _ := os.ReadFile(app)
	os.WriteFile(filepath.Join(bundle, "rootfs", "bin", "httpcount"), data, 0o755)
	if out, err := exec.Command(runc, "spec", "--bundle", bundle).CombinedOutput(); err != nil {
		b.Fatalf("runc spec: %v: %s", err, out)
	}
	prefix := strings.TrimSuffix(l.subnet, "0/24")
	ctrIP := prefix + "200"
	const mac = "02:42:0a:c4:00:c8"
	for i := 0; i < b.N; i++ {
		id := fmt.Sprintf("hotmr%s%d%d", l.sfx, mb, i)
		nsA, nsB := "hmra"+l.sfx, "hmrb"+l.sfx
		for _, n := range []struct{ ns, host, veth string }{{nsA, l.a.name, "hra" + l.sfx}, {nsB, l.b.name, "hrb" + l.sfx}} {
			ip(b, "netns", "add", n.ns)
			b.Cleanup(func() { exec.Command("ip", "netns", "del", n.ns).Run() })
			ip(b, "-n", n.host, "link", "add", n.veth, "type", "veth", "peer", "name", "eth0", "netns", n.ns)
			ip(b, "-n", n.ns, "link", "set", "eth0", "address", mac)
			ip(b, "-n", n.ns, "addr", "add", ctrIP+"/24", "dev", "eth0")
			ip(b, "-n", n.ns, "link", "set", "lo", "up")
			ip(b, "-n", n.ns, "link", "set", "eth0", "up")
			ip(b, "-n", n.host, "link", "set", n.veth, "master", l.bridge)
		}
		ip(b, "-n", l.a.name, "link", "set", "hra"+l.sfx, "up")
		writeRuncConfig(b, bundle, "/run/netns/"+nsA, "config.json", mb)
		writeRuncConfig(b, bundle, "/run/netns/"+nsB, "config-b.json", mb)
		rootA, rootB := filepath.Join(dir, "runc-a"), filepath.Join(dir, "runc-b")
		runcCmd := func(root string, args ...string) {
			b.Helper()
			// A detached container keeps runc's stdout: a pipe drained here, not a buffer
			// that Run would wait on until the container exits.
			r, w, err := os.Pipe()
			if err != nil {
				b.Fatal(err)
			}
			out := make(chan []byte, 1)
			go func() { d, _ := io.ReadAll(io.LimitReader(r, 1<<20)); io.Copy(io.Discard, r); out <- d }()
			cmd := exec.Command(runc, append([]string{"--root", root}, args...)...)
			cmd.Env = env
			cmd.Stdout, cmd.Stderr = w, w
			err = cmd.Run()
			w.Close()
			if err != nil {
				b.Fatalf("runc %s: %v: %s", strings.Join(args, " "), err, <-out)
			}
		}
		runcCmd(rootA, "run", "-d", "--bundle", bundle, id)
		b.Cleanup(func() {
			exec.Command(runc, "--root", rootA, "delete", "-f", id).Run()
			exec.Command(runc, "--root", rootB, "delete", "-f", id).Run()
		})
		m := &migration{l: l, name: id, ip: ctrIP}
		m.startLoad(b)
		imgA, imgB := filepath.Join(dir, "img-a"), filepath.Join(dir, "img-b")
		t0 := time.Now()
		runcCmd(rootA, "checkpoint", "--tcp-established", "--image-path", imgA, "--work-path", imgA, id)
		ip(b, "-n", l.a.name, "link", "set", "hra"+l.sfx, "down")
		sent := sendDir(b, l, imgA, imgB)
		os.Rename(filepath.Join(bundle, "config-b.json"), filepath.Join(bundle, "config.json"))
		runcCmd(rootB, "restore", "-d", "--tcp-established", "--image-path", imgB, "--work-path", imgB, "--bundle", bundle, id)
		// Only now on B's bridge: packets reaching the namespace before its sockets exist
		// would be answered with resets (runc has no way to hold them).
		ip(b, "-n", l.b.name, "link", "set", "hrb"+l.sfx, "up")
		// The bridges still send the MAC to A's port, and a server waiting for requests
		// sends nothing: one gratuitous ARP from B teaches them (what `arping -U` would do by
		// hand; arping is not installed here, so hot's sender of the same frame is used).
		if err := network.Announce("/run/netns/"+nsB, netip.MustParseAddr(ctrIP), 1, 0); err != nil {
			b.Fatal(err)
		}
		down := time.Since(t0)
		after := m.load.Snapshot()
		rep, err := m.load.WaitProgress(after, 3, time.Minute)
		if err != nil || rep.Failures > 0 {
			b.Fatalf("clients after the runc migration: %v %v", err, rep.Errors)
		}
		m.load.Stop()
		exec.Command(runc, "--root", rootB, "delete", "-f", id).Run()
		os.RemoveAll(imgA)
		os.RemoveAll(imgB)
		exec.Command("ip", "netns", "del", nsA).Run()
		exec.Command("ip", "netns", "del", nsB).Run()
		b.ReportMetric(float64(down.Milliseconds()), "downtime-ms")
		b.ReportMetric(float64(rep.MaxGap.Milliseconds()), "gap-ms")
		b.ReportMetric(down.Seconds(), "total-s")
		b.ReportMetric(float64(sent)/1e6, "stream-MB")
	}
}

func writeRuncConfig(b *testing.B, bundle, netnsPath, name string, mb int) {
	b.Helper()
	var spec map[string]any
	raw, _ := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err := json.Unmarshal(raw, &spec); err != nil {
		b.Fatal(err)
	}
	proc := spec["process"].(map[string]any)
	proc["terminal"] = false
	proc["args"] = []string{"/bin/httpcount", "serve", "-addr", ":8080", "-rss", strconv.Itoa(mb)}
	spec["root"].(map[string]any)["readonly"] = false // CRIU's restore needs a writable root
	for _, ns := range spec["linux"].(map[string]any)["namespaces"].([]any) {
		if m := ns.(map[string]any); m["type"] == "network" {
			m["path"] = netnsPath
		}
	}
	raw, _ = json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(bundle, name), raw, 0o644); err != nil {
		b.Fatal(err)
	}
}

// sendDir sends the files of src as a tar from host A's namespace to host B's over the lab's
// management link and unpacks them into dst; it returns the bytes sent.
func sendDir(b *testing.B, l *lab, src, dst string) int64 {
	b.Helper()
	var ln net.Listener
	inNetns(b, l.b.name, func() {
		var err error
		if ln, err = net.Listen("tcp", net.JoinHostPort(l.b.mgmt, "0")); err != nil {
			b.Fatal(err)
		}
	})
	defer ln.Close()
	recvErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			recvErr <- err
			return
		}
		defer c.Close()
		os.MkdirAll(dst, 0o700)
		tr := tar.NewReader(c)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				recvErr <- nil
				return
			}
			if err != nil {
				recvErr <- err
				return
			}
			f, err := os.OpenFile(filepath.Join(dst, filepath.Base(h.Name)), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
			if err != nil {
				recvErr <- err
				return
			}
			_, err = io.Copy(f, tr)
			f.Close()
			if err != nil {
				recvErr <- err
				return
			}
		}
	}()
	var c net.Conn
	inNetns(b, l.a.name, func() {
		var err error
		if c, err = net.Dial("tcp", ln.Addr().String()); err != nil {
			b.Fatal(err)
		}
	})
	var n int64
	tw := tar.NewWriter(c)
	ents, _ := os.ReadDir(src)
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		fi, _ := e.Info()
		f, err := os.Open(filepath.Join(src, e.Name()))
		if err != nil {
			b.Fatal(err)
		}
		tw.WriteHeader(&tar.Header{Name: e.Name(), Mode: 0o600, Size: fi.Size(), Typeflag: tar.TypeReg})
		k, _ := io.Copy(tw, f)
		f.Close()
		n += k
	}
	tw.Close()
	c.Close()
	if err := <-recvErr; err != nil {
		b.Fatalf("receive images: %v", err)
	}
	return n
}
