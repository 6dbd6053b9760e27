package restore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/cowfs"
	"github.com/hotctl/hot/criubin"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// ImportOptions configure Import.
type ImportOptions struct {
	CRIU    criubin.Binary
	Root    string // hot's state root (the image store lives there)
	RunRoot string // hot's runtime root (staging and images go there)
	Name    string // name of the new container; default: the archived one
	Lazy    bool
	// Bridge and Subnet select the network; default: the archived ones. The container asks
	// for its archived IP, so that clients' connections can resume.
	Bridge string
	Subnet netip.Prefix
	Logger *slog.Logger
}

// ErrImageMissing is matched by the error for an archive whose image is not in the store.
var ErrImageMissing = errors.New("image of the checkpoint not in the store")

// Import verifies a checkpoint archive (every member's checksum, before anything is created),
// recreates its container from the image (required by digest), the archived config.json and
// upper layer, with its archived IP, and restores it. If the restore itself fails, the new
// container stays "checkpointed" with its images, so 'hot restore NAME' can retry.
func Import(ctx context.Context, mgr *container.Manager, file string, o ImportOptions) (*ContainerResult, error) {
	if err := os.MkdirAll(o.RunRoot, 0o711); err != nil {
		return nil, fmt.Errorf("import: %w", err)
	}
	staging, err := os.MkdirTemp(o.RunRoot, ".import-")
	if err != nil {
		return nil, fmt.Errorf("import: %w", err)
	}
	defer os.RemoveAll(staging)
	m, err := checkpoint.ReadArchive(ctx, file, staging)
	if err != nil {
		return nil, err
	}
	if missing := m.CheckHost(); len(missing) > 0 {
		return nil, fmt.Errorf("import %s: this CPU lacks features the checkpointed processes may use: %s", file, strings.Join(missing, " "))
	}
	c, err := Recreate(ctx, mgr, m, staging, o)
	if err != nil {
		return nil, fmt.Errorf("import %s: %w", file, err)
	}
	return Container(ctx, mgr, c.ID, ContainerOptions{CRIU: o.CRIU, Lazy: o.Lazy, Logger: o.Logger})
}

// Recreate creates the container a verified archive describes (m, unpacked into staging by
// checkpoint.ReadArchive): from the image (required by digest), the archived config.json and
// upper layer, with its archived IP, and its images moved into place. The container is left
// "checkpointed", ready for Container; on failure, whatever was created stays for 'hot rm -f'
// (named in the error).
func Recreate(ctx context.Context, mgr *container.Manager, m *checkpoint.Manifest, staging string, o ImportOptions) (*container.Container, error) {
	store, err := cowfs.Open(o.Root)
	if err != nil {
		return nil, fmt.Errorf("open image store: %w", err)
	}
	if _, err := store.Resolve(ctx, m.Container.ImageID.String()); err != nil {
		return nil, fmt.Errorf("%w: %s (%s); import that image first ('hot image import') and retry: %v",
			ErrImageMissing, m.Container.ImageID, m.Container.Image, err)
	}
	var spec specs.Spec
	b, err := os.ReadFile(filepath.Join(staging, checkpoint.ConfigMember))
	if err == nil {
		err = json.Unmarshal(b, &spec)
	}
	if err != nil {
		return nil, fmt.Errorf("config.json: %w", err)
	}
	ro := container.RunOptions{
		Name:        o.Name,
		Image:       m.Container.ImageID.String(),
		Spec:        &spec,
		NoStart:     true,
		NetworkMode: m.Container.Network,
		Bridge:      o.Bridge,
		Subnet:      o.Subnet,
		Resources:   container.Resources{MemoryBytes: m.Container.Memory, PidsMax: m.Container.Pids},
		PrepareUpper: func(upper string) error {
			f, err := os.Open(filepath.Join(staging, checkpoint.UpperMember))
			if err != nil {
				return err
			}
			defer f.Close()
			return checkpoint.ExtractDirTar(f, upper)
		},
	}
	if ro.Name == "" {
		ro.Name = m.Container.Name
	}
	if ro.Bridge == "" {
		ro.Bridge = m.Container.Bridge
	}
	if !ro.Subnet.IsValid() && m.Container.Subnet != "" {
		ro.Subnet, _ = netip.ParsePrefix(m.Container.Subnet)
	}
	if m.Container.IP != "" {
		ro.IP, _ = netip.ParseAddr(m.Container.IP)
	}
	c, err := mgr.Run(ctx, ro)
	if err != nil {
		return nil, fmt.Errorf("create container: %w", err)
	}

	rec := m.Record
	rec.ImagesDir = filepath.Join(mgr.RunDir(c.ID), "checkpoint")
	rec.DefaultDir = true
	if err := os.Rename(filepath.Join(staging, strings.TrimSuffix(checkpoint.ImagesPrefix, "/")), rec.ImagesDir); err != nil {
		return nil, fmt.Errorf("move images: %w (remove the container with 'hot rm -f %s')", err, c.Name)
	}
	if err := container.WriteJSONAtomic(filepath.Join(mgr.Dir(c.ID), checkpoint.RecordFile), rec); err != nil {
		return nil, err
	}
	return c, nil
}
