package main

import (
	"fmt"
	"os"
	"time"

	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/restore"
	"github.com/spf13/cobra"
)

// failpointEnv selects a test-only failure injection (shared with the runtime's failpoints).
const failpointEnv = "HOT_FAILPOINT"

func checkpointCommands(opts *globalOptions) []*cobra.Command {
	return []*cobra.Command{newCheckpointCmd(opts), newRestoreCmd(opts), newRestoreHelperCmd(opts)}
}

func newCheckpointCmd(opts *globalOptions) *cobra.Command {
	var (
		leaveRunning bool
		imagesDir    string
		asJSON       bool
	)
	cmd := &cobra.Command{
		Use:   "checkpoint NAME",
		Short: "Checkpoint a running container with CRIU (memory, TCP connections, files)",
		Long: `Freeze the container, dump its processes with CRIU (established TCP connections
included, the network namespace kept) and stop them: the container becomes "checkpointed" and
keeps its IP, root file system and cgroup until 'hot restore'. With --leave-running the
container keeps running and the checkpoint is a copy.`,
		Args: exactArgs(1, "a container NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := opts.manager()
			if err != nil {
				return err
			}
			b, err := criubin.Find(cmd.Context(), opts.criu)
			if err != nil {
				return err
			}
			fp := ""
			switch os.Getenv(failpointEnv) {
			case "checkpoint-post-dump":
				fp = checkpoint.FailAfterMemoryDump
			case "checkpoint-kill-criu":
				fp = checkpoint.FailKillCRIU
			}
			res, err := checkpoint.Container(cmd.Context(), m, args[0], checkpoint.ContainerOptions{
				CRIU: b, LeaveRunning: leaveRunning, ImagesDir: imagesDir, Failpoint: fp, Logger: opts.logger,
			})
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), res)
			}
			s := res.Stats
			state := "checkpointed (processes stopped; 'hot restore " + res.Name + "' resumes them)"
			if res.LeaveRunning {
				state = "checkpointed, still running"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s %s\nimages   %s (%s)\ntimes    freeze %s  dump %s (memory write %s)  total %s\nmemory   %d pages written (%s)\n",
				res.Name, state, res.ImagesDir, mib(s.ImagesBytes), ms(s.Freeze), ms(s.Dump), ms(s.MemWrite), ms(s.Total), s.PagesWritten, mib(int64(s.BytesWritten)))
			return nil
		},
	}
	f := cmd.Flags()
	f.BoolVar(&leaveRunning, "leave-running", false, "keep the container running after the dump")
	f.StringVar(&imagesDir, "images-dir", "", "directory for the CRIU images (default: <run-root>/<id>/checkpoint, tmpfs)")
	f.BoolVar(&asJSON, "json", false, "print the result as JSON")
	return cmd
}

func newRestoreCmd(opts *globalOptions) *cobra.Command {
	var (
		lazy   bool
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "restore NAME",
		Short: "Restore a checkpointed container in place (same IP, TCP connections resumed)",
		Long: `Restore a container that 'hot checkpoint' stopped: its monitor runs CRIU, so the
restored processes are the monitor's children again, in the container's network namespace,
root file system and cgroup. With --lazy, memory is copied on demand (userfaultfd) and the
container runs before all of it is in. A running container is refused.`,
		Args: exactArgs(1, "a container NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := opts.manager()
			if err != nil {
				return err
			}
			b, err := criubin.Find(cmd.Context(), opts.criu)
			if err != nil {
				return err
			}
			res, err := restore.Container(cmd.Context(), m, args[0], restore.ContainerOptions{CRIU: b, Lazy: lazy, Logger: opts.logger})
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), res)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s restored: pid %d, running after %s, all memory in after %s (%d pages)\n",
				res.Name, res.PID, ms(res.Running), ms(res.MemoryIn), res.Stats.PagesRestored)
			return nil
		},
	}
	cmd.Flags().BoolVar(&lazy, "lazy", false, "restore memory on demand (CRIU lazy pages through userfaultfd)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	return cmd
}

// newRestoreHelperCmd is the child a container's monitor runs to restore it (see restore.HelperMain).
func newRestoreHelperCmd(_ *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:    restore.HelperCommand,
		Short:  "Restore helper (run by a container's monitor)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return restore.HelperMain(cmd.Context())
		},
	}
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond)) }

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
