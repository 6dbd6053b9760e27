package checkpoint

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hotctl/hot/cgroups"
	"github.com/hotctl/hot/container"
	"github.com/hotctl/hot/criubin"
)

// RecordFile is the name of the checkpoint record in a container's state directory.
const RecordFile = "checkpoint.json"

// Record describes a container's latest checkpoint: where its images are and what restore
// must hand back to CRIU. It is written to <root>/containers/<id>/checkpoint.json.
type Record struct {
	ImagesDir    string         `json:"imagesDir"`
	DefaultDir   bool           `json:"defaultDir"` // images in <run-root>/<id>/checkpoint (removed after restore)
	Created      time.Time      `json:"created"`
	LeaveRunning bool           `json:"leaveRunning"`
	CRIUVersion  string         `json:"criuVersion"`
	NetnsKey     string         `json:"netnsKey,omitempty"`
	Externals    []ExternalFile `json:"externals,omitempty"`
	Stats        DumpStats      `json:"stats"`
}

// ExternalFile is a file the container's processes hold whose other side is not in the dump.
// Kind "file": a file on a mount that is not the container's (CRIU records it under Key,
// file[MNT_ID:INODE], and restore passes a fresh descriptor of Path opened with Flags).
// Kind "output": the pipe of the container's stdout/stderr that the monitor reads (Key
// pipe:[INODE]); restore passes the write end of a new monitor pipe.
type ExternalFile struct {
	Kind  string `json:"kind"`
	Key   string `json:"key"`
	Path  string `json:"path,omitempty"`
	Flags int    `json:"flags,omitempty"`
}

// Kinds of ExternalFile.
const (
	ExternalFileOnHost = "file"
	ExternalOutputPipe = "output"
)

// ContainerOptions configure Container.
type ContainerOptions struct {
	CRIU         criubin.Binary
	LeaveRunning bool
	ImagesDir    string // default <run-root>/<id>/checkpoint
	Failpoint    string // tests only (see DumpOptions.Failpoint)
	// PageServer makes a lazy dump served from there (see DumpOptions.PageServer).
	PageServer string
	// NetworkLock is passed to CRIU (see DumpOptions.NetworkLock); "skip" when the caller holds
	// the container's packets itself (package sockets).
	NetworkLock string
	// BeforeFreeze is called right before the container is frozen (see DumpOptions).
	BeforeFreeze func()
	Logger       *slog.Logger
	// Export writes a checkpoint archive (see WriteArchive) to this file after the dump.
	Export string
	Zstd   bool
	// afterDump (StartLazyDump) is called once CRIU wrote every image (see DumpOptions.AfterDump).
	afterDump func()
}

// ContainerResult is what Container did.
type ContainerResult struct {
	ID           string        `json:"id"`
	Name         string        `json:"name"`
	ImagesDir    string        `json:"imagesDir"`
	LeaveRunning bool          `json:"leaveRunning"`
	Stats        DumpStats     `json:"stats"`
	Export       string        `json:"export,omitempty"`
	ExportBytes  int64         `json:"exportBytes,omitempty"`
	ExportTime   time.Duration `json:"exportNs,omitempty"`
}

// ErrNotRunning is matched by the error for a container that cannot be checkpointed now.
var ErrNotRunning = errors.New("container not running")

// Container checkpoints a running container of mgr: freeze its cgroup, dump its process tree
// with its TCP connections, its network namespace kept as external, and record where the
// images are. Without LeaveRunning the container becomes "checkpointed": its processes are
// gone, its root file system, network namespace (IP), cgroup and monitor remain for restore.
// On failure the container keeps running (see Dump).
func Container(ctx context.Context, mgr *container.Manager, ref string, o ContainerOptions) (*ContainerResult, error) {
	var res *ContainerResult
	var exportErr error
	err := mgr.WithLock(ctx, ref, func(st *container.State) error {
		var err error
		res, err = ContainerLocked(ctx, mgr, st, o)
		if err != nil || o.Export == "" {
			return err
		}
		// Export under the lock (the upper layer must not change meanwhile). The dump itself
		// succeeded and its state must be saved: an export failure is reported afterwards.
		if exportErr = export(ctx, mgr, st, o, res); exportErr != nil {
			exportErr = fmt.Errorf("checkpoint %s succeeded (images in %s) but the export failed: %w", res.Name, res.ImagesDir, exportErr)
		}
		return nil
	})
	if err == nil {
		err = exportErr
	}
	return res, err
}

// InfoOf is what an archive records about the container st (ContainerInfo).
func InfoOf(st *container.State) ContainerInfo {
	info := ContainerInfo{Name: st.Name, Image: st.Image, ImageID: st.ImageID, Network: st.Network.Mode,
		Bridge: st.Network.Bridge, Memory: st.Resources.MemoryBytes, Pids: st.Resources.PidsMax}
	if st.Network.IP.IsValid() {
		info.IP = st.Network.IP.String()
	}
	if st.Network.Subnet.IsValid() {
		info.Subnet = st.Network.Subnet.String()
	}
	return info
}

// export writes the archive of the checkpoint just made (see WriteArchive).
func export(ctx context.Context, mgr *container.Manager, st *container.State, o ContainerOptions, res *ContainerResult) error {
	t0 := time.Now()
	rec, err := LoadRecord(mgr.Dir(st.ID))
	if err != nil {
		return err
	}
	gen := st.CurrentGeneration()
	if gen == nil {
		return errors.New("no current generation in the container's state")
	}
	info := InfoOf(st)
	if _, err := WriteArchive(ctx, o.Export, ArchiveInput{
		Manifest:  Manifest{CRIUVersion: o.CRIU.Version.String(), Container: info, Record: *rec},
		ImagesDir: rec.ImagesDir, Config: filepath.Join(mgr.Dir(st.ID), "config.json"), UpperDir: gen.Upper, Zstd: o.Zstd,
	}); err != nil {
		return err
	}
	res.Export, res.ExportTime = o.Export, time.Since(t0)
	if fi, err := os.Stat(o.Export); err == nil {
		res.ExportBytes = fi.Size()
	}
	return nil
}

// ContainerLocked is Container for a caller that holds the container's lock
// (container.Manager.WithLock) and saves st afterwards, e.g. the hot update.
func ContainerLocked(ctx context.Context, mgr *container.Manager, st *container.State, o ContainerOptions) (*ContainerResult, error) {
	var res *ContainerResult
	err := func() error {
		c := mgr.Reconciled(st)
		if c.Status != container.StatusRunning {
			if c.Status == container.StatusCheckpointed {
				return fmt.Errorf("checkpoint %s: %w: it is already checkpointed; restore it with 'hot restore %s'", c.Name, ErrNotRunning, c.Name)
			}
			return fmt.Errorf("checkpoint %s: %w: it is %s", c.Name, ErrNotRunning, c.Status)
		}
		cg, err := cgroups.Load(c.Cgroup)
		if err != nil {
			return fmt.Errorf("checkpoint %s: %w", c.Name, err)
		}
		rec := Record{ImagesDir: o.ImagesDir, Created: time.Now().UTC(), LeaveRunning: o.LeaveRunning, CRIUVersion: o.CRIU.Version.String()}
		if rec.ImagesDir == "" {
			rec.ImagesDir = filepath.Join(mgr.RunDir(c.ID), "checkpoint")
			rec.DefaultDir = true
			// An earlier checkpoint of this (since restored) container is stale.
			if err := os.RemoveAll(rec.ImagesDir); err != nil {
				return fmt.Errorf("checkpoint %s: remove old images: %w", c.Name, err)
			}
		}
		procs, err := cg.Procs()
		if err != nil {
			return fmt.Errorf("checkpoint %s: %w", c.Name, err)
		}
		rec.Externals, err = externalFiles(c.Pid, procs)
		if err != nil {
			return fmt.Errorf("checkpoint %s: %w", c.Name, err)
		}
		dopts := DumpOptions{
			CRIU:          o.CRIU,
			PID:           c.Pid,
			ImagesDir:     rec.ImagesDir,
			LeaveRunning:  o.LeaveRunning,
			Freezer:       cg,
			FreezerCgroup: FreezerDir(cg),
			// Container restores run CRIU inside the container's cgroup and ignore recorded ones.
			SkipCgroups:  true,
			Failpoint:    o.Failpoint,
			NetworkLock:  o.NetworkLock,
			PageServer:   o.PageServer,
			BeforeFreeze: o.BeforeFreeze,
			AfterDump:    o.afterDump,
			Logger:       o.Logger,
		}
		for _, x := range rec.Externals {
			if x.Kind == ExternalFileOnHost { // pipes need no --external, only inherit-fd at restore
				dopts.External = append(dopts.External, x.Key)
			}
		}
		if c.Network.NetnsPath != "" {
			dopts.Netns = &ExternalNetns{Path: c.Network.NetnsPath, Key: DefaultNetnsKey}
			rec.NetnsKey = DefaultNetnsKey
		}
		// The record goes to disk before the dump too: if this process dies after CRIU wrote
		// the images, a later restore (or update recovery) still knows how to restore them.
		if err := container.WriteJSONAtomic(filepath.Join(mgr.Dir(c.ID), RecordFile), rec); err != nil {
			return fmt.Errorf("checkpoint %s: %w", c.Name, err)
		}
		dres, err := Dump(ctx, dopts)
		if err != nil {
			return fmt.Errorf("checkpoint %s: %w", c.Name, err)
		}
		if o.Failpoint == FailKillSelfAfterDump {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {}
		}
		rec.Stats = dres.Stats
		if err := container.WriteJSONAtomic(filepath.Join(mgr.Dir(c.ID), RecordFile), rec); err != nil {
			return fmt.Errorf("checkpoint %s: %w", c.Name, err)
		}
		if !o.LeaveRunning {
			st.Status = container.StatusCheckpointed
			st.Pid, st.PidStart = 0, 0
		}
		res = &ContainerResult{ID: c.ID, Name: c.Name, ImagesDir: rec.ImagesDir, LeaveRunning: o.LeaveRunning, Stats: dres.Stats}
		return nil
	}()
	return res, err
}

// LoadRecord reads a container's checkpoint record from its state directory.
func LoadRecord(containerDir string) (*Record, error) {
	b, err := os.ReadFile(filepath.Join(containerDir, RecordFile))
	if err != nil {
		return nil, err
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("read %s: %w", filepath.Join(containerDir, RecordFile), err)
	}
	return &r, nil
}

// externalFiles finds what the dump must treat as external: the init's stdout/stderr pipe
// (read by the monitor) and files the processes hold open on mounts that are not the
// container's (those of init's mount namespace).
func externalFiles(initPid int, pids []int) ([]ExternalFile, error) {
	own, err := mountIDs(initPid)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []ExternalFile
	for _, fd := range []string{"1", "2"} {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", initPid, fd))
		if err == nil && strings.HasPrefix(target, "pipe:[") && !seen[target] {
			seen[target] = true
			out = append(out, ExternalFile{Kind: ExternalOutputPipe, Key: target})
		}
	}
	for _, pid := range pids {
		fdDir := fmt.Sprintf("/proc/%d/fd", pid)
		ents, err := os.ReadDir(fdDir)
		if err != nil {
			continue // exited
		}
		for _, e := range ents {
			target, err := os.Readlink(filepath.Join(fdDir, e.Name()))
			if err != nil || !strings.HasPrefix(target, "/") {
				continue // sockets, pipes, anon inodes: CRIU handles them
			}
			mnt, flags, err := fdInfo(pid, e.Name())
			if err != nil || own[mnt] {
				continue
			}
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join(fdDir, e.Name()), &st); err != nil {
				continue
			}
			key := fmt.Sprintf("file[%x:%x]", mnt, st.Ino)
			if seen[key] {
				continue
			}
			seen[key] = true
			out = append(out, ExternalFile{Kind: ExternalFileOnHost, Key: key, Path: target, Flags: flags &^ (syscall.O_CREAT | syscall.O_TRUNC | syscall.O_EXCL | syscall.O_CLOEXEC)})
		}
	}
	return out, nil
}

func mountIDs(pid int) (map[int]bool, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		return nil, fmt.Errorf("read mounts of pid %d: %w", pid, err)
	}
	defer f.Close()
	ids := map[int]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if id, err := strconv.Atoi(strings.Fields(sc.Text())[0]); err == nil {
			ids[id] = true
		}
	}
	return ids, sc.Err()
}

// fdInfo reads mnt_id and the open flags (octal) of one descriptor.
func fdInfo(pid int, fd string) (mnt, flags int, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd))
	if err != nil {
		return 0, 0, err
	}
	mnt = -1
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "mnt_id":
			mnt, err = strconv.Atoi(v)
		case "flags":
			var f int64
			f, err = strconv.ParseInt(v, 8, 64)
			flags = int(f)
		}
		if err != nil {
			return 0, 0, fmt.Errorf("parse fdinfo %d/%s: %w", pid, fd, err)
		}
	}
	if mnt < 0 {
		return 0, 0, fmt.Errorf("fdinfo %d/%s has no mnt_id", pid, fd)
	}
	return mnt, flags, nil
}

// FreezerDir is the directory of cg that CRIU's freeze_cgroup option needs: the v1 freezer
// group where one is mounted (hybrid and v1 hosts), otherwise the cgroup2 group.
func FreezerDir(cg *cgroups.Cgroup) string {
	if d := cg.Paths()["freezer"]; d != "" {
		return d
	}
	return cg.Paths()["unified"]
}
