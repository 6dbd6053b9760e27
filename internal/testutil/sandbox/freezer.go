package sandbox

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Freezer is a v1 freezer cgroup of the sandbox (hybrid and v1 hosts).
type Freezer struct{ Dir string }

// NewFreezer creates /sys/fs/cgroup/freezer/NAME.
func NewFreezer(name string) (*Freezer, error) {
	dir := filepath.Join("/sys/fs/cgroup/freezer", name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create freezer cgroup (needs the v1 freezer mounted at /sys/fs/cgroup/freezer): %w", err)
	}
	return &Freezer{Dir: dir}, nil
}

// Add moves pid into the cgroup.
func (f *Freezer) Add(pid int) error {
	return os.WriteFile(filepath.Join(f.Dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644)
}

func (f *Freezer) set(ctx context.Context, want string) error {
	state := filepath.Join(f.Dir, "freezer.state")
	if err := os.WriteFile(state, []byte(want), 0o644); err != nil {
		return fmt.Errorf("write %s to %s: %w", want, state, err)
	}
	for {
		b, err := os.ReadFile(state)
		if err != nil {
			return err
		}
		if strings.TrimSpace(string(b)) == want {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Microsecond):
		}
		os.WriteFile(state, []byte(want), 0o644)
	}
}

// Freeze freezes the group and returns once it is FROZEN.
func (f *Freezer) Freeze(ctx context.Context) error { return f.set(ctx, "FROZEN") }

// Thaw thaws the group.
func (f *Freezer) Thaw(ctx context.Context) error { return f.set(ctx, "THAWED") }

// Destroy removes the cgroup (it must be empty).
func (f *Freezer) Destroy() error {
	var err error
	for i := 0; i < 100; i++ {
		if err = os.Remove(f.Dir); err == nil || os.IsNotExist(err) {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return err
}

type netDialer struct{ net.Dialer }

func (d *netDialer) dial(ctx context.Context, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	return d.DialContext(ctx, "tcp", addr)
}
