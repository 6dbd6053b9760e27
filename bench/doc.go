// Package bench measures what a client sees while a running container is updated, and puts
// hot's numbers next to the alternatives measured in the same run on the same machine:
//
//   - hot: `hot update` (CRIU dump, overlay swap, restore onto the new image, packets held);
//   - restart: `hot stop` + `hot rm` + `hot run` of the new image on the same address, the
//     usual way to roll out a new image (requests fail, in-memory state is lost);
//   - runc: `runc checkpoint` + `runc restore` of the same container (runc cannot restore
//     onto a changed image, so this is the price of a checkpoint/restore round trip alone).
//
// The workload is the demo app (demo/app) holding a given amount of touched, resident memory
// (-rss), built from the module's source for two versions. Keep-alive clients
// (internal/testapps/loadclient) send requests back to back during each trial; the longest
// wait one of them saw is the client-visible gap. Each method runs Runs times per memory size;
// the report gives medians and each method's ratio to hot.
//
// The hot driver runs the hot binary as a user would (its own --root, --run-root, bridge and
// subnet, removed at the end). The runc driver builds an OCI bundle (the demo root file
// system and a config.json from `runc spec`) in a network namespace of its own with a veth
// to the host, and passes hot's CRIU (>= 4.2) to runc with --criu.
package bench
