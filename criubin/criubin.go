package criubin

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// PrivatePath is where scripts/install-criu.sh (make deps) puts its CRIU wrapper.
const PrivatePath = "/usr/local/lib/hot/criu/bin/criu"

// EnvVar names the environment variable that selects a CRIU binary.
const EnvVar = "HOT_CRIU"

// MinVersion returns the oldest CRIU that works on the kernels hot targets.
func MinVersion() Version { return Version{Major: 4, Minor: 2} }

// ErrNotFound is returned when no CRIU binary is found at all.
var ErrNotFound = errors.New("criu not found")

// ErrTooOld is matched (errors.Is) by a *TooOldError.
var ErrTooOld = errors.New("criu too old")

// Version is a CRIU release number.
type Version struct {
	Major, Minor, Sublevel int
}

func (v Version) String() string {
	return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Sublevel)
}

// Less reports whether v is older than w.
func (v Version) Less(w Version) bool {
	if v.Major != w.Major {
		return v.Major < w.Major
	}
	if v.Minor != w.Minor {
		return v.Minor < w.Minor
	}
	return v.Sublevel < w.Sublevel
}

// ParseVersion reads the output of `criu --version` ("Version: 4.2.1" and optionally a
// "GitID:" line). Two-part versions ("Version: 4.2") are accepted.
func ParseVersion(out string) (Version, error) {
	for _, line := range strings.Split(out, "\n") {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), "Version:")
		if !ok {
			continue
		}
		fields := strings.Split(strings.TrimSpace(rest), ".")
		if len(fields) < 2 || len(fields) > 3 {
			return Version{}, fmt.Errorf("parse criu version %q: want MAJOR.MINOR[.SUBLEVEL]", strings.TrimSpace(rest))
		}
		var nums [3]int
		for i, f := range fields {
			n, err := strconv.Atoi(f)
			if err != nil || n < 0 {
				return Version{}, fmt.Errorf("parse criu version %q: %q is not a number", strings.TrimSpace(rest), f)
			}
			nums[i] = n
		}
		return Version{Major: nums[0], Minor: nums[1], Sublevel: nums[2]}, nil
	}
	return Version{}, fmt.Errorf("parse criu version: no \"Version:\" line in %q", strings.TrimSpace(out))
}

// Binary is a located CRIU executable.
type Binary struct {
	Path    string  `json:"path"`
	Source  string  `json:"source"` // "--criu", "$HOT_CRIU", "private", "PATH"
	Version Version `json:"version"`
}

// TooOldError says which CRIU was found and why it cannot be used.
type TooOldError struct {
	Binary Binary
	Kernel string
}

func (e *TooOldError) Error() string {
	kernel := e.Kernel
	if kernel == "" {
		kernel = "this kernel"
	} else {
		kernel = "kernel " + kernel
	}
	return fmt.Sprintf("criu %s (%s, from %s) cannot checkpoint on %s (needs >= %d.%d: vDSO layout, SO_PASSCRED on inet sockets); run `make deps` or pass --criu",
		e.Binary.Version, e.Binary.Path, e.Binary.Source, kernel, MinVersion().Major, MinVersion().Minor)
}

func (e *TooOldError) Is(target error) bool { return target == ErrTooOld }

// candidate is a place CRIU may be found.
type candidate struct{ path, source string }

// Find locates CRIU (explicit path first, see the package doc) and checks its version.
// explicit is the value of --criu and may be empty.
func Find(ctx context.Context, explicit string) (Binary, error) {
	var cands []candidate
	switch {
	case explicit != "":
		cands = []candidate{{explicit, "--criu"}}
	case os.Getenv(EnvVar) != "":
		cands = []candidate{{os.Getenv(EnvVar), "$" + EnvVar}}
	default:
		cands = append(cands, candidate{PrivatePath, "private"})
		if p, err := exec.LookPath("criu"); err == nil {
			cands = append(cands, candidate{p, "PATH"})
		}
	}
	var tooOld error
	for _, c := range cands {
		if c.source == "private" {
			if _, err := os.Stat(c.path); err != nil {
				continue
			}
		}
		v, err := QueryVersion(ctx, c.path)
		if err != nil {
			if c.source == "--criu" || c.source == "$"+EnvVar {
				return Binary{}, fmt.Errorf("criu from %s: %w", c.source, err)
			}
			continue
		}
		b := Binary{Path: c.path, Source: c.source, Version: v}
		if v.Less(MinVersion()) {
			if tooOld == nil {
				tooOld = &TooOldError{Binary: b, Kernel: kernelRelease()}
			}
			if c.source == "--criu" || c.source == "$"+EnvVar {
				return b, tooOld
			}
			continue
		}
		return b, nil
	}
	if tooOld != nil {
		return Binary{}, tooOld
	}
	return Binary{}, fmt.Errorf("%w: not at %s nor on PATH; run `make deps` (installs CRIU %d.%d) or pass --criu", ErrNotFound, PrivatePath, MinVersion().Major, MinVersion().Minor)
}

// QueryVersion runs `path --version` and parses the result.
func QueryVersion(ctx context.Context, path string) (Version, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, path, "--version")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return Version{}, fmt.Errorf("run %s --version: %w: %s", path, err, strings.TrimSpace(out.String()))
	}
	return ParseVersion(out.String())
}

// Check runs `criu check` and returns its last line ("Looks good.") or the failure.
func (b Binary) Check(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, b.Path, "check").CombinedOutput()
	text := strings.TrimSpace(string(out))
	last := text
	if i := strings.LastIndexByte(text, '\n'); i >= 0 {
		last = text[i+1:]
	}
	if err != nil {
		return last, fmt.Errorf("criu check (%s): %w: %s", b.Path, err, FirstError(text))
	}
	return last, nil
}

// FirstError returns the first meaningful error line of CRIU output or a CRIU log, skipping
// lines that are harmless on hosts where root lacks CAP_SYS_RESOURCE (the RLIMIT_NOFILE warning)
// or on non-tmpfs image dirs (kdat cache).
func FirstError(log string) string {
	var firstWarn string
	for _, line := range strings.Split(log, "\n") {
		l := strings.TrimSpace(line)
		if l == "" || isHarmless(l) {
			continue
		}
		if strings.HasPrefix(l, "Error") || strings.Contains(l, "Error (") || strings.HasPrefix(l, "(") && strings.Contains(l, "Error") {
			return l
		}
		if firstWarn == "" && (strings.HasPrefix(l, "Warn") || strings.Contains(l, "Warn (")) {
			firstWarn = l
		}
	}
	if firstWarn != "" {
		return firstWarn
	}
	return strings.TrimSpace(log)
}

func isHarmless(line string) bool {
	for _, s := range []string{
		"Can't setup RLIMIT_NOFILE",
		"Can't keep kdat cache on non-tempfs",
	} {
		if strings.Contains(line, s) {
			return true
		}
	}
	return false
}

func kernelRelease() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}
