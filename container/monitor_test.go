package container

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMonitorOpsForRestore checks what a restore op relies on, in-process and without root:
// code that waits for its own children (as go-criu does for `criu swrk`) works while the
// reaper is held, StartProcess reports its child's status, and AdoptInit makes the monitor
// record an adopted process's exit in exit.json and answer `wait`.
func TestMonitorOpsForRestore(t *testing.T) {
	t.Cleanup(func() { unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) })
	// A run root deep enough that the socket path does not fit sun_path (108 bytes).
	dir := t.TempDir()
	deep := filepath.Join(dir, "run", strings.Repeat("d", 60), strings.Repeat("e", 40))
	o := MonitorOptions{Root: filepath.Join(dir, "root"), RunRoot: deep, ID: "m1", NoStart: true}
	p := paths{o.Root, o.RunRoot}
	if err := os.MkdirAll(p.dir(o.ID), 0o700); err != nil {
		t.Fatal(err)
	}
	o.Ops = map[string]OpFunc{
		"own-child": func(ctx context.Context, m *Monitor, req Request) Response {
			release := m.HoldReaper()
			defer release()
			// Like go-criu: start, let the child end, wait for it only later.
			cmd := exec.Command("sh", "-c", "exit 3")
			if err := cmd.Start(); err != nil {
				return Response{Error: err.Error()}
			}
			time.Sleep(300 * time.Millisecond)
			err := cmd.Wait()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 3 {
				return Response{Error: "own child: " + errString(err)}
			}
			return Response{}
		},
		"helper": func(ctx context.Context, m *Monitor, req Request) Response {
			_, done, err := m.StartProcess("/bin/sh", []string{"sh", "-c", "exit 4"}, &os.ProcAttr{})
			if err != nil {
				return Response{Error: err.Error()}
			}
			if ex := <-done; ex.Code != 4 {
				return Response{Error: "helper exit " + strconv.Itoa(ex.Code)}
			}
			return Response{}
		},
		"adopt": func(ctx context.Context, m *Monitor, req Request) Response {
			release := m.HoldReaper()
			defer release()
			cmd := exec.Command("sh", "-c", "sleep 0.3; exit 5")
			if err := cmd.Start(); err != nil {
				return Response{Error: err.Error()}
			}
			if err := m.AdoptInit(cmd.Process.Pid); err != nil {
				return Response{Error: err.Error()}
			}
			data, _ := json.Marshal(cmd.Process.Pid)
			return Response{Data: data}
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- RunMonitor(ctx, o) }()
	sock := p.socket(o.ID)
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 500 {
			t.Fatal("monitor socket did not appear")
		}
		time.Sleep(10 * time.Millisecond)
	}
	call := func(op string) *Response {
		t.Helper()
		r, err := callMonitor(ctx, sock, Request{Op: op})
		if err != nil {
			t.Fatalf("%s: %v", op, err)
		}
		return r
	}
	call("own-child")
	call("helper")
	r := call("adopt")
	var pid int
	json.Unmarshal(r.Data, &pid)
	if st := call(OpStatus).Status; st.Pid != pid || !st.Running {
		t.Errorf("status after adopt: %+v, want pid %d running", st, pid)
	}
	st := call(OpWait).Status
	if st.Running || st.Exit == nil || st.Exit.Code != 5 {
		t.Errorf("wait: %+v, want exit 5", st)
	}
	ex, err := p.loadExit(o.ID)
	if err != nil || ex == nil || ex.Code != 5 {
		t.Errorf("exit.json: %+v, %v", ex, err)
	}
	call(OpShutdown)
	if err := <-done; err != nil {
		t.Errorf("monitor: %v", err)
	}
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}
