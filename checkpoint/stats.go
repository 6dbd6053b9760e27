package checkpoint

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/checkpoint-restore/go-criu/v8/crit"
)

// readDumpStats adds CRIU's stats-dump numbers (microseconds, pages) and the size of the
// images to s.
func readDumpStats(dir string, s *DumpStats) error {
	st, err := crit.GetDumpStats(dir)
	if err != nil {
		return fmt.Errorf("decode %s: %w", filepath.Join(dir, crit.StatsDump), err)
	}
	us := func(v uint32) time.Duration { return time.Duration(v) * time.Microsecond }
	s.CRIUFreezing = us(st.GetFreezingTime())
	s.CRIUFrozen = us(st.GetFrozenTime())
	s.MemDump = us(st.GetMemdumpTime())
	s.MemWrite = us(st.GetMemwriteTime())
	s.PagesScanned = st.GetPagesScanned()
	s.PagesWritten = st.GetPagesWritten()
	s.PagesLazy = st.GetPagesLazy()
	s.BytesWritten = s.PagesWritten * uint64(os.Getpagesize())
	s.ImagesBytes, err = DirSize(dir)
	return err
}

// DirSize is the total size of the regular files under dir.
func DirSize(dir string) (int64, error) {
	var total int64
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			info, err := d.Info()
			if err != nil {
				return err
			}
			total += info.Size()
		}
		return nil
	})
	return total, err
}
