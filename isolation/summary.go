package isolation

import (
	"fmt"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Summary is the isolation a spec asks for, as `hot inspect` prints it.
type Summary struct {
	Capabilities    []string `json:"capabilities"` // bounding set, without the CAP_ prefix
	NoNewPrivileges bool     `json:"noNewPrivileges"`
	Seccomp         string   `json:"seccomp"` // "unconfined" or "N rules, default ACTION"
	MaskedPaths     int      `json:"maskedPaths"`
	ReadonlyPaths   int      `json:"readonlyPaths"`
}

// Summarize reads the isolation settings of spec.
func Summarize(spec *specs.Spec) Summary {
	s := Summary{Seccomp: "unconfined"}
	if spec == nil {
		return s
	}
	if p := spec.Process; p != nil {
		s.NoNewPrivileges = p.NoNewPrivileges
		if p.Capabilities != nil {
			for _, c := range p.Capabilities.Bounding {
				s.Capabilities = append(s.Capabilities, strings.TrimPrefix(c, "CAP_"))
			}
		}
	}
	if l := spec.Linux; l != nil {
		s.MaskedPaths, s.ReadonlyPaths = len(l.MaskedPaths), len(l.ReadonlyPaths)
		if l.Seccomp != nil {
			s.Seccomp = fmt.Sprintf("%d rules, default %s", len(l.Seccomp.Syscalls), l.Seccomp.DefaultAction)
		}
	}
	return s
}

// String is a one-line description.
func (s Summary) String() string {
	nnp := "off"
	if s.NoNewPrivileges {
		nnp = "on"
	}
	return fmt.Sprintf("seccomp %s; no_new_privs %s; %d masked, %d read-only paths", s.Seccomp, nnp, s.MaskedPaths, s.ReadonlyPaths)
}
