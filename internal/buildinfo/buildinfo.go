// Package buildinfo reports the version of the running hot binary.
package buildinfo

import (
	"runtime"
	"runtime/debug"
)

// Version is set at link time with -ldflags "-X github.com/hotctl/hot/internal/buildinfo.Version=...".
// It stays "dev" for plain `go build`/`go test` builds.
var Version = "dev"

// Info describes the binary: its version, the VCS revision it was built from and the Go toolchain.
type Info struct {
	Version   string `json:"version"`
	Revision  string `json:"revision,omitempty"`
	Modified  bool   `json:"modified,omitempty"`
	GoVersion string `json:"goVersion"`
	Platform  string `json:"platform"`
}

// Read returns the build information of the running binary.
func Read() Info {
	info := Info{Version: Version, GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				info.Revision = s.Value
			case "vcs.modified":
				info.Modified = s.Value == "true"
			}
		}
	}
	return info
}

// String renders the version the way `hot version` prints it.
func (i Info) String() string {
	s := "hot " + i.Version
	if i.Revision != "" {
		rev := i.Revision
		if len(rev) > 12 {
			rev = rev[:12]
		}
		s += " (" + rev
		if i.Modified {
			s += "+dirty"
		}
		s += ")"
	}
	return s + " " + i.GoVersion + " " + i.Platform
}
