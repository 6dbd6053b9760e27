// Package network puts containers on a host bridge: one network namespace per container,
// bind-mounted so it outlives the container's processes, a veth pair into it, an address from
// a small persistent IPAM, and host ports published with nftables DNAT.
//
// Contract:
//   - New only checks the configuration. The first Attach creates the bridge (default "hot0",
//     gateway = first address of the subnet, default 10.199.0.0/24), refusing a subnet that
//     overlaps a host route, and the nftables table "ip hot-<bridge>".
//   - Attach records the lease in <StateDir>/<bridge>.json before it touches the host, then
//     makes the netns (<RunRoot>/netns/<id>), the veth pair (host end "hv<hash>" on the bridge,
//     container end eth0), lo up, the address, the default route and the published ports. If
//     any step fails, it undoes all of them. Requested addresses and host ports are checked
//     first: one in use by another container, the bridge, or (ports) a host process is refused
//     with a one-line error naming the fix, before anything is created.
//   - Detach removes the ports, the veth pair, the netns mount and file and the lease. It needs
//     nothing but the id and the state file: the veth and netns names are derived from the id,
//     so it also cleans a crash that happened between recording the lease and finishing. It is
//     idempotent. The bridge and the table stay; Teardown removes them when no lease is left.
//   - Attach and Detach of one bridge serialise on a flock, across hot processes.
//   - The first Attach on a bridge with no container rebuilds the bridge address and the table
//     from the configuration (subnet changes, tables edited by hand or made by an older hot).
//
// Libraries: links, addresses and routes go through github.com/vishvananda/netlink (the netlink
// library of the CNI plugins, moby, runc and cilium), which can
// create the veth's peer directly in the target namespace and work in a namespace through a
// handle without moving goroutines between namespaces. nftables is driven through the nft
// CLI rather than github.com/google/nftables: the rules use a concatenated-type map
// ("tcp . 8080 : 10.199.0.2 . 80"), fib and NAT statements, which google/nftables can only
// express as hand-assembled register bytecode; the CLI takes the same text an operator reads
// back with `nft list table ip hot-hot0` and applies each script as one atomic transaction.
// nft comes with the nftables package (scripts/deps.sh), and a publish or unpublish costs one
// nft run (a few ms).
//
// docs/runtime-network.md describes the bridge, the IPAM, the nftables rules, and how to
// inspect and clean by hand.
package network
