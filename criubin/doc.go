// Package criubin finds the CRIU binary hot uses and checks that it can work on this kernel.
//
// Search order: an explicit path (--criu), $HOT_CRIU, the private install made by
// scripts/install-criu.sh (PrivatePath), then PATH. The version is read from `criu --version`
// and must be at least MinVersion: CRIU 3.17 fails on kernels >= 6.13 (split vDSO/vvar areas)
// and 4.1 cannot dump inet sockets on kernels >= 6.16 (SO_PASSCRED); both were fixed in 4.2.
//
// Binary.EnsureKdatCache keeps CRIU's kernel-feature cache (/run/criu.kdat) where CRIU itself
// does not because /run is not a tmpfs, bound by a marker to the boot id and CRIU version;
// callers run it before each CRIU call and ignore its error (CRIU then probes the kernel, ~40
// ms). It mounts a tmpfs in a mount namespace of one locked, then discarded, OS thread.
package criubin
