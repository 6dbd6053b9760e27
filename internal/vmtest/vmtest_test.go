package vmtest

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriteCPIOListsWithCpioTool(t *testing.T) {
	cpio, err := exec.LookPath("cpio")
	if err != nil {
		t.Skip("requires the cpio tool (Debian package cpio, installed by `make deps`)")
	}
	src := filepath.Join(t.TempDir(), "payload")
	if err := os.WriteFile(src, []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	err = writeCPIO(&buf, []cpioEntry{
		{name: "dev/console", mode: modeChr | 0o600, devMajor: 5, devMinor: 1},
		{name: "/a/b/c.txt", mode: modeReg | 0o644, src: src},
		{name: "bin/sh", mode: modeLink | 0o777, data: []byte("busybox")},
	})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(cpio, "-itv", "--quiet")
	cmd.Stdin = &buf
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -it: %v\n%s", err, out)
	}
	listing := string(out)
	for _, want := range []string{"dev\n", "dev/console\n", "a\n", "a/b\n", "a/b/c.txt\n", "bin/sh -> busybox\n"} {
		if !strings.Contains(listing, " "+want) {
			t.Errorf("listing lacks %q:\n%s", want, listing)
		}
	}
	if !strings.Contains(listing, "crw-------") || !strings.Contains(listing, "5,") {
		t.Errorf("dev/console is not char device 5,1:\n%s", listing)
	}
	// Parents come before children, or the kernel cannot create the files.
	if strings.Index(listing, " a/b\n") > strings.Index(listing, " a/b/c.txt\n") {
		t.Errorf("a/b listed after a/b/c.txt:\n%s", listing)
	}
}

// TestRunReportsGuestStatus boots the cached kernel once and checks that the guest's exit
// status, files and console come back.
func TestRunReportsGuestStatus(t *testing.T) {
	k := Require(t, false)
	payload := filepath.Join(t.TempDir(), "payload.txt")
	if err := os.WriteFile(payload, []byte("payload-ok\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	res, err := Run(context.Background(), Config{
		Kernel: k.Image,
		Files:  []File{{Src: payload, Dst: "/data/payload.txt"}},
		Script: "cat /data/payload.txt\nuname -r\ntest -d /sys/kernel\nexit 42\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("boot and run: %s", res.Duration.Round(100e6))
	if res.Status != 42 {
		t.Errorf("status = %d, want 42; console:\n%s", res.Status, res.Console)
	}
	for _, want := range []string{"payload-ok", k.Release} {
		if !strings.Contains(res.Console, want) {
			t.Errorf("console lacks %q:\n%s", want, res.Console)
		}
	}
}
