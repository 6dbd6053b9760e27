package cowfs

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hotctl/hot/internal/testutil"
	"golang.org/x/sys/unix"
)

// BenchmarkExtractLayer unpacks a layer of 1000 files of 4 KiB in 20 directories (gzip).
func BenchmarkExtractLayer(b *testing.B) {
	testutil.RequireRoot(b)
	var entries []entry
	for i := 0; i < 20; i++ {
		entries = append(entries, dir(fmt.Sprintf("d%02d/", i)))
	}
	for i := 0; i < 1000; i++ {
		entries = append(entries, file(fmt.Sprintf("d%02d/f%04d", i%20, i), strings.Repeat("x", 4096)))
	}
	blob := compress(b, "gzip", layerTar(b, entries...))
	b.SetBytes(int64(1000 * 4096))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		d := filepath.Join(b.TempDir(), "layer")
		if err := os.Mkdir(d, 0o755); err != nil {
			b.Fatal(err)
		}
		if _, _, err := extractLayer(context.Background(), bytes.NewReader(blob), d, nil); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkMountOverlay mounts and unmounts a read-only stack of 40 layers.
func BenchmarkMountOverlay(b *testing.B) {
	testutil.RequireRoot(b)
	base := b.TempDir()
	var layers []string
	for i := 0; i < 40; i++ {
		d := filepath.Join(base, fmt.Sprintf("layer%02d", i))
		if err := os.Mkdir(d, 0o755); err != nil {
			b.Fatal(err)
		}
		layers = append(layers, d)
	}
	mnt := filepath.Join(base, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := MountOverlay(mnt, layers, "", ""); err != nil {
			b.Fatal(err)
		}
		if err := unix.Unmount(mnt, 0); err != nil {
			b.Fatal(err)
		}
	}
}
