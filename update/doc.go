// Package update performs the hot update of a running container to a new image: preflight →
// prepare → freeze → dump → swap → restore → verify → commit, or roll back. The sequence is
// written top to bottom in update.go; each phase emits an event (package events).
//
// Files: the running generation's upper directory becomes a read-only layer above the new
// image's layers, with a fresh upper, so what the container wrote is carried over and the old
// generation stays intact on disk for rollback. Files the processes hold open or mapped whose
// content differs in the new generation (their executable, libraries) are handled like a
// package upgrade does: the running content is staged at its path in the fresh upper before
// the freeze, CRIU restores the processes onto exactly the files they had, and then the new
// content replaces them by rename. The processes keep running their old code until they
// re-exec (see --reload-signal); the update reports which ones still do.
package update
