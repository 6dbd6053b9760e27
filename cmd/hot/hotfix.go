package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/hotctl/hot/ftrace"
	"github.com/spf13/cobra"
)

// hotfixOptions are the flags shared by the hotfix subcommands.
type hotfixOptions struct {
	bpffs string
}

func newHotfixCmd(opts *globalOptions) *cobra.Command {
	ho := &hotfixOptions{}
	cmd := &cobra.Command{
		Use:   "hotfix",
		Short: "Apply, list and remove BPF-based host fixes (cgroup-BPF, fmod_ret, LSM, fentry)",
		Long: `hotfix applies small, targeted fixes to the running kernel's behaviour without loading
modules: BPF trampoline programs (fmod_ret on security_* functions, BPF LSM hooks, fentry/fexit
counters) where the kernel allows them, and cgroup-BPF hooks (sock_create, connect, bind,
sysctl, device) everywhere else. Fixes are pinned in bpffs and outlive hot.

Run 'hot hotfix probe' to see which mechanisms this kernel allows. See docs/hotfix.md.`,
		Args: cobra.NoArgs,
	}
	cmd.PersistentFlags().StringVar(&ho.bpffs, "bpffs", envOr("HOT_BPFFS", ftrace.DefaultRoot),
		"bpffs directory holding one directory of pins per fix; bpffs is mounted on /sys/fs/bpf if needed ($HOT_BPFFS)")
	cmd.AddCommand(
		newHotfixApplyCmd(opts, ho),
		newHotfixListCmd(opts, ho),
		newHotfixRemoveCmd(opts, ho),
		newHotfixProbeCmd(opts),
	)
	return cmd
}

func (ho *hotfixOptions) manager(opts *globalOptions) *ftrace.Manager {
	return &ftrace.Manager{Root: ho.bpffs, Logger: opts.logger}
}

// kindsHelp renders the built-in fix kinds for --help.
func kindsHelp() string {
	var b strings.Builder
	for _, k := range ftrace.Kinds() {
		mechs := make([]string, len(k.Mechanisms))
		for i, m := range k.Mechanisms {
			mechs[i] = string(m)
		}
		fmt.Fprintf(&b, "  %s  [%s]\n      %s\n", k.Name, strings.Join(mechs, ", "), k.Summary)
		for _, p := range k.Params {
			req := ""
			switch {
			case p.Required:
				req = " (required)"
			case p.Default != "":
				req = " (default " + p.Default + ")"
			}
			fmt.Fprintf(&b, "      %-9s %s%s\n", p.Name, p.Help, req)
		}
		fmt.Fprintf(&b, "      e.g. %s\n", k.Example)
	}
	return b.String()
}

func newHotfixApplyCmd(opts *globalOptions, ho *hotfixOptions) *cobra.Command {
	var name string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "apply SPEC",
		Short: "Apply a built-in fix (idempotent; replaces a fix of the same name)",
		Long: `Apply a fix. SPEC is KIND:key=value,key=value (values cannot contain commas).
The spec is checked before anything is loaded: unknown kinds or parameters, a cgroup that is
not a cgroup2 directory, a kernel function missing from the kernel BTF or with another
signature are refused. The fix is pinned under --bpffs/NAME and stays active after hot exits.
Applying the same spec again changes nothing; a different spec under an existing name attaches
the new programs before the old ones are detached.

Fix kinds:
` + kindsHelp(),
		Example: `  hot hotfix apply sock-create-deny:family=inet6,cgroup=/sys/fs/cgroup/unified/web --name no-v6
  hot hotfix apply connect-deny:addr=10.0.0.5,port=6379,cgroup=/sys/fs/cgroup/unified/web
  hot hotfix apply open-deny:path=/etc/shadow,comm=cat,mech=lsm`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usageError{fmt.Errorf("hotfix apply takes exactly one SPEC, got %d (see 'hot hotfix apply --help')", len(args))}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			spec, err := ftrace.ParseSpec(args[0])
			if err != nil {
				return usageError{err}
			}
			if name != "" {
				if err := ftrace.ValidName(name); err != nil {
					return usageError{err}
				}
			}
			res, err := ho.manager(opts).Apply(cmd.Context(), spec, name)
			if errors.Is(err, ftrace.ErrBadSpec) {
				return usageError{err}
			}
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), res)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s %s: %s\n", res.Fix.Name, res.Action, res.Fix.Summary)
			return err
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "name of the fix (default: KIND-HASH of the canonical spec)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	return cmd
}

func newHotfixListCmd(opts *globalOptions, ho *hotfixOptions) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List applied fixes with their links, program ids, targets and hit counters",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			fixes, err := ho.manager(opts).List(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				if fixes == nil {
					fixes = []ftrace.Fix{}
				}
				return writeJSON(cmd.OutOrStdout(), fixes)
			}
			return printFixes(cmd.OutOrStdout(), fixes)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}

func printFixes(w io.Writer, fixes []ftrace.Fix) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tHITS\tMECHANISM\tTARGET\tLINK\tPROG\tSPEC")
	for _, f := range fixes {
		state := "active"
		if !f.Healthy {
			state = "broken"
		}
		for i, l := range f.Links {
			name, st, hits, spec := f.Name, state, fmt.Sprint(f.Hits), f.Spec
			if i > 0 {
				name, st, hits, spec = "", "", "", ""
			}
			linkCol := fmt.Sprint(l.LinkID)
			if l.Error != "" {
				linkCol = "error: " + l.Error
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", name, st, hits, l.Mechanism, l.Target, linkCol, l.ProgramID, spec)
		}
	}
	return tw.Flush()
}

func newHotfixRemoveCmd(opts *globalOptions, ho *hotfixOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "remove NAME",
		Short: "Detach and unpin a fix",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usageError{fmt.Errorf("hotfix remove takes exactly one NAME, got %d (see 'hot hotfix list')", len(args))}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := ho.manager(opts).Remove(cmd.Context(), args[0]); err != nil {
				return err
			}
			_, err := fmt.Fprintf(cmd.OutOrStdout(), "%s removed\n", args[0])
			return err
		},
	}
}

func newHotfixProbeCmd(_ *globalOptions) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "probe",
		Short: "Show which BPF fix mechanisms this kernel allows (loads a trivial program of each kind)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			res := ftrace.Probe(cmd.Context())
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), res)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "MECHANISM\tSUPPORTED\tWHY NOT")
			for _, r := range res {
				yes, why := "yes", ""
				if r.Err != nil {
					yes, why = "no", r.Err.Error()
					if !errors.Is(r.Err, ftrace.ErrNotSupported) {
						yes = "unknown"
					}
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\n", r.Mechanism, yes, why)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}
