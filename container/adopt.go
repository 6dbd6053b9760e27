package container

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/hotctl/hot/cgroups"
	"github.com/hotctl/hot/cowfs"
	"github.com/hotctl/hot/network"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// AdoptOptions describe a container that arrives from elsewhere (a live migration): its
// processes are in CRIU images, its files are an image of this host's store plus an upper
// directory already unpacked on this host.
type AdoptOptions struct {
	Name       string
	Image      string        // the image's name, as the sender knew it
	ImageID    digest.Digest // the image, which must be in this host's store
	Generation int           // generation number to keep (the sender's current one)
	// UpperDir is moved (renamed) into the new container's generation; it must be on the
	// same file system as the state root.
	UpperDir string
	// ExtraLowers are directories (bottom first) stacked between the image's layers and the
	// upper; they are moved into the container's directory like UpperDir.
	ExtraLowers []string
	Spec        *specs.Spec // the sender's config.json; paths are rewritten for this host
	Network     NetworkState
	Resources   Resources
}

// Adopt creates a container from o in the "checkpointed" state: a new id, its generation
// directory holding o.UpperDir, the overlay root mounted over the image's layers, the network
// namespace with o.Network.IP (network.Attach), its cgroup, its config.json and a monitor
// without an init (ready for a restore). Then fn runs with the container's lock held, e.g. to
// restore the processes; the state is saved after fn. If any step or fn fails, everything is
// removed again (as 'hot rm -f' would) and the error returned.
func (m *Manager) Adopt(ctx context.Context, o AdoptOptions, fn func(st *State) error) (*Container, error) {
	if err := ValidateName(o.Name); err != nil {
		return nil, err
	}
	if o.Spec == nil || o.Spec.Linux == nil {
		return nil, fmt.Errorf("adopt %s: no linux runtime config", o.Name)
	}
	store, err := cowfs.Open(m.p.root)
	if err != nil {
		return nil, fmt.Errorf("open image store: %w", err)
	}
	img, err := store.Resolve(ctx, o.ImageID.String())
	if err != nil {
		return nil, fmt.Errorf("adopt %s: %w", o.Name, err)
	}
	id := newID()
	n := o.Generation
	if n <= 0 {
		n = 1
	}
	gen := Generation{N: n, Image: o.Image, ImageID: img.ID, LowerDirs: append([]string(nil), img.LayerDirs...),
		Upper: m.p.genDir(id, n) + "/upper", Work: m.p.genDir(id, n) + "/work"}
	st := &State{ID: id, Name: o.Name, Image: o.Image, ImageID: img.ID, Status: StatusCreating,
		Created: time.Now().UTC(), Current: n, Rootfs: m.p.rootfs(id), Cgroup: "hot/" + id,
		Resources: o.Resources, Network: NetworkState{Mode: o.Network.Mode, Bridge: o.Network.Bridge, Subnet: o.Network.Subnet}}

	glock, err := lockFile(ctx, m.p.globalLock())
	if err != nil {
		return nil, err
	}
	if other := m.findByName(o.Name); other != nil {
		glock.Unlock()
		return nil, fmt.Errorf("name %q is already used by container %s on this host: remove it ('hot rm -f %s') or migrate another container", o.Name, other.ID[:12], o.Name)
	}
	if err := os.MkdirAll(m.p.genDir(id, n), 0o700); err != nil {
		glock.Unlock()
		return nil, fmt.Errorf("create container dir: %w", err)
	}
	st.Generations = []Generation{gen}
	lk, err := lockFile(ctx, m.p.lock(id))
	if err == nil {
		err = m.p.saveState(st)
	}
	glock.Unlock()
	if err != nil {
		os.RemoveAll(m.p.dir(id))
		return nil, err
	}
	defer lk.Unlock()

	err = m.adopt(ctx, st, store, img.ID, o)
	if err == nil {
		err = fn(st)
	}
	if err == nil {
		err = m.p.saveState(st)
	}
	if err != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if cerr := m.cleanup(cctx, st); cerr != nil {
			m.log.Error("undo adopted container", "id", id, "err", cerr)
			return nil, fmt.Errorf("%w (cleaning up also failed: %v; retry with 'hot rm -f %s')", err, cerr, o.Name)
		}
		return nil, err
	}
	return m.view(st, true), nil
}

// adopt does the steps of Adopt after the state exists; cleanup undoes any prefix of them.
func (m *Manager) adopt(ctx context.Context, st *State, store *cowfs.Store, imageID digest.Digest, o AdoptOptions) error {
	gen := &st.Generations[0]
	if err := store.Hold(ctx, imageID, st.ID); err != nil {
		return fmt.Errorf("hold image %s for %s: %w", o.Image, st.Name, err)
	}
	for i, d := range o.ExtraLowers {
		dst := fmt.Sprintf("%s/lower-%d", m.p.genDir(st.ID, gen.N), i)
		if err := os.Rename(d, dst); err != nil {
			return fmt.Errorf("move layer %s into container %s: %w", d, st.Name, err)
		}
		gen.LowerDirs = append(gen.LowerDirs, dst)
	}
	if err := os.Rename(o.UpperDir, gen.Upper); err != nil {
		return fmt.Errorf("move upper layer %s into container %s: %w", o.UpperDir, st.Name, err)
	}
	for _, d := range []string{gen.Work, st.Rootfs} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	if err := m.p.saveState(st); err != nil {
		return err
	}
	if err := cowfs.MountOverlay(st.Rootfs, gen.LowerDirs, gen.Upper, gen.Work); err != nil {
		return fmt.Errorf("mount root file system of %s: %w", st.Name, err)
	}
	spec := o.Spec
	spec.Root = &specs.Root{Path: st.Rootfs}
	spec.Linux.CgroupsPath = st.Cgroup
	if st.Network.Mode == "bridge" {
		nw, err := network.New(m.networkConfig(st))
		if err != nil {
			return fmt.Errorf("network: %w", err)
		}
		att, err := nw.Attach(ctx, st.ID, network.AttachRequest{IP: o.Network.IP, Ports: o.Network.Ports})
		if err != nil {
			return fmt.Errorf("attach %s to network %s with address %s: %w", st.Name, st.Network.Bridge, o.Network.IP, err)
		}
		st.Network.IP, st.Network.Gateway, st.Network.HostVeth = att.IP, att.Gateway, att.HostVeth
		st.Network.NetnsPath, st.Network.Ports = att.NetnsPath, att.Ports
		if att.Prefix.IsValid() {
			st.Network.Subnet = att.Prefix.Masked()
		}
		setNetnsPath(spec, att.NetnsPath)
	}
	if err := m.p.saveState(st); err != nil {
		return err
	}
	if _, err := cgroups.Create(ctx, st.Cgroup, cgroups.Resources{MemoryBytes: st.Resources.MemoryBytes, PidsMax: st.Resources.PidsMax}); err != nil {
		return fmt.Errorf("create cgroup %s: %w", st.Cgroup, err)
	}
	if err := writeJSONAtomic(m.p.config(st.ID), spec); err != nil {
		return err
	}
	if err := m.startMonitor(ctx, st, true); err != nil {
		return err
	}
	st.Status = StatusCheckpointed
	return m.p.saveState(st)
}
