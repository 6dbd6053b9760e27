package restore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/container"
)

// GateOp is the monitor operation that runs a checkpoint.PageGate for a post-copy restore in
// the container's monitor: the gate then outlives the hot process that drives the update.
// If that process dies, the lazy-pages daemon's connection stays open (the copy's page
// faults wait instead of being filled with zeros), and whoever recovers the update decides:
// abort (CRIU resumes the originals) or commit (CRIU ends the dump).
const GateOp = "pagegate"

type gateArgs struct {
	Step     string `json:"step"` // start, wait, commit, abort
	Upstream string `json:"upstream,omitempty"`
}

type gateAnswer struct {
	Addr string `json:"addr,omitempty"`
}

// NewGateOp returns the monitor operation GateOp (one gate per container at a time).
func NewGateOp() container.OpFunc {
	op := &gateOp{}
	return op.handle
}

type gateOp struct {
	mu   sync.Mutex
	gate *checkpoint.PageGate
}

func (op *gateOp) current() *checkpoint.PageGate {
	op.mu.Lock()
	defer op.mu.Unlock()
	return op.gate
}

func (op *gateOp) handle(ctx context.Context, _ *container.Monitor, req container.Request) container.Response {
	var a gateArgs
	if err := json.Unmarshal(req.Args, &a); err != nil {
		return fail("page gate: bad arguments: %v", err)
	}
	if a.Step == "start" {
		op.mu.Lock()
		defer op.mu.Unlock()
		if op.gate != nil {
			op.gate.Abort()
		}
		g, err := checkpoint.NewPageGate(a.Upstream)
		if err != nil {
			return fail("%v", err)
		}
		op.gate = g
		data, _ := json.Marshal(gateAnswer{Addr: g.Addr()})
		return container.Response{Data: data}
	}
	g := op.current()
	if g == nil {
		return fail("page gate: %s: no gate", a.Step)
	}
	switch a.Step {
	case "wait":
		for {
			select {
			case <-g.AllIn():
				return container.Response{}
			case <-ctx.Done():
				return fail("page gate: monitor shutting down")
			case <-time.After(50 * time.Millisecond):
				if op.current() != g {
					return fail("page gate: transfer ended before every page was in")
				}
			}
		}
	case "commit":
		op.clear(g)
		if err := g.Commit(time.Minute); err != nil {
			return fail("%v", err)
		}
		return container.Response{}
	case "abort":
		op.clear(g)
		g.Abort()
		return container.Response{}
	}
	return fail("page gate: unknown step %q", a.Step)
}

func (op *gateOp) clear(g *checkpoint.PageGate) {
	op.mu.Lock()
	if op.gate == g {
		op.gate = nil
	}
	op.mu.Unlock()
}

// ErrNoGate is matched by the error of a gate step when the monitor runs no gate.
var ErrNoGate = errors.New("no gate")

// MonitorGate is a PageGate run by a container's monitor (GateOp).
type MonitorGate struct {
	mgr  *container.Manager
	id   string
	Addr string // where the lazy-pages daemon connects
}

// StartGate starts a gate in the monitor of container id towards the page server upstream.
func StartGate(ctx context.Context, mgr *container.Manager, id, upstream string) (*MonitorGate, error) {
	resp, err := callGate(ctx, mgr, id, gateArgs{Step: "start", Upstream: upstream})
	if err != nil {
		return nil, err
	}
	var a gateAnswer
	if err := json.Unmarshal(resp.Data, &a); err != nil {
		return nil, fmt.Errorf("page gate: read monitor answer: %w", err)
	}
	return &MonitorGate{mgr: mgr, id: id, Addr: a.Addr}, nil
}

// WaitAllIn returns once the lazy-pages daemon has pulled every page and asks to close.
func (g *MonitorGate) WaitAllIn(ctx context.Context) error {
	_, err := callGate(ctx, g.mgr, g.id, gateArgs{Step: "wait"})
	return err
}

// Commit forwards the close: CRIU ends the dump, the original processes go.
func (g *MonitorGate) Commit(ctx context.Context) error { return GateStep(ctx, g.mgr, g.id, "commit") }

// Abort fails the transfer: CRIU resumes the original processes.
func (g *MonitorGate) Abort(ctx context.Context) error { return GateStep(ctx, g.mgr, g.id, "abort") }

// GateStep sends step (commit or abort) to the gate of container id's monitor; an error
// matching ErrNoGate says it runs none (e.g. for a recovery after the monitor restarted).
func GateStep(ctx context.Context, mgr *container.Manager, id, step string) error {
	_, err := callGate(ctx, mgr, id, gateArgs{Step: step})
	return err
}

func callGate(ctx context.Context, mgr *container.Manager, id string, a gateArgs) (*container.Response, error) {
	raw, _ := json.Marshal(a)
	resp, err := mgr.CallMonitor(ctx, id, container.Request{Op: GateOp, Args: raw})
	if err != nil {
		if strings.Contains(err.Error(), ": no gate") {
			return nil, fmt.Errorf("page gate %s: %w", a.Step, ErrNoGate)
		}
		return nil, fmt.Errorf("page gate %s: %w", a.Step, err)
	}
	return resp, nil
}
