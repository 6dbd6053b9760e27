package workload

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ModulePath is the Go module whose source holds the demo app.
const ModulePath = "github.com/hotctl/hot"

// FindSource returns the root of hot's source tree (the directory whose go.mod declares
// ModulePath) at or above dir.
func FindSource(dir string) (string, error) {
	d, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for {
		if isModuleRoot(d) {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", fmt.Errorf("no %s source tree (go.mod) at or above %s: run from a checkout of hot or pass --source", ModulePath, dir)
		}
		d = parent
	}
}

func isModuleRoot(dir string) bool {
	f, err := os.Open(filepath.Join(dir, "go.mod"))
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if mod, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "module "); ok {
			return strings.TrimSpace(mod) == ModulePath
		}
	}
	return false
}

// DemoRootfs builds the demo app (demo/app of the source tree at source) with the given
// version string into dir, a fresh root file system: /app, /etc/demo/version, /var/lib/demo
// and /tmp. extra files (path → content) are added, e.g. a file only the new version ships.
func DemoRootfs(ctx context.Context, source, dir, version string, extra map[string]string) error {
	for _, d := range []string{"etc/demo", "var/lib/demo", "tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return fmt.Errorf("demo rootfs %s: %w", version, err)
		}
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-X main.version="+version, "-o", filepath.Join(dir, "app"), "./demo/app")
	cmd.Dir = source
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("build demo app %s: the Go toolchain is needed (go not in PATH): %w", version, err)
		}
		return fmt.Errorf("build demo app %s in %s: %w\n%s", version, source, err, out)
	}
	files := map[string]string{"etc/demo/version": version + "\n"}
	for p, content := range extra {
		files[p] = content
	}
	for p, content := range files {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			return fmt.Errorf("demo rootfs %s: %w", version, err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			return fmt.Errorf("demo rootfs %s: %w", version, err)
		}
	}
	return nil
}
