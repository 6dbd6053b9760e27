// Package workload builds the root file systems of the demo app (demo/app) from hot's source
// tree, for the benchmarks (package bench) and the end-to-end tests (internal/testutil). It
// depends on the standard library only, so any test package can use it.
package workload
