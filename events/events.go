package events

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"time"
)

// Status of an event.
const (
	Started = "started"
	OK      = "ok"
	Failed  = "failed"
	Info    = "info"
)

// Event is one record of the stream. Durations are milliseconds so JSON stays readable.
type Event struct {
	Time    time.Time      `json:"time"`
	Run     string         `json:"run,omitempty"`   // identifies one operation: all its events share it
	Op      string         `json:"op"`              // update, checkpoint, restore, migrate
	Target  string         `json:"target"`          // container name
	Phase   string         `json:"phase"`           // preflight, freeze, dump, ...
	Status  string         `json:"status"`          // started, ok, failed, info
	MS      float64        `json:"ms,omitempty"`    // duration of the phase (ok/failed)
	Error   string         `json:"error,omitempty"` // failure cause
	Details map[string]any `json:"details,omitempty"`
}

// Sink receives events. Implementations must be safe for use by one goroutine at a time;
// the Recorder serializes calls.
type Sink interface {
	Emit(Event) error
}

// Recorder stamps and fans out events to its sinks.
type Recorder struct {
	op, target string
	run        string
	mu         sync.Mutex
	sinks      []Sink
	now        func() time.Time
	history    []Event
}

// NewRecorder returns a recorder for one operation on one target.
func NewRecorder(op, target string, sinks ...Sink) *Recorder {
	now := time.Now()
	run := fmt.Sprintf("%s-%d", now.UTC().Format("20060102T150405.000000"), os.Getpid())
	return &Recorder{op: op, target: target, run: run, sinks: sinks, now: time.Now}
}

// LastRun returns the events of the most recent operation in evs (those sharing the last
// event's Run), e.g. the latest update of a container for `hot inspect`.
func LastRun(evs []Event) []Event {
	if len(evs) == 0 {
		return nil
	}
	run := evs[len(evs)-1].Run
	var out []Event
	for _, e := range evs {
		if e.Run == run {
			out = append(out, e)
		}
	}
	return out
}

// Events returns a copy of everything recorded so far.
func (r *Recorder) Events() []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Event(nil), r.history...)
}

func (r *Recorder) emit(e Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e.Op, e.Target, e.Run = r.op, r.target, r.run
	if e.Time.IsZero() {
		e.Time = r.now()
	}
	r.history = append(r.history, e)
	for _, s := range r.sinks {
		// A broken sink (closed terminal, full disk) must not break the operation it reports.
		_ = s.Emit(e)
	}
}

// Note records an informational event outside any phase.
func (r *Recorder) Note(phase string, details map[string]any) {
	r.emit(Event{Phase: phase, Status: Info, Details: details})
}

// Span is a running phase.
type Span struct {
	r     *Recorder
	phase string
	start time.Time
	done  bool
}

// Start records the start of a phase.
func (r *Recorder) Start(phase string) *Span {
	s := &Span{r: r, phase: phase, start: r.now()}
	r.emit(Event{Time: s.start, Phase: phase, Status: Started})
	return s
}

// End records the end of the phase: ok when err is nil, failed otherwise. It returns err so
// callers can write `return span.End(err, nil)`. Only the first End counts.
func (s *Span) End(err error, details map[string]any) error {
	if s.done {
		return err
	}
	s.done = true
	end := s.r.now()
	e := Event{Time: end, Phase: s.phase, Status: OK, MS: ms(end.Sub(s.start)), Details: details}
	if err != nil {
		e.Status, e.Error = Failed, err.Error()
	}
	s.r.emit(e)
	return err
}

// Elapsed is the time since the phase started.
func (s *Span) Elapsed() time.Duration { return s.r.now().Sub(s.start) }

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// JSONLines writes one JSON object per line.
type JSONLines struct{ W io.Writer }

// Emit implements Sink.
func (j JSONLines) Emit(e Event) error {
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	_, err = j.W.Write(append(b, '\n'))
	return err
}

// FileLog appends JSON lines to a file, creating it if needed. Each event is written with a
// single write call so concurrent readers see whole lines.
type FileLog struct{ Path string }

// Emit implements Sink.
func (f FileLog) Emit(e Event) error {
	file, err := os.OpenFile(f.Path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("open event log %s: %w", f.Path, err)
	}
	if err := (JSONLines{W: file}).Emit(e); err != nil {
		file.Close()
		return fmt.Errorf("append to event log %s: %w", f.Path, err)
	}
	return file.Close()
}

// ReadLog reads an event log written by FileLog. A torn last line (crash mid-write) is ignored.
func ReadLog(path string) ([]Event, error) {
	file, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("open event log %s: %w", path, err)
	}
	defer file.Close()
	var out []Event
	sc := bufio.NewScanner(file)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		var e Event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			continue
		}
		out = append(out, e)
	}
	if err := sc.Err(); err != nil {
		return out, fmt.Errorf("read event log %s: %w", path, err)
	}
	return out, nil
}

// Progress renders events for a human: a line per finished phase with its duration, and,
// when the writer is a terminal, a live "phase…" line while a phase runs.
type Progress struct {
	W        io.Writer
	Terminal bool
	pending  bool
}

// Emit implements Sink.
func (p *Progress) Emit(e Event) error {
	clear := ""
	if p.Terminal && p.pending {
		clear = "\r\033[K"
	}
	var err error
	switch e.Status {
	case Started:
		if p.Terminal {
			_, err = fmt.Fprintf(p.W, "%s  %-10s …", clear, e.Phase)
			p.pending = true
			return err
		}
		return nil
	case OK:
		_, err = fmt.Fprintf(p.W, "%s✓ %-10s %8.1f ms%s\n", clear, e.Phase, e.MS, summarize(e.Details))
	case Failed:
		_, err = fmt.Fprintf(p.W, "%s✗ %-10s %8.1f ms  %s\n", clear, e.Phase, e.MS, e.Error)
	case Info:
		_, err = fmt.Fprintf(p.W, "%s· %-10s%s\n", clear, e.Phase, summarize(e.Details))
	}
	p.pending = false
	return err
}

func summarize(d map[string]any) string {
	if len(d) == 0 {
		return ""
	}
	keys := make([]string, 0, len(d))
	for k := range d {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	s := " "
	for _, k := range keys {
		s += fmt.Sprintf(" %s=%v", k, d[k])
	}
	return s
}

// IsTerminal reports whether f is a terminal (for choosing Progress.Terminal).
func IsTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
