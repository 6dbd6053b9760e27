package container

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/hotctl/hot/network"
	"github.com/opencontainers/go-digest"
)

// Status is what a container is doing, as reported to users.
type Status string

// Statuses. Only creating, running, paused, exited and checkpointed are ever written to state.json; unknown
// is the reconciled verdict when the facts on the host contradict the file (see Container.Reason).
const (
	StatusCreating Status = "creating" // `hot run` is setting it up
	StatusRunning  Status = "running"
	StatusPaused   Status = "paused" // cgroup frozen
	StatusExited   Status = "exited" // the init process ended; its status is in Exit
	// StatusCheckpointed: the processes were dumped by `hot checkpoint` and are gone; root
	// file system, network namespace (IP), cgroup and monitor are kept for `hot restore`.
	StatusCheckpointed Status = "checkpointed"
	StatusUnknown      Status = "unknown"
)

// ExitStatus is how the container's init process ended. The monitor writes it to exit.json.
type ExitStatus struct {
	Code     int       `json:"code"`             // exit code, or 128+signal when killed by a signal
	Signal   string    `json:"signal,omitempty"` // e.g. "killed" when ended by a signal
	Finished time.Time `json:"finished"`
}

// Generation is one root filesystem of the container: the image layers it stacks on, plus its
// own writable upper layer. `hot run` creates generation 1; a later `hot update` adds
// generation n+1 whose lower stack starts with generation n's upper (then read-only).
type Generation struct {
	N         int           `json:"n"`
	Image     string        `json:"image"`
	ImageID   digest.Digest `json:"imageId"`
	LowerDirs []string      `json:"lowerDirs"` // bottom first, as given to cowfs.MountOverlay
	Upper     string        `json:"upper"`
	Work      string        `json:"work"`
	// Published lists paths a hot update wrote into Upper on the image's behalf: files the
	// processes held open that the new image changed (see package update). Their copies equal
	// the image's own files, so the next update drops them instead of carrying them.
	Published []string `json:"published,omitempty"`
}

// NetworkState records how the container is attached, and which network configuration to use
// again when detaching it (bridge and subnet can differ per container, e.g. in tests).
type NetworkState struct {
	Mode      string                `json:"mode"` // "bridge" or "none"
	Bridge    string                `json:"bridge,omitempty"`
	Subnet    netip.Prefix          `json:"subnet,omitzero"`
	IP        netip.Addr            `json:"ip,omitzero"`
	Gateway   netip.Addr            `json:"gateway,omitzero"`
	HostVeth  string                `json:"hostVeth,omitempty"`
	NetnsPath string                `json:"netnsPath,omitempty"`
	Ports     []network.PortMapping `json:"ports,omitempty"`
}

// State is the persisted record of one container: <root>/containers/<id>/state.json. It is
// written atomically by the CLI while holding the container's lock. The monitor never writes
// it; it writes exit.json next to it, and readers merge both (see Manager.Get).
type State struct {
	ID            string        `json:"id"`
	Name          string        `json:"name"`
	Image         string        `json:"image"`
	ImageID       digest.Digest `json:"imageId"`
	Status        Status        `json:"status"`
	Created       time.Time     `json:"created"`
	Started       time.Time     `json:"started,omitzero"`
	Pid           int           `json:"pid,omitempty"`      // container init, host pid namespace
	PidStart      uint64        `json:"pidStart,omitempty"` // its start time (clock ticks), to detect pid reuse
	MonitorPid    int           `json:"monitorPid,omitempty"`
	MonitorStart  uint64        `json:"monitorStart,omitempty"`
	Current       int           `json:"current"` // generation mounted at Rootfs
	Generations   []Generation  `json:"generations"`
	Rootfs        string        `json:"rootfs"`
	Cgroup        string        `json:"cgroup"` // name given to cgroups.Create, "hot/<id>"
	Network       NetworkState  `json:"network"`
	Resources     Resources     `json:"resources"`
	ConfigVersion string        `json:"configVersion,omitempty"`
}

// Resources are the limits the container was created with.
type Resources struct {
	MemoryBytes int64 `json:"memoryBytes,omitempty"`
	PidsMax     int64 `json:"pidsMax,omitempty"`
}

// CurrentGeneration returns the generation mounted at the rootfs, or nil.
func (s *State) CurrentGeneration() *Generation {
	for i := range s.Generations {
		if s.Generations[i].N == s.Current {
			return &s.Generations[i]
		}
	}
	return nil
}

// paths knows where a container's files live. All per-container files are under Dir (state
// root, survives reboots) and RunDir (run root, tmpfs).
type paths struct{ root, runRoot string }

func (p paths) containersDir() string   { return filepath.Join(p.root, "containers") }
func (p paths) dir(id string) string    { return filepath.Join(p.root, "containers", id) }
func (p paths) runDir(id string) string { return filepath.Join(p.runRoot, id) }
func (p paths) state(id string) string  { return filepath.Join(p.dir(id), "state.json") }
func (p paths) exit(id string) string   { return filepath.Join(p.dir(id), "exit.json") }
func (p paths) config(id string) string { return filepath.Join(p.dir(id), "config.json") }
func (p paths) lock(id string) string   { return filepath.Join(p.dir(id), "lock") }
func (p paths) log(id string) string    { return filepath.Join(p.dir(id), "log") }
func (p paths) monLog(id string) string { return filepath.Join(p.dir(id), "monitor.log") }
func (p paths) rootfs(id string) string { return filepath.Join(p.dir(id), "rootfs") }
func (p paths) socket(id string) string { return filepath.Join(p.runDir(id), "monitor.sock") }
func (p paths) globalLock() string      { return filepath.Join(p.root, "containers", ".lock") }
func (p paths) genDir(id string, n int) string {
	return filepath.Join(p.dir(id), "generations", strconv.Itoa(n))
}

// writeFileAtomic writes data to path through a temporary file, fsync and rename, so readers
// see the old or the new content, never a torn one.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	return writeFileAtomicSync(path, data, perm, true)
}

// WriteJSONAtomicNoSync is WriteJSONAtomic without the fsyncs: the file is replaced
// atomically for every process on this machine (a killed writer leaves the old or the new
// content), but not durably across a power loss. For records written inside a container's
// pause, where each fsync adds to what clients wait for and a power loss ends the processes
// the record is about anyway.
func WriteJSONAtomicNoSync(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	return writeFileAtomicSync(path, append(b, '\n'), 0o600, false)
}

func writeFileAtomicSync(path string, data []byte, perm os.FileMode, sync bool) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	name := tmp.Name()
	_, werr := tmp.Write(data)
	if werr == nil {
		werr = tmp.Chmod(perm)
	}
	if werr == nil && sync {
		werr = tmp.Sync()
	}
	if cerr := tmp.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(name, path)
	}
	if werr != nil {
		os.Remove(name)
		return fmt.Errorf("write %s: %w", path, werr)
	}
	if !sync {
		return nil
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// WriteJSONAtomic writes v as indented JSON to path atomically (temp file, fsync, rename): the
// way every state file of a container is written, also by other packages (checkpoint.json).
func WriteJSONAtomic(path string, v any) error { return writeJSONAtomic(path, v) }

func writeJSONAtomic(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	return writeFileAtomic(path, append(b, '\n'), 0o600)
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("decode %s: %w", path, err)
	}
	return nil
}

func (p paths) loadState(id string) (*State, error) {
	var st State
	if err := readJSON(p.state(id), &st); err != nil {
		return nil, err
	}
	return &st, nil
}

func (p paths) saveState(st *State) error { return writeJSONAtomic(p.state(st.ID), st) }

func (p paths) loadExit(id string) (*ExitStatus, error) {
	var ex ExitStatus
	if err := readJSON(p.exit(id), &ex); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	return &ex, nil
}
