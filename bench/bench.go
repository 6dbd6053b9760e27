package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/hotctl/hot/cowfs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hotctl/hot/bench/workload"
	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/events"
	"github.com/hotctl/hot/internal/testapps/loadclient"
	"github.com/hotctl/hot/restore"
	"github.com/hotctl/hot/update"
)

// Methods, in report order.
const (
	MethodHot     = "hot update"
	MethodHotLazy = "hot update --lazy"
	MethodRestart = "restart (stop + run)"
	MethodRunc    = "runc checkpoint+restore"
	// Operation "checkpoint": hot checkpoint + hot restore in place, plain and --lazy.
	MethodCheckpoint     = "hot checkpoint+restore"
	MethodCheckpointLazy = "hot checkpoint+restore --lazy"
)

// Operations a benchmark measures (Config.Operation).
const (
	OpUpdate     = "update"
	OpCheckpoint = "checkpoint"
)

// Config is one benchmark run.
type Config struct {
	Hot    string // hot binary to drive
	CRIU   string // CRIU binary (>= 4.2) handed to runc
	Source string // hot's source tree, for building the demo app
	// RSS lists the resident memory sizes of the workload, in MB.
	RSS  []int
	Runs int // trials per method and size
	// Clients is the number of keep-alive clients (default 4); Interval their pause between
	// requests (default 5 ms).
	Clients  int
	Interval time.Duration
	// Settle is how long the load runs before and after each operation (default 300 ms).
	Settle time.Duration
	// Operation is OpUpdate (default: hot update v1 → v2 against a restart and runc) or
	// OpCheckpoint (hot checkpoint + restore in place, plain and --lazy, against runc).
	Operation string
	// Lazy also measures hot update --lazy (lazy restore), in a row after hot update's.
	Lazy bool
	// Peers: run the restart-based update and runc when installed (default both).
	NoRestart, NoRunc bool
	WorkDir           string // scratch space (default a new temporary directory)
	Logger            *slog.Logger
}

// Sample is one trial.
type Sample struct {
	FreezeMS     float64  `json:"freezeMs"`               // service pause: processes stopped → running again
	GapMS        float64  `json:"gapMs"`                  // longest wait of a client for one answer
	ClientHoldMS float64  `json:"clientHoldMs,omitempty"` // hot: packets held (freeze + verification)
	DumpMS       float64  `json:"dumpMs,omitempty"`
	RestoreMS    float64  `json:"restoreMs,omitempty"`
	DumpBytes    uint64   `json:"dumpBytes,omitempty"`
	Failed       int      `json:"failedRequests"`
	Requests     int      `json:"requests"`
	StateLost    bool     `json:"stateLost"` // the counter went backwards
	Connections  string   `json:"connections"`
	Errors       []string `json:"errors,omitempty"` // the first failed requests
	// Phases are hot's phase durations (ms) from its events: preflight, prepare, dump, swap,
	// restore, verify, commit.
	Phases map[string]float64 `json:"phasesMs,omitempty"`
}

// Row is one method at one memory size.
type Row struct {
	Method string   `json:"method"`
	RSSMB  int      `json:"rssMb"`
	Runs   []Sample `json:"runs,omitempty"`
	// Medians over Runs.
	FreezeMS  float64 `json:"freezeMsMedian"`
	GapMS     float64 `json:"gapMsMedian"`
	DumpMS    float64 `json:"dumpMsMedian,omitempty"`
	RestoreMS float64 `json:"restoreMsMedian,omitempty"`
	Failed    int     `json:"failedRequests"` // total over Runs
	// Phases are the median durations of hot's phases (hot rows only).
	Phases    map[string]float64 `json:"phasesMsMedian,omitempty"`
	StateLost bool               `json:"stateLost"`
	// GapVsHot is this row's median gap divided by hot's at the same size.
	GapVsHot float64 `json:"gapVsHot,omitempty"`
	// Skipped says why the method has no numbers (tool missing, kernel refuses…).
	Skipped string `json:"skipped,omitempty"`
}

// Report is a whole benchmark run.
type Report struct {
	Host    string    `json:"host"`
	Kernel  string    `json:"kernel"`
	Started time.Time `json:"started"`
	Command string    `json:"command"`
	Clients int       `json:"clients"`
	Lazy    bool      `json:"lazy"`
	Rows    []Row     `json:"rows"`
}

// Run measures every method at every size. A method that cannot run here gives a row with
// Skipped set; an error is returned only when the benchmark itself cannot work.
func Run(ctx context.Context, c Config) (*Report, error) {
	if c.Clients <= 0 {
		c.Clients = 4
	}
	if c.Interval <= 0 {
		c.Interval = 5 * time.Millisecond
	}
	if c.Settle <= 0 {
		c.Settle = 300 * time.Millisecond
	}
	if c.Runs <= 0 {
		c.Runs = 1
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if len(c.RSS) == 0 {
		return nil, errors.New("no memory sizes to measure")
	}
	if c.WorkDir == "" {
		dir, err := os.MkdirTemp("", "hot-bench-")
		if err != nil {
			return nil, fmt.Errorf("bench: scratch dir: %w", err)
		}
		defer os.RemoveAll(dir)
		c.WorkDir = dir
	}
	rep := &Report{Started: time.Now().UTC(), Clients: c.Clients, Lazy: c.Lazy}
	rep.Host, _ = os.Hostname()
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		rep.Kernel = strings.TrimSpace(string(b))
	}
	w := &rootfses{v1: filepath.Join(c.WorkDir, "rootfs-v1"), v2: filepath.Join(c.WorkDir, "rootfs-v2")}
	if err := workload.DemoRootfs(ctx, c.Source, w.v1, "v1", nil); err != nil {
		return nil, err
	}
	if err := workload.DemoRootfs(ctx, c.Source, w.v2, "v2", map[string]string{"etc/demo/v2-notes": "only in v2\n"}); err != nil {
		return nil, err
	}
	env := newHotEnv(c.Hot, filepath.Join(c.WorkDir, "hot"))
	// Checkpoint images go to the run root: a tmpfs in production (/run), so here too.
	if err := mountTmpfs(env.runRoot); err != nil {
		return nil, err
	}
	defer cowfs.Unmount(env.runRoot)
	defer env.close(context.WithoutCancel(ctx))
	for _, v := range []string{"v1", "v2"} {
		dir := w.v1
		if v == "v2" {
			dir = w.v2
		}
		if _, err := env.hot(ctx, "image", "import", "--rootfs", dir, "--tag", "demo:"+v, "--entrypoint", "/app"); err != nil {
			return nil, fmt.Errorf("bench: %w", err)
		}
	}
	var runc *runcPeer
	if !c.NoRunc {
		runc = newRuncPeer(c.WorkDir, c.CRIU, w.v1)
		defer runc.close()
	}
	for _, mb := range c.RSS {
		methods := []method{{MethodHot, "", func(ctx context.Context, mb, i int) (Sample, error) { return hotTrial(ctx, c, env, mb, i, false) }}}
		if c.Lazy && c.Operation != OpCheckpoint {
			methods = append(methods, method{MethodHotLazy, "", func(ctx context.Context, mb, i int) (Sample, error) { return hotTrial(ctx, c, env, mb, i, true) }})
		}
		if c.Operation == OpCheckpoint {
			methods = []method{
				{MethodCheckpoint, "", func(ctx context.Context, mb, i int) (Sample, error) {
					return checkpointTrial(ctx, c, env, mb, i, false)
				}},
				{MethodCheckpointLazy, "", func(ctx context.Context, mb, i int) (Sample, error) { return checkpointTrial(ctx, c, env, mb, i, true) }},
			}
		}
		if !c.NoRestart && c.Operation != OpCheckpoint {
			methods = append(methods, method{MethodRestart, "", func(ctx context.Context, mb, i int) (Sample, error) { return restartTrial(ctx, c, env, mb, i) }})
		}
		if runc != nil {
			methods = append(methods, method{MethodRunc, runc.unavailable(ctx), func(ctx context.Context, mb, i int) (Sample, error) { return runc.trial(ctx, c, mb, i) }})
		}
		var hotGap float64
		for _, m := range methods {
			row := Row{Method: m.name, RSSMB: mb, Skipped: m.skip}
			for i := 0; i < c.Runs && row.Skipped == ""; i++ {
				if err := ctx.Err(); err != nil {
					return rep, err
				}
				c.Logger.Info("trial", "method", m.name, "rssMB", mb, "run", i+1)
				s, err := m.trial(ctx, mb, i)
				if err != nil {
					if ctx.Err() != nil {
						return rep, ctx.Err()
					}
					row.Skipped = err.Error()
					break
				}
				row.Runs = append(row.Runs, s)
			}
			row.summarize()
			if m.name == methods[0].name {
				hotGap = row.GapMS
			} else if hotGap > 0 && row.Skipped == "" {
				row.GapVsHot = row.GapMS / hotGap
			}
			rep.Rows = append(rep.Rows, row)
		}
	}
	return rep, nil
}

// method is one way of updating, measured by trial.
type method struct {
	name  string
	skip  string // why it cannot run here
	trial func(ctx context.Context, rssMB, run int) (Sample, error)
}

// rootfses are the demo app's two root file systems.
type rootfses struct{ v1, v2 string }

func appArgs(mb int) []string {
	return []string{"-listen", ":8080", "-rss", strconv.Itoa(mb)}
}

// underLoad starts keep-alive clients on addr, lets them run for settle, calls op, lets them
// run for settle again and returns what they saw.
func underLoad(ctx context.Context, c Config, addr string, reconnect bool, op func() error) (loadclient.Report, error) {
	l, err := loadclient.StartWith(ctx, addr, c.Clients, c.Interval, loadclient.Options{Reconnect: reconnect})
	if err != nil {
		return loadclient.Report{}, fmt.Errorf("start clients: %w", err)
	}
	time.Sleep(c.Settle)
	before := l.Snapshot()
	opErr := op()
	if opErr == nil {
		// Every client must get answers again before the trial ends.
		// (Reconnecting clients count failures without stopping: that is what a restart costs.)
		_, err = l.WaitProgress(before, 3, 30*time.Second)
		time.Sleep(c.Settle)
	}
	rep := l.Stop()
	if opErr != nil {
		return rep, opErr
	}
	return rep, err
}

func sampleFromLoad(s *Sample, r loadclient.Report) {
	s.GapMS = ms(r.MaxGap)
	s.Failed = r.Failures
	s.Requests = r.Requests
	s.StateLost = r.Regressions > 0
	s.Connections = "kept"
	if len(r.Errors) > 0 {
		s.Errors = r.Errors[:min(len(r.Errors), 4)]
	}
	if r.Failures > 0 {
		s.Connections = "reset, reconnected"
	}
}

func hotTrial(ctx context.Context, c Config, env *hotEnv, mb, i int, lazy bool) (Sample, error) {
	var s Sample
	name := fmt.Sprintf("hot%d-%d", mb, i)
	if lazy {
		name = fmt.Sprintf("lazy%d-%d", mb, i)
	}
	ip, err := env.run(ctx, append([]string{"--name", name, "demo:v1"}, appArgs(mb)...)...)
	if err != nil {
		return s, err
	}
	defer env.hot(context.WithoutCancel(ctx), "rm", "-f", name)
	addr := net.JoinHostPort(ip.String(), "8080")
	if err := waitHTTP(ctx, "http://"+addr+"/healthz", 60*time.Second); err != nil {
		return s, err
	}
	var sum update.Summary
	s.Phases = map[string]float64{}
	lr, err := underLoad(ctx, c, addr, false, func() error {
		args := []string{"update", name, "demo:v2", "--json"}
		if lazy {
			args = append(args, "--lazy")
		}
		out, err := env.hot(ctx, args...)
		if err != nil {
			return err
		}
		return decodeSummary(out, &sum, s.Phases)
	})
	if err != nil {
		return s, err
	}
	sampleFromLoad(&s, lr)
	if sum.Outcome != "updated" {
		return s, fmt.Errorf("hot update %s: outcome %q: %s", name, sum.Outcome, sum.Reason)
	}
	s.FreezeMS, s.ClientHoldMS, s.DumpMS, s.RestoreMS, s.DumpBytes = sum.FreezeWindowMS, sum.ClientPauseMS, sum.DumpMS, sum.RestoreMS, sum.DumpBytes
	return s, nil
}

// decodeSummary reads the summary object that ends `hot update --json` output and the
// durations of the phases from the JSON event lines before it.
func decodeSummary(out string, sum *update.Summary, phases map[string]float64) error {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if lines[i] != "{" {
			continue
		}
		for _, l := range lines[:i] {
			var ev events.Event
			if json.Unmarshal([]byte(l), &ev) != nil || ev.Status != "ok" || ev.MS <= 0 {
				continue
			}
			phases[ev.Phase] += ev.MS
			// CRIU's own numbers inside a phase, e.g. dump: criuFrozenMs, memWriteMs.
			for k, v := range ev.Details {
				if f, ok := v.(float64); ok && strings.HasSuffix(k, "Ms") && k != "freezeWindowMs" && k != "clientPauseMs" {
					phases[ev.Phase+"."+strings.TrimSuffix(k, "Ms")] = f
				}
			}
		}
		return json.Unmarshal([]byte(strings.Join(lines[i:], "\n")), sum)
	}
	return fmt.Errorf("no summary in hot update output: %q", out)
}

func restartTrial(ctx context.Context, c Config, env *hotEnv, mb, i int) (Sample, error) {
	var s Sample
	name := fmt.Sprintf("rst%d-%d", mb, i)
	ip, err := env.run(ctx, append([]string{"--name", name, "demo:v1"}, appArgs(mb)...)...)
	if err != nil {
		return s, err
	}
	defer env.hot(context.WithoutCancel(ctx), "rm", "-f", name)
	addr := net.JoinHostPort(ip.String(), "8080")
	if err := waitHTTP(ctx, "http://"+addr+"/healthz", 60*time.Second); err != nil {
		return s, err
	}
	lr, err := underLoad(ctx, c, addr, true, func() error {
		start := time.Now()
		if _, err := env.hot(ctx, "stop", "-t", "10", name); err != nil {
			return err
		}
		if _, err := env.hot(ctx, "rm", name); err != nil {
			return err
		}
		if _, err := env.run(ctx, append([]string{"--name", name, "--ip", ip.String(), "demo:v2"}, appArgs(mb)...)...); err != nil {
			return err
		}
		if err := waitHTTP(ctx, "http://"+addr+"/healthz", 60*time.Second); err != nil {
			return err
		}
		s.FreezeMS = ms(time.Since(start))
		return nil
	})
	if err != nil {
		return s, err
	}
	sampleFromLoad(&s, lr)
	return s, nil
}

// checkpointTrial checkpoints and restores a container in place under load (hot checkpoint,
// then hot restore [--lazy]). Pause: from the start of the checkpoint until the restored tree
// runs (with --lazy, before all its memory is in).
func checkpointTrial(ctx context.Context, c Config, env *hotEnv, mb, i int, lazy bool) (Sample, error) {
	var s Sample
	name := fmt.Sprintf("ckp%d-%d", mb, i)
	if lazy {
		name = fmt.Sprintf("ckl%d-%d", mb, i)
	}
	ip, err := env.run(ctx, append([]string{"--name", name, "demo:v1"}, appArgs(mb)...)...)
	if err != nil {
		return s, err
	}
	defer env.hot(context.WithoutCancel(ctx), "rm", "-f", name)
	addr := net.JoinHostPort(ip.String(), "8080")
	if err := waitHTTP(ctx, "http://"+addr+"/healthz", 60*time.Second); err != nil {
		return s, err
	}
	lr, err := underLoad(ctx, c, addr, false, func() error {
		t0 := time.Now()
		out, err := env.hot(ctx, "checkpoint", "--json", name)
		if err != nil {
			return err
		}
		var cres checkpoint.ContainerResult
		if err := json.Unmarshal([]byte(out), &cres); err != nil {
			return fmt.Errorf("hot checkpoint output: %w", err)
		}
		t1 := time.Now()
		args := []string{"restore", "--json", name}
		if lazy {
			args = append(args, "--lazy")
		}
		if out, err = env.hot(ctx, args...); err != nil {
			return err
		}
		var rres restore.ContainerResult
		if err := json.Unmarshal([]byte(out), &rres); err != nil {
			return fmt.Errorf("hot restore output: %w", err)
		}
		s.DumpMS, s.RestoreMS = ms(t1.Sub(t0)), ms(time.Since(t1))
		s.FreezeMS = ms(t1.Sub(t0) + time.Since(t1) - (rres.MemoryIn - rres.Running))
		s.DumpBytes = cres.Stats.BytesWritten
		return nil
	})
	if err != nil {
		return s, err
	}
	sampleFromLoad(&s, lr)
	return s, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
