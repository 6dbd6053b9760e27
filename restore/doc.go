// Package restore brings a process tree dumped by package checkpoint back to life with CRIU
// (go-criu's swrk RPC): into a prepared root filesystem, rejoining the external network
// namespace the dump recorded (passed to CRIU with inherit-fd), with established TCP
// connections resumed.
//
// The restored root process becomes a child of the caller (CRIU's rst_sibling), so the
// caller (the container's monitor) can wait for it; a caller that is a child subreaper also
// inherits the rest of the tree. With Lazy, memory is served on demand by a local
// `criu lazy-pages` daemon through userfaultfd: the tree runs before its memory is in.
//
// A failed restore returns a *checkpoint.CRIUError and leaves the images untouched, so the
// restore can be retried.
package restore
