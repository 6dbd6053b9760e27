package criubin

import (
	"context"
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
