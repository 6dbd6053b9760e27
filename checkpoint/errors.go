package checkpoint

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/hotctl/hot/criubin"
)

// ErrCRIU is matched (errors.Is) by every *CRIUError.
var ErrCRIU = errors.New("criu failed")

// CRIUError is a failed CRIU operation. Line is the first meaningful line of the CRIU log
// (the harmless RLIMIT_NOFILE warning skipped); LogPath is where the whole log is.
type CRIUError struct {
	Op      string // "dump", "restore", "lazy-pages"
	LogPath string
	Line    string
	Err     error // what go-criu returned
}

func (e *CRIUError) Error() string {
	line := e.Line
	if line == "" && e.Err != nil {
		line = e.Err.Error()
	}
	return fmt.Sprintf("criu %s failed: %s%s (full log: %s)", e.Op, line, hint(line), e.LogPath)
}

// hint adds what to do for CRIU errors whose cause is known.
func hint(line string) string {
	switch {
	case strings.Contains(line, "Unsupported proto 262"):
		return " [an MPTCP socket, which CRIU cannot dump: Go >= 1.24 listens with MPTCP by default; hot disables MPTCP in the network namespaces it creates, otherwise disable it in the app (net.ListenConfig.SetMultipathTCP(false)) or set net.mptcp.enabled=0 in its namespace before it starts]"
	case strings.Contains(line, "Can't lookup mount"):
		return " [a file of a mount outside the container is open: CRIU can only dump files on the container's own mounts]"
	}
	return ""
}

func (e *CRIUError) Unwrap() error { return e.Err }

func (e *CRIUError) Is(target error) bool { return target == ErrCRIU }

// NewCRIUError builds the typed error for a failed CRIU operation from its log file.
func NewCRIUError(op, logPath string, err error) *CRIUError {
	e := &CRIUError{Op: op, LogPath: logPath, Err: err}
	if b, rerr := os.ReadFile(logPath); rerr == nil {
		e.Line = criubin.FirstError(string(b))
		if i := strings.IndexByte(e.Line, '\n'); i >= 0 { // FirstError falls back to the whole log
			e.Line = lastLine(string(b))
		}
	}
	return e
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}
