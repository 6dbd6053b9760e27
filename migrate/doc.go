// Package migrate moves a running container to another host: `hot migrate` (Migrate, the
// sender) and `hot agent` (Agent, the receiver), talking HTTP over TCP, optionally mutual TLS.
//
// The sequence, written top to bottom in send.go (sender.run): preflight (CRIU versions,
// kernel, architecture, CPU flags, image presence, name) → push the image if the target lacks
// it (before anything stops; the agent imports it with cowfs's verification) → freeze and dump
// (package checkpoint) → take the container's veth down → stream a checkpoint archive
// (checkpoint.WriteArchiveTo) → the target verifies it (checkpoint.ReadArchiveFrom),
// recreates the container with the same name and IP (restore.Recreate), restores it with
// client packets held (sockets.Holder), releases them and announces the address
// (network.Announce) → the source removes its copy. Any failure before the target's answer
// restores the container on the source from its images.
//
// Security: every request carries a bearer token the agent compares in constant time; refused
// requests are answered 401 and logged. The archive's manifest lists every member's size and
// SHA-256 and carries an HMAC keyed by the token, so the receiver refuses any altered stream
// even without TLS, and it touches nothing outside its staging directory before the whole
// stream verified.
//
// Only the standard library is used for the protocol (net/http, crypto/tls): nothing a
// library would add was needed. See docs/migration.md.
package migrate
