package testutil

import (
	"context"
	"testing"

	"github.com/hotctl/hot/bench/workload"
)

// DemoRootfs builds the demo app (demo/app) with the given version string into a fresh root
// file system directory (see workload.DemoRootfs). extra files (path → content) are added, e.g.
// a file only the new version ships.
func DemoRootfs(t testing.TB, version string, extra map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	if err := workload.DemoRootfs(context.Background(), ModuleRoot(t), dir, version, extra); err != nil {
		t.Fatal(err)
	}
	return dir
}
