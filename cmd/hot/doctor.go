package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/hotctl/hot/doctor"
	"github.com/spf13/cobra"
)

func newDoctorCmd(opts *globalOptions) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Report what this host supports (CRIU, freezer, overlayfs, namespaces, BPF, livepatch) and why not",
		Long: `doctor tries each capability hot relies on — it freezes a scratch cgroup, mounts a scratch
overlay, creates namespaces, runs 'criu check' — and prints one line per capability:
ok, limited or missing, with the reason and the fix.

Exit status: 0 when 'hot update' can work on this host, 1 when a capability it needs is missing.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			rep := doctor.Run(cmd.Context(), doctor.Options{CRIUPath: opts.criu})
			out := cmd.OutOrStdout()
			if asJSON {
				if err := writeJSON(out, rep); err != nil {
					return err
				}
			} else {
				tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
				for _, r := range rep.Results {
					line := r.Detail
					if r.Fix != "" {
						line += " — fix: " + r.Fix
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\n", r.Status, r.Name, line)
				}
				tw.Flush()
			}
			if !rep.UpdateWorks {
				return exitCodeError{code: exitFailure, err: fmt.Errorf("hot update cannot work on this host: see the missing lines above")}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	return cmd
}
