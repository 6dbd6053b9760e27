package isolation

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	mobyseccomp "github.com/moby/profiles/seccomp"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Options is what `hot run` takes from --privileged, --cap-add, --cap-drop and
// --security-opt.
type Options struct {
	// Privileged starts from every capability and turns off seccomp, masked and read-only
	// paths and no_new_privs (unless asked for explicitly). --cap-drop still applies.
	Privileged bool
	CapAdd     []string // names with or without CAP_, any case, or ALL
	CapDrop    []string
	// SeccompProfile is the JSON of a Docker or OCI seccomp profile (--security-opt
	// seccomp=FILE); nil means the default profile, unless SeccompUnconfined.
	SeccompProfile    []byte
	SeccompSource     string // the FILE named on the command line, for error messages
	SeccompUnconfined bool
	// NoNewPrivileges overrides the default (on, off for --privileged) when set.
	NoNewPrivileges *bool
}

// AddSecurityOpt parses one --security-opt value: seccomp=unconfined, seccomp=FILE,
// no-new-privileges, no-new-privileges=true|false. seccomp=FILE reads FILE.
func (o *Options) AddSecurityOpt(opt string) error {
	key, val, hasVal := strings.Cut(opt, "=")
	if !hasVal {
		key, val, hasVal = strings.Cut(opt, ":") // Docker also accepts key:value
	}
	switch key {
	case "seccomp":
		if !hasVal || val == "" {
			return fmt.Errorf("--security-opt %q: want seccomp=unconfined or seccomp=/path/to/profile.json", opt)
		}
		if val == "unconfined" {
			o.SeccompUnconfined, o.SeccompProfile, o.SeccompSource = true, nil, ""
			return nil
		}
		data, err := os.ReadFile(val)
		if err != nil {
			return fmt.Errorf("--security-opt seccomp: read profile: %w", err)
		}
		o.SeccompUnconfined, o.SeccompProfile, o.SeccompSource = false, data, val
		return nil
	case "no-new-privileges":
		v := true
		if hasVal {
			b, err := strconv.ParseBool(val)
			if err != nil {
				return fmt.Errorf("--security-opt %q: want no-new-privileges=true or =false", opt)
			}
			v = b
		}
		o.NoNewPrivileges = &v
		return nil
	}
	return fmt.Errorf("--security-opt %q is not supported: use seccomp=unconfined, seccomp=FILE or no-new-privileges[=true|false]", opt)
}

// DefaultMaskedPaths are hidden from a default container: files are covered by /dev/null,
// directories by an empty read-only tmpfs (runtime-spec's and Docker's list).
func DefaultMaskedPaths() []string {
	return []string{
		"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
		"/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list",
		"/proc/timer_stats", "/sys/devices/virtual/powercap", "/sys/firmware",
	}
}

// DefaultReadonlyPaths are bind-mounted read-only in a default container.
func DefaultReadonlyPaths() []string {
	return []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
}

// Validate checks the capability names, so that the command line can report them as usage
// errors before anything is created.
func (o Options) Validate() error {
	_, err := resolveCaps(nil, o.CapAdd, o.CapDrop)
	return err
}

// Apply writes the isolation opts ask for into spec: process capabilities (bounding,
// effective, permitted; inheritable and ambient empty), no_new_privs, masked and read-only
// paths, and the seccomp filter. It does not touch the host apart from reading the kernel
// version, which the default seccomp profile uses for a few syscalls.
func Apply(spec *specs.Spec, opts Options) error {
	if spec == nil || spec.Process == nil {
		return errors.New("apply isolation: spec has no process section")
	}
	if spec.Linux == nil {
		spec.Linux = &specs.Linux{}
	}
	base := DefaultCapabilities()
	if opts.Privileged {
		base = AllCapabilities()
	}
	caps, err := resolveCaps(base, opts.CapAdd, opts.CapDrop)
	if err != nil {
		return err
	}
	spec.Process.Capabilities = &specs.LinuxCapabilities{
		Bounding:  caps,
		Effective: append([]string(nil), caps...),
		Permitted: append([]string(nil), caps...),
	}
	spec.Process.NoNewPrivileges = !opts.Privileged
	if opts.NoNewPrivileges != nil {
		spec.Process.NoNewPrivileges = *opts.NoNewPrivileges
	}
	spec.Linux.MaskedPaths, spec.Linux.ReadonlyPaths = nil, nil
	if !opts.Privileged {
		spec.Linux.MaskedPaths = DefaultMaskedPaths()
		spec.Linux.ReadonlyPaths = DefaultReadonlyPaths()
	}

	// The seccomp profile depends on the bounding set (the default profile opens syscalls
	// such as mount or bpf only to containers that hold the matching capability).
	spec.Linux.Seccomp = nil
	switch {
	case opts.SeccompProfile != nil:
		sc, err := mobyseccomp.LoadProfile(string(opts.SeccompProfile), spec)
		if err != nil {
			return fmt.Errorf("seccomp profile %s: %w", opts.SeccompSource, err)
		}
		if sc == nil {
			return fmt.Errorf("seccomp profile %s has no defaultAction and no syscalls: use seccomp=unconfined to run without a filter", opts.SeccompSource)
		}
		spec.Linux.Seccomp = sc
	case opts.SeccompUnconfined || opts.Privileged:
	default:
		sc, err := mobyseccomp.GetDefaultProfile(spec)
		if err != nil {
			return fmt.Errorf("default seccomp profile: %w", err)
		}
		spec.Linux.Seccomp = sc
	}
	if spec.Linux.Seccomp != nil {
		if _, err := compileSeccomp(spec.Linux.Seccomp); err != nil {
			return fmt.Errorf("seccomp profile %s: %w", profileName(opts), err)
		}
	}
	return nil
}

func profileName(o Options) string {
	if o.SeccompSource != "" {
		return o.SeccompSource
	}
	return "(default)"
}
