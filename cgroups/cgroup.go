package cgroups

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Resources are the limits of a group; 0 means unlimited.
type Resources struct {
	MemoryBytes int64 // memory.limit_in_bytes (v1) or memory.max (v2)
	PidsMax     int64 // pids.max
}

// Cgroup is one container's group across the host's hierarchies.
type Cgroup struct {
	name    string
	mode    string
	paths   map[string]string // controller or "unified" -> absolute directory
	roots   map[string]string // same keys -> hierarchy mount point
	freezer string            // directory whose freezer is used
	v2      bool              // freezer is cgroup2's cgroup.freeze rather than v1 freezer.state
}

// validName accepts relative, clean, slash-separated names such as "hot/<container-id>".
func validName(name string) error {
	if name == "" || strings.HasPrefix(name, "/") || path.Clean(name) != name || name == "." ||
		strings.HasPrefix(name, "../") || name == ".." || strings.Contains(name, "/../") || strings.HasSuffix(name, "/..") {
		return fmt.Errorf("invalid cgroup name %q: use a relative path such as hot/<container-id>", name)
	}
	return nil
}

// open computes where name lives on this host, without touching anything.
func open(name string) (*Cgroup, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	l, err := readLayout()
	if err != nil {
		return nil, err
	}
	mode, err := l.mode()
	if err != nil {
		return nil, err
	}
	c := &Cgroup{name: name, mode: mode, paths: map[string]string{}, roots: map[string]string{}}
	for ctrl, mnt := range l.v1 {
		c.paths[ctrl] = filepath.Join(mnt, name)
		c.roots[ctrl] = mnt
	}
	if l.unified != "" {
		c.paths[unifiedKey] = filepath.Join(l.unified, name)
		c.roots[unifiedKey] = l.unified
	}
	if p, ok := c.paths["freezer"]; ok {
		c.freezer = p
	} else if p, ok := c.paths[unifiedKey]; ok {
		c.freezer, c.v2 = p, true
	}
	return c, nil
}

// Create makes the group in every hierarchy and applies res. It reuses an existing empty
// group (a leftover of a crash) but refuses one that still has processes.
func Create(ctx context.Context, name string, res Resources) (*Cgroup, error) {
	if res.MemoryBytes < 0 || res.PidsMax < 0 {
		return nil, fmt.Errorf("create cgroup %s: negative limit (memory %d, pids %d): use 0 for unlimited", name, res.MemoryBytes, res.PidsMax)
	}
	c, err := open(name)
	if err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", name, err)
	}
	if pids, err := c.allProcs(); err == nil && len(pids) > 0 {
		return nil, fmt.Errorf("create cgroup %s: it exists and still has processes %v: remove the old container first (hot rm -f)", name, pids)
	}
	if err := c.checkControllers(res); err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", name, err)
	}
	if err := c.makeDirs(ctx, res); err != nil {
		_ = c.Destroy(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("create cgroup %s: %w", name, err)
	}
	if err := c.setLimits(res); err != nil {
		_ = c.Destroy(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("create cgroup %s: %w", name, err)
	}
	// A leftover group may have been left frozen by a crash during a checkpoint: every task
	// added to it would stop at once.
	if c.freezer != "" {
		if err := c.thaw(ctx); err != nil {
			_ = c.Destroy(context.WithoutCancel(ctx))
			return nil, fmt.Errorf("create cgroup %s: %w", name, err)
		}
	}
	return c, nil
}

// Load opens an existing group. The error wraps fs.ErrNotExist when it exists in no hierarchy.
func Load(name string) (*Cgroup, error) {
	c, err := open(name)
	if err != nil {
		return nil, fmt.Errorf("load cgroup %s: %w", name, err)
	}
	for _, d := range c.dirs() {
		if _, err := os.Stat(d); err == nil {
			return c, nil
		}
	}
	return nil, fmt.Errorf("load cgroup %s: %w", name, fs.ErrNotExist)
}

// Name is the group's name relative to the hierarchy roots.
func (c *Cgroup) Name() string { return c.name }

// Mode is the host's layout the group was made for: "v1", "v2" or "hybrid".
func (c *Cgroup) Mode() string { return c.mode }

// Paths maps each controller ("freezer", "memory", "pids", ..., and "unified" for cgroup2) to
// the group's absolute directory. Co-mounted controllers share a directory.
func (c *Cgroup) Paths() map[string]string {
	m := make(map[string]string, len(c.paths))
	for k, v := range c.paths {
		m[k] = v
	}
	return m
}

// dirs returns the distinct directories of the group, sorted.
func (c *Cgroup) dirs() []string {
	var ds []string
	for _, d := range c.paths {
		if !slices.Contains(ds, d) {
			ds = append(ds, d)
		}
	}
	sort.Strings(ds)
	return ds
}

// checkControllers fails early, with the fix, when a requested limit has no controller.
func (c *Cgroup) checkControllers(res Resources) error {
	need := map[string]bool{"memory": res.MemoryBytes > 0, "pids": res.PidsMax > 0}
	for ctrl, wanted := range need {
		if !wanted {
			continue
		}
		if c.mode == ModeV2 {
			avail, err := os.ReadFile(filepath.Join(c.roots[unifiedKey], "cgroup.controllers"))
			if err != nil {
				return fmt.Errorf("read available controllers: %w", err)
			}
			if !slices.Contains(strings.Fields(string(avail)), ctrl) {
				return fmt.Errorf("the %s controller is not available in %s: enable it in the parent's cgroup.subtree_control or drop the %s limit", ctrl, c.roots[unifiedKey], ctrl)
			}
			continue
		}
		if _, ok := c.paths[ctrl]; !ok {
			return fmt.Errorf("no %s cgroup hierarchy is mounted: mount it under /sys/fs/cgroup or drop the %s limit", ctrl, ctrl)
		}
	}
	return nil
}

// makeDirs creates the directories; on pure v2 it enables the controllers on the way down.
// A concurrent Destroy may remove a shared parent between our mkdirs: retry then.
func (c *Cgroup) makeDirs(ctx context.Context, res Resources) error {
	for attempt := 0; ; attempt++ {
		err := c.makeDirsOnce(res)
		if err == nil || !errors.Is(err, fs.ErrNotExist) || attempt >= 20 || ctx.Err() != nil {
			return err
		}
		time.Sleep(time.Millisecond)
	}
}

func (c *Cgroup) makeDirsOnce(res Resources) error {
	for key, dir := range c.paths {
		if c.mode == ModeV2 && key == unifiedKey {
			if err := c.enableV2Controllers(res); err != nil {
				return err
			}
		}
		if err := mkdirAll(dir); err != nil {
			return fmt.Errorf("make %s: %w", dir, err)
		}
	}
	return nil
}

func mkdirAll(dir string) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return nil
}

// enableV2Controllers writes +memory/+pids (and +cpu/+io where available) into the
// cgroup.subtree_control of every ancestor of the group, creating the ancestors.
func (c *Cgroup) enableV2Controllers(res Resources) error {
	root := c.roots[unifiedKey]
	dir := root
	parts := strings.Split(c.name, "/")
	for i := 0; i < len(parts); i++ {
		if i > 0 {
			dir = filepath.Join(dir, parts[i-1])
			if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				return fmt.Errorf("make %s: %w", dir, err)
			}
		}
		avail, err := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
		if err != nil {
			return fmt.Errorf("read controllers of %s: %w", dir, err)
		}
		var enable []string
		for _, ctrl := range []string{"memory", "pids", "cpu", "io"} {
			if slices.Contains(strings.Fields(string(avail)), ctrl) {
				enable = append(enable, "+"+ctrl)
			}
		}
		if len(enable) == 0 {
			continue
		}
		if err := writeFile(dir, "cgroup.subtree_control", strings.Join(enable, " ")); err != nil {
			if (res.MemoryBytes > 0 || res.PidsMax > 0) && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("%w (a cgroup with processes cannot delegate controllers: run hot from a leaf-free parent)", err)
			}
		}
	}
	return nil
}

func (c *Cgroup) setLimits(res Resources) error {
	mem := "max"
	if res.MemoryBytes > 0 {
		mem = strconv.FormatInt(res.MemoryBytes, 10)
	}
	pids := "max"
	if res.PidsMax > 0 {
		pids = strconv.FormatInt(res.PidsMax, 10)
	}
	if c.mode == ModeV2 {
		u := c.paths[unifiedKey]
		if err := writeIfLimited(u, "memory.max", mem, res.MemoryBytes); err != nil {
			return err
		}
		return writeIfLimited(u, "pids.max", pids, res.PidsMax)
	}
	if d, ok := c.paths["memory"]; ok {
		v := "-1"
		if res.MemoryBytes > 0 {
			v = mem
		}
		if err := writeIfLimited(d, "memory.limit_in_bytes", v, res.MemoryBytes); err != nil {
			return err
		}
	}
	if d, ok := c.paths["pids"]; ok {
		if err := writeIfLimited(d, "pids.max", pids, res.PidsMax); err != nil {
			return err
		}
	}
	return nil
}

// writeIfLimited writes a limit; an "unlimited" value is written too (a reused leftover group
// may carry an old limit) but a missing file is then not an error.
func writeIfLimited(dir, file, value string, limit int64) error {
	err := writeFile(dir, file, value)
	if err != nil && limit == 0 && errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

func writeFile(dir, file, value string) error {
	p := filepath.Join(dir, file)
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("write %q to %s: %w", value, p, err)
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %q to %s: %w", value, p, err)
	}
	return nil
}

// AddProc moves pid into the group in every hierarchy.
func (c *Cgroup) AddProc(pid int) error {
	for _, d := range c.dirs() {
		if err := writeFile(d, "cgroup.procs", strconv.Itoa(pid)); err != nil {
			return fmt.Errorf("add process %d to cgroup %s: %w", pid, c.name, err)
		}
	}
	return nil
}

// Procs lists the processes of the group (from the freezer's hierarchy, which is the one
// that decides what a pause stops).
func (c *Cgroup) Procs() ([]int, error) {
	dir := c.freezer
	if dir == "" {
		dir = c.dirs()[0]
	}
	pids, err := readPids(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, fmt.Errorf("list processes of cgroup %s: %w", c.name, err)
	}
	return pids, nil
}

// allProcs is the union of the processes in every hierarchy; missing directories count as empty.
func (c *Cgroup) allProcs() ([]int, error) {
	var all []int
	for _, d := range c.dirs() {
		pids, err := readPids(filepath.Join(d, "cgroup.procs"))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, p := range pids {
			if !slices.Contains(all, p) {
				all = append(all, p)
			}
		}
	}
	sort.Ints(all)
	return all, nil
}

func readPids(file string) ([]int, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		p, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("parse %s: %w", file, err)
		}
		pids = append(pids, p)
	}
	return pids, nil
}

// Kill sends SIGKILL to every process of the group and waits until the group is empty in
// every hierarchy. It freezes the group first so that nothing forks between listing and
// killing (cgroup.kill does the same in one step on cgroup2), then thaws so the killed tasks
// can die. Zombies leave cgroup.procs when they exit, so no reaper is needed. Without a
// deadline in ctx it gives up after 30s (a task stuck in uninterruptible sleep cannot die).
func (c *Cgroup) Kill(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
	}
	delay := 50 * time.Microsecond
	for {
		pids, err := c.allProcs()
		if err != nil {
			return fmt.Errorf("kill cgroup %s: %w", c.name, err)
		}
		if len(pids) == 0 {
			return nil
		}
		if u, ok := c.paths[unifiedKey]; ok {
			// cgroup.kill (Linux 5.14+) kills the whole subtree atomically; ignore its absence.
			_ = writeFile(u, "cgroup.kill", "1")
		}
		if c.freezer != "" {
			fctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
			_ = c.Freeze(fctx) // best effort: stops forks; a failure thaws back
			cancel()
		}
		for _, p := range pids {
			if err := syscall.Kill(p, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
				return fmt.Errorf("kill process %d of cgroup %s: %w", p, c.name, err)
			}
		}
		if c.freezer != "" {
			if err := c.thaw(context.WithoutCancel(ctx)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("kill cgroup %s: %w", c.name, err)
			}
		}
		select {
		case <-ctx.Done():
			left, _ := c.allProcs()
			return fmt.Errorf("kill cgroup %s: processes %v still present: %w (see their state in /proc/<pid>/stat: D means stuck in the kernel)", c.name, left, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(delay*2, 10*time.Millisecond)
	}
}

// Destroy removes the group's directories in every hierarchy, and parents of the name that
// are left empty (so "hot" goes with the last "hot/<id>"). Idempotent. It fails, naming the
// processes, if the group still has some: call Kill first.
func (c *Cgroup) Destroy(ctx context.Context) error {
	var errs []error
	for _, d := range c.dirs() {
		if err := rmdirRetry(ctx, d); err != nil {
			pids, _ := readPids(filepath.Join(d, "cgroup.procs"))
			if len(pids) > 0 {
				err = fmt.Errorf("%w: processes %v are still in it: kill them first", err, pids)
			}
			errs = append(errs, fmt.Errorf("destroy cgroup %s: %w", c.name, err))
			continue
		}
		// Empty parents up to, not including, the hierarchy root.
		root := ""
		for _, r := range c.roots {
			if strings.HasPrefix(d, r+"/") {
				root = r
			}
		}
		for p := filepath.Dir(d); root != "" && p != root && strings.HasPrefix(p, root+"/"); p = filepath.Dir(p) {
			if err := syscall.Rmdir(p); err != nil {
				break // not empty (other containers), busy or gone: leave it
			}
		}
	}
	return errors.Join(errs...)
}

// rmdirRetry removes a cgroup directory. Right after its last task exits the kernel may still
// report EBUSY for a moment, so it retries until ctx ends.
func rmdirRetry(ctx context.Context, dir string) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
	}
	delay := 100 * time.Microsecond
	for {
		err := syscall.Rmdir(dir)
		if err == nil || errors.Is(err, syscall.ENOENT) {
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("remove %s: %w", dir, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("remove %s: %w", dir, err)
		case <-time.After(delay):
		}
		delay = min(delay*2, 20*time.Millisecond)
	}
}
