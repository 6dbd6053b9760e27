package main

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
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
		export       string
		zstd         bool
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
			case "checkpoint-kill-self":
				fp = checkpoint.FailKillSelf
			case "checkpoint-kill-self-after-dump":
				fp = checkpoint.FailKillSelfAfterDump
			}
			res, err := checkpoint.Container(cmd.Context(), m, args[0], checkpoint.ContainerOptions{
				CRIU: b, LeaveRunning: leaveRunning, ImagesDir: imagesDir, Failpoint: fp, Logger: opts.logger,
				Export: export, Zstd: zstd,
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
			if res.Export != "" {
				fmt.Fprintf(cmd.OutOrStdout(), "archive  %s (%s, written in %s)\n", res.Export, mib(res.ExportBytes), ms(res.ExportTime))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.BoolVar(&leaveRunning, "leave-running", false, "keep the container running after the dump")
	f.StringVar(&imagesDir, "images-dir", "", "directory for the CRIU images (default: <run-root>/<id>/checkpoint, tmpfs)")
	f.StringVar(&export, "export", "", "also write a checkpoint archive to FILE (images, config.json, upper layer, manifest with checksums)")
	f.BoolVar(&zstd, "zstd", false, "with --export: compress the archive with zstd")
	f.BoolVar(&asJSON, "json", false, "print the result as JSON")
	cmd.AddCommand(newCheckpointInspectCmd(opts))
	return cmd
}

func newCheckpointInspectCmd(opts *globalOptions) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "inspect FILE|NAME",
		Short: "Show what a checkpoint holds: processes, memory, TCP connections, open files, mounts",
		Long: `Decode the CRIU images of a checkpoint archive (FILE, verified first) or of a container's
latest checkpoint (NAME, while its images exist: checkpointed, or after --leave-running).`,
		Args: exactArgs(1, "a checkpoint archive FILE or a container NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var sum *checkpoint.Summary
			if fi, err := os.Stat(args[0]); err == nil && fi.Mode().IsRegular() {
				tmp, err := os.MkdirTemp("", "hot-inspect-")
				if err != nil {
					return err
				}
				defer os.RemoveAll(tmp)
				m, err := checkpoint.ReadArchive(cmd.Context(), args[0], tmp)
				if err != nil {
					return err
				}
				if sum, err = checkpoint.Inspect(filepath.Join(tmp, "images")); err != nil {
					return err
				}
				sum.Manifest, sum.ImagesDir = m, args[0]
			} else {
				m, err := opts.manager()
				if err != nil {
					return err
				}
				c, err := m.Get(cmd.Context(), args[0])
				if err != nil {
					return fmt.Errorf("%s is neither a checkpoint archive nor a container: %w", args[0], err)
				}
				rec, err := checkpoint.LoadRecord(m.Dir(c.ID))
				if err != nil {
					return fmt.Errorf("container %s has no checkpoint ('hot checkpoint %s' makes one): %w", c.Name, c.Name, err)
				}
				if sum, err = checkpoint.Inspect(rec.ImagesDir); err != nil {
					return fmt.Errorf("%w (the images of a restored container are removed; checkpoint it again)", err)
				}
				sum.Record = rec
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), sum)
			}
			printCheckpointSummary(cmd.OutOrStdout(), sum)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}

func printCheckpointSummary(w io.Writer, s *checkpoint.Summary) {
	fmt.Fprintf(w, "checkpoint  %s\n", s.ImagesDir)
	if m := s.Manifest; m != nil {
		fmt.Fprintf(w, "container   %s  image %s (%s)  ip %s\ncreated     %s by hot %s, CRIU %s, kernel %s; %d members verified\n",
			m.Container.Name, m.Container.Image, m.Container.ImageID, m.Container.IP, m.Created.Format(time.RFC3339), m.HotVersion, m.CRIUVersion, m.Kernel, len(m.Members))
	}
	fmt.Fprintf(w, "memory      %s resident\nprocesses\n", mib(s.MemoryBytes))
	for _, p := range s.Processes {
		fmt.Fprintf(w, "  %s%d %s\n", strings.Repeat("  ", p.Depth), p.PID, p.Comm)
	}
	fmt.Fprintf(w, "tcp (%d)\n", len(s.TCP))
	for _, c := range s.TCP {
		fmt.Fprintf(w, "  pid %d fd %d  %-11s %s -> %s\n", c.PID, c.FD, c.State, c.Local, c.Peer)
	}
	fmt.Fprintf(w, "files (%d)\n", len(s.Files))
	for _, f := range s.Files {
		fmt.Fprintf(w, "  pid %d %-5s %-8s %s\n", f.PID, f.FD, f.Type, f.Path)
	}
	fmt.Fprintf(w, "mounts (%d)\n", len(s.Mounts))
	for _, m := range s.Mounts {
		fmt.Fprintf(w, "  %-20s %-10s %s\n", m.Mountpoint, m.FSType, m.Source)
	}
}

func newRestoreCmd(opts *globalOptions) *cobra.Command {
	var (
		lazy      bool
		asJSON    bool
		importing string
		name      string
		bridge    string
		subnet    string
	)
	cmd := &cobra.Command{
		Use:   "restore NAME | restore --import FILE [--name NEW]",
		Short: "Restore a checkpointed container in place (same IP, TCP connections resumed)",
		Long: `Restore a container that 'hot checkpoint' stopped: its monitor runs CRIU, so the
restored processes are the monitor's children again, in the container's network namespace,
root file system and cgroup. With --lazy, memory is copied on demand (userfaultfd) and the
container runs before all of it is in. A running container is refused.

With --import, the archive written by 'hot checkpoint --export' is verified first (every
member's sha256; nothing is created if one fails), its image must be in the store (by digest),
and a new container is created from it (same IP) and restored.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if importing != "" {
				if len(args) != 0 {
					return usageError{fmt.Errorf("%s --import takes no NAME: use --name for the new container", cmd.CommandPath())}
				}
				return nil
			}
			if name != "" {
				return usageError{fmt.Errorf("%s: --name only applies with --import", cmd.CommandPath())}
			}
			return exactArgs(1, "a container NAME (or --import FILE)")(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := opts.manager()
			if err != nil {
				return err
			}
			b, err := criubin.Find(cmd.Context(), opts.criu)
			if err != nil {
				return err
			}
			var res *restore.ContainerResult
			if importing != "" {
				io := restore.ImportOptions{CRIU: b, Root: opts.root, RunRoot: opts.runRoot, Name: name, Lazy: lazy, Bridge: bridge, Logger: opts.logger}
				if subnet != "" {
					if io.Subnet, err = netip.ParsePrefix(subnet); err != nil {
						return usageError{fmt.Errorf("--subnet %q: want a CIDR such as 10.88.0.0/16", subnet)}
					}
				}
				res, err = restore.Import(cmd.Context(), m, importing, io)
			} else {
				ro := restore.ContainerOptions{CRIU: b, Lazy: lazy, Logger: opts.logger}
				if os.Getenv(failpointEnv) == "restore-post-restore" {
					ro.Failpoint = restore.FailAfterRestore
				}
				res, err = restore.Container(cmd.Context(), m, args[0], ro)
			}
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
	cmd.Flags().StringVar(&importing, "import", "", "create and restore a container from a checkpoint archive FILE")
	cmd.Flags().StringVar(&name, "name", "", "with --import: name of the new container (default: the archived name)")
	cmd.Flags().StringVar(&bridge, "bridge", "", "with --import: bridge to attach to (default: the archived one)")
	cmd.Flags().StringVar(&subnet, "subnet", "", "with --import: subnet of that bridge (default: the archived one)")
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
