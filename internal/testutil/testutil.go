// Package testutil holds helpers shared by the tests of several packages: skipping with a
// stated reason when root or a kernel feature is missing, and locating the hot binary for
// end-to-end tests that drive the real CLI.
package testutil

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// RequireRoot skips the test, naming the reason, unless it runs as root and not in -short mode.
func RequireRoot(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test: requires root and kernel features, skipped in -short mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("end-to-end test: requires root (namespaces, mounts, cgroups)")
	}
}

// RequireCommand skips the test unless name is on PATH.
func RequireCommand(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("requires %s on PATH (installed by `make deps`): %v", name, err)
	}
	return p
}

var (
	buildOnce sync.Once
	buildPath string
	buildErr  error
)

// HotBinary returns the path of a hot binary built from this checkout: $HOT_TEST_BINARY when
// set (make test sets it), otherwise one built once per test process. The build goes to one
// fixed file per checkout under the temp dir (renamed into place, so concurrent test processes
// do not see a half-written binary), instead of a new directory per process.
func HotBinary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("HOT_TEST_BINARY"); p != "" {
		return p
	}
	buildOnce.Do(func() {
		root := ModuleRoot(t)
		sum := sha256.Sum256([]byte(root))
		buildPath = filepath.Join(os.TempDir(), "hot-test-"+hex.EncodeToString(sum[:6]))
		tmp := fmt.Sprintf("%s.%d", buildPath, os.Getpid())
		cmd := exec.Command("go", "build", "-o", tmp, "./cmd/hot")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = &buildError{err: err, out: string(out)}
			os.Remove(tmp)
			return
		}
		buildErr = os.Rename(tmp, buildPath)
	})
	if buildErr != nil {
		t.Fatalf("build hot: %v", buildErr)
	}
	return buildPath
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return e.err.Error() + ": " + e.out }

// ModuleRoot returns the directory holding go.mod.
func ModuleRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate testutil source file")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Result is the outcome of one hot invocation.
type Result struct {
	Stdout, Stderr string
	ExitCode       int
}

// RunHot runs the hot binary with args (a --root/--run-root pair is the caller's business)
// and returns its output. It fails the test only if the binary could not be started.
func RunHot(t testing.TB, timeout time.Duration, args ...string) Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, HotBinary(t), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := Result{Stdout: stdout.String(), Stderr: stderr.String()}
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("run hot %s: %v", strings.Join(args, " "), err)
		}
		res.ExitCode = ee.ExitCode()
	}
	return res
}

// BuildStatic builds the Go package pkg of this module (e.g. "./internal/testapps/secprobe")
// with CGO_ENABLED=0 into out, for use inside container root file systems.
func BuildStatic(t testing.TB, pkg, out string) error {
	t.Helper()
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = ModuleRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return &buildError{err: err, out: string(b)}
	}
	return nil
}

// Logger returns a logger that writes to the test's log (all levels, debug included).
func Logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testLogWriter struct{ t testing.TB }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
