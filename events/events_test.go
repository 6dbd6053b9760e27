package events

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func fakeClock() func() time.Time {
	t := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	return func() time.Time { t = t.Add(5 * time.Millisecond); return t }
}

func TestRecorderSpansAndLog(t *testing.T) {
	log := filepath.Join(t.TempDir(), "events.jsonl")
	var js bytes.Buffer
	r := NewRecorder("update", "web", JSONLines{W: &js}, FileLog{Path: log})
	r.now = fakeClock()

	s := r.Start("freeze")
	s.End(nil, map[string]any{"tasks": 3})
	err := r.Start("dump").End(errors.New("criu: bad build-ID"), nil)
	if err == nil || err.Error() != "criu: bad build-ID" {
		t.Fatalf("End must return its error, got %v", err)
	}
	s.End(errors.New("ignored"), nil) // second End is a no-op

	got, err := ReadLog(log)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 4 {
		t.Fatalf("log has %d events, want 4: %+v", len(got), got)
	}
	if got[1].Phase != "freeze" || got[1].Status != OK || got[1].MS != 5 || got[1].Target != "web" || got[1].Op != "update" {
		t.Errorf("freeze end event = %+v", got[1])
	}
	if got[3].Status != Failed || !strings.Contains(got[3].Error, "bad build-ID") {
		t.Errorf("dump end event = %+v", got[3])
	}
	if n := strings.Count(js.String(), "\n"); n != 4 {
		t.Errorf("JSON lines sink wrote %d lines, want 4", n)
	}
	if len(r.Events()) != 4 {
		t.Errorf("history has %d events", len(r.Events()))
	}
	// A second operation appends to the same log; LastRun picks it alone.
	r2 := NewRecorder("rollback", "web", FileLog{Path: log})
	r2.run = "second"
	r2.Start("preflight").End(nil, nil)
	all, _ := ReadLog(log)
	last := LastRun(all)
	if len(all) != 6 || len(last) != 2 || last[0].Op != "rollback" {
		t.Errorf("LastRun = %+v (of %d events)", last, len(all))
	}
}

func TestReadLogIgnoresTornLine(t *testing.T) {
	log := filepath.Join(t.TempDir(), "events.jsonl")
	FileLog{Path: log}.Emit(Event{Phase: "a", Status: OK})
	appendRaw(t, log, `{"phase":"b","sta`)
	got, err := ReadLog(log)
	if err != nil || len(got) != 1 || got[0].Phase != "a" {
		t.Fatalf("ReadLog = %+v, %v", got, err)
	}
	if missing, err := ReadLog(filepath.Join(t.TempDir(), "nope")); err != nil || missing != nil {
		t.Fatalf("missing log: %v %v", missing, err)
	}
}

func TestProgressPlain(t *testing.T) {
	var out bytes.Buffer
	p := &Progress{W: &out}
	p.Emit(Event{Phase: "dump", Status: Started})
	p.Emit(Event{Phase: "dump", Status: OK, MS: 41.5, Details: map[string]any{"pages": 10, "bytes": 40960}})
	p.Emit(Event{Phase: "restore", Status: Failed, MS: 3, Error: "boom"})
	want := "✓ dump           41.5 ms  bytes=40960 pages=10\n✗ restore         3.0 ms  boom\n"
	if out.String() != want {
		t.Errorf("progress output:\n%q\nwant\n%q", out.String(), want)
	}
}

func appendRaw(t *testing.T, path, s string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
}
