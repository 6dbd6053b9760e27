package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// DemoRootfs builds the demo app (demo/app) with the given version string into a fresh root
// file system directory: /app, /etc/demo/version, /var/lib/demo and /tmp. extra files
// (path → content) are added, e.g. a file only the new version ships.
func DemoRootfs(t testing.TB, version string, extra map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{"etc/demo", "var/lib/demo", "tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-X main.version="+version, "-o", filepath.Join(dir, "app"), "./demo/app")
	cmd.Dir = ModuleRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build demo app %s: %v\n%s", version, err, out)
	}
	extra = mergeMap(map[string]string{"etc/demo/version": version + "\n"}, extra)
	for p, content := range extra {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func mergeMap(a, b map[string]string) map[string]string {
	for k, v := range b {
		a[k] = v
	}
	return a
}
