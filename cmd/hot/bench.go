package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/hotctl/hot/bench"
	"github.com/hotctl/hot/bench/workload"
	"github.com/hotctl/hot/criubin"
	"github.com/spf13/cobra"
)

func newBenchCmd(opts *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Benchmarks that put hot next to the alternatives on this machine",
	}
	cmd.AddCommand(newBenchUpdateCmd(opts), newBenchCheckpointCmd(opts))
	return cmd
}

func newBenchUpdateCmd(opts *globalOptions) *cobra.Command {
	return newBenchOpCmd(opts, bench.OpUpdate, &cobra.Command{
		Use:   "update",
		Short: "Measure the pause and the client-visible gap of hot update against a restart and runc checkpoint/restore",
		Long: `Runs the demo app holding the given resident memory under keep-alive load and updates it
from v1 to v2 with hot update, with a restart (hot stop + hot run of v2) and, when installed,
checkpoints and restores it with runc (which cannot switch images). For every memory size and
method it reports the median pause, the longest wait a client saw, dump and restore times, the
failed requests and whether the in-memory state survived. Needs root and the Go toolchain (the
demo app is built from hot's source tree). Uses its own state root, bridge and network namespace
and removes them at the end.`,
	})
}

func newBenchCheckpointCmd(opts *globalOptions) *cobra.Command {
	return newBenchOpCmd(opts, bench.OpCheckpoint, &cobra.Command{
		Use:   "checkpoint",
		Short: "Measure hot checkpoint + restore in place (plain and --lazy) against runc checkpoint/restore",
		Long: `Runs the demo app holding the given resident memory under keep-alive load, checkpoints it
and restores it in place with hot checkpoint + hot restore, the same with hot restore --lazy,
and, when installed, with runc checkpoint + runc restore of the same app (same CRIU). For every
memory size and method it reports the median pause (until the processes run again), the
longest wait a client saw, dump and restore times (wall time of each command), the failed
requests and whether the in-memory state survived. Needs root and the Go toolchain.`,
	})
}

// newBenchOpCmd completes cmd (Use and help set) into a benchmark of operation op.
func newBenchOpCmd(opts *globalOptions, op string, cmd *cobra.Command) *cobra.Command {
	var (
		rss, source       string
		runs              int
		lazy, asJSON      bool
		noRestart, noRunc bool
	)
	cmd.Args = exactArgs(0, "no arguments")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		sizes, err := parseSizesMB(rss)
		if err != nil {
			return usageError{fmt.Errorf("--rss %q: %w", rss, err)}
		}
		if runs < 1 {
			return usageError{fmt.Errorf("--runs %d: need at least 1", runs)}
		}
		if source == "" {
			wd, _ := os.Getwd()
			if source, err = workload.FindSource(wd); err != nil {
				return usageError{err}
			}
		}
		self, err := os.Executable()
		if err != nil {
			return fmt.Errorf("bench: find the hot binary: %w", err)
		}
		b, err := criubin.Find(cmd.Context(), opts.criu)
		if err != nil {
			return err
		}
		rep, err := bench.Run(cmd.Context(), bench.Config{Hot: self, CRIU: b.Path, Source: source, RSS: sizes, Runs: runs,
			Operation: op, Lazy: lazy, NoRestart: noRestart, NoRunc: noRunc, Logger: opts.logger})
		if err != nil {
			return err
		}
		rep.Command = "hot " + strings.Join(os.Args[1:], " ")
		if asJSON {
			return writeJSON(cmd.OutOrStdout(), rep)
		}
		rep.WriteTable(cmd.OutOrStdout())
		return nil
	}
	f := cmd.Flags()
	f.StringVar(&rss, "rss", "10M,256M,1G", "comma-separated resident memory sizes of the workload (M or G suffix)")
	f.IntVar(&runs, "runs", 3, "trials per method and size (the report gives medians)")
	f.StringVar(&source, "source", "", "hot's source tree, to build the demo app (default: found above the current directory)")
	if op == bench.OpUpdate {
		f.BoolVar(&lazy, "lazy", false, "also measure hot update --lazy (lazy restore), side by side with hot update")
		f.BoolVar(&noRestart, "no-restart", false, "skip the restart-based update")
	}
	f.BoolVar(&noRunc, "no-runc", false, "skip runc checkpoint/restore")
	f.BoolVar(&asJSON, "json", false, "print the report as JSON (every trial included)")
	return cmd
}

// parseSizesMB parses "10M,256M,1G" into MB.
func parseSizesMB(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.ToUpper(strings.TrimSpace(f))
		mult := 1
		switch {
		case strings.HasSuffix(f, "G"):
			mult, f = 1024, strings.TrimSuffix(f, "G")
		case strings.HasSuffix(f, "M"):
			f = strings.TrimSuffix(f, "M")
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("%q is not a size like 10M or 1G", f)
		}
		out = append(out, n*mult)
	}
	return out, nil
}
