package checkpoint

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCRIUErrorNamesFirstMeaningfulLine(t *testing.T) {
	log := filepath.Join(t.TempDir(), "dump.log")
	content := `(00.000100) Version: 4.2.1
(00.058999) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.070000) Warn  (criu/kerndat.c:1): something minor
(00.080000) Error (criu/sk-inet.c:137): inet: Unsupported proto 262 for socket 9fcc
(00.090000) Error (criu/cr-dump.c:2000): Dumping FAILED.
`
	if err := os.WriteFile(log, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	goCRIU := errors.New("operation failed (msg:rlimit: Can't setup RLIMIT_NOFILE for self err:0)")
	err := NewCRIUError("dump", log, goCRIU)
	if !strings.Contains(err.Line, "Unsupported proto 262") {
		t.Errorf("Line = %q, want the inet error", err.Line)
	}
	msg := err.Error()
	if strings.Contains(msg, "RLIMIT") || !strings.Contains(msg, log) || !strings.HasPrefix(msg, "criu dump failed: ") {
		t.Errorf("message %q: want the real cause and the log path, not the rlimit line", msg)
	}
	if !strings.Contains(msg, "MPTCP") {
		t.Errorf("message %q lacks the MPTCP hint", msg)
	}
	if !errors.Is(err, ErrCRIU) || !errors.Is(err, goCRIU) {
		t.Errorf("errors.Is: want ErrCRIU and the go-criu error to match")
	}
}

func TestCRIUErrorWithoutLog(t *testing.T) {
	err := NewCRIUError("restore", filepath.Join(t.TempDir(), "missing.log"), errors.New("swrk exited"))
	if !strings.Contains(err.Error(), "swrk exited") {
		t.Errorf("without a log the message must quote go-criu's error: %v", err)
	}
}
