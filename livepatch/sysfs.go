package livepatch

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// System is the kernel interface: the directories it reads and writes and the syscalls it
// makes. Host returns the real one; tests point the directories at a fake tree.
type System struct {
	LivepatchDir string // /sys/kernel/livepatch
	ModuleDir    string // /sys/module
	ProcDir      string // /proc
	// Release is the running kernel release for vermagic checks; "" means uname -r.
	Release string
	// PollInterval is how often a transition is polled; 0 means 50 ms.
	PollInterval time.Duration
	// LoadModule and DeleteModule replace finit_module(2) and delete_module(2) when set
	// (tests); nil means the real syscalls.
	LoadModule   func(f *os.File, params string) error
	DeleteModule func(name string) error
}

// Host returns the System of the running kernel.
func Host() *System {
	return &System{LivepatchDir: "/sys/kernel/livepatch", ModuleDir: "/sys/module", ProcDir: "/proc"}
}

// State is the state a patch is in or is heading to.
type State int

// Patch states as the kernel's `enabled` file and patch_state use them.
const (
	Disabled State = 0
	Enabled  State = 1
)

func (s State) String() string {
	if s == Enabled {
		return "enabled"
	}
	return "disabled"
}

// Patch is one livepatch as /sys/kernel/livepatch/NAME shows it.
type Patch struct {
	Name       string `json:"name"`
	Enabled    bool   `json:"enabled"`
	Transition bool   `json:"transition"` // a transition (to Enabled's value) is in progress
	// Replace is the atomic-replace mode; nil when the kernel does not show it (before 6.11).
	Replace *bool    `json:"replace"`
	Objects []Object `json:"objects"`
}

// Object is a patched object: "vmlinux" or a module.
type Object struct {
	Name string `json:"name"`
	// Patched says whether the object's functions are redirected now; nil when the kernel
	// does not show it.
	Patched   *bool      `json:"patched"`
	Functions []Function `json:"functions"`
}

// Function is a patched function; Sympos tells same-named local symbols apart (0: unique).
type Function struct {
	Name   string `json:"name"`
	Sympos int    `json:"sympos"`
}

// Target is the state the patch is in, or heading to while Transition is true.
func (p *Patch) Target() State {
	if p.Enabled {
		return Enabled
	}
	return Disabled
}

// List returns every livepatch the kernel has, sorted by name.
func (s *System) List() ([]Patch, error) {
	if err := s.Supported(); err != nil {
		return nil, err
	}
	return s.list()
}

func (s *System) list() ([]Patch, error) {
	ents, err := os.ReadDir(s.LivepatchDir)
	if err != nil {
		return nil, fmt.Errorf("list livepatches in %s: %w", s.LivepatchDir, err)
	}
	var out []Patch
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		p, err := s.readPatch(e.Name())
		if errors.Is(err, ErrNotFound) {
			continue // removed while we read
		}
		if err != nil {
			return nil, err
		}
		out = append(out, *p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Get returns the patch named name (module name; dashes are accepted).
func (s *System) Get(name string) (*Patch, error) {
	if err := s.Supported(); err != nil {
		return nil, err
	}
	return s.readPatch(SysfsName(name))
}

func (s *System) readPatch(name string) (*Patch, error) {
	dir := filepath.Join(s.LivepatchDir, name)
	// A patch being freed answers ENOENT or ENODEV while its kobject goes away.
	gone := func(err error) error {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("livepatch %s: %w (see 'hot livepatch list')", name, ErrNotFound)
		}
		return fmt.Errorf("read livepatch %s: %w", name, err)
	}
	enabled, err := readBool(filepath.Join(dir, "enabled"))
	if err != nil {
		return nil, gone(err)
	}
	transition, err := readBool(filepath.Join(dir, "transition"))
	if err != nil {
		return nil, gone(err)
	}
	p := &Patch{Name: name, Enabled: enabled, Transition: transition, Objects: []Object{}}
	if v, err := readBool(filepath.Join(dir, "replace")); err == nil {
		p.Replace = &v
	}
	objs, err := os.ReadDir(dir)
	if err != nil {
		return nil, gone(err)
	}
	for _, o := range objs {
		if !o.IsDir() {
			continue
		}
		obj := Object{Name: o.Name(), Functions: []Function{}}
		if v, err := readBool(filepath.Join(dir, o.Name(), "patched")); err == nil {
			obj.Patched = &v
		}
		funcs, err := os.ReadDir(filepath.Join(dir, o.Name()))
		if err != nil {
			return nil, gone(err)
		}
		for _, f := range funcs {
			if !f.IsDir() {
				continue
			}
			fn, pos, _ := strings.Cut(f.Name(), ",")
			n, _ := strconv.Atoi(pos)
			obj.Functions = append(obj.Functions, Function{Name: fn, Sympos: n})
		}
		p.Objects = append(p.Objects, obj)
	}
	return p, nil
}

// Task is a thread the transition waits for.
type Task struct {
	PID        int      `json:"pid"`
	TID        int      `json:"tid"`
	Comm       string   `json:"comm"`
	PatchState int      `json:"patchState"` // 0 unpatched, 1 patched, -1 no transition
	Stack      []string `json:"stack,omitempty"`
}

// BlockedTasks lists the threads whose patch_state is not yet target (read from
// /proc/PID/task/TID/patch_state), with comm and, where readable, the kernel stack.
func (s *System) BlockedTasks(target State) ([]Task, error) {
	pids, err := os.ReadDir(s.ProcDir)
	if err != nil {
		return nil, fmt.Errorf("list tasks in %s: %w", s.ProcDir, err)
	}
	var out []Task
	for _, p := range pids {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		tids, err := os.ReadDir(filepath.Join(s.ProcDir, p.Name(), "task"))
		if err != nil {
			continue // exited
		}
		for _, t := range tids {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			tdir := filepath.Join(s.ProcDir, p.Name(), "task", t.Name())
			st, err := readInt(filepath.Join(tdir, "patch_state"))
			if err != nil || st < 0 || State(st) == target {
				continue
			}
			task := Task{PID: pid, TID: tid, PatchState: st, Comm: readTrim(filepath.Join(tdir, "comm"))}
			task.Stack = parseStack(readTrim(filepath.Join(tdir, "stack")))
			out = append(out, task)
		}
	}
	return out, nil
}

// TaskSummary is a one-line description of up to max tasks: comm, pid and the innermost
// stack frame that is not scheduler plumbing.
func TaskSummary(tasks []Task, max int) string {
	var parts []string
	for i, t := range tasks {
		if i == max {
			parts = append(parts, fmt.Sprintf("and %d more", len(tasks)-max))
			break
		}
		s := fmt.Sprintf("%s (pid %d", t.Comm, t.PID)
		if t.TID != t.PID {
			s += fmt.Sprintf(" tid %d", t.TID)
		}
		s += ")"
		if f := interestingFrame(t.Stack); f != "" {
			s += " in " + f
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, ", ")
}

// schedFrames are stack frames that say a task sleeps, not where.
var schedFrames = []string{"__schedule", "schedule", "do_nanosleep", "hrtimer_nanosleep", "io_schedule", "schedule_timeout", "__switch_to"}

func interestingFrame(stack []string) string {
	for _, f := range stack {
		fn, _, _ := strings.Cut(f, "+")
		skip := false
		for _, s := range schedFrames {
			if fn == s {
				skip = true
				break
			}
		}
		if !skip {
			return f
		}
	}
	return ""
}

// parseStack turns /proc/.../stack ("[<0>] func+0x1/0x2 [mod]" lines) into frames.
func parseStack(s string) []string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		if i := strings.Index(line, "] "); strings.HasPrefix(line, "[<") && i > 0 {
			line = line[i+2:]
		}
		out = append(out, line)
	}
	return out
}

func readTrim(p string) string {
	b, _ := os.ReadFile(p)
	return strings.TrimSpace(string(b))
}

func readInt(p string) (int, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("parse %s: %w", p, err)
	}
	return n, nil
}

func readBool(p string) (bool, error) {
	n, err := readInt(p)
	return n != 0, err
}

func writeValue(p, v string) error {
	if err := os.WriteFile(p, []byte(v), 0); err != nil {
		return fmt.Errorf("write %s to %s: %w", strings.TrimSpace(v), p, err)
	}
	return nil
}
