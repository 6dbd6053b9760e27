// Package cowfs is hot's content-addressed image and layer store.
//
// Layout under the store root (hot's --root):
//
//	blobs/sha256/<hex>   OCI content: manifests, configs, layer tars, as imported
//	layers/<hex>/        one unpacked, read-only layer per diffID, usable as an overlay lowerdir
//	layermeta/<hex>.json directories the layer created implicitly (re-checked on reuse)
//	images.json          name:tag → manifest digest, image records, holders (atomic writes)
//	images.lock          flock serialising writers of images.json
//	gc.lock              flock: imports hold it shared, removal holds it exclusive
//	tmp/                 per-import staging; renamed into place only once fully verified
//
// Contract:
//   - Every blob read from outside (an archive, a layout directory, a root filesystem) is
//     hashed while it is copied and compared with the digest and size that name it; a mismatch,
//     a truncated blob or a missing blob refuses the whole import, names the blob, and leaves
//     nothing behind (staging lives under tmp/ and is removed on failure).
//   - Layers are unpacked once per diffID. Extraction refuses entries that would escape the
//     layer root: ".." components, absolute names, writing through a symlink planted earlier in
//     the same layer or in a lower layer of the image, hardlinks to anything outside the layer.
//     Parent directories are opened with openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS), so the
//     kernel, not string checks alone, guarantees nothing is created outside the layer. A layer
//     already unpacked for another image is re-checked against the new image's lower layers.
//   - Owners, modes, xattrs, device nodes, fifos, hardlinks and mtimes are kept. OCI whiteouts
//     (".wh.NAME", ".wh..wh..opq") become overlayfs whiteouts (char device 0/0) and opaque
//     directories (trusted.overlay.opaque=y), so an overlay mount of the layer directories shows
//     exactly the image's filesystem.
//   - Concurrent imports are safe: each stages privately and renames blobs and layers into place
//     under images.lock; a blob or layer that another import placed first is kept.
//
// Spec types come from github.com/opencontainers/image-spec and go-digest; compression from
// github.com/klauspost/compress (gzip and zstd; faster than the standard library's gzip and the
// de-facto zstd implementation in Go); syscalls (openat2, the new mount API) from
// golang.org/x/sys/unix.
package cowfs
