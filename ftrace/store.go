package ftrace

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// DefaultRoot is where fixes are pinned unless the caller says otherwise.
const DefaultRoot = "/sys/fs/bpf/hot"

// Names of the pins inside a fix directory.
const (
	pinMeta   = "meta"   // array map holding the JSON metadata
	pinHits   = "hits"   // array map holding the hit counter
	pinLinkFm = "link%d" // one pinned bpf_link per program
)

// Manager applies, lists and removes fixes pinned under Root (one directory per fix).
type Manager struct {
	Root   string // a directory on a bpffs; DefaultRoot when empty
	Env    *Env   // pre-flight environment; nil reads the real system
	Logger *slog.Logger
}

// Fix is an applied fix as read back from its pins.
type Fix struct {
	Name    string       `json:"name"`
	Spec    string       `json:"spec"`
	Kind    string       `json:"kind"`
	Summary string       `json:"summary"`
	Applied time.Time    `json:"applied"`
	Hits    uint64       `json:"hits"`
	Healthy bool         `json:"healthy"` // every link is pinned and attached
	Links   []LinkStatus `json:"links"`
}

// LinkStatus is one pinned link of a fix and what the kernel says about it.
type LinkStatus struct {
	Pin       string    `json:"pin"`
	Mechanism Mechanism `json:"mechanism"`
	Target    string    `json:"target"`
	LinkType  string    `json:"link_type,omitempty"`
	LinkID    uint32    `json:"link_id,omitempty"`
	ProgramID uint32    `json:"program_id,omitempty"`
	CgroupID  uint64    `json:"cgroup_id,omitempty"`
	BTFID     uint32    `json:"target_btf_id,omitempty"`
	Error     string    `json:"error,omitempty"`
}

// Action says what Apply did.
type Action string

// Apply outcomes.
const (
	Applied   Action = "applied"   // a new fix was attached
	Replaced  Action = "replaced"  // a fix of that name with another spec was replaced
	Unchanged Action = "unchanged" // the same spec was already applied and healthy
)

// ApplyResult reports an Apply.
type ApplyResult struct {
	Action Action `json:"action"`
	Fix    Fix    `json:"fix"`
}

type meta struct {
	Version  int        `json:"version"`
	Name     string     `json:"name"`
	Spec     string     `json:"spec"`
	Kind     string     `json:"kind"`
	Summary  string     `json:"summary"`
	Applied  time.Time  `json:"applied"`
	Programs []metaProg `json:"programs"`
}

type metaProg struct {
	Pin       string    `json:"pin"`
	Mechanism Mechanism `json:"mechanism"`
	Target    string    `json:"target"`
}

var fixName = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)

// DefaultName is the name a fix gets without --name: its kind and a hash of its
// canonical spec, so applying the same spec twice finds the same fix.
func DefaultName(s Spec) string {
	sum := sha256.Sum256([]byte(s.String()))
	return s.Kind + "-" + hex.EncodeToString(sum[:4])
}

// ValidName checks a fix name.
func ValidName(name string) error {
	if !fixName.MatchString(name) {
		return fmt.Errorf("fix name %q: use 1-63 lower-case letters, digits, '-' or '_', starting with a letter or digit", name)
	}
	return nil
}

func (m *Manager) root() string {
	if m.Root == "" {
		return DefaultRoot
	}
	return m.Root
}

func (m *Manager) log() *slog.Logger {
	if m.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return m.Logger
}

// Apply runs the pre-flight checks of s, loads and attaches its programs, and pins them
// under Root/name. Nothing is loaded when the spec is bad. When a fix called name already
// exists with the same spec and is healthy, nothing changes; with another spec, the new
// programs are attached before the old ones are detached.
func (m *Manager) Apply(ctx context.Context, s Spec, name string) (ApplyResult, error) {
	if name == "" {
		name = DefaultName(s)
	}
	if err := ValidName(name); err != nil {
		return ApplyResult{}, err
	}
	plan, err := Prepare(m.Env, s)
	if err != nil {
		return ApplyResult{}, err
	}
	if err := ctx.Err(); err != nil {
		return ApplyResult{}, err
	}
	unlock, err := m.lock()
	if err != nil {
		return ApplyResult{}, err
	}
	defer unlock()
	m.cleanStale()

	dir := filepath.Join(m.root(), name)
	action := Applied
	if _, err := os.Stat(dir); err == nil {
		old, err := m.read(name)
		if err == nil && old.Spec == s.String() && old.Healthy {
			return ApplyResult{Action: Unchanged, Fix: old}, nil
		}
		action = Replaced
	}

	staging := filepath.Join(m.root(), fmt.Sprintf("_staging-%s-%d", name, os.Getpid()))
	if err := m.load(plan, name, staging); err != nil {
		if rerr := os.RemoveAll(staging); rerr != nil {
			m.log().Warn("remove staging dir", "dir", staging, "err", rerr)
		}
		return ApplyResult{}, fmt.Errorf("apply %s: %w", name, err)
	}
	if action == Replaced {
		// The new links are attached and pinned; now retire the old fix.
		old := filepath.Join(m.root(), fmt.Sprintf("_old-%s-%d", name, os.Getpid()))
		if err := os.Rename(dir, old); err != nil {
			os.RemoveAll(staging)
			return ApplyResult{}, fmt.Errorf("replace %s: move old fix aside: %w", name, err)
		}
		if err := os.Rename(staging, dir); err != nil {
			os.RemoveAll(staging)
			if rerr := os.Rename(old, dir); rerr != nil {
				m.log().Error("restore old fix", "name", name, "err", rerr)
			}
			return ApplyResult{}, fmt.Errorf("replace %s: %w", name, err)
		}
		if err := m.retire(old); err != nil {
			return ApplyResult{}, fmt.Errorf("replace %s: drop old fix: %w", name, err)
		}
	} else if err := os.Rename(staging, dir); err != nil {
		os.RemoveAll(staging)
		return ApplyResult{}, fmt.Errorf("apply %s: %w", name, err)
	}
	fix, err := m.read(name)
	if err != nil {
		return ApplyResult{}, fmt.Errorf("apply %s: read back: %w", name, err)
	}
	m.log().Info("fix applied", "name", name, "spec", fix.Spec, "action", action)
	return ApplyResult{Action: action, Fix: fix}, nil
}

// load loads and attaches the plan's programs and pins everything into dir. All file
// descriptors are closed on return; the pins keep the programs attached.
func (m *Manager) load(plan *Plan, name, dir string) error {
	if err := rlimit.RemoveMemlock(); err != nil {
		// Kernels >= 5.11 account BPF memory to the cgroup and need nothing here.
		m.log().Debug("raise RLIMIT_MEMLOCK", "err", err)
	}
	var closers []interface{ Close() error }
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	hits, err := ebpf.NewMap(&ebpf.MapSpec{Name: "hot_hits", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		return fmt.Errorf("create hit counter map: %w", err)
	}
	closers = append(closers, hits)

	md := meta{Version: 1, Name: name, Spec: plan.Spec.String(), Kind: plan.Spec.Kind, Summary: plan.Summary, Applied: time.Now().UTC()}
	var links []link.Link
	for i, pp := range plan.Programs {
		spec := pp.spec.Copy()
		if err := spec.Instructions.AssociateMap(hitsMapName, hits); err != nil {
			return fmt.Errorf("%s program: %w", pp.Mechanism, err)
		}
		prog, err := ebpf.NewProgram(spec)
		if err != nil {
			return kernelError(pp.Mechanism, pp.Target, "load", err)
		}
		closers = append(closers, prog)
		l, err := attach(pp, prog)
		if err != nil {
			return kernelError(pp.Mechanism, pp.Target, "attach", err)
		}
		closers = append(closers, l)
		links = append(links, l)
		md.Programs = append(md.Programs, metaProg{Pin: fmt.Sprintf(pinLinkFm, i), Mechanism: pp.Mechanism, Target: pp.Target})
	}

	blob, err := json.Marshal(md)
	if err != nil {
		return fmt.Errorf("encode metadata: %w", err)
	}
	metaMap, err := ebpf.NewMap(&ebpf.MapSpec{Name: "hot_meta", Type: ebpf.Array, KeySize: 4, ValueSize: uint32(len(blob)), MaxEntries: 1})
	if err != nil {
		return fmt.Errorf("create metadata map: %w", err)
	}
	closers = append(closers, metaMap)
	if err := metaMap.Update(uint32(0), blob, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write metadata map: %w", err)
	}
	if err := metaMap.Freeze(); err != nil {
		m.log().Debug("freeze metadata map", "err", err)
	}

	if err := os.Mkdir(dir, 0o700); err != nil {
		return fmt.Errorf("create pin dir: %w", err)
	}
	if err := hits.Pin(filepath.Join(dir, pinHits)); err != nil {
		return fmt.Errorf("pin hit counter: %w", err)
	}
	if err := metaMap.Pin(filepath.Join(dir, pinMeta)); err != nil {
		return fmt.Errorf("pin metadata: %w", err)
	}
	for i, l := range links {
		if err := l.Pin(filepath.Join(dir, md.Programs[i].Pin)); err != nil {
			return fmt.Errorf("pin %s link: %w (the kernel must support bpf_link for this attach type)", md.Programs[i].Mechanism, err)
		}
	}
	return nil
}

func attach(pp ProgramPlan, prog *ebpf.Program) (link.Link, error) {
	_, at := pp.Mechanism.kernelTypes()
	switch {
	case pp.Mechanism == MechLSM:
		return link.AttachLSM(link.LSMOptions{Program: prog})
	case pp.Mechanism.Trampoline():
		return link.AttachTracing(link.TracingOptions{Program: prog, AttachType: at})
	default:
		return link.AttachCgroup(link.CgroupOptions{Path: pp.Target, Attach: at, Program: prog})
	}
}

// List returns the fixes pinned under Root, sorted by name. A missing root means no fixes.
func (m *Manager) List(ctx context.Context) ([]Fix, error) {
	entries, err := os.ReadDir(m.root())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list fixes in %s: %w", m.root(), err)
	}
	var fixes []Fix
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), "_") {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		f, err := m.read(e.Name())
		if err != nil {
			f = Fix{Name: e.Name(), Links: []LinkStatus{{Error: err.Error()}}}
		}
		fixes = append(fixes, f)
	}
	return fixes, nil
}

// Get returns one fix.
func (m *Manager) Get(name string) (Fix, error) {
	if err := ValidName(name); err != nil {
		return Fix{}, err
	}
	if _, err := os.Stat(filepath.Join(m.root(), name)); err != nil {
		return Fix{}, fmt.Errorf("fix %s: %w (see 'hot hotfix list')", name, ErrNotFound)
	}
	return m.read(name)
}

// read reads a fix back from its pins.
func (m *Manager) read(name string) (Fix, error) {
	dir := filepath.Join(m.root(), name)
	md, err := readMeta(filepath.Join(dir, pinMeta))
	if err != nil {
		return Fix{}, fmt.Errorf("fix %s: %w", name, err)
	}
	f := Fix{Name: name, Spec: md.Spec, Kind: md.Kind, Summary: md.Summary, Applied: md.Applied, Healthy: true}
	if hm, err := ebpf.LoadPinnedMap(filepath.Join(dir, pinHits), nil); err == nil {
		if err := hm.Lookup(uint32(0), &f.Hits); err != nil {
			m.log().Debug("read hit counter", "fix", name, "err", err)
		}
		hm.Close()
	}
	for _, p := range md.Programs {
		ls := LinkStatus{Pin: p.Pin, Mechanism: p.Mechanism, Target: p.Target}
		if err := linkStatus(filepath.Join(dir, p.Pin), &ls); err != nil {
			ls.Error = err.Error()
			f.Healthy = false
		}
		f.Links = append(f.Links, ls)
	}
	return f, nil
}

func readMeta(path string) (meta, error) {
	mm, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return meta{}, fmt.Errorf("read metadata pin: %w", err)
	}
	defer mm.Close()
	blob := make([]byte, mm.ValueSize())
	if err := mm.Lookup(uint32(0), &blob); err != nil {
		return meta{}, fmt.Errorf("read metadata: %w", err)
	}
	var md meta
	if err := json.Unmarshal(blob, &md); err != nil {
		return meta{}, fmt.Errorf("decode metadata: %w", err)
	}
	return md, nil
}

func linkStatus(pin string, ls *LinkStatus) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return fmt.Errorf("load pinned link: %w", err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return fmt.Errorf("link info: %w", err)
	}
	ls.LinkID, ls.ProgramID = uint32(info.ID), uint32(info.Program)
	switch info.Type {
	case link.CgroupType:
		ls.LinkType = "cgroup"
		if c := info.Cgroup(); c != nil {
			ls.CgroupID = c.CgroupId
			if c.CgroupId == 0 {
				return errors.New("cgroup link is detached (its cgroup was removed)")
			}
		}
	case link.TracingType:
		ls.LinkType = "tracing"
		if t := info.Tracing(); t != nil {
			ls.BTFID = uint32(t.TargetBtfId)
		}
	default:
		ls.LinkType = fmt.Sprintf("type %d", info.Type)
	}
	return nil
}

// Remove detaches and unpins the fix called name.
func (m *Manager) Remove(ctx context.Context, name string) error {
	if err := ValidName(name); err != nil {
		return err
	}
	dir := filepath.Join(m.root(), name)
	if _, err := os.Stat(dir); err != nil {
		return fmt.Errorf("remove fix %s: %w (see 'hot hotfix list')", name, ErrNotFound)
	}
	unlock, err := m.lock()
	if err != nil {
		return err
	}
	defer unlock()
	if err := m.retire(dir); err != nil {
		return fmt.Errorf("remove fix %s: %w", name, err)
	}
	m.log().Info("fix removed", "name", name)
	return nil
}

// retire detaches the links of the fix pinned in dir, unpins everything, and waits until
// the kernel has released the links: the release of an unpinned link runs later from a
// kernel work queue, so without the wait a fix could still act for a moment after remove.
func (m *Manager) retire(dir string) error {
	var ids []link.ID
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "link") {
			continue
		}
		l, err := link.LoadPinnedLink(filepath.Join(dir, e.Name()), nil)
		if err != nil {
			m.log().Warn("load pinned link", "pin", filepath.Join(dir, e.Name()), "err", err)
			continue
		}
		if info, err := l.Info(); err == nil {
			ids = append(ids, info.ID)
		}
		// Detach takes effect at once where the kernel supports it (cgroup links do).
		if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
			m.log().Debug("detach link", "pin", e.Name(), "err", err)
		}
		l.Close()
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("unpin %s: %w", dir, err)
	}
	deadline := time.Now().Add(releaseTimeout)
	for _, id := range ids {
		for {
			l, err := link.NewFromID(id)
			if err != nil {
				break // released
			}
			l.Close()
			if time.Now().After(deadline) {
				return fmt.Errorf("link %d is still in the kernel %s after unpinning: another process holds a file descriptor to it (find it with 'bpftool link show id %d')", id, releaseTimeout, id)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return nil
}

// releaseTimeout bounds the wait for the kernel to release unpinned links.
const releaseTimeout = 5 * time.Second

// lock makes sure Root exists on a bpffs and takes an exclusive lock on it.
func (m *Manager) lock() (func(), error) {
	if err := ensureBPFFS(m.root()); err != nil {
		return nil, err
	}
	f, err := os.Open(m.root())
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", m.root(), err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", m.root(), err)
	}
	return func() { f.Close() }, nil
}

// cleanStale removes staging and retired directories a killed apply left behind.
func (m *Manager) cleanStale() {
	entries, _ := os.ReadDir(m.root())
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "_staging-") || strings.HasPrefix(e.Name(), "_old-") {
			p := filepath.Join(m.root(), e.Name())
			if err := os.RemoveAll(p); err != nil {
				m.log().Warn("remove stale fix dir", "dir", p, "err", err)
			}
		}
	}
}

// ensureBPFFS creates root on a bpf file system, mounting bpffs on /sys/fs/bpf when that
// is where root lives and nothing is mounted there yet.
func ensureBPFFS(root string) error {
	root = filepath.Clean(root)
	existing := root
	for {
		if _, err := os.Stat(existing); err == nil {
			break
		}
		parent := filepath.Dir(existing)
		if parent == existing {
			break
		}
		existing = parent
	}
	isBPF := func(p string) bool {
		var fs unix.Statfs_t
		return unix.Statfs(p, &fs) == nil && fs.Type == unix.BPF_FS_MAGIC
	}
	if rel, err := filepath.Rel(existing, root); err == nil && strings.Contains(rel, ".") && rel != "." {
		return fmt.Errorf("bpffs directory %s: bpffs refuses names containing '.', choose another --bpffs", root)
	}
	if !isBPF(existing) {
		if existing != "/sys/fs/bpf" {
			return fmt.Errorf("%s is not on a bpf file system: mount one first (mount -t bpf bpf %s)", root, existing)
		}
		if err := unix.Mount("bpf", existing, "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("mount bpffs on %s: %w", existing, err)
		}
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", root, err)
	}
	return nil
}
