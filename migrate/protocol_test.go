package migrate

import (
	"bufio"
	"strings"
	"testing"
)

func TestParseCPUFlags(t *testing.T) {
	in := "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 sse2 aes\nbugs\t\t: spectre\n\nprocessor\t: 1\nflags\t\t: fpu\n"
	got, err := parseCPUFlags(bufio.NewScanner(strings.NewReader(in)))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, " ") != "aes avx2 fpu sse2" {
		t.Errorf("flags = %v, want the first processor's, sorted and unique", got)
	}
	if _, err := parseCPUFlags(bufio.NewScanner(strings.NewReader("processor: 0\n"))); err == nil {
		t.Error("cpuinfo without flags: no error")
	}
}

func TestCompareHosts(t *testing.T) {
	src := HostFacts{CRIUVersion: "4.2.1", Arch: "x86_64", CPUFlags: []string{"avx2", "avx512f", "sse2"}}
	if p := compareHosts(src, src); len(p) != 0 {
		t.Errorf("identical hosts: problems %v", p)
	}
	dst := HostFacts{CRIUVersion: "4.2.0", Arch: "x86_64", CPUFlags: []string{"sse2", "avx2"}}
	p := strings.Join(compareHosts(src, dst), "\n")
	for _, want := range []string{"avx512f", "older than the source's 4.2.1"} {
		if !strings.Contains(p, want) {
			t.Errorf("problems %q do not name %q", p, want)
		}
	}
	if strings.Contains(p, "avx2 ") || strings.Contains(p, "sse2") {
		t.Errorf("problems %q name flags the target has", p)
	}
	dst = HostFacts{CRIUVersion: "4.3", Arch: "aarch64", CPUFlags: src.CPUFlags}
	if p := strings.Join(compareHosts(src, dst), "\n"); !strings.Contains(p, "architecture") || strings.Contains(p, "CRIU") {
		t.Errorf("newer CRIU on another architecture: problems %q", p)
	}
}

func TestManifestVerify(t *testing.T) {
	token := []byte("0123456789abcdef")
	members := []Member{{Name: "state.json", Size: 10, SHA256: "aa"}, {Name: "images/pages-1.img", Size: 4096, SHA256: "bb"}}
	m := Manifest{Members: members, MAC: manifestMAC(token, members)}
	if err := m.verify(token, members); err != nil {
		t.Fatalf("intact stream refused: %v", err)
	}
	for name, tc := range map[string]struct {
		token []byte
		m     Manifest
		got   []Member
	}{
		"other token":       {[]byte("fedcba9876543210"), m, members},
		"member changed":    {token, m, []Member{members[0], {Name: "images/pages-1.img", Size: 4096, SHA256: "cc"}}},
		"member dropped":    {token, m, members[:1]},
		"members reordered": {token, m, []Member{members[1], members[0]}},
		"manifest rewritten": {token, Manifest{Members: []Member{members[0], {Name: "images/pages-1.img", Size: 4096, SHA256: "cc"}}, MAC: m.MAC},
			[]Member{members[0], {Name: "images/pages-1.img", Size: 4096, SHA256: "cc"}}},
	} {
		if err := tc.m.verify(tc.token, tc.got); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestTokenEqual(t *testing.T) {
	if !tokenEqual([]byte("abc"), []byte("abc")) || tokenEqual([]byte("abc"), []byte("abd")) || tokenEqual([]byte("abc"), []byte("abcd")) {
		t.Error("tokenEqual is wrong")
	}
}

func TestIsLowerMember(t *testing.T) {
	for name, want := range map[string]bool{"lower-0.tar": true, "lower-12.tar": true, "lower-x.tar": false, "lower-1.tarx": false, "upper.tar": false, "lower--1.tar": false} {
		if got := isLowerMember(name); got != want {
			t.Errorf("isLowerMember(%q) = %v, want %v", name, got, want)
		}
	}
}
