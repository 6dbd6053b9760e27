package update

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func write(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

func whiteout(t *testing.T, path string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mknod(path, unix.S_IFCHR, 0); err != nil {
		t.Skipf("creating an overlay whiteout needs CAP_MKNOD (root): %v", err)
	}
}

func TestLayerLookup(t *testing.T) {
	d := t.TempDir()
	l1, l2, l3 := filepath.Join(d, "l1"), filepath.Join(d, "l2"), filepath.Join(d, "l3")
	write(t, l1+"/bin/app", "v1", 0o755)
	write(t, l1+"/etc/conf", "base", 0o644)
	write(t, l1+"/etc/gone", "x", 0o644)
	write(t, l1+"/opt/x/y", "hidden by opaque", 0o644)
	write(t, l2+"/bin/app", "v2", 0o755)
	write(t, l3+"/etc/conf", "mine", 0o644)
	whiteout(t, l3+"/etc/gone")
	if err := os.MkdirAll(l3+"/opt/x", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(l3+"/opt/x", "trusted.overlay.opaque", []byte("y"), 0); err != nil {
		t.Skipf("setting trusted.* xattrs needs root: %v", err)
	}
	stack := []string{l1, l2, l3}
	for _, tc := range []struct {
		path, want string
	}{
		{"/bin/app", l2 + "/bin/app"},
		{"/etc/conf", l3 + "/etc/conf"},
		{"/etc/gone", ""},
		{"/opt/x/y", ""},
		{"/nope", ""},
		{"/bin/app/sub", ""},
	} {
		got, ok, err := layerLookup(stack, tc.path)
		if err != nil {
			t.Fatalf("%s: %v", tc.path, err)
		}
		if !ok {
			got = ""
		}
		if got != tc.want {
			t.Errorf("layerLookup(%s) = %q, want %q", tc.path, got, tc.want)
		}
	}
}

func TestDiffStagePublish(t *testing.T) {
	d := t.TempDir()
	old, newL, oldUpper, newUpper, merged := d+"/old", d+"/new", d+"/oldupper", d+"/newupper", d+"/merged"
	write(t, old+"/bin/app", "binary v1", 0o755)
	write(t, old+"/lib/same.so", "shared", 0o644)
	write(t, old+"/lib/dropped.so", "bye", 0o644)
	write(t, old+"/etc/conf", "image conf", 0o644)
	write(t, newL+"/bin/app", "binary v2!", 0o755)
	write(t, newL+"/lib/same.so", "shared", 0o644)
	write(t, newL+"/etc/conf", "image conf v2", 0o644)
	write(t, oldUpper+"/etc/conf", "edited by the container", 0o644)
	for _, p := range []string{newUpper, merged} {
		os.MkdirAll(p, 0o755)
	}
	held := []HeldFile{{Path: "/bin/app", Exe: true}, {Path: "/lib/same.so"}, {Path: "/lib/dropped.so"}, {Path: "/etc/conf"}}
	oldStack := []string{old, oldUpper}
	newStack := []string{newL, oldUpper}
	changes, err := diffHeld(held, oldStack, newStack, nil)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range changes {
		got = append(got, c.Path)
	}
	if strings.Join(got, ",") != "/bin/app,/lib/dropped.so" {
		t.Fatalf("changed held files = %v, want /bin/app and /lib/dropped.so (conf is the container's own copy, same.so is identical)", got)
	}
	if !changes[1].Removed() {
		t.Error("/lib/dropped.so must be reported as removed in the new image")
	}
	if err := stageOld(changes, newUpper, newStack); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(newUpper + "/bin/app")
	if err != nil || string(b) != "binary v1" {
		t.Fatalf("staged /bin/app = %q, %v; want the running content", b, err)
	}
	if fi, _ := os.Stat(newUpper + "/bin/app"); fi.Mode().Perm() != 0o755 {
		t.Errorf("staged mode %v, want 0755", fi.Mode())
	}
	// Simulate the mounted new root by a plain directory holding the staged files.
	write(t, merged+"/bin/app", "binary v1", 0o755)
	write(t, merged+"/lib/dropped.so", "bye", 0o644)
	held1, _ := os.Open(merged + "/bin/app") // a "process" holding the old binary
	defer held1.Close()
	if err := publishNew(changes, merged, nil); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(merged + "/bin/app"); string(b) != "binary v2!" {
		t.Errorf("after publish /bin/app = %q, want the new binary", b)
	}
	if _, err := os.Stat(merged + "/lib/dropped.so"); !os.IsNotExist(err) {
		t.Errorf("dropped.so still present after publish: %v", err)
	}
	if b, _ := bufio.NewReader(held1).ReadString(0); b != "binary v1" {
		t.Errorf("a holder of the old binary now reads %q; it must keep the old inode", b)
	}
}

func TestParseRootMountID(t *testing.T) {
	info := `22 1 0:21 / / rw - ext4 /dev/vda rw
30 22 0:25 / /proc rw - proc proc rw
41 22 0:40 / / rw - overlay overlay rw,lowerdir=/a
`
	id, err := parseRootMountID(bufio.NewScanner(strings.NewReader(info)), "test")
	if err != nil || id != 41 {
		t.Fatalf("root mount id = %d, %v; want 41 (the last mount on /)", id, err)
	}
	if _, err := parseRootMountID(bufio.NewScanner(strings.NewReader("30 22 0:25 / /proc rw - proc proc rw\n")), "x"); err == nil {
		t.Fatal("want an error when nothing is mounted on /")
	}
}

func TestHeldFilesOfALiveProcess(t *testing.T) {
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Skipf("requires the sleep command: %v", err)
	}
	sleep, _ = filepath.EvalSymlinks(sleep)
	cmd := exec.Command(sleep, "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	var held []HeldFile
	for i := 0; i < 50; i++ { // wait for the exec to complete
		if held, err = heldFiles([]int{cmd.Process.Pid}); err != nil {
			t.Fatal(err)
		}
		if len(held) > 0 && held[0].PIDs[0] == cmd.Process.Pid {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	var exe *HeldFile
	for i := range held {
		if held[i].Exe {
			exe = &held[i]
		}
	}
	if exe == nil {
		t.Skipf("%s is not on the root mount here; nothing to check", sleep)
	}
	if exe.Path != sleep || !exe.Mapped {
		t.Errorf("exe entry = %+v, want %s mapped", *exe, sleep)
	}
}
