package main

import "runtime"

// lockThreadForever wires the calling goroutine to its thread and never unlocks, so the
// runtime ends that thread (and whatever the probe changed on it) when the goroutine exits.
func lockThreadForever() { runtime.LockOSThread() }
