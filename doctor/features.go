package doctor

import (
	"context"
	"errors"
	"strings"

	"github.com/hotctl/hot/ftrace"
	"github.com/hotctl/hot/livepatch"
)

// bpfCheckers reports the BPF mechanisms `hot hotfix` can use, from ftrace.Probe, which loads
// a trivial program of each kind.
func bpfCheckers() []Checker {
	group := func(name, fix string, want func(ftrace.Mechanism) bool) Checker {
		return Checker{Name: name, Run: func(ctx context.Context, _ *Options) Result {
			var okMechs, refused []string
			var firstErr error
			for _, s := range ftrace.Probe(ctx) {
				if !want(s.Mechanism) {
					continue
				}
				if s.Err == nil {
					okMechs = append(okMechs, string(s.Mechanism))
					continue
				}
				refused = append(refused, string(s.Mechanism))
				if firstErr == nil {
					firstErr = s.Err
				}
			}
			switch {
			case len(refused) == 0:
				return ok("loaded a trivial program of each kind: %s", strings.Join(okMechs, ", "))
			case len(okMechs) == 0:
				return missing(fix, "refused: %s (first: %v)", strings.Join(refused, ", "), firstErr)
			}
			return limited(fix, "works: %s; refused: %s (first: %v)", strings.Join(okMechs, ", "), strings.Join(refused, ", "), firstErr)
		}}
	}
	return []Checker{
		group("bpf-trampoline", "a kernel that allows BPF trampolines (fentry/fexit/fmod_ret/LSM); `hot hotfix` falls back to cgroup-BPF fixes",
			ftrace.Mechanism.Trampoline),
		group("cgroup-bpf", "a kernel with CONFIG_CGROUP_BPF and a cgroup2 mount",
			func(m ftrace.Mechanism) bool { return !m.Trampoline() }),
	}
}

func checkLivepatch(ctx context.Context, _ *Options) Result {
	err := livepatch.Supported()
	switch {
	case err == nil:
		return ok("modules load and /sys/kernel/livepatch exists: `hot livepatch` works")
	case errors.Is(err, livepatch.ErrNotSupported):
		return missing("a kernel with CONFIG_MODULES and CONFIG_LIVEPATCH; on this one use BPF fixes (`hot hotfix`)", "%v", err)
	}
	return missing("", "probe failed: %v", err)
}
