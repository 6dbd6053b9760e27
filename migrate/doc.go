// Package migrate moves a running container to another host: `hot migrate` (Migrate, the
// sender) and `hot agent` (Agent, the receiver), talking HTTP over TCP, optionally mutual TLS.
//
// The sequence, written top to bottom in send.go (sender.run): preflight (CRIU versions,
// kernel, architecture, CPU flags, image presence, name) → push the image if the target lacks
// it (before anything stops; the agent imports it with cowfs's verification) → freeze and dump
// (package checkpoint) → take the container's veth down → stream → the target verifies,
// recreates the container with the same name and IP (container.Manager.Adopt), restores it
// (package restore, into the new container's cgroup), releases held packets and announces
// the address (network.Announce) → the source removes its copy. Any failure before the
// target's answer restores the container on the source from its images.
//
// Security: every request carries a bearer token the agent compares in constant time; refused
// requests are answered 401 and logged. The migration stream's manifest lists every member's
// size and SHA-256 and is authenticated with an HMAC keyed by the token, so the receiver
// refuses any altered stream even without TLS, and it touches nothing outside its staging
// directories before the whole stream verified.
//
// Only the standard library is used for the protocol (net/http, crypto/tls, archive/tar,
// crypto/hmac): nothing a library would add was needed. See docs/migration.md.
package migrate
