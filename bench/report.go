package bench

import (
	"fmt"
	"io"
	"slices"
	"strings"
)

func (r *Row) summarize() {
	if len(r.Runs) == 0 {
		return
	}
	pick := func(f func(Sample) float64) float64 {
		v := make([]float64, len(r.Runs))
		for i, s := range r.Runs {
			v[i] = f(s)
		}
		return median(v)
	}
	r.FreezeMS = pick(func(s Sample) float64 { return s.FreezeMS })
	r.GapMS = pick(func(s Sample) float64 { return s.GapMS })
	r.DumpMS = pick(func(s Sample) float64 { return s.DumpMS })
	r.RestoreMS = pick(func(s Sample) float64 { return s.RestoreMS })
	for _, s := range r.Runs {
		for ph := range s.Phases {
			if r.Phases == nil {
				r.Phases = map[string]float64{}
			}
			if _, done := r.Phases[ph]; !done {
				r.Phases[ph] = pick(func(s Sample) float64 { return s.Phases[ph] })
			}
		}
	}
	r.Failed = 0
	for _, s := range r.Runs {
		r.Failed += s.Failed
		r.StateLost = r.StateLost || s.StateLost
	}
}

// median of v (the mean of the middle two for an even count).
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// WriteTable prints the report as a Markdown table (readable on a terminal too).
func (rep *Report) WriteTable(w io.Writer) {
	fmt.Fprintf(w, "kernel %s, %d keep-alive clients, medians of the runs per row", rep.Kernel, rep.Clients)
	fmt.Fprintln(w)
	fmt.Fprintln(w)
	tw := w
	fmt.Fprintln(tw, "| RSS | method | runs | pause ms | client gap ms | gap vs hot | dump ms | restore ms | failed requests | state |")
	fmt.Fprintln(tw, "|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range rep.Rows {
		if r.Skipped != "" {
			fmt.Fprintf(tw, "| %s | %s | 0 | not measured: %s | | | | | | |\n", rssText(r.RSSMB), r.Method, oneLine(r.Skipped))
			continue
		}
		ratio := "1"
		if r.Method != MethodHot && r.Method != MethodCheckpoint {
			ratio = "—"
			if r.GapVsHot > 0 {
				ratio = fmt.Sprintf("%.1f×", r.GapVsHot)
			}
		}
		state := "kept"
		if r.StateLost {
			state = "lost"
		}
		fmt.Fprintf(tw, "| %s | %s | %d | %.0f | %.0f | %s | %s | %s | %d | %s |\n", rssText(r.RSSMB), r.Method, len(r.Runs),
			r.FreezeMS, r.GapMS, ratio, optMS(r.DumpMS), optMS(r.RestoreMS), r.Failed, state)
	}
	for _, r := range rep.Rows {
		if len(r.Phases) == 0 {
			continue
		}
		fmt.Fprintf(w, "\n%s phases at %s (median ms):", r.Method, rssText(r.RSSMB))
		for _, ph := range phaseOrder {
			if v, ok := r.Phases[ph]; ok {
				fmt.Fprintf(w, " %s %.0f", ph, v)
			}
		}
	}
	fmt.Fprintln(w)
}

// phaseOrder is the order of hot update's phases.
var phaseOrder = []string{"preflight", "prepare", "dump", "dump.freeze", "dump.criuFrozen", "dump.memDump", "dump.memWrite",
	"swap", "restore", "restore.criuRestore", "verify", "memory-in", "commit"}

func optMS(v float64) string {
	if v == 0 {
		return "—"
	}
	return fmt.Sprintf("%.0f", v)
}

func rssText(mb int) string {
	if mb >= 1024 && mb%1024 == 0 {
		return fmt.Sprintf("%d GB", mb/1024)
	}
	return fmt.Sprintf("%d MB", mb)
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 160 {
		s = s[:157] + "..."
	}
	return s
}
