package network

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
)

// tableName is the nftables table (family ip) holding one bridge's rules.
func tableName(bridge string) string { return "hot-" + bridge }

// tableScript creates the bridge's table in one atomic transaction:
//   - map "ports": protocol . host port -> container address . container port, one element per
//     published port, commented with the container id;
//   - DNAT through that map for packets to any local address, in prerouting (from outside and
//     from containers) and in output (from the host itself, including 127.0.0.1);
//   - masquerade: 127.0.0.1 sources going to the bridge (needs route_localnet on the bridge),
//     hairpin connections (a container reaching a published port of the same bridge) and
//     container traffic leaving through another interface.
//   - input: route_localnet on the bridge would let a container send new connections to the
//     host's 127.0.0.1 services (CVE-2020-8558 in kube-proxy); only replies may come in.
func tableScript(bridge string, subnet netip.Prefix) string {
	return fmt.Sprintf(`table ip %[1]s {
	comment "hot: bridge %[2]s, subnet %[3]s"
	map ports {
		type inet_proto . inet_service : ipv4_addr . inet_service
		comment "published ports: proto . host port : container address . port"
	}
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local dnat ip to meta l4proto . th dport map @ports
	}
	chain output {
		type nat hook output priority -100; policy accept;
		fib daddr type local dnat ip to meta l4proto . th dport map @ports
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 127.0.0.0/8 oifname %[2]q masquerade
		ip saddr %[3]s oifname %[2]q ct status dnat masquerade
		ip saddr %[3]s oifname != %[2]q masquerade
	}
	chain input {
		type filter hook input priority filter; policy accept;
		iifname %[2]q ip daddr 127.0.0.0/8 ct state { new, invalid, untracked } drop comment "route_localnet must not open the host's 127.0.0.1 services to containers"
	}
}
`, tableName(bridge), bridge, subnet.Masked())
}

// nft runs the nft CLI with script on stdin (if any) and returns its error with nft's
// message.
func nft(ctx context.Context, script string, args ...string) error {
	cmd := exec.CommandContext(ctx, "nft", args...)
	if script != "" {
		cmd.Stdin = strings.NewReader(script)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			msg := strings.TrimSpace(stderr.String())
			if i := strings.IndexByte(msg, '\n'); i >= 0 {
				msg = msg[:i]
			}
			return &nftError{args: strings.Join(args, " "), msg: msg}
		}
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("nft not found: install nftables (make deps): %w", err)
		}
		return fmt.Errorf("nft %s: %w", strings.Join(args, " "), err)
	}
	return nil
}

type nftError struct{ args, msg string }

func (e *nftError) Error() string { return fmt.Sprintf("nft %s: %s", e.args, e.msg) }

func isNftNotFound(err error) bool {
	var ne *nftError
	return errors.As(err, &ne) && strings.Contains(ne.msg, "No such file or directory")
}

// ensureTable creates the bridge's table unless it exists. With rebuild (no container is on
// the bridge, so no published port can be lost) it replaces an existing table in the same
// transaction, which repairs a table edited by hand or made by an older hot.
func ensureTable(ctx context.Context, bridge string, subnet netip.Prefix, rebuild bool) error {
	if rebuild {
		script := fmt.Sprintf("add table ip %[1]s\ndelete table ip %[1]s\n", tableName(bridge)) + tableScript(bridge, subnet)
		if err := nft(ctx, script, "-f", "-"); err != nil {
			return fmt.Errorf("create nftables table %s: %w", tableName(bridge), err)
		}
		return nil
	}
	err := nft(ctx, "", "list", "table", "ip", tableName(bridge))
	if err == nil {
		return nil
	}
	if !isNftNotFound(err) {
		return fmt.Errorf("check nftables table %s: %w", tableName(bridge), err)
	}
	if err := nft(ctx, tableScript(bridge, subnet), "-f", "-"); err != nil {
		return fmt.Errorf("create nftables table %s: %w", tableName(bridge), err)
	}
	return nil
}

// deleteTable removes the bridge's table; a missing table is fine.
func deleteTable(ctx context.Context, bridge string) error {
	if err := nft(ctx, "", "delete", "table", "ip", tableName(bridge)); err != nil && !isNftNotFound(err) {
		return fmt.Errorf("delete nftables table %s: %w", tableName(bridge), err)
	}
	return nil
}

func portKey(p PortMapping) string { return fmt.Sprintf("%s . %d", p.Proto, p.HostPort) }

// addPorts publishes ports of the container at ip, all or none (one nft transaction).
func addPorts(ctx context.Context, bridge, id string, ip netip.Addr, ports []PortMapping) error {
	if len(ports) == 0 {
		return nil
	}
	var elems []string
	for _, p := range ports {
		elems = append(elems, fmt.Sprintf("%s comment %q : %s . %d", portKey(p), "hot:"+id, ip, p.ContainerPort))
	}
	script := fmt.Sprintf("add element ip %s ports { %s }\n", tableName(bridge), strings.Join(elems, ", "))
	if err := nft(ctx, script, "-f", "-"); err != nil {
		return fmt.Errorf("publish ports of %s: %w", id, err)
	}
	return nil
}

// deletePorts unpublishes ports one by one, ignoring ones already gone, so that it can
// finish a half-done earlier attempt.
func deletePorts(ctx context.Context, bridge string, ports []PortMapping) error {
	var errs []error
	for _, p := range ports {
		err := nft(ctx, "", "delete", "element", "ip", tableName(bridge), "ports", "{ "+portKey(p)+" }")
		if err != nil && !isNftNotFound(err) {
			errs = append(errs, fmt.Errorf("unpublish port %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}
