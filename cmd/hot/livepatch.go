package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hotctl/hot/livepatch"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

func newLivepatchCmd(opts *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "livepatch",
		Short: "Load, inspect, disable and unload kernel livepatch modules",
		Long: `livepatch manages kernel livepatches (CONFIG_LIVEPATCH): it checks a module before the kernel
sees it (ELF relocatable, livepatch=Y, vermagic of the running kernel), loads it, follows the
transition in /sys/kernel/livepatch, names the tasks that block a transition, and disables and
unloads patches. On a kernel without module loading or livepatch every subcommand says so.`,
	}
	cmd.AddCommand(newLivepatchLoadCmd(opts), newLivepatchListCmd(opts), newLivepatchStatusCmd(opts),
		newLivepatchEnableCmd(opts), newLivepatchDisableCmd(opts), newLivepatchUnloadCmd(opts))
	return cmd
}

// waitFlags are the flags of every command that can follow a transition.
type waitFlags struct {
	timeout time.Duration
	force   bool
}

func (w *waitFlags) add(cmd *cobra.Command, withForce bool) {
	cmd.Flags().DurationVar(&w.timeout, "timeout", 60*time.Second, "how long to wait for the transition before reporting and signalling the tasks that block it")
	if withForce {
		cmd.Flags().BoolVar(&w.force, "force", false, "if the transition is still stalled after signalling, force it (DANGEROUS: skips the consistency check; a patch forced while being disabled keeps its module loaded for good)")
	}
}

func (w *waitFlags) options(cmd *cobra.Command, opts *globalOptions) livepatch.WaitOptions {
	if w.force {
		fmt.Fprintln(cmd.ErrOrStderr(), "hot: warning: --force: a stalled transition will be forced: the remaining tasks skip the consistency check (old and new code may mix), and a patch forced while being disabled keeps its module loaded for good")
	}
	return livepatch.WaitOptions{Timeout: w.timeout, Force: w.force, Logger: opts.logger, Progress: progressPrinter(cmd.ErrOrStderr())}
}

func newLivepatchLoadCmd(opts *globalOptions) *cobra.Command {
	var (
		wait, replace, asJSON bool
		wf                    waitFlags
	)
	cmd := &cobra.Command{
		Use:   "load FILE.ko",
		Short: "Check a livepatch module, load it and (with --wait) follow its transition",
		Long: `load checks FILE.ko before the kernel sees it (ELF relocatable module for this machine, whole file
present, .modinfo livepatch=Y, vermagic of the running kernel), then loads it with finit_module.
The kernel enables the patch at once and moves tasks over one by one. With --wait, load follows
that transition; when it does not finish within --timeout, the blocking tasks are listed and
signalled through /sys/kernel/livepatch/NAME/signal.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			lo := livepatch.LoadOptions{NoWait: !wait, Replace: replace}
			if wait || replace {
				lo.Wait = wf.options(cmd, opts)
			}
			res, err := livepatch.Host().Load(cmd.Context(), args[0], lo)
			endProgress(cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, res)
			}
			fmt.Fprintf(out, "loaded %s as livepatch %s (finit_module %s)\n", res.Module.Path, res.Module.SysfsName, res.LoadTime.Round(time.Millisecond))
			if t := res.Transition; t != nil {
				fmt.Fprintf(out, "transition to enabled finished in %s%s\n", t.Duration.Round(time.Millisecond), transitionNote(t))
			} else {
				fmt.Fprintf(out, "transition to enabled in progress: see 'hot livepatch status %s'\n", res.Module.SysfsName)
			}
			for _, u := range res.Unloaded {
				fmt.Fprintf(out, "unloaded replaced livepatch %s\n", u)
			}
			for _, w := range res.Warnings {
				fmt.Fprintf(cmd.ErrOrStderr(), "hot: warning: %s\n", w)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the transition to enabled has finished")
	cmd.Flags().BoolVar(&replace, "replace", false, "the module is an atomic-replace patch: after its transition, unload the modules of the patches it replaced (implies --wait)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	wf.add(cmd, true)
	return cmd
}

func newLivepatchListCmd(_ *globalOptions) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the kernel's livepatches: enabled, transition, replace mode, patched functions",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			patches, err := livepatch.Host().List()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				if patches == nil {
					patches = []livepatch.Patch{}
				}
				return writeJSON(out, patches)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tENABLED\tTRANSITION\tREPLACE\tPATCHES")
			for _, p := range patches {
				fmt.Fprintf(tw, "%s\t%v\t%s\t%s\t%s\n", p.Name, p.Enabled, transitionWord(p), optBool(p.Replace), functionsSummary(p))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}

func newLivepatchStatusCmd(_ *globalOptions) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status NAME",
		Short: "Show one livepatch and, during a transition, the tasks it waits for",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := livepatch.Host().Status(args[0])
			if err != nil {
				return err
			}
			name, p := st.Name, st.Patch
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, st)
			}
			if st.Patch == nil {
				fmt.Fprintf(out, "%s: disabled; its module is still loaded: 'hot livepatch unload %s' removes it\n", name, name)
				return nil
			}
			fmt.Fprintf(out, "%s: enabled=%v transition=%s replace=%s\n", name, p.Enabled, transitionWord(*p), optBool(p.Replace))
			for _, o := range p.Objects {
				fmt.Fprintf(out, "  object %s (patched=%s):", o.Name, optBool(o.Patched))
				for _, f := range o.Functions {
					fmt.Fprintf(out, " %s", f.Name)
				}
				fmt.Fprintln(out)
			}
			if len(st.BlockedTasks) > 0 {
				fmt.Fprintf(out, "%d task(s) not yet %s:\n", len(st.BlockedTasks), p.Target())
				printTasks(out, st.BlockedTasks)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}

func newLivepatchEnableCmd(opts *globalOptions) *cobra.Command {
	var (
		wait bool
		wf   waitFlags
	)
	cmd := &cobra.Command{
		Use:   "enable NAME",
		Short: "Reverse a disable that is still in transition",
		Long: `enable turns a patch that is being disabled back on. The kernel cannot enable a patch again once
its disable has finished (its sysfs directory is gone): unload it and load the module again.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var wo *livepatch.WaitOptions
			if wait {
				o := wf.options(cmd, opts)
				wo = &o
			}
			t, err := livepatch.Host().Enable(cmd.Context(), args[0], wo)
			endProgress(cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			return printTransition(cmd.OutOrStdout(), livepatch.SysfsName(args[0]), livepatch.Enabled, t)
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the transition to enabled has finished")
	wf.add(cmd, true)
	return cmd
}

func newLivepatchDisableCmd(opts *globalOptions) *cobra.Command {
	var (
		wait bool
		wf   waitFlags
	)
	cmd := &cobra.Command{
		Use:   "disable NAME",
		Short: "Disable a livepatch (reverses an enable still in transition)",
		Long: `disable starts the transition back to the original code. With --wait it returns once the kernel
has finished and removed the patch from /sys/kernel/livepatch; then 'hot livepatch unload NAME'
removes the module. A disabled patch cannot be enabled again without unloading and loading it.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var wo *livepatch.WaitOptions
			if wait {
				o := wf.options(cmd, opts)
				wo = &o
			}
			t, err := livepatch.Host().Disable(cmd.Context(), args[0], wo)
			endProgress(cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			return printTransition(cmd.OutOrStdout(), livepatch.SysfsName(args[0]), livepatch.Disabled, t)
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the patch is disabled and gone from /sys/kernel/livepatch")
	wf.add(cmd, true)
	return cmd
}

func newLivepatchUnloadCmd(_ *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "unload NAME",
		Short: "Remove the module of a disabled livepatch",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := livepatch.SysfsName(args[0])
			if err := livepatch.Host().Unload(cmd.Context(), name); err != nil {
				return err
			}
			_, err := fmt.Fprintf(cmd.OutOrStdout(), "unloaded %s\n", name)
			return err
		},
	}
}

func printTransition(out io.Writer, name string, target livepatch.State, t *livepatch.Transition) error {
	if t == nil {
		_, err := fmt.Fprintf(out, "%s: transition to %s started: see 'hot livepatch status %s'\n", name, target, name)
		return err
	}
	_, err := fmt.Fprintf(out, "%s: transition to %s finished in %s%s\n", name, target, t.Duration.Round(time.Millisecond), transitionNote(t))
	return err
}

func transitionNote(t *livepatch.Transition) string {
	var notes []string
	if t.Signalled {
		notes = append(notes, "blocking tasks were signalled")
	}
	if t.Forced {
		notes = append(notes, forcedNote(t.Target))
	}
	if len(notes) == 0 {
		return ""
	}
	return " (" + strings.Join(notes, "; ") + ")"
}

// forcedNote says what a forced transition to target leaves behind.
func forcedNote(target livepatch.State) string {
	if target == livepatch.Disabled {
		return "FORCED: the module can never be unloaded"
	}
	return "FORCED: the remaining tasks were switched without the consistency check"
}

func transitionWord(p livepatch.Patch) string {
	if p.Transition {
		return "to-" + p.Target().String()
	}
	return "done"
}

func optBool(b *bool) string {
	if b == nil {
		return "-"
	}
	return fmt.Sprint(*b)
}

func functionsSummary(p livepatch.Patch) string {
	var parts []string
	for _, o := range p.Objects {
		var fns []string
		for _, f := range o.Functions {
			fns = append(fns, f.Name)
		}
		parts = append(parts, o.Name+":"+strings.Join(fns, ","))
	}
	return strings.Join(parts, " ")
}

func printTasks(w io.Writer, tasks []livepatch.Task) {
	for _, t := range tasks {
		fmt.Fprintf(w, "  %s pid %d tid %d patch_state %d\n", t.Comm, t.PID, t.TID, t.PatchState)
		for i, f := range t.Stack {
			if i == 6 {
				fmt.Fprintf(w, "      ...\n")
				break
			}
			fmt.Fprintf(w, "      %s\n", f)
		}
	}
}

// progressPrinter shows a transition's progress: a self-rewriting line on a terminal, and
// the blocked-task report, signal and force notices always.
func progressPrinter(w io.Writer) func(livepatch.Event) {
	tty := isTerminal(w)
	return func(e livepatch.Event) {
		switch e.Kind {
		case livepatch.EventWaiting:
			if tty {
				pending := fmt.Sprintf("%d task(s) not yet switched", e.Pending)
				if e.Pending == 0 {
					pending = "waiting for the kernel's next try" // e.g. idle tasks, which /proc does not show
				}
				fmt.Fprintf(w, "\r\033[K%s → %s: %s, %s", e.Patch, e.Target, e.Elapsed.Round(100*time.Millisecond), pending)
			}
		case livepatch.EventBlocked:
			if tty {
				fmt.Fprint(w, "\r\033[K")
			}
			fmt.Fprintf(w, "hot: %s → %s: not finished after %s; %d task(s) block it:\n", e.Patch, e.Target, e.Elapsed.Round(time.Millisecond), e.Pending)
			printTasks(w, e.Tasks)
		case livepatch.EventSignalled:
			fmt.Fprintf(w, "hot: %s → %s: %s\n", e.Patch, e.Target, e.Detail)
		case livepatch.EventForced:
			fmt.Fprintf(w, "hot: WARNING: forced the transition of %s to %s: %s\n", e.Patch, e.Target, forcedNote(e.Target))
		}
	}
}

// endProgress clears a progress line left on a terminal.
func endProgress(w io.Writer) {
	if isTerminal(w) {
		fmt.Fprint(w, "\r\033[K")
	}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
