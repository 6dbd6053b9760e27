// Package events records the phases of long operations (update, checkpoint, restore,
// migrate) as a stream of events: one when a phase starts, one when it ends with its duration,
// outcome and details. Sinks render the stream: JSON lines for scripts (--json), a live
// progress display for terminals, and an append-only log file kept for `hot events NAME` and
// `hot inspect`.
package events
