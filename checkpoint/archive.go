package checkpoint

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/hotctl/hot/internal/buildinfo"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// Archive member names. Images live under ImagesPrefix.
const (
	ManifestMember = "manifest.json"
	ConfigMember   = "config.json"
	UpperMember    = "upper.tar"
	ImagesPrefix   = "images/"
	// ArchiveVersion is the format version written into manifests.
	ArchiveVersion = 1
)

// Manifest is the first member of a checkpoint archive: what the checkpoint needs to be
// restored (image by digest, CRIU, kernel, CPU) and the sha256 of every other member.
type Manifest struct {
	Version     int           `json:"version"`
	Created     time.Time     `json:"created"`
	HotVersion  string        `json:"hotVersion"`
	CRIUVersion string        `json:"criuVersion"`
	Kernel      string        `json:"kernel"`
	CPUFlags    []string      `json:"cpuFlags"`
	Container   ContainerInfo `json:"container"`
	Record      Record        `json:"record"` // the checkpoint record (externals, netns key, stats)
	// PageServer, when set, says the images hold no memory pages: a restore pulls them from
	// the CRIU page server at this host:port (post-copy migration, restore.Options.PageServer).
	PageServer string   `json:"pageServer,omitempty"`
	Members    []Member `json:"members"`
	// MAC, when set, is ManifestMAC of the manifest: written with ArchiveInput.MACKey, checked
	// by ReadArchiveFrom with the same key before any member is accepted.
	MAC string `json:"mac,omitempty"`
}

// ManifestMAC is the HMAC-SHA256, keyed with key, of m's JSON with MAC empty. With the
// manifest authenticated, every member is too (their sha256 sums are in it), so a stream
// altered on the way is refused even without TLS.
func ManifestMAC(key []byte, m Manifest) string {
	m.MAC = ""
	b, _ := json.Marshal(m)
	h := hmac.New(sha256.New, key)
	h.Write(b)
	return hex.EncodeToString(h.Sum(nil))
}

// ContainerInfo is what recreating the container needs besides config.json and the upper layer.
type ContainerInfo struct {
	Name    string        `json:"name"`
	Image   string        `json:"image"`
	ImageID digest.Digest `json:"imageId"`
	IP      string        `json:"ip,omitempty"`
	Bridge  string        `json:"bridge,omitempty"`
	Subnet  string        `json:"subnet,omitempty"`
	Network string        `json:"network"` // "bridge" or "none"
	Memory  int64         `json:"memoryBytes,omitempty"`
	Pids    int64         `json:"pidsMax,omitempty"`
}

// Member is one archive member with its checksum.
type Member struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// ArchiveInput is what WriteArchive packs.
type ArchiveInput struct {
	Manifest  Manifest // Container, Record, CRIUVersion filled by the caller; the rest is computed
	ImagesDir string
	Config    string // path of config.json
	UpperDir  string // the container's upper directory
	Zstd      bool   // compress the archive with zstd
	// TmpDir holds the packed upper layer while the archive is written (WriteArchiveTo;
	// WriteArchive uses the archive's directory).
	TmpDir string
	// MACKey, when set, authenticates the manifest (Manifest.MAC, see ManifestMAC).
	MACKey []byte
}

// WriteArchive writes a checkpoint archive to path (atomically: a temp file renamed in place).
func WriteArchive(ctx context.Context, path string, in ArchiveInput) (*Manifest, error) {
	if in.TmpDir == "" {
		in.TmpDir = filepath.Dir(path)
	}
	out, err := os.CreateTemp(filepath.Dir(path), ".hot-export-*.tmp")
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	defer os.Remove(out.Name())
	defer out.Close()
	bw := bufio.NewWriterSize(out, 1<<20)
	m, err := WriteArchiveTo(ctx, bw, in)
	if err != nil {
		return nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	if err := out.Sync(); err != nil {
		return nil, err
	}
	if err := out.Close(); err != nil {
		return nil, err
	}
	if err := os.Rename(out.Name(), path); err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	return m, nil
}

// WriteArchiveTo writes a checkpoint archive to w, e.g. a network stream. The upper directory
// is packed first into a temporary file under in.TmpDir and every member is hashed, so that
// the manifest, which comes first, can name every member's checksum.
func WriteArchiveTo(ctx context.Context, w io.Writer, in ArchiveInput) (*Manifest, error) {
	tmpDir, err := os.MkdirTemp(in.TmpDir, ".hot-export-")
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	defer os.RemoveAll(tmpDir)
	upperTar := filepath.Join(tmpDir, UpperMember)
	if err := writeDirTarFile(upperTar, in.UpperDir); err != nil {
		return nil, fmt.Errorf("export: pack upper layer %s: %w", in.UpperDir, err)
	}
	type src struct{ name, path string }
	srcs := []src{{ConfigMember, in.Config}, {UpperMember, upperTar}}
	ents, err := os.ReadDir(in.ImagesDir)
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			return nil, fmt.Errorf("export: images dir %s holds %s, which is not a regular file", in.ImagesDir, e.Name())
		}
		srcs = append(srcs, src{ImagesPrefix + e.Name(), filepath.Join(in.ImagesDir, e.Name())})
	}
	m := in.Manifest
	m.Version, m.Created = ArchiveVersion, time.Now().UTC()
	m.HotVersion = buildinfo.Read().Version
	m.Kernel = KernelRelease()
	m.CPUFlags = CPUFlags()
	m.Members, m.MAC = nil, ""
	for _, s := range srcs {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		sum, size, err := fileSHA256(s.path)
		if err != nil {
			return nil, fmt.Errorf("export: %w", err)
		}
		m.Members = append(m.Members, Member{Name: s.name, Size: size, SHA256: sum})
	}
	if len(in.MACKey) > 0 {
		m.MAC = ManifestMAC(in.MACKey, m)
	}
	mb, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	var zw *zstd.Encoder
	if in.Zstd {
		zw, err = zstd.NewWriter(w, zstd.WithEncoderLevel(zstd.SpeedFastest))
		if err != nil {
			return nil, err
		}
		w = zw
	}
	tw := tar.NewWriter(w)
	if err := tw.WriteHeader(&tar.Header{Name: ManifestMember, Mode: 0o600, Size: int64(len(mb)), ModTime: m.Created, Typeflag: tar.TypeReg}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(mb); err != nil {
		return nil, err
	}
	for i, s := range srcs {
		if err := copyMember(tw, s.name, s.path, m.Members[i].Size, m.Created); err != nil {
			return nil, fmt.Errorf("export: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if zw != nil {
		if err := zw.Close(); err != nil {
			return nil, err
		}
	}
	return &m, nil
}

func copyMember(tw *tar.Writer, name, p string, size int64, mtime time.Time) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o600, Size: size, ModTime: mtime, Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	if n, err := io.Copy(tw, f); err != nil || n != size {
		return fmt.Errorf("copy %s into the archive: %d of %d bytes: %v (did it change?)", p, n, size, err)
	}
	return nil
}

func fileSHA256(p string) (string, int64, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, fmt.Errorf("read %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// ErrBadArchive is matched by every verification failure of ReadArchive.
var ErrBadArchive = errors.New("checkpoint archive rejected")

// ArchiveError names the member that failed verification.
type ArchiveError struct {
	File   string
	Member string // empty: the archive as a whole
	Reason string
}

func (e *ArchiveError) Error() string {
	if e.Member == "" {
		return fmt.Sprintf("checkpoint archive %s rejected: %s", e.File, e.Reason)
	}
	return fmt.Sprintf("checkpoint archive %s rejected: member %s: %s", e.File, e.Member, e.Reason)
}

func (e *ArchiveError) Is(target error) bool { return target == ErrBadArchive }

// ReadArchive verifies the archive at path and unpacks it into dir (which must be empty and
// private to the caller: nothing else is touched). Every member's size and sha256 are checked
// against the manifest; an unknown, missing, duplicated, truncated or altered member is an
// *ArchiveError naming it, and dir is then left for the caller to remove.
func ReadArchive(ctx context.Context, path, dir string) (*Manifest, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("import: %w", err)
	}
	defer f.Close()
	return ReadArchiveFrom(ctx, f, path, dir, nil)
}

// ReadArchiveFrom is ReadArchive for an archive read from f (e.g. a network stream; path
// names it in errors). With macKey, the manifest must carry a matching MAC (ManifestMAC),
// checked before any member is read: a manifest from anyone without the key is refused.
func ReadArchiveFrom(ctx context.Context, f io.Reader, path, dir string, macKey []byte) (*Manifest, error) {
	bad := func(member, format string, a ...any) error {
		return &ArchiveError{File: path, Member: member, Reason: fmt.Sprintf(format, a...)}
	}
	br := bufio.NewReaderSize(f, 1<<20)
	var r io.Reader = br
	if magic, _ := br.Peek(4); bytes.Equal(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}) {
		zr, err := zstd.NewReader(br)
		if err != nil {
			return nil, bad("", "zstd: %v", err)
		}
		defer zr.Close()
		r = zr
	}
	tr := tar.NewReader(r)
	hdr, err := tr.Next()
	if err != nil {
		return nil, bad("", "no manifest: %v", truncErr(err))
	}
	if hdr.Name != ManifestMember {
		return nil, bad(hdr.Name, "the first member must be %s", ManifestMember)
	}
	mb, err := io.ReadAll(io.LimitReader(tr, 16<<20))
	if err != nil {
		return nil, bad(ManifestMember, "%v", truncErr(err))
	}
	var m Manifest
	if err := json.Unmarshal(mb, &m); err != nil {
		return nil, bad(ManifestMember, "not valid JSON: %v", err)
	}
	if m.Version != ArchiveVersion {
		return nil, bad(ManifestMember, "format version %d, this hot reads %d", m.Version, ArchiveVersion)
	}
	if len(macKey) > 0 && !hmac.Equal([]byte(ManifestMAC(macKey, m)), []byte(m.MAC)) {
		return nil, bad(ManifestMember, "its MAC does not match: altered on the way, or written with another key")
	}
	want := map[string]Member{}
	for _, mem := range m.Members {
		if err := checkMemberName(mem.Name); err != nil {
			return nil, bad(mem.Name, "%v", err)
		}
		want[mem.Name] = mem
	}
	seen := map[string]bool{}
	for {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, bad("", "after %d members: %v", len(seen), truncErr(err))
		}
		mem, ok := want[hdr.Name]
		if !ok {
			return nil, bad(hdr.Name, "not listed in the manifest")
		}
		if seen[hdr.Name] {
			return nil, bad(hdr.Name, "appears twice")
		}
		seen[hdr.Name] = true
		if hdr.Typeflag != tar.TypeReg || hdr.Size != mem.Size {
			return nil, bad(hdr.Name, "size %d, manifest says %d", hdr.Size, mem.Size)
		}
		dst := filepath.Join(dir, filepath.FromSlash(hdr.Name))
		if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
			return nil, err
		}
		out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, fmt.Errorf("import: %w", err)
		}
		h := sha256.New()
		n, err := io.Copy(io.MultiWriter(out, h), tr)
		cerr := out.Close()
		if err != nil {
			return nil, bad(hdr.Name, "%v after %d of %d bytes", truncErr(err), n, mem.Size)
		}
		if cerr != nil {
			return nil, fmt.Errorf("import: %w", cerr)
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != mem.SHA256 {
			return nil, bad(hdr.Name, "sha256 %s, manifest says %s (the archive is corrupted)", got, mem.SHA256)
		}
	}
	var missing []string
	for name := range want {
		if !seen[name] {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		return nil, bad(missing[0], "missing from the archive (%d member(s) missing: %s)", len(missing), strings.Join(missing, ", "))
	}
	if !seen[ConfigMember] || !seen[UpperMember] || !seen[ImagesPrefix+"inventory.img"] {
		return nil, bad("", "incomplete: it needs %s, %s and %sinventory.img", ConfigMember, UpperMember, ImagesPrefix)
	}
	return &m, nil
}

func truncErr(err error) error {
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return errors.New("truncated (unexpected end of file)")
	}
	return err
}

// checkMemberName accepts config.json, upper.tar and images/<file>.
func checkMemberName(name string) error {
	switch {
	case name == ConfigMember || name == UpperMember:
		return nil
	case strings.HasPrefix(name, ImagesPrefix):
		base := strings.TrimPrefix(name, ImagesPrefix)
		if base != "" && base == path.Base(base) && base != "." && base != ".." {
			return nil
		}
	}
	return errors.New("unexpected member name")
}

// CheckHost compares a manifest with this host: CRIU cannot restore on a CPU lacking features
// the dumped processes may use. It returns the missing CPU flags (nil when none).
func (m *Manifest) CheckHost() []string {
	return MissingFlags(m.CPUFlags, CPUFlags())
}

// MissingFlags returns the CPU flags of want that have lacks: a process dumped on a CPU with
// want may have picked code paths by them (glibc ifuncs, a JIT) and die of SIGILL on have.
func MissingFlags(want, have []string) []string {
	set := map[string]bool{}
	for _, f := range have {
		set[f] = true
	}
	var missing []string
	for _, f := range want {
		if !set[f] {
			missing = append(missing, f)
		}
	}
	return missing
}

// KernelRelease is this host's kernel release (uname -r).
func KernelRelease() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}

// CPUFlags returns the "flags" of the first CPU in /proc/cpuinfo, sorted.
func CPUFlags() []string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return nil
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok && strings.TrimSpace(k) == "flags" {
			f := strings.Fields(v)
			sort.Strings(f)
			return f
		}
	}
	return nil
}
