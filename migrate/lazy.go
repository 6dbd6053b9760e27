package migrate

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"time"

	"github.com/hotctl/hot/checkpoint"
)

// Post-copy (--lazy): CRIU dumps everything but the memory pages and keeps those in its page
// pipes, served by a page server on the source; the target restores first and its
// `criu lazy-pages --page-server` pulls the pages while the processes already run
// (checkpoint.LazyDump).

// pageServerAddr picks the local address the target reaches us by (the route towards it) and
// a free port on it.
func pageServerAddr(to string) (string, error) {
	c, err := net.Dial("udp", to) // no packet is sent: this only asks for the route
	if err != nil {
		return "", fmt.Errorf("find the local address towards %s: %w", to, err)
	}
	ip := c.LocalAddr().(*net.UDPAddr).IP
	c.Close()
	return checkpoint.FreePort(ip.String())
}

// precopyNote says whether pre-copy (iterative dumps while the container runs, tracking the
// pages it dirties) could shorten the pause here: it needs the kernel's soft-dirty bits,
// which `criu check --feature mem_dirty_track` probes.
func precopyNote(ctx context.Context, criu string) string {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := exec.CommandContext(cctx, criu, "check", "--feature", "mem_dirty_track").Run(); err != nil {
		return "pre-copy unavailable: this kernel has no soft-dirty page tracking (MEM_SOFT_DIRTY); post-copy only"
	}
	return "pre-copy possible on this kernel (soft-dirty tracking), not used: post-copy only"
}
