package bench_test

import (
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/hotctl/hot/bench"
	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/internal/testutil"
)

// BenchmarkUpdate runs the update benchmark (hot update, restart, runc) once per iteration
// at $HOT_BENCH_RSS MB (default 10; comma-separated for several sizes) and reports hot's and
// the peers' medians as metrics. Run it as root:
//
//	go test -run '^$' -bench Update -benchtime 1x ./bench
func BenchmarkUpdate(b *testing.B) {
	testutil.RequireRoot(b)
	testutil.RequireCommand(b, "iptables")
	crb, err := criubin.Find(b.Context(), "")
	if err != nil {
		b.Skipf("no usable CRIU: %v", err)
	}
	sizes := []int{10}
	if v := os.Getenv("HOT_BENCH_RSS"); v != "" {
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				b.Fatalf("HOT_BENCH_RSS=%q: want MB values like 10,256", v)
			}
			sizes = append(sizes, n)
		}
	}
	cfg := bench.Config{Hot: testutil.HotBinary(b), CRIU: crb.Path, Source: testutil.ModuleRoot(b), RSS: sizes, Runs: b.N,
		Lazy: os.Getenv("HOT_BENCH_LAZY") != "", WorkDir: b.TempDir()}
	b.ResetTimer()
	rep, err := bench.Run(b.Context(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	var sb strings.Builder
	rep.WriteTable(&sb)
	b.Log("\n" + sb.String())
	for _, r := range rep.Rows {
		if r.Skipped != "" {
			continue
		}
		unit := func(what string) string {
			return strings.NewReplacer(" ", "", "(", "", ")", "", "+", "", "-", "").Replace(r.Method) + "-" + strconv.Itoa(r.RSSMB) + "MB-" + what
		}
		b.ReportMetric(r.GapMS, unit("gap-ms"))
		b.ReportMetric(r.FreezeMS, unit("pause-ms"))
		b.ReportMetric(float64(r.Failed), unit("failed"))
	}
	for _, r := range rep.Rows {
		if (r.Method == bench.MethodHot || r.Method == bench.MethodHotLazy) && (r.Skipped != "" || r.Failed > 0 || r.StateLost) {
			b.Errorf("hot update at %d MB: %d failed requests, state lost %v, %s", r.RSSMB, r.Failed, r.StateLost, r.Skipped)
		}
	}
}
