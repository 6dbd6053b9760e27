package main

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func buildDemo(t *testing.T, out, ver string) {
	t.Helper()
	cmd := exec.Command("go", "build", "-ldflags", "-X main.version="+ver, "-o", out, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build demo %s: %v\n%s", ver, err, b)
	}
}

func get(t *testing.T, c net.Conn, br *bufio.Reader) string {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: demo\r\n\r\n"); err != nil {
		t.Fatalf("send: %v", err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	var sb strings.Builder
	bufio.NewReader(resp.Body).WriteTo(&sb)
	resp.Body.Close()
	return sb.String()
}

// TestReexecHandoff replaces the binary on disk, sends SIGHUP and checks that the same
// connection is answered by the new version with the counter continued and the PID kept.
func TestReexecHandoff(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the demo binary; skipped in -short mode")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "app")
	buildDemo(t, bin, "v1")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cmd := exec.Command(bin, "-listen", addr)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })

	var c net.Conn
	for i := 0; i < 100; i++ {
		if c, err = net.Dial("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("demo never listened: %v", err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	for i := 1; i <= 3; i++ {
		if got, want := get(t, c, br), fmt.Sprintf("demo v1 count=%d pid=%d\n", i, cmd.Process.Pid); got != want {
			t.Fatalf("request %d: got %q, want %q", i, got, want)
		}
	}
	v2 := filepath.Join(dir, "app.new")
	buildDemo(t, v2, "v2")
	if err := os.Rename(v2, bin); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	// The signal is asynchronous: keep asking on the same connection until v2 answers. Every
	// answer must continue the count and come from the same PID.
	count := 4
	for deadline := time.Now().Add(5 * time.Second); ; count++ {
		got := get(t, c, br)
		if want := fmt.Sprintf("demo v2 count=%d pid=%d\n", count, cmd.Process.Pid); got == want {
			break
		}
		if want := fmt.Sprintf("demo v1 count=%d pid=%d\n", count, cmd.Process.Pid); got != want || time.Now().After(deadline) {
			t.Fatalf("after SIGHUP on the same connection: got %q, want v1 or v2 with count=%d", got, count)
		}
	}
	// New connections reach the new binary too.
	c2, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("connect after handoff: %v", err)
	}
	defer c2.Close()
	if got := get(t, c2, bufio.NewReader(c2)); !strings.HasPrefix(got, fmt.Sprintf("demo v2 count=%d ", count+1)) {
		t.Fatalf("new connection after handoff: %q", got)
	}
}
