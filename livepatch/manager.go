package livepatch

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// EventKind says what a progress Event reports.
type EventKind string

// Progress events, in the order they can happen.
const (
	EventWaiting   EventKind = "waiting"   // transition in progress (sent about 4 times a second)
	EventBlocked   EventKind = "blocked"   // timeout reached; Tasks block the transition
	EventSignalled EventKind = "signalled" // the blocking tasks were signalled through sysfs
	EventForced    EventKind = "forced"    // force was written (WaitOptions.Force)
)

// Event is a progress report while a transition runs.
type Event struct {
	Kind    EventKind
	Patch   string
	Target  State
	Elapsed time.Duration
	Pending int    // tasks not yet on the target side (EventWaiting, EventBlocked)
	Tasks   []Task // EventBlocked
	Detail  string // EventSignalled: how the tasks were signalled
}

// WaitOptions tune how a transition is followed.
type WaitOptions struct {
	// Timeout before the blocking tasks are reported and signalled; 0 means 60 s. After the
	// signal the transition gets SignalGrace more before it counts as stalled.
	Timeout     time.Duration
	SignalGrace time.Duration // 0 means 5 s (the kernel retries once a second)
	// Force writes `force` when the transition is still stalled after the signal: the
	// remaining tasks are switched without the consistency check (they may run old and new
	// code mixed), and the kernel keeps the module of a patch forced while being disabled (or
	// replaced) loaded for good: it can never be unloaded.
	Force    bool
	Progress func(Event) // optional
	Logger   *slog.Logger
}

// Transition is how a finished transition went.
type Transition struct {
	Patch     string        `json:"patch"`
	Target    State         `json:"target"`
	Duration  time.Duration `json:"durationNs"`
	Signalled bool          `json:"signalled"`
	Forced    bool          `json:"forced"`
}

// MarshalText lets State print as "enabled"/"disabled" in JSON.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// LoadOptions tune Load.
type LoadOptions struct {
	Wait WaitOptions
	// NoWait returns as soon as the kernel accepted the module, with the transition running.
	NoWait bool
	// Replace: the module is an atomic-replace (cumulative) patch; once its transition is
	// done, the modules of the patches it replaced are unloaded. Implies waiting.
	Replace bool
	// Params is the module parameter string passed to finit_module.
	Params string
}

// LoadResult is what Load did.
type LoadResult struct {
	Module     *Module       `json:"module"`
	LoadTime   time.Duration `json:"loadTimeNs"` // finit_module
	Transition *Transition   `json:"transition,omitempty"`
	Patch      *Patch        `json:"patch,omitempty"`
	Unloaded   []string      `json:"unloaded,omitempty"` // replaced patches' modules (Replace)
	Warnings   []string      `json:"warnings,omitempty"`
}

// Check inspects and validates the module at path for this kernel without loading it.
func (s *System) Check(path string) (*Module, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open module %s: %w", path, err)
	}
	defer f.Close()
	return s.check(f, path)
}

func (s *System) check(f *os.File, path string) (*Module, error) {
	m, err := inspectFile(f, path)
	if err != nil {
		return nil, err
	}
	rel, err := s.release()
	if err != nil {
		return nil, err
	}
	if err := m.Validate(rel); err != nil {
		return m, err
	}
	return m, nil
}

// Load validates the module at path, loads it and (unless NoWait) follows the transition
// to enabled.
func (s *System) Load(ctx context.Context, path string, o LoadOptions) (*LoadResult, error) {
	if err := s.Supported(); err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("load livepatch: %w", err)
	}
	defer f.Close()
	m, err := s.check(f, path) // the same open file goes to finit_module below
	if err != nil {
		return nil, err
	}
	res := &LoadResult{Module: m}
	if _, err := os.Stat(filepath.Join(s.ModuleDir, m.SysfsName)); err == nil {
		return nil, fmt.Errorf("load livepatch %s: module %s is already loaded (see 'hot livepatch status %s')", path, m.SysfsName, m.SysfsName)
	}
	before, err := s.list()
	if err != nil {
		return nil, err
	}
	for _, p := range before {
		if p.Transition {
			return nil, fmt.Errorf("load livepatch %s: livepatch %s is still in transition to %s and the kernel allows one transition at a time: wait for it ('hot livepatch status %s') or reverse it, then retry", m.SysfsName, p.Name, p.Target(), p.Name)
		}
	}
	start := time.Now()
	err = s.loadModule(f, o.Params)
	res.LoadTime = time.Since(start)
	if err != nil {
		return nil, fmt.Errorf("load livepatch %s: finit_module: %w (%s)", m.Name, err, loadErrorHint(err))
	}
	if o.NoWait && !o.Replace {
		p, err := s.readPatch(m.SysfsName)
		if err != nil {
			return res, fmt.Errorf("module %s loaded but its livepatch is not in %s: %w", m.Name, s.LivepatchDir, err)
		}
		res.Patch = p
		return res, nil
	}
	tr, err := s.WaitTransition(ctx, m.SysfsName, Enabled, o.Wait)
	res.Transition = tr
	if err != nil {
		return res, err
	}
	if res.Patch, err = s.readPatch(m.SysfsName); err != nil {
		return res, err
	}
	if o.Replace {
		if res.Patch.Replace != nil && !*res.Patch.Replace {
			res.Warnings = append(res.Warnings, fmt.Sprintf("%s is not an atomic-replace patch: the other patches stay active", m.SysfsName))
		}
		for _, old := range before {
			// When the new patch's transition completes, the kernel has already cleared
			// `enabled` of every patch it replaced and frees them asynchronously.
			p, err := s.readPatch(old.Name)
			if err == nil && p.Enabled {
				continue // not replaced: stays active
			}
			if err != nil && !errors.Is(err, ErrNotFound) {
				return res, err
			}
			if err := s.waitGone(ctx, old.Name, 10*time.Second); err != nil {
				res.Warnings = append(res.Warnings, fmt.Sprintf("replaced patch %s: %v", old.Name, err))
				continue
			}
			if err := s.unloadModule(old.Name); err != nil {
				res.Warnings = append(res.Warnings, fmt.Sprintf("replaced patch %s: %v", old.Name, err))
				continue
			}
			res.Unloaded = append(res.Unloaded, old.Name)
		}
		if len(before) > 0 && len(res.Unloaded) == 0 {
			res.Warnings = append(res.Warnings, fmt.Sprintf("--replace: %s replaced no patch; was it built with klp_patch.replace = true?", m.SysfsName))
		}
	}
	return res, nil
}

// WaitTransition follows the transition of patch name to target until it is done: for
// Enabled, `transition` reads 0 with `enabled` 1; for Disabled, the patch's sysfs directory
// is gone (only then can the module be unloaded). See WaitOptions for the timeout policy.
func (s *System) WaitTransition(ctx context.Context, name string, target State, o WaitOptions) (*Transition, error) {
	if o.Timeout <= 0 {
		o.Timeout = 60 * time.Second
	}
	if o.SignalGrace <= 0 {
		o.SignalGrace = 5 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	poll := s.PollInterval
	if poll <= 0 {
		poll = 50 * time.Millisecond
	}
	emit := func(e Event) {
		if o.Progress != nil {
			e.Patch, e.Target = name, target
			o.Progress(e)
		}
	}
	tr := &Transition{Patch: name, Target: target}
	dir := filepath.Join(s.LivepatchDir, name)
	start := time.Now()
	deadline := start.Add(o.Timeout)
	var lastProgress time.Time
	tick := time.NewTicker(poll)
	defer tick.Stop()
	for {
		p, err := s.readPatch(name)
		switch {
		case errors.Is(err, ErrNotFound) && target == Disabled:
			tr.Duration = time.Since(start)
			return tr, nil
		case errors.Is(err, ErrNotFound):
			return tr, fmt.Errorf("wait for livepatch %s to be enabled: its directory %s disappeared (disabled or replaced meanwhile)", name, dir)
		case err != nil:
			return tr, err
		case p.Target() != target:
			return tr, fmt.Errorf("wait for livepatch %s to be %s: it is now heading to %s (reversed by someone else)", name, target, p.Target())
		case !p.Transition && target == Enabled:
			tr.Duration = time.Since(start)
			return tr, nil
		}
		now := time.Now()
		if now.After(deadline) {
			tasks, _ := s.BlockedTasks(target)
			emit(Event{Kind: EventBlocked, Elapsed: now.Sub(start), Pending: len(tasks), Tasks: tasks})
			switch {
			case !tr.Signalled:
				tr.Signalled = true
				how, err := s.signal(name)
				if err != nil {
					o.Logger.Warn("livepatch: cannot signal blocking tasks", "patch", name, "err", err)
				} else {
					emit(Event{Kind: EventSignalled, Elapsed: now.Sub(start), Pending: len(tasks), Detail: how})
				}
				deadline = now.Add(o.SignalGrace)
				if how == kernelSignals {
					// Give the kernel's own signal time to happen and work.
					if d := start.Add(kernelSignalAfter + o.SignalGrace); d.After(deadline) {
						deadline = d
					}
				}
			case o.Force && !tr.Forced:
				o.Logger.Warn("livepatch: forcing the transition past the consistency check", "patch", name, "target", target)
				if err := writeValue(filepath.Join(dir, "force"), "1"); err != nil {
					return tr, fmt.Errorf("force livepatch %s: %w", name, err)
				}
				tr.Forced = true
				emit(Event{Kind: EventForced, Elapsed: now.Sub(start)})
				deadline = now.Add(o.SignalGrace)
			default:
				return tr, &StalledError{Patch: name, Target: target, Waited: now.Sub(start), Signalled: tr.Signalled, Tasks: tasks}
			}
		} else if o.Progress != nil && now.Sub(lastProgress) >= 250*time.Millisecond {
			lastProgress = now
			tasks, _ := s.BlockedTasks(target)
			emit(Event{Kind: EventWaiting, Elapsed: now.Sub(start), Pending: len(tasks)})
		}
		select {
		case <-ctx.Done():
			return tr, fmt.Errorf("wait for livepatch %s to be %s: %w (the transition goes on in the kernel)", name, target, ctx.Err())
		case <-tick.C:
		}
	}
}

// kernelSignalAfter is when the kernel itself signals the tasks blocking a transition
// (kernel/livepatch/transition.c: every SIGNALS_TIMEOUT = 15 retries, one retry a second).
const kernelSignalAfter = 15 * time.Second

const kernelSignals = "this kernel has no per-patch signal file; it signals the blocking tasks itself 15 s into the transition"

// signal asks the kernel to kick the tasks blocking the transition (fake signals for user
// tasks, wake-ups for kthreads) through the patch's `signal` file where it exists. Kernels
// without it (Debian 12's 6.1 has none) send those signals by themselves; signal says so.
func (s *System) signal(name string) (string, error) {
	p := filepath.Join(s.LivepatchDir, name, "signal")
	if _, err := os.Stat(p); errors.Is(err, fs.ErrNotExist) {
		return kernelSignals, nil
	}
	if err := writeValue(p, "1"); err != nil {
		return "", err
	}
	return "signalled them through " + p, nil
}

// Enable reverses a disable that is still in transition. A fully disabled patch cannot be
// enabled again (the kernel forbids it); the error says to unload and load it.
func (s *System) Enable(ctx context.Context, name string, wait *WaitOptions) (*Transition, error) {
	if err := s.Supported(); err != nil {
		return nil, err
	}
	name = SysfsName(name)
	p, err := s.readPatch(name)
	if errors.Is(err, ErrNotFound) {
		if s.moduleLoaded(name) {
			return nil, fmt.Errorf("enable livepatch %s: it was disabled and the kernel cannot enable a disabled livepatch again: run 'hot livepatch unload %s', then 'hot livepatch load FILE.ko'", name, name)
		}
		return nil, err
	}
	if err != nil {
		return nil, err
	}
	if p.Enabled {
		if !p.Transition {
			return nil, fmt.Errorf("enable livepatch %s: already enabled", name)
		}
	} else if err := writeValue(filepath.Join(s.LivepatchDir, name, "enabled"), "1"); err != nil {
		return nil, fmt.Errorf("enable livepatch %s (reverse its disable): %w", name, err)
	}
	if wait == nil {
		return nil, nil
	}
	return s.WaitTransition(ctx, name, Enabled, *wait)
}

// Disable starts disabling the patch (reversing an enable still in transition) and, when
// wait is not nil, waits until its sysfs directory is gone.
func (s *System) Disable(ctx context.Context, name string, wait *WaitOptions) (*Transition, error) {
	if err := s.Supported(); err != nil {
		return nil, err
	}
	name = SysfsName(name)
	p, err := s.readPatch(name)
	if errors.Is(err, ErrNotFound) && s.moduleLoaded(name) {
		return &Transition{Patch: name, Target: Disabled}, nil // already disabled
	}
	if err != nil {
		return nil, err
	}
	if p.Enabled {
		if err := writeValue(filepath.Join(s.LivepatchDir, name, "enabled"), "0"); err != nil {
			if errors.Is(err, unix.EBUSY) {
				return nil, fmt.Errorf("disable livepatch %s: another patch is in transition; wait for it and retry: %w", name, err)
			}
			return nil, fmt.Errorf("disable livepatch %s: %w", name, err)
		}
	}
	if wait == nil {
		return nil, nil
	}
	return s.WaitTransition(ctx, name, Disabled, *wait)
}

// Unload removes the module of a disabled patch (delete_module). It refuses while the patch
// is still in sysfs and refuses modules that are not livepatches.
func (s *System) Unload(ctx context.Context, name string) error {
	if err := s.Supported(); err != nil {
		return err
	}
	name = SysfsName(name)
	if p, err := s.readPatch(name); err == nil {
		if p.Enabled {
			return fmt.Errorf("unload livepatch %s: it is still enabled: run 'hot livepatch disable %s --wait' first", name, name)
		}
		// Disabled: the kernel removes the directory once the transition is over.
		if err := s.waitGone(ctx, name, 2*time.Second); err != nil {
			return fmt.Errorf("unload livepatch %s: still being disabled: wait with 'hot livepatch disable %s --wait'", name, name)
		}
	}
	if !s.moduleLoaded(name) {
		return fmt.Errorf("unload livepatch %s: no module %s is loaded: %w", name, name, ErrNotFound)
	}
	taint := readTrim(filepath.Join(s.ModuleDir, name, "taint"))
	if !strings.Contains(taint, "K") {
		return fmt.Errorf("unload livepatch %s: module %s is not a livepatch (taint %q has no K); use rmmod for ordinary modules", name, name, taint)
	}
	return s.unloadModule(name)
}

func (s *System) unloadModule(name string) error {
	if err := s.deleteModule(name); err != nil {
		hint := "see dmesg"
		if errors.Is(err, unix.EWOULDBLOCK) || errors.Is(err, unix.EBUSY) {
			hint = "still in use; a module whose patch was forced while being disabled or replaced can never be unloaded"
		}
		return fmt.Errorf("unload livepatch %s: delete_module: %w (%s)", name, err, hint)
	}
	return nil
}

func (s *System) moduleLoaded(name string) bool {
	_, err := os.Stat(filepath.Join(s.ModuleDir, name))
	return err == nil
}

// waitGone waits up to d for the patch's sysfs directory to disappear.
func (s *System) waitGone(ctx context.Context, name string, d time.Duration) error {
	dir := filepath.Join(s.LivepatchDir, name)
	deadline := time.Now().Add(d)
	for {
		if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("livepatch %s still in %s", name, s.LivepatchDir)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Status is one patch's state, as `hot livepatch status` shows it.
type Status struct {
	Name         string `json:"name"`
	Patch        *Patch `json:"patch"`        // nil once the patch is gone from sysfs (disabled)
	ModuleLoaded bool   `json:"moduleLoaded"` // its module is still loaded
	BlockedTasks []Task `json:"blockedTasks"` // during a transition: tasks not yet on the target side
}

// Status returns the patch's state, the tasks a running transition waits for, and whether
// its module is still loaded. ErrNotFound when neither patch nor module exists.
func (s *System) Status(name string) (*Status, error) {
	if err := s.Supported(); err != nil {
		return nil, err
	}
	name = SysfsName(name)
	st := &Status{Name: name, BlockedTasks: []Task{}, ModuleLoaded: s.moduleLoaded(name)}
	p, err := s.readPatch(name)
	switch {
	case err == nil:
		st.Patch = p
		if p.Transition {
			tasks, err := s.BlockedTasks(p.Target())
			if err != nil {
				return nil, err
			}
			st.BlockedTasks = append(st.BlockedTasks, tasks...)
		}
	case errors.Is(err, ErrNotFound) && st.ModuleLoaded:
	default:
		return nil, err
	}
	return st, nil
}

// UnmarshalText reads "enabled"/"disabled".
func (s *State) UnmarshalText(b []byte) error {
	switch string(b) {
	case "enabled":
		*s = Enabled
	case "disabled":
		*s = Disabled
	default:
		return fmt.Errorf("livepatch state %q: want enabled or disabled", b)
	}
	return nil
}
