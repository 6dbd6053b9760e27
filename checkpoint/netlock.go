package checkpoint

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
)

// NetworkLocks lists the network-lock objects CRIU left in the network namespace bound at
// netnsPath: nftables tables named CRIU* ("inet CRIU-1234") and an iptables "CRIU" chain.
func NetworkLocks(ctx context.Context, netnsPath string) ([]string, error) {
	var locks []string
	if _, err := exec.LookPath("nft"); err == nil {
		out, err := inNetns(ctx, netnsPath, "nft", "list", "tables")
		if err != nil {
			return nil, err
		}
		for _, line := range strings.Split(out, "\n") {
			f := strings.Fields(line) // "table inet CRIU-1234"
			if len(f) == 3 && f[0] == "table" && strings.HasPrefix(f[2], "CRIU") {
				locks = append(locks, "nft:"+f[1]+" "+f[2])
			}
		}
	}
	for _, ipt := range []string{"iptables", "ip6tables"} {
		if _, err := exec.LookPath(ipt); err != nil {
			continue
		}
		if _, err := inNetns(ctx, netnsPath, ipt, "-w", "-t", "filter", "-n", "-L", "CRIU"); err == nil {
			locks = append(locks, ipt+":CRIU")
		}
	}
	return locks, nil
}

// RemoveNetworkLock deletes what NetworkLocks finds and returns what it removed. A dump that
// failed or was killed can leave the lock behind; until it is gone the namespace drops all
// traffic of the locked connections.
func RemoveNetworkLock(ctx context.Context, netnsPath string) ([]string, error) {
	locks, err := NetworkLocks(ctx, netnsPath)
	if err != nil {
		return nil, err
	}
	for _, l := range locks {
		kind, obj, _ := strings.Cut(l, ":")
		switch kind {
		case "nft":
			if _, err := inNetns(ctx, netnsPath, "nft", "delete", "table", obj); err != nil {
				return nil, fmt.Errorf("remove network lock %s: %w", l, err)
			}
		default: // iptables / ip6tables chain: unhook from INPUT/OUTPUT, flush, delete
			for _, hook := range []string{"INPUT", "OUTPUT"} {
				for {
					if _, err := inNetns(ctx, netnsPath, kind, "-w", "-t", "filter", "-D", hook, "-j", "CRIU"); err != nil {
						break
					}
				}
			}
			if _, err := inNetns(ctx, netnsPath, kind, "-w", "-t", "filter", "-F", "CRIU"); err != nil {
				return nil, fmt.Errorf("remove network lock %s: %w", l, err)
			}
			if _, err := inNetns(ctx, netnsPath, kind, "-w", "-t", "filter", "-X", "CRIU"); err != nil {
				return nil, fmt.Errorf("remove network lock %s: %w", l, err)
			}
		}
	}
	return locks, nil
}

// inNetns runs a tool inside the network namespace bound at netnsPath.
func inNetns(ctx context.Context, netnsPath string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + netnsPath, "--", name}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s in netns %s: %w: %s", name, strings.Join(args, " "), netnsPath, err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}
