package sockets

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/florianl/go-nfqueue/v2"
	"golang.org/x/sys/unix"
)

// Defaults of HoldOptions.
const (
	// DefaultMaxQueueLen is the kernel queue length a Holder asks for (the kernel's default is
	// 1024). Packets beyond it are dropped, never passed: the client retransmits them.
	DefaultMaxQueueLen = 16384
	// hookLocalOut is NF_INET_LOCAL_OUT, the hook of packets the netns sends.
	hookLocalOut = 3
	// readBufferBytes is the netlink receive buffer of the reader. Every queued packet is one
	// notification in it; a notification that does not fit makes the kernel drop that packet.
	readBufferBytes = 32 << 20
	// queueTries is how many queue numbers NewHolder tries when one is taken in the netns.
	queueTries = 8
)

// HoldOptions tune a Holder. The zero value is fine.
type HoldOptions struct {
	// Queue is the NFQUEUE number; 0 picks a free one in 32768..65535 (queues are per netns).
	Queue uint16
	// MaxQueueLen is the most packets the kernel keeps for one hold; 0 means DefaultMaxQueueLen.
	MaxQueueLen uint32
	// Legacy uses the iptables-legacy/ip6tables-legacy binaries (xtables legacy backend)
	// instead of iptables, which is tried first otherwise (nf_tables backend on Debian 12).
	// The system's alternatives are never changed.
	Legacy bool
	// StartHolding makes the Holder hold from its first packet, as if Hold had been called
	// before the rules went in: for callers that must not let a single packet through, e.g.
	// a rollback after a crash, where the connections have no socket until the restore.
	StartHolding bool
	// Logger receives debug and warning messages; nil means slog.Default().
	Logger *slog.Logger
}

// HoldStats describe one Hold/Release cycle.
type HoldStats struct {
	Packets         int           `json:"packets"`             // incoming packets held and then released
	OutputDropped   int           `json:"output_dropped"`      // outgoing packets dropped during the hold
	HoldDuration    time.Duration `json:"hold_duration"`       // Hold() to Release()
	MaxPacketWait   time.Duration `json:"max_packet_wait"`     // first held packet's arrival to its release
	ReleaseDuration time.Duration `json:"release_duration"`    // time to hand all held packets back to the kernel
	Overflows       int           `json:"overflows,omitempty"` // notifications lost (kernel dropped those packets)
}

// Stats are a Holder's counters since NewHolder.
type Stats struct {
	Queue         uint16    `json:"queue"`
	Backend       string    `json:"backend"` // the iptables command whose rules are in place
	PassedPackets uint64    `json:"passed_packets"`
	HeldPackets   uint64    `json:"held_packets"`
	Holds         int       `json:"holds"`
	Overflows     uint64    `json:"overflows"`
	Last          HoldStats `json:"last"`
}

// Holder queues the packets of one network namespace to a reader in this process. Outside a
// hold every packet is accepted at once. During a hold the verdicts on incoming packets are
// withheld, so they wait in the kernel instead of being dropped, and Release lets them all
// through in arrival order; outgoing TCP segments that carry no new data (retransmissions,
// probes, ACKs) are dropped meanwhile, as CRIU's lock drops all (see holdTable for why), while
// new data the application sends before it is frozen goes out. Methods are safe for
// concurrent use.
type Holder struct {
	netnsPath string
	queue     uint16
	log       *slog.Logger
	rules     []installedRule
	nf        *nfqueue.Nfqueue
	cancel    context.CancelFunc // stops the reader
	closeOnce sync.Once
	closeErr  error
	done      chan struct{} // closed by Close

	mu         sync.Mutex
	sent       sentTracker // highest sequence sent per outgoing TCP flow
	holding    bool
	holdStart  time.Time
	firstHeld  time.Time
	held       int
	outDropped int
	lastID     uint32
	overflow   int
	readerErr  error
	closed     bool
	stats      Stats
}

// installedRule is one hold rule in place, with the front end that put it there.
type installedRule struct {
	tool  iptablesTool
	chain string
	spec  []string
}

// NewHolder installs an NFQUEUE rule for incoming packets (IPv4 and, where the kernel has it,
// IPv6) in the network namespace at netnsPath and starts a pass-through reader for it. The
// rules and the reader go away with Close, or when ctx is cancelled. Errors that mean the host
// cannot hold packets match ErrNotSupported.
func NewHolder(ctx context.Context, netnsPath string, opts HoldOptions) (*Holder, error) {
	if err := checkNetns(netnsPath); err != nil {
		return nil, err
	}
	if _, err := exec.LookPath("nsenter"); err != nil {
		return nil, &NotSupportedError{Missing: "nsenter", Fix: "apt-get install util-linux", Err: err}
	}
	if len(allTools()) == 0 {
		return nil, &NotSupportedError{Missing: "iptables CLI", Fix: "apt-get install iptables", Err: exec.ErrNotFound}
	}
	if opts.MaxQueueLen == 0 {
		opts.MaxQueueLen = DefaultMaxQueueLen
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	h := &Holder{netnsPath: netnsPath, log: log, done: make(chan struct{}), sent: sentTracker{}}
	if opts.StartHolding {
		h.holding, h.holdStart = true, time.Now()
	}
	if err := h.startReader(opts); err != nil {
		return nil, err
	}
	if err := h.installRules(ctx, opts.Legacy); err != nil {
		h.stopReader()
		return nil, err
	}
	h.stats.Queue = h.queue
	h.stats.Backend = h.rules[0].tool.Cmd
	go func() {
		select {
		case <-ctx.Done():
			if err := h.Close(); err != nil {
				h.log.Warn("close packet holder after cancel", "netns", netnsPath, "err", err)
			}
		case <-h.done:
		}
	}()
	log.Debug("packet holder ready", "netns", netnsPath, "queue", h.queue, "backend", h.stats.Backend)
	return h, nil
}

// startReader opens the nfnetlink_queue socket inside the netns (the netlink library creates
// it on a thread locked into the namespace; the socket stays bound to it) and binds a queue.
func (h *Holder) startReader(opts HoldOptions) error {
	f, err := os.Open(h.netnsPath)
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", h.netnsPath, err)
	}
	defer f.Close()
	var lastErr error
	for try := 0; try < queueTries; try++ {
		q := opts.Queue
		if q == 0 {
			q = uint16(32768 + rand.IntN(32768))
		}
		nf, err := nfqueue.Open(&nfqueue.Config{
			NetNS:        int(f.Fd()),
			NfQueue:      q,
			MaxQueueLen:  opts.MaxQueueLen,
			MaxPacketLen: headerBytes,
			Copymode:     nfqueue.NfQnlCopyPacket,
			Flags:        nfqueue.NfQaCfgFlagGSO, // no segmentation of GSO packets for us; never fail-open
			AfFamily:     unix.AF_INET,
			WriteTimeout: time.Second,
		})
		if err != nil {
			return &NotSupportedError{Missing: "nfnetlink_queue", Fix: "a kernel with CONFIG_NETFILTER_NETLINK_QUEUE", Err: fmt.Errorf("open netfilter netlink socket in %s: %w", h.netnsPath, err)}
		}
		if err := setReadBuffer(nf, readBufferBytes); err != nil {
			h.log.Warn("enlarge nfqueue receive buffer", "err", err)
		}
		rctx, cancel := context.WithCancel(context.Background())
		h.nf, h.queue, h.cancel = nf, q, cancel
		err = nf.RegisterWithErrorFunc(rctx, h.onPacket, h.onError)
		if err == nil {
			return nil
		}
		cancel()
		nf.Close()
		h.nf, h.cancel = nil, nil
		lastErr = err
		if opts.Queue != 0 || !errors.Is(err, unix.EBUSY) {
			break
		}
	}
	if errors.Is(lastErr, unix.EBUSY) {
		return fmt.Errorf("bind nfqueue %d in %s: queue taken by another reader: %w", opts.Queue, h.netnsPath, lastErr)
	}
	return &NotSupportedError{Missing: "nfnetlink_queue", Fix: "a kernel with CONFIG_NETFILTER_NETLINK_QUEUE", Err: fmt.Errorf("bind nfqueue in %s: %w", h.netnsPath, lastErr)}
}

// setReadBuffer sets the socket's receive buffer past net.core.rmem_max (root only).
func setReadBuffer(nf *nfqueue.Nfqueue, n int) error {
	rc, err := nf.Con.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n)
	}); err != nil {
		return err
	}
	return serr
}

// installRules puts the hold rules at the top of raw PREROUTING and OUTPUT, for IPv4 and IPv6,
// with the first iptables backend that accepts an NFQUEUE target (only the legacy one if
// onlyLegacy).
func (h *Holder) installRules(ctx context.Context, onlyLegacy bool) error {
	tools := allTools()
	var failures []string
	backends := []bool{false, true}
	if onlyLegacy {
		backends = []bool{true}
	}
	for _, legacy := range backends {
		var rules []installedRule
		ok := true
	tools:
		for _, t := range tools {
			if strings.HasSuffix(t.Cmd, "-legacy") != legacy || (t.IPv6 && !hostHasIPv6()) {
				continue
			}
			for _, chain := range holdChains() {
				spec := holdRuleSpec(h.queue, chain)
				args := append([]string{"-w", "-t", holdTable, "-I", chain, "1"}, spec...)
				if _, err := runIn(ctx, h.netnsPath, "", t.Cmd, args...); err != nil {
					failures = append(failures, err.Error())
					ok = false
					break tools
				}
				rules = append(rules, installedRule{tool: t, chain: chain, spec: spec})
			}
		}
		if ok && len(rules) > 0 && !rules[0].tool.IPv6 {
			h.rules = rules
			return nil
		}
		removeRules(ctx, h.netnsPath, rules)
	}
	if ctx.Err() != nil {
		return fmt.Errorf("install hold rule in %s: %w", h.netnsPath, ctx.Err())
	}
	return &NotSupportedError{
		Missing: "NFQUEUE target",
		Fix:     "a kernel with CONFIG_NETFILTER_XT_TARGET_NFQUEUE and iptables (nft or legacy backend)",
		Err:     errors.New(strings.Join(failures, "; ")),
	}
}

// removeRules deletes installed rules, returning the first failure.
func removeRules(ctx context.Context, netnsPath string, rules []installedRule) error {
	var first error
	for _, r := range rules {
		args := append([]string{"-w", "-t", holdTable, "-D", r.chain}, r.spec...)
		if _, err := runIn(ctx, netnsPath, "", r.tool.Cmd, args...); err != nil && first == nil {
			first = fmt.Errorf("remove hold rule: %w", err)
		}
	}
	return first
}

// onPacket is the reader's callback, once per queued packet, in arrival order.
func (h *Holder) onPacket(a nfqueue.Attribute) int {
	if a.PacketID == nil {
		return 0
	}
	id := *a.PacketID
	h.mu.Lock()
	defer h.mu.Unlock()
	if a.Hook != nil && *a.Hook == hookLocalOut {
		fresh := true
		if a.Payload != nil {
			total := len(*a.Payload)
			if a.CapLen != nil {
				total = int(*a.CapLen)
			}
			if seg, ok := parseSegment(*a.Payload, total); ok {
				fresh = h.sent.observe(seg)
			}
		}
		verdict := nfqueue.NfAccept
		if h.holding && !fresh {
			// Nothing new: a retransmission, probe or ACK, possibly from a socket being
			// dumped, with a timestamp newer than CRIU saves (see holdTable). Dropped, as
			// CRIU's lock does. New data (the application still ran) goes out.
			verdict = nfqueue.NfDrop
			h.outDropped++
		} else {
			h.stats.PassedPackets++
		}
		if err := h.nf.SetVerdict(id, verdict); err != nil {
			h.log.Warn("verdict on outgoing packet", "netns", h.netnsPath, "queue", h.queue, "err", err)
		}
		return 0
	}
	if h.holding {
		if h.held == 0 {
			h.firstHeld = time.Now()
		}
		h.held++
		h.lastID = id
		return 0
	}
	h.stats.PassedPackets++
	if err := h.nf.SetVerdict(id, nfqueue.NfAccept); err != nil {
		h.log.Warn("accept packet", "netns", h.netnsPath, "queue", h.queue, "err", err)
	}
	return 0
}

// onError decides whether the reader goes on after a receive error.
func (h *Holder) onError(err error) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	if errors.Is(err, unix.ENOBUFS) {
		// The kernel could not notify us of a packet and dropped it; the sender retransmits.
		h.overflow++
		h.stats.Overflows++
		return 0
	}
	if h.closed {
		return 1
	}
	var ne interface{ Timeout() bool }
	if errors.As(err, &ne) && ne.Timeout() {
		return 0
	}
	h.readerErr = err
	h.log.Warn("packet holder reader stopped; queued packets are dropped until the rule is removed", "netns", h.netnsPath, "queue", h.queue, "err", err)
	return 1
}

// Hold starts withholding verdicts: from now on incoming packets wait in the kernel queue, and
// outgoing TCP segments with no new data are dropped. Call it right before the freeze.
func (h *Holder) Hold() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.usableLocked(); err != nil {
		return err
	}
	if h.holding {
		return fmt.Errorf("hold packets in %s: already holding", h.netnsPath)
	}
	h.holding, h.holdStart, h.held, h.outDropped, h.overflow = true, time.Now(), 0, 0, 0
	return nil
}

// Release accepts every held packet, in arrival order, with one batch verdict and returns to
// pass-through. It reports what the hold did.
func (h *Holder) Release() (HoldStats, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.holding {
		return HoldStats{}, fmt.Errorf("release packets in %s: not holding", h.netnsPath)
	}
	if err := h.usableLocked(); err != nil {
		return HoldStats{}, err
	}
	start := time.Now()
	st := HoldStats{Packets: h.held, OutputDropped: h.outDropped, HoldDuration: start.Sub(h.holdStart), Overflows: h.overflow}
	var err error
	if h.held > 0 {
		err = h.nf.SetVerdictBatch(h.lastID, nfqueue.NfAccept)
		st.ReleaseDuration = time.Since(start)
		st.MaxPacketWait = time.Since(h.firstHeld)
	}
	h.holding = false
	h.stats.Holds++
	h.stats.HeldPackets += uint64(h.held)
	h.stats.Last = st
	h.held = 0
	if err != nil {
		return st, fmt.Errorf("release %d held packets in %s: %w", st.Packets, h.netnsPath, err)
	}
	return st, nil
}

// usableLocked returns why the holder cannot hold or release, if it cannot.
func (h *Holder) usableLocked() error {
	if h.closed {
		return fmt.Errorf("packet holder for %s is closed", h.netnsPath)
	}
	if h.readerErr != nil {
		return fmt.Errorf("packet holder reader for %s stopped: %w", h.netnsPath, h.readerErr)
	}
	return nil
}

// Holding reports whether a hold is in progress.
func (h *Holder) Holding() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.holding
}

// Stats returns the counters since NewHolder.
func (h *Holder) Stats() Stats {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.stats
}

// Queue returns the NFQUEUE number in use.
func (h *Holder) Queue() uint16 { return h.queue }

// Close removes the rules and stops the reader. Packets still held are dropped (their senders
// retransmit), never accepted: call Release first to let them through. Close is idempotent.
func (h *Holder) Close() error {
	h.closeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err := removeRules(ctx, h.netnsPath, h.rules)
		h.mu.Lock()
		if h.holding && h.held > 0 && h.readerErr == nil {
			if derr := h.nf.SetVerdictBatch(h.lastID, nfqueue.NfDrop); derr != nil {
				h.log.Warn("drop held packets", "netns", h.netnsPath, "err", derr)
			}
		}
		h.holding = false
		h.closed = true
		h.mu.Unlock()
		h.closeErr = err
		// Packets queued just before the rules went are already notified to the reader,
		// which accepts them within microseconds; give it that moment before unbinding.
		time.Sleep(2 * time.Millisecond)
		h.stopReader()
		close(h.done)
	})
	return h.closeErr
}

// stopReader cancels the reader and closes its socket (the kernel unbinds the queue).
func (h *Holder) stopReader() {
	if h.cancel != nil {
		h.cancel()
	}
	if h.nf != nil {
		if err := h.nf.Close(); err != nil {
			h.log.Debug("close nfqueue socket", "err", err)
		}
	}
}
