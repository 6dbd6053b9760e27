package sockets

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
)

// HoldRules lists the hold rules (any queue, any iptables backend and family) present in the
// network namespace at netnsPath, as "COMMAND: RULE" strings. Empty after a clean Close.
func HoldRules(ctx context.Context, netnsPath string) ([]string, error) {
	if err := checkNetns(netnsPath); err != nil {
		return nil, err
	}
	var found []string
	for _, t := range allTools() {
		out, err := saveAll(ctx, netnsPath, t)
		if err != nil {
			return found, fmt.Errorf("list hold rules: %w", err)
		}
		rules, _ := parseSave(out)
		for _, r := range rules {
			if isHoldRule(r) {
				found = append(found, t.Cmd+": "+r.Line)
			}
		}
	}
	return found, nil
}

// Cleanup removes every hold rule from the network namespace at netnsPath: the leftovers of a
// hot that was killed while a Holder was open. With no reader behind them such rules drop all
// incoming traffic. Nothing to remove is not an error.
func Cleanup(ctx context.Context, netnsPath string) error {
	if err := checkNetns(netnsPath); err != nil {
		return err
	}
	var errs []error
	for _, t := range allTools() {
		out, err := saveAll(ctx, netnsPath, t)
		if err != nil {
			errs = append(errs, fmt.Errorf("clean up hold rules: %w", err))
			continue
		}
		rules, _ := parseSave(out)
		del := map[string][]string{} // table -> delete lines
		for _, r := range rules {
			if isHoldRule(r) {
				del[r.Table] = append(del[r.Table], deleteLine(r))
			}
		}
		for table, lines := range del {
			if err := restoreNoflush(ctx, netnsPath, t, table, lines); err != nil {
				errs = append(errs, fmt.Errorf("clean up hold rules: %w", err))
			}
		}
	}
	return errors.Join(errs...)
}

// CRIULocks lists what CRIU's network lock left in the network namespace at netnsPath:
// nftables tables "inet CRIU-<id>" (--network-lock nftables) and, per iptables front end,
// the CRIU chain, jumps to it and per-connection lock rules (--network-lock iptables).
// Empty when no lock is in place.
func CRIULocks(ctx context.Context, netnsPath string) ([]string, error) {
	if err := checkNetns(netnsPath); err != nil {
		return nil, err
	}
	var found []string
	tables, err := criuTables(ctx, netnsPath)
	if err != nil {
		return nil, err
	}
	for _, tb := range tables {
		found = append(found, "nft: table "+tb)
	}
	for _, t := range allTools() {
		out, err := saveAll(ctx, netnsPath, t)
		if err != nil {
			return found, fmt.Errorf("list CRIU network lock: %w", err)
		}
		rules, chains := parseSave(out)
		if slices.Contains(chains, "CRIU") {
			found = append(found, t.Cmd+": chain CRIU")
		}
		for _, r := range rules {
			if isCRIURule(r) {
				found = append(found, t.Cmd+": "+r.Line)
			}
		}
	}
	return found, nil
}

// criuTables returns CRIU's lock tables in the netns ("inet CRIU-..."); none without nft.
func criuTables(ctx context.Context, netnsPath string) ([]string, error) {
	if _, err := exec.LookPath("nft"); err != nil {
		return nil, nil
	}
	out, err := runIn(ctx, netnsPath, "", "nft", "list", "tables")
	if err != nil {
		return nil, fmt.Errorf("list CRIU network lock: %w", err)
	}
	return nftCRIUTables(out), nil
}

// CleanupCRIULock removes CRIU's network lock from the network namespace at netnsPath, as a
// failed or killed `criu dump` leaves it: every "inet CRIU-*" nftables table, and for each
// iptables front end the jumps to the CRIU chain, the chain itself and per-connection lock
// rules. Use it after a failed dump once the old processes run again; until then the lock is
// what keeps clients from getting resets. Nothing to remove is not an error.
func CleanupCRIULock(ctx context.Context, netnsPath string) error {
	if err := checkNetns(netnsPath); err != nil {
		return err
	}
	var errs []error
	tables, err := criuTables(ctx, netnsPath)
	if err != nil {
		errs = append(errs, err)
	}
	for _, tb := range tables {
		if _, err := runIn(ctx, netnsPath, "", "nft", "delete", "table", tb); err != nil {
			errs = append(errs, fmt.Errorf("remove CRIU network lock: %w", err))
		}
	}
	for _, t := range allTools() {
		if err := cleanupCRIUChain(ctx, netnsPath, t); err != nil {
			errs = append(errs, fmt.Errorf("remove CRIU network lock: %w", err))
		}
	}
	return errors.Join(errs...)
}

// cleanupCRIUChain removes CRIU's iptables lock for one front end: rules first (jumps
// included: the nft backend refuses to delete a chain that is still referenced), then the chain.
func cleanupCRIUChain(ctx context.Context, netnsPath string, t iptablesTool) error {
	out, err := saveAll(ctx, netnsPath, t)
	if err != nil {
		return err
	}
	rules, chains := parseSave(out)
	var del []string
	for _, r := range rules {
		if isCRIURule(r) && r.Chain != "CRIU" {
			del = append(del, deleteLine(r))
		}
	}
	if err := restoreNoflush(ctx, netnsPath, t, "filter", del); err != nil {
		return err
	}
	if !slices.Contains(chains, "CRIU") {
		return nil
	}
	// Declaring the chain in a --noflush script flushes it; -X then deletes it.
	return restoreNoflush(ctx, netnsPath, t, "filter", []string{":CRIU - [0:0]", "-X CRIU"})
}
