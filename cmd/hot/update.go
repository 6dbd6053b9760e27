package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/cowfs"
	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/events"
	"github.com/hotctl/hot/update"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

// eventsFile is the per-container event log kept for `hot events` and `hot inspect`.
const eventsFile = "events.jsonl"

func updateCommands(opts *globalOptions) []*cobra.Command {
	return []*cobra.Command{newUpdateCmd(opts), newRollbackCmd(opts), newHistoryCmd(opts), newEventsCmd(opts)}
}

// updateFlags are shared by update and rollback.
type updateFlags struct {
	reloadSignal, healthHTTP string
	healthTCP                uint16
	healthTimeout            time.Duration
	discardChanges, noHold   bool
	lazy                     bool
	asJSON                   bool
}

func (f *updateFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.reloadSignal, "reload-signal", "", "signal sent to the container's init after the restore so it re-executes its new binary (e.g. HUP)")
	fl.Uint16Var(&f.healthTCP, "health-tcp", 0, "health probe: TCP connect to this port of the container")
	fl.StringVar(&f.healthHTTP, "health-http", "", "health probe: HTTP GET PORT/PATH of the container must answer 2xx/3xx (e.g. 8080/healthz)")
	fl.DurationVar(&f.healthTimeout, "health-timeout", 10*time.Second, "how long the health probe may fail before the update rolls back")
	fl.BoolVar(&f.discardChanges, "discard-changes", false, "start from the pristine image instead of carrying the files the container wrote (memory is kept)")
	fl.BoolVar(&f.noHold, "no-hold", false, "drop client packets during the pause (CRIU's network lock) instead of holding them")
	fl.BoolVar(&f.lazy, "lazy", false, "post-copy: dump without copying memory and restore at once, the processes pull their pages from the frozen originals afterwards, so the pause hardly grows with memory; the originals stay until every page is in (a failure until then resumes them), then the update commits")
	fl.BoolVar(&f.asJSON, "json", false, "print events as JSON lines and the summary as JSON")
}

func (f *updateFlags) options(cmd *cobra.Command, opts *globalOptions, name string, dir string) (update.Options, error) {
	o := update.Options{DiscardChanges: f.discardChanges, NoHold: f.noHold, Lazy: f.lazy, Logger: opts.logger, Failpoint: updateFailpoint()}
	if f.reloadSignal != "" {
		sig := unix.SignalNum("SIG" + strings.TrimPrefix(strings.ToUpper(f.reloadSignal), "SIG"))
		if sig == 0 {
			return o, usageError{fmt.Errorf("--reload-signal %q: not a signal name (e.g. HUP, USR2)", f.reloadSignal)}
		}
		o.ReloadSignal = sig
	}
	if f.healthTCP != 0 && f.healthHTTP != "" {
		return o, usageError{errors.New("--health-tcp and --health-http: choose one")}
	}
	o.Health = update.Health{TCPPort: f.healthTCP, Timeout: f.healthTimeout}
	if f.healthHTTP != "" {
		port, path, err := update.ParseHealthHTTP(f.healthHTTP)
		if err != nil {
			return o, usageError{err}
		}
		o.Health.HTTPPort, o.Health.HTTPPath = port, path
	}
	b, err := criubin.Find(cmd.Context(), opts.criu)
	if err != nil {
		return o, err
	}
	o.CRIU = b
	sinks := []events.Sink{events.FileLog{Path: filepath.Join(dir, eventsFile)}}
	if f.asJSON {
		sinks = append(sinks, events.JSONLines{W: cmd.OutOrStdout()})
	} else {
		sinks = append(sinks, &events.Progress{W: cmd.ErrOrStderr(), Terminal: events.IsTerminal(os.Stderr)})
	}
	o.Events = events.NewRecorder(cmd.Name(), name, sinks...)
	return o, nil
}

// updateFailpoint reads the test-only failure injection for updates from $HOT_FAILPOINT
// ("update-kill:PHASE" or "update-restore").
func updateFailpoint() string {
	v := os.Getenv(failpointEnv)
	switch {
	case strings.HasPrefix(v, "update-kill:"):
		return "kill:" + strings.TrimPrefix(v, "update-kill:")
	case v == "update-restore":
		return "restore"
	}
	return ""
}

func newUpdateCmd(opts *globalOptions) *cobra.Command {
	var f updateFlags
	cmd := &cobra.Command{
		Use:   "update NAME IMAGE",
		Short: "Hot-update a running container to a new image, keeping its memory and TCP connections",
		Long: `update moves a running container to IMAGE without a restart:

  preflight → prepare → freeze → dump → swap → restore → verify → commit (or roll back)

The container's processes are frozen, dumped with CRIU (TCP connections included), and restored
onto a new root: IMAGE's layers topped by the files the container wrote (unless
--discard-changes). Client packets are held during the pause and released after verification,
so clients see a short delay, not an error. Files the processes hold open that IMAGE changes
(their binary, libraries) keep their running content; the new content is put at the path, and
--reload-signal asks an application that re-executes itself to pick it up.

If anything fails after the freeze, the pre-update processes are restored onto the old
generation: the container keeps running as before, and the exit status is non-zero.`,
		Example: `  hot update web app:v2
  hot update web app:v2 --reload-signal HUP --health-http 8080/healthz`,
		Args: exactArgs(2, "a container NAME and an IMAGE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runUpdate(cmd, opts, &f, args[0], func(m *container.Manager, s *cowfs.Store, o update.Options) (*update.Summary, error) {
				return update.Update(cmd.Context(), m, s, args[0], args[1], o)
			})
		},
	}
	f.register(cmd)
	return cmd
}

func newRollbackCmd(opts *globalOptions) *cobra.Command {
	var f updateFlags
	cmd := &cobra.Command{
		Use:   "rollback NAME",
		Short: "Go back to the previous generation's image, keeping memory and TCP connections",
		Long: `rollback is a hot update back to the image of the container's previous generation
(see 'hot history'). What is kept: the processes' memory and their TCP connections (they are
dumped and restored as in an update), the files of the previous generation, and — unless
--discard-changes — the files the container wrote since the update. Processes that re-executed
into the newer binary keep running it until they re-execute again (--reload-signal).`,
		Args: exactArgs(1, "a container NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runUpdate(cmd, opts, &f, args[0], func(m *container.Manager, s *cowfs.Store, o update.Options) (*update.Summary, error) {
				return update.Rollback(cmd.Context(), m, s, args[0], o)
			})
		},
	}
	f.register(cmd)
	return cmd
}

func runUpdate(cmd *cobra.Command, opts *globalOptions, f *updateFlags, name string, do func(*container.Manager, *cowfs.Store, update.Options) (*update.Summary, error)) error {
	m, c, err := opts.lookup(cmd, name)
	if err != nil {
		return err
	}
	store, err := cowfs.Open(opts.root)
	if err != nil {
		return err
	}
	o, err := f.options(cmd, opts, c.Name, c.Dir)
	if err != nil {
		return err
	}
	sum, err := do(m, store, o)
	if sum != nil && sum.Outcome != "" {
		if f.asJSON {
			writeJSON(cmd.OutOrStdout(), sum)
		} else {
			printSummary(cmd.OutOrStdout(), sum)
		}
	}
	return err
}

func printSummary(w io.Writer, s *update.Summary) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "%s\t%s: %s → %s (generation %d → %d)\n", s.Outcome, s.Container, s.FromImage, s.ToImage, s.FromGen, s.ToGen)
	if s.Reason != "" {
		fmt.Fprintf(tw, "reason\t%s\n", s.Reason)
	}
	if s.MemoryInMS > 0 { // post-copy: no memory went through images
		fmt.Fprintf(tw, "freeze window\t%.1f ms (dump without memory %.1f ms, restore %.1f ms)\n", s.FreezeWindowMS, s.DumpMS, s.RestoreMS)
		fmt.Fprintf(tw, "memory\tpulled from the frozen originals, all in %.1f ms after the restore started\n", s.MemoryInMS)
	} else {
		fmt.Fprintf(tw, "freeze window\t%.1f ms (dump %.1f ms, restore %.1f ms, %s written)\n", s.FreezeWindowMS, s.DumpMS, s.RestoreMS, humanBytes(s.DumpBytes))
	}
	fmt.Fprintf(tw, "client pause\t%.1f ms (%s, %d packets held)\n", s.ClientPauseMS, s.Holding, s.HeldPackets)
	fmt.Fprintf(tw, "tcp established\t%d before, %d after\n", s.TCPBefore, s.TCPAfter)
	fmt.Fprintf(tw, "files carried\t%d\n", s.FilesCarried)
	if len(s.Replaced) > 0 {
		fmt.Fprintf(tw, "replaced in place\t%s\n", strings.Join(s.Replaced, ", "))
	}
	for _, p := range s.OldCode {
		fmt.Fprintf(tw, "still on old code\tpid %d (%s): %s\n", p.PID, p.Comm, strings.Join(p.Files, ", "))
	}
	tw.Flush()
}

func humanBytes(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func newHistoryCmd(opts *globalOptions) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "history NAME",
		Short: "List a container's root file system generations (one per update)",
		Args:  exactArgs(1, "a container NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			_, c, err := opts.lookup(cmd, args[0])
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), c.Generations)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "GEN\tIMAGE\tIMAGE ID\tLAYERS\tCURRENT")
			for _, g := range c.Generations {
				cur := ""
				if g.N == c.Current {
					cur = "*"
				}
				id := g.ImageID.Encoded()
				if len(id) > 12 {
					id = id[:12]
				}
				fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\n", g.N, g.Image, id, len(g.LowerDirs), cur)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}

func newEventsCmd(opts *globalOptions) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "events NAME",
		Short: "Show the phase events of a container's updates (and rollbacks)",
		Args:  exactArgs(1, "a container NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			_, c, err := opts.lookup(cmd, args[0])
			if err != nil {
				return err
			}
			evs, err := events.ReadLog(filepath.Join(c.Dir, eventsFile))
			if err != nil {
				return err
			}
			if asJSON {
				for _, e := range evs {
					if err := (events.JSONLines{W: cmd.OutOrStdout()}).Emit(e); err != nil {
						return err
					}
				}
				return nil
			}
			p := &events.Progress{W: cmd.OutOrStdout()}
			for _, e := range evs {
				if e.Status == events.Started && e.Phase == "preflight" {
					fmt.Fprintf(cmd.OutOrStdout(), "%s %s %s\n", e.Time.Local().Format(time.DateTime), e.Op, e.Target)
				}
				p.Emit(e)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON lines")
	return cmd
}

// recoverInterrupted runs before commands that act on containers. It finishes updates that a
// killed hot left behind, and refuses to act on a container (args[0]) that another hot is
// updating right now. It costs one glob when no container has an update journal.
func recoverInterrupted(cmd *cobra.Command, opts *globalOptions, args []string) error {
	journals, _ := filepath.Glob(filepath.Join(opts.root, "containers", "*", update.JournalFile))
	records, _ := filepath.Glob(filepath.Join(opts.root, "containers", "*", checkpoint.RecordFile))
	if len(journals) == 0 && len(records) == 0 {
		return nil
	}
	m, err := opts.manager()
	if err != nil {
		return err
	}
	if len(records) > 0 {
		// A `hot checkpoint` killed after CRIU completed the dump left an "exited" container
		// whose images are complete: record it as checkpointed.
		names, err := checkpoint.Recover(cmd.Context(), m)
		for _, n := range names {
			opts.logger.Warn("recovered an interrupted checkpoint: the dump had completed; 'hot restore' brings it back", "container", n)
		}
		if err != nil {
			return err
		}
	}
	if len(journals) == 0 {
		return nil
	}
	if len(args) > 0 {
		if pending, alive, owner, err := update.Pending(cmd.Context(), m, args[0]); err == nil && pending && alive {
			return fmt.Errorf("container %s: %w: hot (pid %d) is updating it; try again when it is done", args[0], update.ErrBusy, owner)
		}
	}
	store, err := cowfs.Open(opts.root)
	if err != nil {
		return err
	}
	var b criubin.Binary
	if opts.criu != "" {
		if b, err = criubin.Find(cmd.Context(), opts.criu); err != nil {
			return err
		}
	}
	return update.RecoverAll(cmd.Context(), m, store, b, opts.logger)
}

// lastOpText summarizes an operation's events in one line for `hot inspect`.
func lastOpText(evs []events.Event) string {
	if len(evs) == 0 {
		return ""
	}
	first, last := evs[0], evs[len(evs)-1]
	outcome := "interrupted"
	switch {
	case last.Phase == "commit" && last.Status == events.OK:
		outcome = "done"
	case last.Phase == "rollback" && last.Status == events.OK:
		outcome = "rolled back"
	case last.Status == events.Failed:
		outcome = "failed in " + last.Phase + ": " + last.Error
	}
	s := fmt.Sprintf("%s %s at %s", first.Op, outcome, first.Time.Local().Format(time.DateTime))
	for _, e := range evs {
		if e.Phase == "restore" && e.Status == events.OK {
			if w, ok := e.Details["freezeWindowMs"]; ok {
				s += fmt.Sprintf(", freeze window %v ms", w)
			}
		}
	}
	return s + " ('hot events' for details)"
}

// lookup opens the container manager and finds the container ref.
func (o *globalOptions) lookup(cmd *cobra.Command, ref string) (*container.Manager, *container.Container, error) {
	m, err := o.manager()
	if err != nil {
		return nil, nil, err
	}
	c, err := m.Get(cmd.Context(), ref)
	if err != nil {
		return nil, nil, err
	}
	return m, c, nil
}
