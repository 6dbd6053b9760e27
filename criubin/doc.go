// Package criubin finds the CRIU binary hot uses and checks that it can work on this kernel.
//
// Search order: an explicit path (--criu), $HOT_CRIU, the private install made by
// scripts/install-criu.sh (PrivatePath), then PATH. The version is read from `criu --version`
// and must be at least MinVersion: CRIU 3.17 fails on kernels >= 6.13 (split vDSO/vvar areas)
// and 4.1 cannot dump inet sockets on kernels >= 6.16 (SO_PASSCRED); both were fixed in 4.2.
package criubin
