package checkpoint

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/hotctl/hot/sockets"
)

// releaseTCPRepair takes every TCP socket of the tree rooted at pid out of repair mode.
//
// CRIU puts established connections into TCP repair mode while it dumps them and takes them
// out again when it finishes or fails cleanly. A CRIU that dies (SIGKILL, OOM) leaves them in
// repair mode, where they no longer answer: the peers see resets once the network lock is
// gone. It returns how many sockets it switched back (see sockets.SetTCPRepair).
func releaseTCPRepair(pid int) (int, error) {
	pids, err := treePIDs(pid)
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for _, p := range pids {
		k, err := sockets.SetTCPRepair(p, false)
		n += k
		if err != nil {
			errs = append(errs, err)
		}
	}
	return n, errors.Join(errs...)
}

// treePIDs lists pid and all its descendants (through /proc/PID/task/TID/children).
func treePIDs(pid int) ([]int, error) {
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		tasks, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(out[i]), "task"))
		if err != nil {
			if i == 0 {
				return nil, fmt.Errorf("list tasks of %d: %w", pid, err)
			}
			continue
		}
		for _, t := range tasks {
			b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(out[i]), "task", t.Name(), "children"))
			if err != nil {
				continue
			}
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil {
					out = append(out, c)
				}
			}
		}
	}
	return out, nil
}
