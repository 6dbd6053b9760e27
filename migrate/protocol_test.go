package migrate

import (
	"strings"
	"testing"
)

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

func TestTokenEqual(t *testing.T) {
	if !tokenEqual([]byte("abc"), []byte("abc")) || tokenEqual([]byte("abc"), []byte("abd")) || tokenEqual([]byte("abc"), []byte("abcd")) {
		t.Error("tokenEqual is wrong")
	}
}
