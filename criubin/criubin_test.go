package criubin

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseVersion(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Version
		err  string
	}{
		{in: "Version: 4.2.1\n", want: Version{4, 2, 1}},
		{in: "Version: 3.17.1\nGitID: v3.17.1\n", want: Version{3, 17, 1}},
		{in: "Version: 4.2\n", want: Version{4, 2, 0}},
		{in: "criu: command not found", err: "no \"Version:\" line"},
		{in: "Version: 4.x", err: "not a number"},
		{in: "Version: 4", err: "MAJOR.MINOR"},
	} {
		got, err := ParseVersion(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseVersion(%q) error = %v, want it to contain %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseVersion(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
}

func TestVersionLess(t *testing.T) {
	if !(Version{3, 17, 1}).Less(MinVersion()) || !(Version{4, 1, 9}).Less(MinVersion()) {
		t.Error("3.17.1 and 4.1.9 must be older than the minimum")
	}
	if (Version{4, 2, 0}).Less(MinVersion()) || (Version{5, 0, 0}).Less(MinVersion()) {
		t.Error("4.2.0 and 5.0.0 must be accepted")
	}
}

// fakeCRIU writes an executable that prints the given version.
func fakeCRIU(t *testing.T, version string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "criu")
	if err := os.WriteFile(p, []byte("#!/bin/sh\necho 'Version: "+version+"'\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestFindExplicitTooOld(t *testing.T) {
	p := fakeCRIU(t, "3.17.1")
	_, err := Find(context.Background(), p)
	if !errors.Is(err, ErrTooOld) {
		t.Fatalf("Find(3.17.1) error = %v, want ErrTooOld", err)
	}
	for _, want := range []string{"criu 3.17.1", "needs >= 4.2", "make deps", "--criu"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestFindEnv(t *testing.T) {
	p := fakeCRIU(t, "4.2.1")
	t.Setenv(EnvVar, p)
	b, err := Find(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	if b.Path != p || b.Source != "$HOT_CRIU" || b.Version != (Version{4, 2, 1}) {
		t.Errorf("Find via env = %+v", b)
	}
	// An explicit flag wins over the environment.
	q := fakeCRIU(t, "5.0")
	if b, err := Find(context.Background(), q); err != nil || b.Path != q {
		t.Errorf("explicit path not preferred: %+v, %v", b, err)
	}
}

func TestFindExplicitMissing(t *testing.T) {
	_, err := Find(context.Background(), filepath.Join(t.TempDir(), "nope"))
	if err == nil || !strings.Contains(err.Error(), "--criu") {
		t.Fatalf("want an error naming --criu, got %v", err)
	}
}

func TestFirstError(t *testing.T) {
	log := `(00.000010) Warn  (criu/kerndat.c:1290): Can't keep kdat cache on non-tempfs
(00.000020) Error (criu/util.c:123): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.001000) Error (criu/files-reg.c:2000): File /srv/app has bad build-ID
(00.002000) Error (criu/cr-restore.c:1): Restoring FAILED.`
	if got := FirstError(log); !strings.Contains(got, "bad build-ID") {
		t.Errorf("FirstError = %q, want the build-ID line", got)
	}
}

func TestKdatMarkerRoundTrip(t *testing.T) {
	m := kdatMarker{BootID: "95f427d3-b0ee-46c6-ac87-d277f0a7de41", CRIUVersion: "4.2.1", Size: 1024}
	got, err := parseKdatMarker(m.String())
	if err != nil || got != m {
		t.Fatalf("parseKdatMarker(String()) = %+v, %v; want %+v", got, err, m)
	}
	// A later hot may add keys; they do not make the marker unreadable.
	if got, err := parseKdatMarker(m.String() + "kernel=6.18\n"); err != nil || got != m {
		t.Errorf("marker with an extra key = %+v, %v", got, err)
	}
}

func TestParseKdatMarkerErrors(t *testing.T) {
	for in, want := range map[string]string{
		"":                                      "no boot_id",
		"boot_id=x\ncriu_version=4.2.1\n":       "no kdat_size",
		"boot_id=x\nkdat_size=10\n":             "no criu_version",
		"boot_id=x\ncriu_version=4\nkdat_size=": "not a positive number",
		"boot_id=x\ncriu_version=4\nkdat_size=-3": "not a positive number",
		"garbage": "not key=value",
	} {
		if _, err := parseKdatMarker(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("parseKdatMarker(%q) error = %v, want it to contain %q", in, err, want)
		}
	}
}

func TestKdatMarkerStale(t *testing.T) {
	m := kdatMarker{BootID: "boot-a", CRIUVersion: "4.2.1", Size: 1024}
	if r := m.staleReason("boot-a", "4.2.1", 1024); r != "" {
		t.Errorf("same boot, CRIU and size: stale (%s)", r)
	}
	for _, tc := range []struct {
		boot, version string
		size          int64
		want          string
	}{
		{"boot-b", "4.2.1", 1024, "another boot"},
		{"boot-a", "4.3.0", 1024, "written by CRIU 4.2.1, now 4.3.0"},
		{"boot-a", "4.2.1", 0, "changed since hot wrote it"},
	} {
		if r := m.staleReason(tc.boot, tc.version, tc.size); !strings.Contains(r, tc.want) {
			t.Errorf("staleReason(%s, %s, %d) = %q, want %q", tc.boot, tc.version, tc.size, r, tc.want)
		}
	}
}

func TestCheckKdat(t *testing.T) {
	good := make([]byte, 64)
	binary.NativeEndian.PutUint32(good, kdatMagic1)
	if err := checkKdat(good); err != nil {
		t.Errorf("checkKdat(magic) = %v", err)
	}
	if err := checkKdat(good[:4]); err == nil || !strings.Contains(err.Error(), "too short") {
		t.Errorf("checkKdat(4 bytes) = %v, want too short", err)
	}
	if err := checkKdat(make([]byte, 64)); err == nil || !strings.Contains(err.Error(), "magic") {
		t.Errorf("checkKdat(zeros) = %v, want a magic error", err)
	}
}
