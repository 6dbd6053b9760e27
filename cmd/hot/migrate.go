package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hotctl/hot/cowfs"
	"github.com/hotctl/hot/criubin"
	"github.com/hotctl/hot/events"
	"github.com/hotctl/hot/migrate"
	"github.com/spf13/cobra"
)

func migrateCommands(opts *globalOptions) []*cobra.Command {
	return []*cobra.Command{newAgentCmd(opts), newMigrateCmd(opts)}
}

func registerTLSFlags(cmd *cobra.Command, t *migrate.TLSFiles) {
	fl := cmd.Flags()
	fl.StringVar(&t.Cert, "tls-cert", "", "mutual TLS: this side's certificate (PEM)")
	fl.StringVar(&t.Key, "tls-key", "", "mutual TLS: this side's private key (PEM)")
	fl.StringVar(&t.CA, "tls-ca", "", "mutual TLS: CA certificate (PEM) the other side's certificate must be signed by")
}

func newAgentCmd(opts *globalOptions) *cobra.Command {
	var (
		listen, tokenFile string
		tlsFiles          migrate.TLSFiles
	)
	cmd := &cobra.Command{
		Use:   "agent --listen ADDR:PORT --token-file FILE",
		Short: "Receive containers migrated from other hosts ('hot migrate')",
		Long: `agent serves hot's migration API on ADDR:PORT. Every request must carry the token from
--token-file (compared in constant time; refused requests are logged); with --tls-cert,
--tls-key and --tls-ca the connection is mutual TLS as well.

It receives what it lacks of a container's image (verified blob by blob), then the migration
stream (CRIU images, the container's files, its configuration; every member checked against
a manifest authenticated with the token), and only then creates the container under this
host's --root with the same name and IP address and restores its processes. It writes nothing
outside --root and --run-root. Stop it with SIGINT or SIGTERM.`,
		Example: `  openssl rand -hex 32 > /etc/hot/token
  hot agent --listen 10.0.0.2:7777 --token-file /etc/hot/token`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if listen == "" {
				return usageError{errors.New("--listen ADDR:PORT is required")}
			}
			if _, _, err := net.SplitHostPort(listen); err != nil {
				return usageError{fmt.Errorf("--listen %q: want ADDR:PORT", listen)}
			}
			if tokenFile == "" {
				return usageError{errors.New("--token-file is required: every request is authenticated")}
			}
			token, err := migrate.LoadToken(tokenFile)
			if err != nil {
				return usageError{err}
			}
			m, err := opts.manager()
			if err != nil {
				return err
			}
			store, err := cowfs.Open(opts.root)
			if err != nil {
				return err
			}
			b, err := criubin.Find(cmd.Context(), opts.criu)
			if err != nil {
				return err
			}
			a := &migrate.Agent{Manager: m, Store: store, CRIU: b, Token: token, Root: opts.root, RunRoot: opts.runRoot,
				Logger: opts.logger, Failpoint: agentFailpoint()}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return a.Serve(ctx, listen, tlsFiles, func(addr net.Addr) {
				fmt.Fprintf(cmd.OutOrStdout(), "hot agent listening on %s\n", addr)
			})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&listen, "listen", "", "address and port to serve on (ADDR:PORT)")
	fl.StringVar(&tokenFile, "token-file", "", "file holding the shared token (at least 16 characters) every request must carry")
	registerTLSFlags(cmd, &tlsFiles)
	return cmd
}

// agentFailpoint reads the test-only failure injection for the agent from $HOT_FAILPOINT
// ("agent-exit-after-bytes:N").
func agentFailpoint() string {
	if v, ok := strings.CutPrefix(os.Getenv(failpointEnv), "agent-"); ok {
		return v
	}
	return ""
}

func newMigrateCmd(opts *globalOptions) *cobra.Command {
	var (
		to, tokenFile string
		lazy, asJSON  bool
		tlsFiles      migrate.TLSFiles
	)
	cmd := &cobra.Command{
		Use:   "migrate NAME --to ADDR:PORT",
		Short: "Move a running container to another host, keeping its memory, TCP connections and IP",
		Long: `migrate moves a running container to the 'hot agent' at --to:

  preflight → push image (if missing) → freeze+dump → transfer → restore there → clean up here

Preflight compares CRIU versions, kernels and CPU flags (a flag the target lacks is named and
refused) and finds out whether the target has the image; a missing image is pushed before the
container is frozen. The container's IP moves with it: it leaves this host's bridge and the
target claims it and announces it with gratuitous ARP, so clients keep their connections.
The local copy is removed only after the target confirms that the processes run there; any
failure before that restores the container here, with its connections.

--lazy (post-copy) restores on the target first and lets it pull memory pages from a CRIU page
server on this host while the processes already run.`,
		Example: `  hot migrate web --to 10.0.0.2:7777 --token-file /etc/hot/token`,
		Args:    exactArgs(1, "a container NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return usageError{errors.New("--to ADDR:PORT is required")}
			}
			if _, _, err := net.SplitHostPort(to); err != nil {
				return usageError{fmt.Errorf("--to %q: want ADDR:PORT of a 'hot agent'", to)}
			}
			if tokenFile == "" {
				return usageError{errors.New("--token-file is required: the agent refuses requests without its token")}
			}
			token, err := migrate.LoadToken(tokenFile)
			if err != nil {
				return usageError{err}
			}
			m, err := opts.manager()
			if err != nil {
				return err
			}
			c, err := m.Get(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			store, err := cowfs.Open(opts.root)
			if err != nil {
				return err
			}
			b, err := criubin.Find(cmd.Context(), opts.criu)
			if err != nil {
				return err
			}
			o := migrate.Options{To: to, Token: token, TLS: tlsFiles, CRIU: b, Lazy: lazy, Logger: opts.logger,
				Failpoint: migrateFailpoint()}
			sinks := []events.Sink{events.FileLog{Path: filepath.Join(c.Dir, eventsFile)}}
			if asJSON {
				sinks = append(sinks, events.JSONLines{W: cmd.OutOrStdout()})
			} else {
				term := events.IsTerminal(os.Stderr)
				sinks = append(sinks, &events.Progress{W: cmd.ErrOrStderr(), Terminal: term})
				o.Progress = transferPrinter(cmd.ErrOrStderr(), term)
			}
			o.Events = events.NewRecorder("migrate", c.Name, sinks...)
			sum, err := migrate.Migrate(cmd.Context(), m, store, args[0], o)
			if sum != nil && sum.Outcome != "" {
				if asJSON {
					writeJSON(cmd.OutOrStdout(), sum)
				} else {
					printMigrateSummary(cmd.OutOrStdout(), sum)
				}
			}
			return err
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&to, "to", "", "the target's 'hot agent' (ADDR:PORT)")
	fl.StringVar(&tokenFile, "token-file", "", "file holding the agent's token")
	fl.BoolVar(&lazy, "lazy", false, "post-copy: restore on the target first, pull memory pages from this host afterwards")
	fl.BoolVar(&asJSON, "json", false, "print events as JSON lines and the summary as JSON")
	registerTLSFlags(cmd, &tlsFiles)
	return cmd
}

// migrateFailpoint reads the test-only failure injection for migrations ("migrate-tamper").
func migrateFailpoint() string {
	if v, ok := strings.CutPrefix(os.Getenv(failpointEnv), "migrate-"); ok {
		return v
	}
	return ""
}

// transferPrinter shows the transfer: one line rewritten in place on a terminal, a line per
// finished transfer otherwise.
func transferPrinter(w io.Writer, term bool) func(string, int64, int64, time.Duration) {
	return func(what string, sent, total int64, el time.Duration) {
		rate := 0.0
		if el > 0 {
			rate = float64(sent) / 1e6 / el.Seconds()
		}
		of := ""
		if total > 0 {
			of = fmt.Sprintf(" of %s (%.0f%%)", humanBytes(uint64(total)), 100*float64(sent)/float64(total))
		}
		if term {
			fmt.Fprintf(w, "\r%-8s %s%s  %.1f MB/s   ", what, humanBytes(uint64(sent)), of, rate)
			if total > 0 && sent >= total {
				fmt.Fprintln(w)
			}
		}
	}
}

func printMigrateSummary(w io.Writer, s *migrate.Summary) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "%s\t%s → %s (%s)\n", s.Outcome, s.Container, s.To, s.Mode)
	if s.Reason != "" {
		fmt.Fprintf(tw, "reason\t%s\n", s.Reason)
	}
	if s.ImagePush > 0 {
		fmt.Fprintf(tw, "image pushed\t%s\n", humanBytes(uint64(s.ImagePush)))
	}
	fmt.Fprintf(tw, "stream\t%s at %.1f MB/s\n", humanBytes(uint64(s.StreamBytes)), s.StreamMBps)
	if t := s.Target; t != nil {
		fmt.Fprintf(tw, "downtime\t%.1f ms (dump %.1f ms, target: verify %.1f ms, setup %.1f ms, restore %.1f ms)\n", s.DowntimeMS, s.DumpMS, t.VerifyMS, t.SetupMS, t.RestoreMS)
		fmt.Fprintf(tw, "on target\tid %s, pid %d, ip %s (%s, %d packets held)\n", shortHex(t.ID), t.PID, t.IP, t.Holding, t.Held)
		if s.Mode == "lazy" {
			fmt.Fprintf(tw, "memory in\t%.1f ms after the restore started (pulled from this host's page server)\n", t.MemoryMS)
		}
	}
	for _, n := range s.Notes {
		fmt.Fprintf(tw, "note\t%s\n", n)
	}
	fmt.Fprintf(tw, "total\t%.1f ms\n", s.TotalMS)
	tw.Flush()
}

func shortHex(s string) string {
	if len(s) > 12 {
		return s[:12]
	}
	return s
}
