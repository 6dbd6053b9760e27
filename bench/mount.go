package bench

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// mountTmpfs mounts a fresh tmpfs at dir (created if missing).
func mountTmpfs(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("tmpfs at %s: %w", dir, err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount tmpfs at %s: %w", dir, err)
	}
	return nil
}
