package livepatch

import (
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
)

// Module is what a .ko file says about itself.
type Module struct {
	Path        string   `json:"path"`
	Name        string   `json:"name"`      // module name (modinfo name=, else from the file name)
	SysfsName   string   `json:"sysfsName"` // directory under /sys/kernel/livepatch
	Livepatch   bool     `json:"livepatch"` // modinfo livepatch=Y
	Vermagic    string   `json:"vermagic"`
	Release     string   `json:"release"` // first field of vermagic: the kernel it was built for
	License     string   `json:"license,omitempty"`
	Description string   `json:"description,omitempty"`
	Depends     []string `json:"depends,omitempty"`
	Size        int64    `json:"size"`
}

// elfMachines maps GOARCH to the ELF machine its kernel modules have.
var elfMachines = map[string]elf.Machine{
	"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64, "386": elf.EM_386, "arm": elf.EM_ARM,
	"ppc64le": elf.EM_PPC64, "ppc64": elf.EM_PPC64, "s390x": elf.EM_S390, "riscv64": elf.EM_RISCV,
	"loong64": elf.EM_LOONGARCH,
}

// Inspect reads and checks the module file at path without loading it: ELF relocatable for
// this machine, every section inside the file, .modinfo and .gnu.linkonce.this_module present.
func Inspect(path string) (*Module, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open module %s: %w", path, err)
	}
	defer f.Close()
	return inspectFile(f, path)
}

// inspectFile is Inspect on an open file, so that Load checks exactly the bytes it then
// hands to finit_module (no window for the file to change in between).
func inspectFile(f *os.File, path string) (*Module, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat module %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return nil, &ModuleError{Path: path, Kind: ErrNotModule, Detail: "not a regular file"}
	}
	size := st.Size()
	bad := func(kind error, fix, format string, a ...any) error {
		return &ModuleError{Path: path, Kind: kind, Detail: fmt.Sprintf(format, a...), Fix: fix}
	}
	const rebuild = "copy the module again or rebuild it"

	magic := make([]byte, 4)
	if n, _ := io.ReadFull(io.NewSectionReader(f, 0, 4), magic); n < 4 || !bytes.Equal(magic, []byte(elf.ELFMAG)) {
		if n < 4 && bytes.HasPrefix([]byte(elf.ELFMAG), magic[:n]) {
			return nil, bad(ErrTruncated, rebuild, "file is %d bytes, shorter than an ELF header", size)
		}
		return nil, bad(ErrNotModule, "pass a .ko file", "not an ELF file")
	}
	ef, err := elf.NewFile(f)
	if err != nil {
		if size < 64 || strings.Contains(err.Error(), "EOF") || strings.Contains(err.Error(), "out of range") {
			return nil, bad(ErrTruncated, rebuild, "ELF headers cut off (file is %d bytes): %v", size, err)
		}
		return nil, bad(ErrNotModule, "pass a .ko file", "unreadable ELF: %v", err)
	}
	if ef.Type != elf.ET_REL {
		return nil, bad(ErrNotModule, "pass a .ko file", "ELF type %s, kernel modules are ET_REL (relocatable)", ef.Type)
	}
	if want, ok := elfMachines[runtime.GOARCH]; ok && ef.Machine != want {
		return nil, bad(ErrNotModule, "build it for this architecture", "built for %s, this machine is %s (%s)", ef.Machine, runtime.GOARCH, want)
	}
	// A file cut short keeps its section table only if the cut is after it; check every
	// section's bytes are inside the file so a partial copy is named for what it is.
	for _, s := range ef.Sections {
		if s.Type == elf.SHT_NOBITS || s.Type == elf.SHT_NULL {
			continue
		}
		if end := int64(s.Offset + s.Size); end > size {
			return nil, bad(ErrTruncated, rebuild, "section %s ends at byte %d but the file has %d bytes", s.Name, end, size)
		}
	}
	if ef.Section(".gnu.linkonce.this_module") == nil {
		return nil, bad(ErrNotModule, "pass a .ko built by kbuild", "no .gnu.linkonce.this_module section: an object file, not a linked kernel module")
	}
	sec := ef.Section(".modinfo")
	if sec == nil {
		return nil, bad(ErrNotModule, "pass a .ko built by kbuild", "no .modinfo section")
	}
	data, err := sec.Data()
	if err != nil {
		return nil, bad(ErrTruncated, rebuild, "read .modinfo: %v", err)
	}
	info := parseModinfo(data)
	m := &Module{
		Path:        path,
		Name:        first(info["name"]),
		Livepatch:   first(info["livepatch"]) == "Y",
		Vermagic:    first(info["vermagic"]),
		License:     first(info["license"]),
		Description: first(info["description"]),
		Size:        size,
	}
	if m.Name == "" {
		m.Name = strings.TrimSuffix(filepath.Base(path), ".ko")
	}
	m.SysfsName = SysfsName(m.Name)
	m.Release, _, _ = strings.Cut(m.Vermagic, " ")
	if d := first(info["depends"]); d != "" {
		m.Depends = strings.Split(d, ",")
	}
	return m, nil
}

// Validate refuses a module the running kernel (release, as `uname -r` prints it) must not
// get as a livepatch.
func (m *Module) Validate(release string) error {
	if !m.Livepatch {
		return &ModuleError{Path: m.Path, Kind: ErrNotLivepatch,
			Detail: fmt.Sprintf("module %s has no livepatch=Y in .modinfo", m.Name),
			Fix:    `livepatches are built with MODULE_INFO(livepatch, "Y") (klp-build/kpatch-build do that); load ordinary modules with modprobe`}
	}
	if m.Vermagic == "" {
		return &ModuleError{Path: m.Path, Kind: ErrVermagic, Detail: "no vermagic in .modinfo", Fix: "rebuild it against this kernel's headers"}
	}
	if m.Release != release {
		return &ModuleError{Path: m.Path, Kind: ErrVermagic,
			Detail: fmt.Sprintf("built for kernel %s (vermagic %q), running %s", m.Release, strings.TrimSpace(m.Vermagic), release),
			Fix:    fmt.Sprintf("rebuild it against the headers of %s (make -C /lib/modules/%s/build M=DIR)", release, release)}
	}
	return nil
}

// SysfsName is the directory name a module's patch gets under /sys/kernel/livepatch (and its
// name in /sys/module): the module name with dashes turned into underscores.
func SysfsName(module string) string { return strings.ReplaceAll(module, "-", "_") }

// parseModinfo splits a .modinfo section (NUL-separated key=value strings).
func parseModinfo(data []byte) map[string][]string {
	info := map[string][]string{}
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok || k == "" {
			continue
		}
		info[k] = append(info[k], v)
	}
	return info
}

func first(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}
