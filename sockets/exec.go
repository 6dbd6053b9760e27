package sockets

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// runIn runs name with args inside the network namespace at netnsPath (via nsenter, so the
// tool sees that namespace's netfilter tables) and returns its standard output. stdin may be
// empty. A failure names the command and quotes its standard error.
func runIn(ctx context.Context, netnsPath, stdin, name string, args ...string) (string, error) {
	if netnsPath == "" {
		return "", errors.New("network namespace path is empty: pass a bind-mounted netns file such as /run/netns/NAME")
	}
	full := append([]string{"--net=" + netnsPath, "--", name}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", full...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = strings.TrimSpace(stdout.String())
		}
		return stdout.String(), fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), netnsPath, err, msg)
	}
	return stdout.String(), nil
}

// checkNetns returns a clear error unless path names a network namespace file.
func checkNetns(path string) error {
	if path == "" {
		return errors.New("network namespace path is empty: pass a bind-mounted netns file such as /run/netns/NAME")
	}
	if _, err := os.Stat(path); err != nil {
		return fmt.Errorf("network namespace %s: %w (is the container running and its netns bind-mounted?)", path, err)
	}
	return nil
}

// iptablesTool is one iptables front end: the rule CLI and its save/restore companions.
type iptablesTool struct {
	Cmd, Save, Restore string
	IPv6               bool
}

// Front ends in the order they are tried: iptables (whatever the alternatives system points
// at: the nf_tables backend on Debian 12) first, the explicit legacy binaries second. The
// alternatives system is never changed.
func knownTools() []iptablesTool {
	return []iptablesTool{
		{Cmd: "iptables", Save: "iptables-save", Restore: "iptables-restore"},
		{Cmd: "ip6tables", Save: "ip6tables-save", Restore: "ip6tables-restore", IPv6: true},
		{Cmd: "iptables-legacy", Save: "iptables-legacy-save", Restore: "iptables-legacy-restore"},
		{Cmd: "ip6tables-legacy", Save: "ip6tables-legacy-save", Restore: "ip6tables-legacy-restore", IPv6: true},
	}
}

// allTools returns every iptables front end installed on this host (both backends, both families).
func allTools() []iptablesTool {
	var out []iptablesTool
	for _, t := range knownTools() {
		if _, err := exec.LookPath(t.Cmd); err == nil {
			out = append(out, t)
		}
	}
	return out
}

// hostHasIPv6 reports whether the kernel has IPv6 (then ip6tables rules are needed too).
func hostHasIPv6() bool {
	_, err := os.Stat("/proc/net/if_inet6")
	return err == nil
}

// saveAll returns every table as printed by tool's save command inside the netns.
func saveAll(ctx context.Context, netnsPath string, t iptablesTool) (string, error) {
	return runIn(ctx, netnsPath, "", t.Save)
}

// restoreNoflush feeds a script for one table to tool's restore command (-w --noflush) in the
// netns.
func restoreNoflush(ctx context.Context, netnsPath string, t iptablesTool, table string, lines []string) error {
	if len(lines) == 0 {
		return nil
	}
	script := "*" + table + "\n" + strings.Join(lines, "\n") + "\nCOMMIT\n"
	_, err := runIn(ctx, netnsPath, script, t.Restore, "-w", "--noflush")
	return err
}
