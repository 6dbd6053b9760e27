package livepatch

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// fakeELF builds a small ELF64 little-endian file with the named sections (in order) and a
// section name table. With shdrFirst the section header table comes right after the ELF
// header (so cutting the file loses section data, not headers); otherwise it comes last,
// as in real .ko files.
func fakeELF(t *testing.T, typ elf.Type, machine elf.Machine, shdrFirst bool, sections ...section) []byte {
	t.Helper()
	shstr := []byte{0}
	nameOff := make([]uint32, len(sections)+1)
	for i, s := range sections {
		nameOff[i] = uint32(len(shstr))
		shstr = append(append(shstr, s.name...), 0)
	}
	nameOff[len(sections)] = uint32(len(shstr))
	shstr = append(append(shstr, ".shstrtab"...), 0)
	all := append(append([]section{}, sections...), section{name: ".shstrtab", data: shstr})

	const ehSize, shSize = 64, 64
	nsec := len(all) + 1 // plus the null section
	var dataStart int
	if shdrFirst {
		dataStart = ehSize + nsec*shSize
	} else {
		dataStart = ehSize
	}
	var data bytes.Buffer
	offsets := make([]int, len(all))
	// The name table goes first, so a cut at the end hits the last named section.
	order := []int{len(all) - 1}
	for i := range len(all) - 1 {
		order = append(order, i)
	}
	for _, i := range order {
		offsets[i] = dataStart + data.Len()
		data.Write(all[i].data)
	}
	shoff := ehSize
	if !shdrFirst {
		shoff = dataStart + data.Len()
	}
	var out bytes.Buffer
	hdr := elf.Header64{
		Type: uint16(typ), Machine: uint16(machine), Version: 1,
		Shoff: uint64(shoff), Ehsize: ehSize, Shentsize: shSize, Shnum: uint16(nsec), Shstrndx: uint16(nsec - 1),
	}
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	hdr.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	hdr.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	must(t, binary.Write(&out, binary.LittleEndian, hdr))
	writeShdrs := func() {
		must(t, binary.Write(&out, binary.LittleEndian, elf.Section64{}))
		for i, s := range all {
			typ := elf.SHT_PROGBITS
			if i == len(all)-1 {
				typ = elf.SHT_STRTAB
			}
			must(t, binary.Write(&out, binary.LittleEndian, elf.Section64{
				Name: nameOff[i], Type: uint32(typ), Off: uint64(offsets[i]), Size: uint64(len(s.data)), Addralign: 1,
			}))
		}
	}
	if shdrFirst {
		writeShdrs()
		out.Write(data.Bytes())
	} else {
		out.Write(data.Bytes())
		writeShdrs()
	}
	return out.Bytes()
}

type section struct {
	name string
	data []byte
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func modinfo(kv ...string) section {
	return section{name: ".modinfo", data: []byte(strings.Join(kv, "\x00") + "\x00")}
}

var thisModule = section{name: ".gnu.linkonce.this_module", data: make([]byte, 64)}

func hostMachine(t *testing.T) elf.Machine {
	m, ok := elfMachines[runtime.GOARCH]
	if !ok {
		t.Skipf("requires an architecture with a known ELF machine (not %s)", runtime.GOARCH)
	}
	return m
}

func writeFile(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	must(t, os.WriteFile(p, data, 0o644))
	return p
}

const testRelease = "6.1.0-56-amd64"

func goodModule(t *testing.T) []byte {
	return fakeELF(t, elf.ET_REL, hostMachine(t), false, thisModule,
		modinfo("livepatch=Y", "license=GPL", "depends=", "name=lp_cmdline", "vermagic="+testRelease+" SMP preempt mod_unload modversions "))
}

func TestInspectValidLivepatch(t *testing.T) {
	p := writeFile(t, "lp-cmdline.ko", goodModule(t))
	m, err := Inspect(p)
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != "lp_cmdline" || m.SysfsName != "lp_cmdline" || !m.Livepatch || m.Release != testRelease || m.License != "GPL" {
		t.Errorf("Inspect = %+v", m)
	}
	if err := m.Validate(testRelease); err != nil {
		t.Errorf("Validate(%s) = %v, want nil", testRelease, err)
	}
	err = m.Validate("6.18.0-1-amd64")
	if !errors.Is(err, ErrVermagic) || !errors.Is(err, ErrInvalidModule) {
		t.Fatalf("Validate(other release) = %v, want ErrVermagic", err)
	}
	for _, want := range []string{"built for kernel " + testRelease, "running 6.18.0-1-amd64", "rebuild"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
}

func TestInspectNameFromFileName(t *testing.T) {
	data := fakeELF(t, elf.ET_REL, hostMachine(t), false, thisModule, modinfo("livepatch=Y", "vermagic="+testRelease+" SMP"))
	m, err := Inspect(writeFile(t, "my-fix-1.ko", data))
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != "my-fix-1" || m.SysfsName != "my_fix_1" {
		t.Errorf("name %q sysfs %q, want my-fix-1 / my_fix_1", m.Name, m.SysfsName)
	}
}

func TestInspectRefusals(t *testing.T) {
	machine := hostMachine(t)
	other := elf.EM_AARCH64
	if machine == other {
		other = elf.EM_X86_64
	}
	good := goodModule(t)
	shdrFirst := fakeELF(t, elf.ET_REL, machine, true, thisModule, modinfo("livepatch=Y", "vermagic="+testRelease))
	cases := []struct {
		name, file string
		data       []byte
		kind       error
		says       string
	}{
		{"text file", "notes.ko", []byte("hello, not a module\n"), ErrNotModule, "not an ELF file"},
		{"executable", "prog.ko", fakeELF(t, elf.ET_EXEC, machine, false, thisModule, modinfo("livepatch=Y")), ErrNotModule, "ET_EXEC"},
		{"other arch", "arm.ko", fakeELF(t, elf.ET_REL, other, false, thisModule, modinfo("livepatch=Y")), ErrNotModule, "built for"},
		{"no modinfo", "obj.ko", fakeELF(t, elf.ET_REL, machine, false, thisModule), ErrNotModule, ".modinfo"},
		{"object file", "obj.o", fakeELF(t, elf.ET_REL, machine, false, modinfo("livepatch=Y")), ErrNotModule, ".gnu.linkonce.this_module"},
		{"truncated half", "half.ko", good[:len(good)/2], ErrTruncated, "cut off"},
		{"truncated to 3 bytes", "tiny.ko", good[:3], ErrTruncated, "shorter than an ELF header"},
		{"empty", "empty.ko", nil, ErrTruncated, "shorter than an ELF header"},
		{"section past end", "cut.ko", shdrFirst[:len(shdrFirst)-8], ErrTruncated, "ends at byte"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Inspect(writeFile(t, c.file, c.data))
			if !errors.Is(err, c.kind) || !errors.Is(err, ErrInvalidModule) {
				t.Fatalf("Inspect = %v, want %v", err, c.kind)
			}
			if !strings.Contains(err.Error(), c.says) || !strings.Contains(err.Error(), c.file) {
				t.Errorf("error %q does not name the file and say %q", err, c.says)
			}
		})
	}
}

func TestValidateRefusesOrdinaryModule(t *testing.T) {
	data := fakeELF(t, elf.ET_REL, hostMachine(t), false, thisModule, modinfo("name=plain_mod", "vermagic="+testRelease+" SMP"))
	m, err := Inspect(writeFile(t, "plain-mod.ko", data))
	if err != nil {
		t.Fatal(err)
	}
	err = m.Validate(testRelease)
	if !errors.Is(err, ErrNotLivepatch) || !strings.Contains(err.Error(), "livepatch=Y") {
		t.Fatalf("Validate = %v, want ErrNotLivepatch naming livepatch=Y", err)
	}
}
