package bench

import (
	"strings"
	"testing"
)

func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(tc.in); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestTableMarksLostStateAndSkips(t *testing.T) {
	r := Row{Method: MethodRestart, RSSMB: 1024, Runs: []Sample{{GapMS: 900, Failed: 5, StateLost: true}, {GapMS: 1100, Failed: 7}}}
	r.summarize()
	if r.GapMS != 1000 || r.Failed != 12 || !r.StateLost {
		t.Fatalf("summarize = %+v", r)
	}
	rep := &Report{Rows: []Row{r, {Method: MethodRunc, RSSMB: 10, Skipped: "runc is not installed"}}}
	var sb strings.Builder
	rep.WriteTable(&sb)
	for _, want := range []string{"| 1 GB | restart (stop + run) | 2 | 0 | 1000 |", "| 12 | lost |", "not measured: runc is not installed"} {
		if !strings.Contains(sb.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, sb.String())
		}
	}
}
