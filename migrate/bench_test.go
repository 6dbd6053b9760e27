package migrate_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/internal/testapps"
	"github.com/hotctl/hot/migrate"
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
// HOT_BENCH_RSS selects the sizes in MB (default "10,256,1024"). There is no peer row yet
// (runc checkpoint, copy, runc restore on the other namespace by hand).
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
					before := m.load.Snapshot()
					args := []string{"migrate", name, "--json", "--to", l.b.addr(), "--token-file", l.token}
					if lazy {
						args = append(args, "--lazy")
					}
					t0 := time.Now()
					sum := lastSummary(b, l.a.mustHot(args...))
					total += time.Since(t0)
					rep, err := m.load.WaitProgress(before, 3, time.Minute)
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
