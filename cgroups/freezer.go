package cgroups

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Freeze stops every task of the group and returns once the kernel reports the group frozen.
// If ctx ends first it thaws the group again and returns an error naming the tasks that did
// not freeze (typically ones in uninterruptible sleep, e.g. on a hung NFS server or vfork).
func (c *Cgroup) Freeze(ctx context.Context) error {
	if c.freezer == "" {
		return fmt.Errorf("freeze cgroup %s: no freezer: neither a v1 freezer hierarchy nor cgroup2 is mounted", c.name)
	}
	var err error
	if c.v2 {
		err = c.setV2Frozen(ctx, true)
	} else {
		err = c.setV1State(ctx, "FROZEN")
	}
	if err == nil {
		return nil
	}
	stuck := c.unfrozenTasks()
	if terr := c.thaw(context.WithoutCancel(ctx)); terr != nil {
		err = errors.Join(err, terr)
	}
	if len(stuck) > 0 {
		return fmt.Errorf("freeze cgroup %s: %w; tasks that did not freeze: %s (thawed again)", c.name, err, strings.Join(stuck, ", "))
	}
	return fmt.Errorf("freeze cgroup %s: %w (thawed again)", c.name, err)
}

// Thaw resumes the group and returns once the kernel reports it thawed.
func (c *Cgroup) Thaw(ctx context.Context) error {
	if c.freezer == "" {
		return fmt.Errorf("thaw cgroup %s: no freezer: neither a v1 freezer hierarchy nor cgroup2 is mounted", c.name)
	}
	if err := c.thaw(ctx); err != nil {
		return fmt.Errorf("thaw cgroup %s: %w", c.name, err)
	}
	return nil
}

func (c *Cgroup) thaw(ctx context.Context) error {
	if c.v2 {
		return c.setV2Frozen(ctx, false)
	}
	return c.setV1State(ctx, "THAWED")
}

// Frozen reports whether the kernel considers the group frozen (v1: freezer.state is FROZEN,
// which includes being frozen through a parent; v2: cgroup.events says "frozen 1").
func (c *Cgroup) Frozen() (bool, error) {
	if c.freezer == "" {
		return false, fmt.Errorf("read freezer state of cgroup %s: no freezer hierarchy", c.name)
	}
	if c.v2 {
		b, err := os.ReadFile(filepath.Join(c.freezer, "cgroup.events"))
		if err != nil {
			return false, fmt.Errorf("read freezer state of cgroup %s: %w", c.name, err)
		}
		return eventsFrozen(b), nil
	}
	s, err := readTrim(filepath.Join(c.freezer, "freezer.state"))
	if err != nil {
		return false, fmt.Errorf("read freezer state of cgroup %s: %w", c.name, err)
	}
	return s == "FROZEN", nil
}

// setV1State writes state to freezer.state and polls it until the kernel reports it; reading
// freezer.state is what makes a v1 freezer notice that the last task has frozen. The poll
// starts at 20µs and backs off to 1ms: a small group freezes in ~0.2ms.
func (c *Cgroup) setV1State(ctx context.Context, state string) error {
	file := filepath.Join(c.freezer, "freezer.state")
	if err := writeFile(c.freezer, "freezer.state", state); err != nil {
		return err
	}
	delay := 20 * time.Microsecond
	for {
		cur, err := readTrim(file)
		if err != nil {
			return fmt.Errorf("read %s: %w", file, err)
		}
		if cur == state {
			return nil
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("still %s, want %s: %w", cur, state, ctx.Err())
		case <-t.C:
		}
		delay = min(delay*2, time.Millisecond)
	}
}

// setV2Frozen writes cgroup.freeze and waits for cgroup.events to report the new "frozen"
// value. The kernel signals a change of cgroup.events to poll(2) as POLLPRI, so the wait
// usually wakes up at the transition. It rate-limits those notifications to one per 10ms per
// file, though (CGROUP_FILE_NOTIFY_MIN_INTV), so a freeze right after a thaw would wait for
// the delayed one: each poll therefore also times out after a short, growing interval
// (50µs up to 1ms) and the file is read again.
func (c *Cgroup) setV2Frozen(ctx context.Context, frozen bool) error {
	events := filepath.Join(c.freezer, "cgroup.events")
	f, err := os.Open(events)
	if err != nil {
		return fmt.Errorf("open %s: %w", events, err)
	}
	defer f.Close()
	want := "0"
	if frozen {
		want = "1"
	}
	if err := writeFile(c.freezer, "cgroup.freeze", want); err != nil {
		return err
	}
	buf := make([]byte, 512)
	fd := int(f.Fd())
	step := 50 * time.Microsecond
	for {
		n, err := unix.Pread(fd, buf, 0)
		if err != nil {
			return fmt.Errorf("read %s: %w", events, err)
		}
		if eventsFrozen(buf[:n]) == frozen {
			return nil
		}
		wait := step
		if dl, ok := ctx.Deadline(); ok {
			wait = min(wait, time.Until(dl))
		}
		if ctx.Err() != nil || wait <= 0 {
			return fmt.Errorf("cgroup.events does not report frozen %s yet: %w", want, context.Cause(ctx))
		}
		ts := unix.NsecToTimespec(wait.Nanoseconds())
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLPRI}}
		if _, err := unix.Ppoll(fds, &ts, nil); err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("poll %s: %w", events, err)
		}
		step = min(step*2, time.Millisecond)
	}
}

func eventsFrozen(b []byte) bool {
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, " "); ok && k == "frozen" {
			return strings.TrimSpace(v) == "1"
		}
	}
	return false
}

// unfrozenTasks describes the group's tasks that are not parked in the freezer, as
// "pid/tid (comm) state S in wchan". A frozen task waits in __refrigerator (v1) or
// do_freezer_trap (v2).
func (c *Cgroup) unfrozenTasks() []string {
	pids, err := readPids(filepath.Join(c.freezer, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var out []string
	for _, pid := range pids {
		tids, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			continue
		}
		for _, t := range tids {
			dir := fmt.Sprintf("/proc/%d/task/%s", pid, t.Name())
			wchan, _ := readTrim(filepath.Join(dir, "wchan"))
			if strings.Contains(wchan, "refrigerator") || strings.Contains(wchan, "freezer_trap") {
				continue
			}
			comm, _ := readTrim(filepath.Join(dir, "comm"))
			state := taskState(filepath.Join(dir, "stat"))
			desc := fmt.Sprintf("%d/%s (%s) state %s", pid, t.Name(), comm, state)
			if wchan != "" && wchan != "0" {
				desc += " in " + wchan
			}
			out = append(out, desc)
		}
	}
	return out
}

// taskState returns the one-letter state from a /proc/<pid>/stat file ("?" if unreadable).
func taskState(statFile string) string {
	b, err := os.ReadFile(statFile)
	if err != nil {
		return "?"
	}
	return parseStatState(string(b))
}

// parseStatState extracts the state field, which follows the parenthesised comm (which may
// itself contain spaces and parentheses).
func parseStatState(stat string) string {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 || i+2 >= len(stat) {
		return "?"
	}
	f := strings.Fields(stat[i+1:])
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

func readTrim(p string) (string, error) {
	b, err := os.ReadFile(p)
	return strings.TrimSpace(string(b)), err
}
