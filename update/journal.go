package update

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"
)

// JournalFile is the name of the update journal in a container's state directory. It exists
// from the moment an update touches anything until it committed or rolled back, so a hot that
// was killed mid-update leaves a record the next hot command finishes from (Recover).
const JournalFile = "update.json"

// Phases recorded in the journal, in order.
const (
	phasePrepared = "prepared" // new generation dirs exist, running content staged; nothing stopped
	phaseDumping  = "dumping"  // packets held, CRIU dumping; processes may be frozen or gone
	phaseDumped   = "dumped"   // images complete, processes gone, old root still mounted
	phaseSwapped  = "swapped"  // new root mounted, state points at the new generation
	phaseRestored = "restored" // processes running on the new root; packets still held
	// phaseCommitting (post-copy only): every page was pulled, CRIU is told to end the dump and
	// kill the originals; from here on the update is finished forward, never rolled back.
	phaseCommitting = "committing"
)

// journal is the on-disk record of an update in progress.
type journal struct {
	Owner      int           `json:"owner"`      // pid of the hot process doing the update
	OwnerStart uint64        `json:"ownerStart"` // its start time, to tell pid reuse
	Op         string        `json:"op"`         // update or rollback
	Phase      string        `json:"phase"`
	From       int           `json:"from"` // generation that was running
	To         int           `json:"to"`   // generation being created
	GenDir     string        `json:"genDir"`
	Image      string        `json:"image"`
	ImageID    digest.Digest `json:"imageId"`
	ImagesDir  string        `json:"imagesDir"`
	Started    time.Time     `json:"started"`
	// Lazy marks a post-copy update: the original processes stay frozen under CRIU (which
	// serves their pages) until phaseCommitting, and are what a rollback resumes.
	Lazy     bool `json:"lazy,omitempty"`
	OrigInit int  `json:"origInit,omitempty"` // the original init (post-copy)
	// Originals are the original processes (post-copy), held by CRIU: a recovery discards
	// every other process of the cgroup (the copy) and resumes these.
	Originals      []int    `json:"originals,omitempty"`
	OriginalStarts []uint64 `json:"originalStarts,omitempty"` // their start times (pid reuse)
	// PageServer is the lazy dump's page server (post-copy): a recovery sends it an invalid
	// request so that CRIU gives up and resumes the originals.
	PageServer string `json:"pageServer,omitempty"`
	// PipeMaxBefore is fs.pipe-max-size before the post-copy update raised it for CRIU's page
	// server; a recovery puts it back.
	PipeMaxBefore int `json:"pipeMaxBefore,omitempty"`
	// Stashed are copies moved out of the old upper (stashCopies), under GenDir/stashed.
	Stashed []string `json:"stashed,omitempty"`
}

func journalPath(containerDir string) string { return filepath.Join(containerDir, JournalFile) }

func loadJournal(containerDir string) (*journal, error) {
	b, err := os.ReadFile(journalPath(containerDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read update journal: %w", err)
	}
	var j journal
	if err := json.Unmarshal(b, &j); err != nil {
		return nil, fmt.Errorf("read update journal %s: %w", journalPath(containerDir), err)
	}
	return &j, nil
}

func removeJournal(containerDir string) error {
	if err := os.Remove(journalPath(containerDir)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove update journal: %w", err)
	}
	return nil
}
