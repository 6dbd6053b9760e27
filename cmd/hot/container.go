package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/events"
	"github.com/hotctl/hot/isolation"
	"github.com/hotctl/hot/network"
	"github.com/hotctl/hot/restore"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

func (o *globalOptions) manager() (*container.Manager, error) {
	return container.NewManager(o.root, o.runRoot, o.logger)
}

func containerCommands(opts *globalOptions) []*cobra.Command {
	return []*cobra.Command{
		newRunCmd(opts), newPsCmd(opts), newInspectCmd(opts), newLogsCmd(opts), newExecCmd(opts),
		newStopCmd(opts), newKillCmd(opts), newRmCmd(opts), newPauseCmd(opts), newResumeCmd(opts),
		newMonitorCmd(opts), newInitCmd(opts), newExecHelperCmd(opts),
	}
}

func newRunCmd(opts *globalOptions) *cobra.Command {
	var (
		ro                       container.RunOptions
		detach                   bool
		ip, memory, subnet, user string
		ports                    []string
		entrypoint               string
		entrypointSet, printJSON bool
		pidsLimit                int64
		securityOpts             []string
	)
	cmd := &cobra.Command{
		Use:   "run [flags] IMAGE [CMD...]",
		Short: "Create and start a container from an image",
		Long: `Create a container from IMAGE and start it: an overlay root over the image's layers, new
mount, pid, uts, ipc and network namespaces, a cgroup with the given limits, and a monitor
process that keeps it running after this command exits. CMD replaces the image's Cmd.
Without -d, hot run prints the container's output until it exits and exits with its code.`,
		Args: minArgs(1, "an IMAGE, optionally followed by a command"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ro.Image, ro.Command = args[0], args[1:]
			entrypointSet = cmd.Flags().Changed("entrypoint")
			if entrypointSet {
				ro.Entrypoint = strings.Fields(entrypoint)
				if ro.Entrypoint == nil {
					ro.Entrypoint = []string{}
				}
			}
			if memory != "" {
				n, err := container.ParseSize(memory)
				if err != nil {
					return usageError{fmt.Errorf("--memory: %w", err)}
				}
				ro.Resources.MemoryBytes = n
			}
			if pidsLimit < 0 {
				return usageError{fmt.Errorf("--pids-limit %d: want a positive number of processes", pidsLimit)}
			}
			ro.Resources.PidsMax = pidsLimit
			if ip != "" {
				a, err := netip.ParseAddr(ip)
				if err != nil || !a.Is4() {
					return usageError{fmt.Errorf("--ip %q: want an IPv4 address inside the subnet, such as 10.199.0.20", ip)}
				}
				ro.IP = a
			}
			p, err := netip.ParsePrefix(subnet)
			if err != nil {
				return usageError{fmt.Errorf("--subnet %q: want a CIDR such as %s", subnet, network.DefaultSubnet)}
			}
			ro.Subnet = p.Masked()
			for _, s := range ports {
				pm, err := network.ParsePortMapping(s)
				if err != nil {
					return usageError{fmt.Errorf("-p: %w", err)}
				}
				ro.Ports = append(ro.Ports, pm)
			}
			if user != "" {
				if _, _, err := container.ParseUser(user); err != nil {
					return usageError{fmt.Errorf("--user: %w", err)}
				}
				ro.User = user
			}
			for _, so := range securityOpts {
				if err := ro.Isolation.AddSecurityOpt(so); err != nil {
					return usageError{err}
				}
			}
			if err := ro.Isolation.Validate(); err != nil {
				return usageError{err}
			}
			m, err := opts.manager()
			if err != nil {
				return err
			}
			c, err := m.Run(cmd.Context(), ro)
			if err != nil {
				return err
			}
			if detach {
				if printJSON {
					return writeJSON(cmd.OutOrStdout(), c)
				}
				_, err := fmt.Fprintln(cmd.OutOrStdout(), c.ID)
				return err
			}
			return attach(cmd.Context(), m, c.ID, cmd)
		},
	}
	f := cmd.Flags()
	f.SetInterspersed(false) // flags after IMAGE belong to the container's command
	f.BoolVarP(&detach, "detach", "d", false, "start in the background and print the container id")
	f.BoolVar(&printJSON, "json", false, "with -d: print the container as JSON instead of its id")
	f.StringVar(&ro.Name, "name", "", "container name (default: the first 12 hex digits of its id)")
	f.StringVar(&ro.Hostname, "hostname", "", "host name inside the container (default: short id)")
	f.StringVar(&ip, "ip", "", "IPv4 address on the bridge (default: the next free one)")
	f.StringArrayVarP(&ports, "publish", "p", nil, "publish a container port on the host: HOSTPORT:PORT (repeatable)")
	f.StringVar(&memory, "memory", "", "memory limit, e.g. 512M or 1G")
	f.Int64Var(&pidsLimit, "pids-limit", 0, "maximum number of processes (0: no limit)")
	f.StringArrayVarP(&ro.Env, "env", "e", nil, "set an environment variable K=V (repeatable)")
	f.StringVarP(&ro.Workdir, "workdir", "w", "", "working directory inside the container (default: the image's)")
	f.StringVarP(&user, "user", "u", "", "run as UID[:GID] (default: the image's user)")
	f.StringVar(&entrypoint, "entrypoint", "", "replace the image's entrypoint (space-separated words; \"\" clears it)")
	f.StringVar(&ro.NetworkMode, "network", "bridge", "bridge: attach to the host bridge; none: loopback only")
	f.StringVar(&ro.Bridge, "bridge", envOr("HOT_BRIDGE", network.DefaultBridge), "host bridge to attach to ($HOT_BRIDGE)")
	f.StringVar(&subnet, "subnet", envOr("HOT_SUBNET", network.DefaultSubnet), "subnet of the bridge ($HOT_SUBNET)")
	f.BoolVar(&ro.Isolation.Privileged, "privileged", false, "give the container every capability and turn off seccomp, masked and read-only /proc paths and no_new_privs")
	f.StringArrayVar(&ro.Isolation.CapAdd, "cap-add", nil, "add a capability to the default set, e.g. NET_RAW or CAP_SYS_TIME, or ALL (repeatable)")
	f.StringArrayVar(&ro.Isolation.CapDrop, "cap-drop", nil, "drop a capability from the default set, or ALL (repeatable; --cap-add is applied after it)")
	f.StringArrayVar(&securityOpts, "security-opt", nil, "seccomp=unconfined, seccomp=PROFILE.json (Docker or OCI format), no-new-privileges[=true|false] (repeatable)")
	return cmd
}

// attach streams the container's output until it exits, then exits with its code.
func attach(ctx context.Context, m *container.Manager, id string, cmd *cobra.Command) error {
	done := make(chan error, 1)
	go func() { done <- m.Logs(ctx, id, cmd.OutOrStdout(), true) }()
	c, err := m.Wait(ctx, id)
	if err != nil {
		if ctx.Err() != nil {
			fmt.Fprintf(cmd.ErrOrStderr(), "hot: detached; the container keeps running (stop it with 'hot stop %s')\n", id[:12])
			return nil
		}
		return err
	}
	<-done
	if c.Exit != nil && c.Exit.Code != 0 {
		return exitCodeError{code: c.Exit.Code, err: fmt.Errorf("")}
	}
	return nil
}

func newPsCmd(opts *globalOptions) *cobra.Command {
	var all, asJSON, quiet bool
	cmd := &cobra.Command{
		Use:   "ps",
		Short: "List containers",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := opts.manager()
			if err != nil {
				return err
			}
			cs, err := m.List(cmd.Context(), all)
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), cs)
			}
			if quiet {
				for _, c := range cs {
					fmt.Fprintln(cmd.OutOrStdout(), c.ID)
				}
				return nil
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tIMAGE\tSTATUS\tPID\tIP\tCREATED")
			for _, c := range cs {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", c.ID[:12], c.Name, c.Image, statusText(c),
					pidText(c), ipText(c), c.Created.Local().Format(time.DateTime))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVarP(&all, "all", "a", false, "include exited containers")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print only full ids")
	return cmd
}

func statusText(c *container.Container) string {
	switch {
	case c.Status == container.StatusExited && c.Exit != nil:
		return fmt.Sprintf("exited (%d)", c.Exit.Code)
	case c.Status == container.StatusUnknown:
		return "unknown: " + c.Reason
	}
	return string(c.Status)
}

func pidText(c *container.Container) string {
	if c.Status == container.StatusRunning || c.Status == container.StatusPaused {
		return strconv.Itoa(c.Pid)
	}
	return "-"
}

func ipText(c *container.Container) string {
	if c.Network.IP.IsValid() {
		return c.Network.IP.String()
	}
	return "-"
}

func newInspectCmd(opts *globalOptions) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show a container's details",
		Args:  exactArgs(1, "a container NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := opts.manager()
			if err != nil {
				return err
			}
			c, err := m.Get(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			var sum *isolation.Summary
			var spec specs.Spec
			if b, err := os.ReadFile(c.ConfigPath); err == nil && json.Unmarshal(b, &spec) == nil {
				s := isolation.Summarize(&spec)
				sum = &s
			}
			lastOp, _ := events.ReadLog(filepath.Join(c.Dir, eventsFile))
			lastOp = events.LastRun(lastOp)
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), struct {
					*container.Container
					Isolation *isolation.Summary `json:"isolation,omitempty"`
					LastOp    []events.Event     `json:"lastOperation,omitempty"`
				}{c, sum, lastOp})
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
			row("id", c.ID)
			row("name", c.Name)
			row("image", fmt.Sprintf("%s (%s)", c.Image, c.ImageID))
			row("state", statusText(c))
			row("pid", pidText(c))
			row("monitor pid", strconv.Itoa(c.MonitorPid))
			row("ip", ipText(c))
			for _, p := range c.Network.Ports {
				row("port", fmt.Sprintf("%d -> %d/%s", p.HostPort, p.ContainerPort, p.Proto))
			}
			row("cgroup", c.Cgroup)
			row("rootfs", c.Rootfs)
			row("generation", strconv.Itoa(c.Current))
			if line := lastOpText(lastOp); line != "" {
				row("last operation", line)
			}
			row("created", c.Created.Local().Format(time.RFC3339))
			if !c.Started.IsZero() {
				row("started", c.Started.Local().Format(time.RFC3339))
			}
			if c.Exit != nil {
				row("exit code", strconv.Itoa(c.Exit.Code))
				row("finished", c.Exit.Finished.Local().Format(time.RFC3339))
			}
			row("log", c.LogPath)
			if sum != nil {
				row("capabilities", strings.Join(sum.Capabilities, ","))
				row("isolation", sum.String())
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}

func newLogsCmd(opts *globalOptions) *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs [-f] NAME",
		Short: "Print a container's output (stdout and stderr)",
		Args:  exactArgs(1, "a container NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := opts.manager()
			if err != nil {
				return err
			}
			return m.Logs(cmd.Context(), args[0], cmd.OutOrStdout(), follow)
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output until the container exits")
	return cmd
}

func newExecCmd(opts *globalOptions) *cobra.Command {
	var eo container.ExecOptions
	cmd := &cobra.Command{
		Use:   "exec [flags] NAME CMD...",
		Short: "Run a command inside a running container",
		Long: `Run CMD in the container's namespaces (mount, pid, uts, ipc, net), root and cgroup, with its
environment. hot exec becomes the command (through nsenter from util-linux): stdin, stdout,
stderr and the exit status are the command's.`,
		Args: minArgs(2, "NAME and a command"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if eo.User != "" {
				if _, _, err := container.ParseUser(eo.User); err != nil {
					return usageError{fmt.Errorf("--user: %w", err)}
				}
			}
			m, err := opts.manager()
			if err != nil {
				return err
			}
			eo.Args = args[1:]
			return m.Exec(cmd.Context(), args[0], eo)
		},
	}
	f := cmd.Flags()
	f.SetInterspersed(false)
	f.StringArrayVarP(&eo.Env, "env", "e", nil, "set an environment variable K=V (repeatable)")
	f.StringVarP(&eo.Workdir, "workdir", "w", "", "working directory (default: the container's)")
	f.StringVarP(&eo.User, "user", "u", "", "run as UID[:GID] (default: the container's user)")
	return cmd
}

func newStopCmd(opts *globalOptions) *cobra.Command {
	var secs int
	cmd := &cobra.Command{
		Use:   "stop [-t SECS] NAME...",
		Short: "Stop containers: SIGTERM, then SIGKILL after a timeout",
		Args:  minArgs(1, "one or more container NAMEs"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if secs < 0 {
				return usageError{fmt.Errorf("-t %d: want seconds >= 0", secs)}
			}
			m, err := opts.manager()
			if err != nil {
				return err
			}
			for _, a := range args {
				if _, err := m.Stop(cmd.Context(), a, time.Duration(secs)*time.Second); err != nil {
					return err
				}
			}
			return nil
		},
	}
	cmd.Flags().IntVarP(&secs, "time", "t", 10, "seconds to wait after SIGTERM before SIGKILL")
	return cmd
}

func newKillCmd(opts *globalOptions) *cobra.Command {
	var sig string
	cmd := &cobra.Command{
		Use:   "kill [-s SIGNAL] NAME...",
		Short: "Send a signal to a container's init process",
		Args:  minArgs(1, "one or more container NAMEs"),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := parseSignal(sig)
			if err != nil {
				return usageError{err}
			}
			m, err := opts.manager()
			if err != nil {
				return err
			}
			for _, a := range args {
				if err := m.Signal(cmd.Context(), a, s); err != nil {
					return err
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&sig, "signal", "s", "KILL", "signal name or number, e.g. TERM, HUP, 9")
	return cmd
}

// parseSignal accepts KILL, SIGKILL, kill or 9.
func parseSignal(s string) (unix.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 64 {
			return 0, fmt.Errorf("signal %d: want 1-64", n)
		}
		return unix.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("signal %q: want a name such as TERM, HUP, KILL or a number", s)
}

func newRmCmd(opts *globalOptions) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "rm [-f] NAME...",
		Short: "Remove containers and everything they hold on the host",
		Long: `Remove stopped containers: root file system mount, network namespace, veth, nftables rules,
address lease, cgroup and directories. With -f, running containers are killed first, and the
leftovers of crashed or interrupted commands are cleaned as well.`,
		Args: minArgs(1, "one or more container NAMEs"),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := opts.manager()
			if err != nil {
				return err
			}
			for _, a := range args {
				if err := m.Remove(cmd.Context(), a, force); err != nil {
					return err
				}
			}
			return nil
		},
	}
	cmd.Flags().BoolVarP(&force, "force", "f", false, "kill the container if it runs, and clean up leftovers of crashes")
	return cmd
}

func newPauseCmd(opts *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "pause NAME",
		Short: "Freeze every process of a container (cgroup freezer)",
		Args:  exactArgs(1, "a container NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := opts.manager()
			if err != nil {
				return err
			}
			return m.Pause(cmd.Context(), args[0])
		},
	}
}

func newResumeCmd(opts *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "resume NAME",
		Short: "Thaw a paused container",
		Args:  exactArgs(1, "a container NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := opts.manager()
			if err != nil {
				return err
			}
			return m.Resume(cmd.Context(), args[0])
		},
	}
}

// newMonitorCmd is the per-container monitor that `hot run` starts (see container.RunMonitor).
func newMonitorCmd(opts *globalOptions) *cobra.Command {
	var noStart bool
	cmd := &cobra.Command{
		Use:    "__monitor ID",
		Short:  "Per-container monitor process (started by hot run)",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ready := os.NewFile(3, "ready")
			return container.RunMonitor(context.Background(), container.MonitorOptions{
				Root: opts.root, RunRoot: opts.runRoot, ID: args[0], Logger: opts.logger, Ready: ready,
				NoStart: noStart,
				Ops:     map[string]container.OpFunc{restore.MonitorOp: restore.NewMonitorOp(), restore.GateOp: restore.NewGateOp()},
			})
		},
	}
	cmd.Flags().BoolVar(&noStart, "no-start", false, "start no init: wait for an op (e.g. a restore) to adopt one")
	return cmd
}

// newInitCmd is the container's init before it execs the entrypoint (see container.InitMain).
func newInitCmd(_ *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:    "__init CONFIG",
		Short:  "Container init (started by the monitor)",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return container.InitMain(args[0])
		},
	}
}

func newExecHelperCmd(_ *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:    container.ExecCommand + " SPECFD",
		Short:  "Drop privileges and exec inside a container (run by hot exec through nsenter)",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			fd, err := strconv.Atoi(args[0])
			if err != nil {
				return usageError{fmt.Errorf("%s: want a descriptor number", container.ExecCommand)}
			}
			return container.ExecMain(fd)
		},
	}
}

// minArgs is cobra.MinimumNArgs with a usage error (exit 2) that says what is wanted.
func minArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) < n {
			return usageError{fmt.Errorf("%s: want %s (see '%s --help')", cmd.CommandPath(), what, cmd.CommandPath())}
		}
		return nil
	}
}
