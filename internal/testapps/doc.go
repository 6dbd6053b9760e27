// Package testapps holds small programs and clients for end-to-end tests and benchmarks:
// httpcount (an HTTP server with in-memory state, run inside containers) and loadclient
// (keep-alive clients that prove the same TCP connections survive a checkpoint). Build
// compiles a program statically so that it runs in an empty root filesystem.
package testapps

import (
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

var builds sync.Map // import path -> *buildResult

type buildResult struct {
	once sync.Once
	path string
	err  error
	out  []byte
}

// Build compiles the program at the import path pkg (for example
// "github.com/hotctl/hot/internal/testapps/httpcount") as a static binary, once per test process,
// and returns its path. The binary lives in a temporary directory that outlives the test.
func Build(t testing.TB, pkg string) string {
	t.Helper()
	v, _ := builds.LoadOrStore(pkg, &buildResult{})
	r := v.(*buildResult)
	r.once.Do(func() {
		dir, err := os.MkdirTemp("", "hot-testapp-")
		if err != nil {
			r.err = err
			return
		}
		r.path = filepath.Join(dir, filepath.Base(pkg))
		cmd := exec.Command("go", "build", "-trimpath", "-o", r.path, pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		r.out, r.err = cmd.CombinedOutput()
	})
	if r.err != nil {
		t.Fatalf("build %s: %v: %s", pkg, r.err, r.out)
	}
	return r.path
}
