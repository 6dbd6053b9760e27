package sockets

import (
	"fmt"
	"strings"
)

// holdComment marks every rule a Holder installs, so that Cleanup finds rules a crashed hot
// left behind. The queue number follows the colon.
const holdComment = "hot-hold"

// soccrMark is the packet mark of the packets CRIU injects itself (SOCCR_MARK in CRIU's
// source: libsoccr's raw FIN for connections it closes). CRIU's own network lock lets such
// packets through; the hold rules do the same.
const soccrMark = "0xc114"

// holdTable is the table of the hold rules: raw, before conntrack and routing.
//
// Incoming packets are queued in PREROUTING. Queued later (filter INPUT) a packet has already
// been early-demuxed: it carries a reference to the socket it was meant for, and after restore
// it would be handed to that old, closed socket and silently discarded, costing the client a
// retransmission. Queued in PREROUTING it is matched to the restored socket when released.
//
// Outgoing packets are queued in OUTPUT so that, during a hold, the reader can drop those that
// carry no new data (CRIU's own lock drops all). The dumped sockets are still in the kernel while CRIU works, and a
// socket in TCP repair mode still fires its retransmission timer: such a segment carries a TCP
// timestamp newer than the one CRIU saved, the client takes it as its latest, and after
// restore rejects the restored socket's segments as old (PAWS) until the restored clock has
// caught up, i.e. for as long as the pause was. (Seen with real CRIU: the answer to a held
// request came one client retransmission late, +200 to +500 ms.)
const holdTable = "raw"

// holdChains are the chains of holdTable that get a hold rule.
func holdChains() []string { return []string{"PREROUTING", "OUTPUT"} }

// holdRuleSpec returns the iptables arguments (after -I/-D CHAIN) of the hold rule for queue q
// in chain (PREROUTING or OUTPUT). Deliberately no --queue-bypass: if the reader is gone,
// packets are dropped (the client retransmits) instead of reaching a socket that is being
// restored and answering with RST.
//
// Loopback traffic is not held: inside the namespace it is the container talking to itself
// or hot's own health probe, both of which must go on while client packets wait. PREROUTING
// matches the input interface, OUTPUT the output interface (iptables refuses -i in OUTPUT).
func holdRuleSpec(q uint16, chain string) []string {
	iface := "-i"
	if chain == "OUTPUT" {
		iface = "-o"
	}
	return []string{
		"!", iface, "lo",
		"-m", "mark", "!", "--mark", soccrMark,
		"-m", "comment", "--comment", fmt.Sprintf("%s:%d", holdComment, q),
		"-j", "NFQUEUE", "--queue-num", fmt.Sprint(q),
	}
}

// saveRule is one "-A CHAIN ..." line of iptables-save output, split into words.
type saveRule struct {
	Table string
	Chain string
	Args  []string // words after the chain name
	Line  string   // the original line
}

// parseSave returns the rules of every table in iptables-save output, and the chains of the
// filter table.
func parseSave(out string) (rules []saveRule, filterChains []string) {
	table := ""
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "*"):
			table = line[1:]
		case table == "":
		case strings.HasPrefix(line, ":"):
			if f := strings.Fields(line[1:]); len(f) > 0 && table == "filter" {
				filterChains = append(filterChains, f[0])
			}
		case strings.HasPrefix(line, "-A "):
			words := splitSaveWords(line)
			if len(words) < 2 {
				continue
			}
			rules = append(rules, saveRule{Table: table, Chain: words[1], Args: words[2:], Line: line})
		}
	}
	return rules, filterChains
}

// splitSaveWords splits an iptables-save line into words the way iptables-restore does:
// blanks separate words, double quotes group them, a backslash escapes the next character.
func splitSaveWords(line string) []string {
	var words []string
	var cur strings.Builder
	inQuote, have := false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case c == '\\' && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
			have = true
		case c == '"':
			inQuote = !inQuote
			have = true
		case (c == ' ' || c == '\t') && !inQuote:
			if have {
				words = append(words, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteByte(c)
			have = true
		}
	}
	if have {
		words = append(words, cur.String())
	}
	return words
}

// deleteLine turns an iptables-save "-A CHAIN ..." line into the "-D CHAIN ..." line that
// iptables-restore --noflush uses to delete exactly that rule.
func deleteLine(r saveRule) string {
	return "-D" + strings.TrimPrefix(r.Line, "-A")
}

// hasWordPair reports whether args contain key immediately followed by a value accepted by ok.
func hasWordPair(args []string, key string, ok func(string) bool) bool {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == key && ok(args[i+1]) {
			return true
		}
	}
	return false
}

// isHoldRule reports whether r was installed by a Holder (any queue).
func isHoldRule(r saveRule) bool {
	return hasWordPair(r.Args, "--comment", func(v string) bool {
		return v == holdComment || strings.HasPrefix(v, holdComment+":")
	})
}

// isCRIURule reports whether r belongs to CRIU's iptables network lock (filter table): a jump
// to (or a rule in) the CRIU chain, or a per-connection lock rule
// (`-m mark ! --mark 0xc114 ... -j DROP`).
func isCRIURule(r saveRule) bool {
	if r.Table != "filter" {
		return false
	}
	if r.Chain == "CRIU" || hasWordPair(r.Args, "-j", func(v string) bool { return v == "CRIU" }) {
		return true
	}
	notMark := false
	for i := 0; i+2 < len(r.Args); i++ {
		if r.Args[i] == "!" && r.Args[i+1] == "--mark" && strings.EqualFold(markValue(r.Args[i+2]), soccrMark) {
			notMark = true
		}
	}
	return notMark && hasWordPair(r.Args, "-j", func(v string) bool { return v == "DROP" })
}

// markValue drops a "/mask" suffix that iptables-save may print after a mark.
func markValue(v string) string {
	if i := strings.IndexByte(v, '/'); i >= 0 {
		return v[:i]
	}
	return v
}

// nftCRIUTables returns the "FAMILY NAME" of every table in `nft list tables` output that
// CRIU's nftables network lock creates: `inet CRIU-<run id>` (CRIU >= 3.18 uses the run's UUID,
// older images the root task's PID).
func nftCRIUTables(out string) []string {
	var tables []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 3 && f[0] == "table" && f[1] == "inet" && strings.HasPrefix(f[2], "CRIU-") {
			tables = append(tables, f[1]+" "+f[2])
		}
	}
	return tables
}
