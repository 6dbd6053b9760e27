// Package sockets handles a container's network namespace around a checkpoint/restore pause:
// it holds incoming packets instead of dropping them, lists the namespace's TCP sockets, and
// removes network locks a failed CRIU run left behind. Every function takes the path of a
// network namespace file (a bind mount such as /run/netns/NAME or /proc/PID/ns/net).
//
// # Holding packets
//
// CRIU's network lock drops every packet during the pause, so each client that sent something
// waits for its TCP retransmission timer (at least 200 ms, doubling): the gap it sees is the
// pause rounded up to its next retransmission. A Holder instead puts iptables NFQUEUE rules at
// the top of the namespace's raw PREROUTING and OUTPUT chains (IPv4 and IPv6; loopback left
// alone) and reads the queue from this process. Outside a hold it accepts every packet at once
// (about 20-40 µs per packet on the reference host). Hold withholds the verdicts on incoming
// packets, so they wait in the kernel, and drops outgoing TCP segments that carry no new data
// (CRIU's lock drops all outgoing packets; new data the still-running application sends goes
// out). Release accepts the held packets, in arrival order, with one batch verdict (well under
// a millisecond) and the clients see a gap equal to the pause. Run CRIU with --network-lock
// skip while a Holder is open. Why raw PREROUTING (early demux) and why those outgoing
// segments are dropped (TCP timestamps of sockets in repair mode) is explained at holdTable
// and in docs/hold.md.
//
// The rule has no --queue-bypass: if the reader is gone (hot crashed), packets are dropped and
// the client retransmits, rather than reaching a socket that is being restored and getting a
// reset. Packets beyond the queue length (HoldOptions.MaxQueueLen) are dropped the same way.
// Rules carry the comment "hot-hold:QUEUE"; Cleanup removes leftovers after a crash, and
// HoldRules lists them. Close while holding drops the held packets; call Release first.
//
// The kernel must have NFQUEUE as an xtables target (CONFIG_NETFILTER_XT_TARGET_NFQUEUE) and
// nfnetlink_queue; nftables' own "queue" expression and sch_plug are not needed (the reference
// kernel has neither). iptables with the nf_tables backend carries the xtables NFQUEUE target
// through nft_compat and works; iptables-legacy works too (HoldOptions.Legacy) and is tried
// when iptables fails. HoldSupported finds out by trying, in a scratch namespace; its errors,
// like NewHolder's for the same causes, match ErrNotSupported and name what is missing, and the
// caller then falls back to CRIU's lock.
//
// The reader's netlink socket and the sock_diag socket of ListTCP are created on an OS thread
// locked into the target namespace (github.com/mdlayher/netlink and
// github.com/vishvananda/netlink do that and restore the thread); iptables and nft run under
// nsenter --net. The queue protocol is github.com/florianl/go-nfqueue/v2 (pure Go, no
// libnetfilter_queue); sock_diag parsing is github.com/vishvananda/netlink.
//
// # TCP inventory
//
// ListTCP returns every TCP socket of a namespace (addresses, state, inode, retransmissions)
// and CountEstablished the number of established connections: the "TCP connections
// established before and after" of an update.
//
// # CRIU's lock leftovers
//
// CRIU 4.2 locks with an nftables table "inet CRIU-<run UUID>" (--network-lock nftables; older
// images use the root task's PID) or an iptables CRIU chain jumped to from INPUT and OUTPUT
// (--network-lock iptables), plus per-connection rules matching "! --mark 0xc114". A killed
// dump leaves them, and the namespace then drops all traffic: CRIULocks lists and
// CleanupCRIULock removes them.
//
// See docs/hold.md for the measurements.
package sockets
