package cowfs_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hotctl/hot/cowfs"
	"github.com/hotctl/hot/internal/testutil"
)

// hot runs the CLI against root and fails the test unless it exits with want.
func hot(t *testing.T, root string, want int, args ...string) testutil.Result {
	t.Helper()
	res := testutil.RunHot(t, 2*time.Minute, append([]string{"--root", root}, args...)...)
	if res.ExitCode != want {
		t.Fatalf("hot %s: exit %d, want %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), res.ExitCode, want, res.Stdout, res.Stderr)
	}
	return res
}

func TestCLIImportRootfsLsInspect(t *testing.T) {
	testutil.RequireRoot(t)
	root := filepath.Join(t.TempDir(), "root")
	rootfs := filepath.Join(t.TempDir(), "rootfs")
	if err := os.MkdirAll(filepath.Join(rootfs, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rootfs, "bin", "app"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	hot(t, root, 0, "image", "import", "--rootfs", rootfs, "--tag", "app:v1",
		"--entrypoint", "/bin/app", "--cmd", "serve", "--cmd", "--port=80", "--env", "MODE=prod", "--workdir", "/srv")

	var list []cowfs.Summary
	if err := json.Unmarshal([]byte(hot(t, root, 0, "image", "ls", "--json").Stdout), &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || len(list[0].Names) != 1 || list[0].Names[0] != "app:v1" || list[0].Size <= 0 {
		t.Fatalf("ls --json: %+v", list)
	}
	table := hot(t, root, 0, "image", "ls").Stdout
	if !strings.Contains(table, "app:v1") || !strings.Contains(table, list[0].ID.Encoded()[:12]) {
		t.Errorf("ls table lacks name or ID:\n%s", table)
	}

	var ins struct {
		ID         string   `json:"id"`
		Entrypoint []string `json:"entrypoint"`
		Cmd        []string `json:"cmd"`
		Env        []string `json:"env"`
		WorkingDir string   `json:"workingDir"`
		Layers     []struct {
			DiffID string `json:"diffID"`
		} `json:"layers"`
	}
	// Resolve by short ID works from the CLI too.
	out := hot(t, root, 0, "image", "inspect", "--json", list[0].ID.Encoded()[:12]).Stdout
	if err := json.Unmarshal([]byte(out), &ins); err != nil {
		t.Fatal(err)
	}
	if ins.ID != string(list[0].ID) || strings.Join(ins.Entrypoint, " ") != "/bin/app" ||
		strings.Join(ins.Cmd, " ") != "serve --port=80" || ins.WorkingDir != "/srv" ||
		!strings.Contains(strings.Join(ins.Env, " "), "MODE=prod") || len(ins.Layers) != 1 {
		t.Errorf("inspect: %s", out)
	}

	res := hot(t, root, 1, "image", "inspect", "nosuch:v9")
	if !strings.Contains(res.Stderr, "nosuch:v9") || !strings.Contains(res.Stderr, "hot image ls") {
		t.Errorf("unknown image error does not name it or the fix: %s", res.Stderr)
	}
	for _, bad := range [][]string{{"--tag", "Bad:Name"}, {"--env", "NOEQUALS"}, {"--workdir", "relative"}} {
		res = hot(t, root, 2, append([]string{"image", "import", "--rootfs", rootfs}, bad...)...)
		if !strings.Contains(res.Stderr, bad[0]) {
			t.Errorf("usage error for %v does not name the flag: %s", bad, res.Stderr)
		}
	}
	res = hot(t, root, 2, "image", "import", "--rootfs", rootfs, "extra-arg")
	if !strings.Contains(res.Stderr, "not both") {
		t.Errorf("usage error: %s", res.Stderr)
	}
}

func TestCLIRmExport(t *testing.T) {
	testutil.RequireRoot(t)
	root := filepath.Join(t.TempDir(), "root")
	rootfs := t.TempDir()
	if err := os.WriteFile(filepath.Join(rootfs, "f"), []byte("f"), 0o644); err != nil {
		t.Fatal(err)
	}
	hot(t, root, 0, "image", "import", "--rootfs", rootfs, "--tag", "app:v1")
	s, err := cowfs.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	img, err := s.Resolve(context.Background(), "app:v1")
	if err != nil {
		t.Fatal(err)
	}

	// Export and re-import into another store: same digests, same name.
	archive := filepath.Join(t.TempDir(), "app.tar")
	hot(t, root, 0, "image", "export", "app:v1", archive)
	root2 := filepath.Join(t.TempDir(), "root2")
	var ims []cowfs.Imported
	if err := json.Unmarshal([]byte(hot(t, root2, 0, "image", "import", archive, "--json").Stdout), &ims); err != nil {
		t.Fatal(err)
	}
	if len(ims) != 1 || ims[0].ManifestDigest != img.ManifestDigest || ims[0].ID != img.ID || ims[0].Names[0] != "app:v1" {
		t.Fatalf("re-import: %+v, want %s / %s", ims, img.ManifestDigest, img.ID)
	}

	if err := s.Hold(context.Background(), img.ID, "web-7"); err != nil {
		t.Fatal(err)
	}
	res := hot(t, root, 1, "image", "rm", "app:v1")
	if !strings.Contains(res.Stderr, "web-7") || !strings.Contains(res.Stderr, "in use") {
		t.Errorf("rm of a used image: %s", res.Stderr)
	}
	if err := s.Release(context.Background(), img.ID, "web-7"); err != nil {
		t.Fatal(err)
	}
	if out := hot(t, root, 0, "image", "rm", "app:v1").Stdout; !strings.Contains(out, "deleted "+string(img.ManifestDigest)) {
		t.Errorf("rm output: %s", out)
	}
	if out := hot(t, root, 0, "image", "ls", "--json").Stdout; strings.TrimSpace(out) != "[]" {
		t.Errorf("ls after rm: %s", out)
	}
	for _, d := range []string{"blobs/sha256", "layers", "layermeta"} {
		if entries, _ := os.ReadDir(filepath.Join(root, d)); len(entries) != 0 {
			t.Errorf("%s not emptied by rm: %d entries", d, len(entries))
		}
	}
}

// A SIGKILLed import leaves its staging behind; the next import removes it and the store
// shows no trace of the killed one.
func TestCLIKilledImportIsCleanedUp(t *testing.T) {
	testutil.RequireRoot(t)
	root := filepath.Join(t.TempDir(), "root")
	rootfs := t.TempDir()
	for i := 0; i < 1200; i++ {
		d := filepath.Join(rootfs, fmt.Sprintf("d%02d", i%50))
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, fmt.Sprintf("f%04d", i)), []byte(strings.Repeat("x", 4096)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(testutil.HotBinary(t), "--root", root, "image", "import", "--rootfs", rootfs, "--tag", "big:1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if entries, _ := os.ReadDir(filepath.Join(root, "tmp")); len(entries) > 0 {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			t.Fatal("import never started staging")
		}
		time.Sleep(2 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	cmd.Process.Kill()
	cmd.Wait()
	if entries, _ := os.ReadDir(filepath.Join(root, "tmp")); len(entries) == 0 {
		t.Skip("requires the import to still be running when killed (here it finished first: the machine was fast enough to stage and commit it in 100 ms); nothing to clean")
	}

	small := t.TempDir()
	if err := os.WriteFile(filepath.Join(small, "f"), []byte("f"), 0o644); err != nil {
		t.Fatal(err)
	}
	hot(t, root, 0, "image", "import", "--rootfs", small, "--tag", "small:1")
	if entries, _ := os.ReadDir(filepath.Join(root, "tmp")); len(entries) != 0 {
		t.Errorf("staging of the killed import still there: %v", entries)
	}
	var list []cowfs.Summary
	if err := json.Unmarshal([]byte(hot(t, root, 0, "image", "ls", "--json").Stdout), &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Names[0] != "small:1" {
		t.Errorf("images after a killed import: %+v", list)
	}
	if layers, _ := os.ReadDir(filepath.Join(root, "layers")); len(layers) != 1 {
		t.Errorf("%d layer dirs, want 1 (the killed import's layer must not appear)", len(layers))
	}
}
