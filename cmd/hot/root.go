package main

import (
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"
)

// annotateRecover marks commands before which interrupted updates are recovered.
const annotateRecover = "hot.recover-updates"

// globalOptions holds the persistent flags shared by every command.
type globalOptions struct {
	root     string // state root (images, containers)
	runRoot  string // runtime dir (netns handles, sockets, tmpfs checkpoint images)
	criu     string // explicit CRIU binary, overrides discovery
	logLevel string
	logger   *slog.Logger
}

func newRootCmd() *cobra.Command {
	opts := &globalOptions{}
	root := &cobra.Command{
		Use:   "hot",
		Short: "Zero-downtime live operations: hot-update containers, migrate them, patch the kernel",
		Long: `hot updates a running container to a new image without dropping its TCP connections or
its in-memory state, migrates running containers between hosts, and live-patches the running
kernel. Run 'hot doctor' to see what this host supports.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			var level slog.Level
			if err := level.UnmarshalText([]byte(opts.logLevel)); err != nil {
				return usageError{fmt.Errorf("--log-level %q: want debug, info, warn or error", opts.logLevel)}
			}
			opts.logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			if cmd.Annotations[annotateRecover] != "" {
				return recoverInterrupted(cmd, opts, args)
			}
			return nil
		},
	}
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return usageError{fmt.Errorf("%w (see '%s --help')", err, cmd.CommandPath())}
	})
	pf := root.PersistentFlags()
	pf.StringVar(&opts.root, "root", envOr("HOT_ROOT", "/var/lib/hot"), "state directory: images, layers, containers ($HOT_ROOT)")
	pf.StringVar(&opts.runRoot, "run-root", envOr("HOT_RUN_ROOT", "/run/hot"), "runtime directory: netns handles, monitor sockets, checkpoint images on tmpfs ($HOT_RUN_ROOT)")
	pf.StringVar(&opts.criu, "criu", "", "CRIU binary to use (default: $HOT_CRIU, then the private install from 'make deps', then PATH)")
	pf.StringVar(&opts.logLevel, "log-level", "warn", "log verbosity: debug, info, warn, error")

	root.AddCommand(
		newVersionCmd(opts),
		newDoctorCmd(opts),
		newHotfixCmd(opts),
		newLivepatchCmd(opts),
		newManCmd(root),
		newImageCmd(opts),
		newBenchCmd(opts),
	)
	// Commands acting on containers first finish updates a killed hot left behind.
	for _, group := range [][]*cobra.Command{containerCommands(opts), checkpointCommands(opts), updateCommands(opts), migrateCommands(opts)} {
		for _, c := range group {
			if !c.Hidden {
				c.Annotations = map[string]string{annotateRecover: "1"}
			}
			root.AddCommand(c)
		}
	}
	return root
}

func envOr(key, def string) string {
	if v := strings.TrimSpace(os.Getenv(key)); v != "" {
		return v
	}
	return def
}
