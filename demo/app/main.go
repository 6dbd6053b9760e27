// Command app is the demo workload of hot: a tiny HTTP/1.1 server with an in-memory request
// counter. It answers every request with its version and the counter, keeps connections alive,
// and on SIGHUP re-executes its own binary (nginx-style binary upgrade) handing over its
// listener, its open client connections and the counter, so an updated binary on disk takes
// over without a client noticing.
//
// The version is set at build time: go build -ldflags "-X main.version=v2".
//
// Endpoints: / (version and count), /healthz, /cat?path=FILE (a file's content, for tests),
// /write?path=FILE&data=TEXT (writes a file, for tests).
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var version = "v1"

// Environment used to hand state to the re-executed binary.
const (
	envCount = "DEMO_HANDOFF_COUNT" // counter value
	envFDs   = "DEMO_HANDOFF_FDS"   // comma-separated fds: the listener, then client connections
)

func main() {
	addr := flag.String("listen", ":8080", "address to listen on")
	writeFile := flag.String("write-on-start", "", "file to create at first start (shows that files the container wrote survive)")
	rssMB := flag.Int("rss", 0, "MB of memory to allocate, touch and keep resident (checkpoint and update benchmarks)")
	flag.Parse()
	ballast := resident(*rssMB)
	log := slog.New(slog.NewTextHandler(os.Stdout, nil)).With("version", version, "pid", os.Getpid())

	s := &server{log: log, conns: map[*conn]struct{}{}}
	var ln net.Listener
	var inherited []net.Conn
	if v := os.Getenv(envCount); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			log.Error("bad handoff counter", "value", v)
			os.Exit(1)
		}
		s.count.Store(n)
		ln, inherited = adopt(log)
		log.Info("took over after re-exec", "count", n, "connections", len(inherited))
	} else {
		var err error
		// Plain TCP: Go listens with MPTCP by default where the kernel has it, and CRIU cannot
		// checkpoint MPTCP sockets ("inet: Unsupported proto 262").
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		if ln, err = lc.Listen(context.Background(), "tcp", *addr); err != nil {
			log.Error("listen", "addr", *addr, "err", err)
			os.Exit(1)
		}
		if *writeFile != "" {
			if err := os.WriteFile(*writeFile, []byte("written by "+version+"\n"), 0o644); err != nil {
				log.Warn("write-on-start", "file", *writeFile, "err", err)
			}
		}
		log.Info("listening", "addr", ln.Addr().String())
	}
	for _, c := range inherited {
		s.serve(c)
	}
	go s.acceptLoop(ln)
	s.ln = ln

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	defer runtime.KeepAlive(ballast)
	for sg := range sig {
		if sg != syscall.SIGHUP {
			log.Info("exiting", "signal", sg.String(), "count", s.count.Load())
			os.Exit(0)
		}
		if err := s.reexec(); err != nil {
			log.Error("re-exec failed; still serving", "err", err)
			s.resume()
		}
	}
}

// resident allocates mb MB and writes every page with non-zero content, so the memory is
// resident and a checkpoint has to copy it (zero pages would be skipped).
func resident(mb int) []byte {
	b := make([]byte, mb<<20)
	for i := 0; i < len(b); i += 4096 {
		b[i] = byte(i>>12) | 1
	}
	return b
}

type server struct {
	log      *slog.Logger
	ln       net.Listener
	count    atomic.Int64
	draining atomic.Bool

	mu    sync.Mutex
	conns map[*conn]struct{}
	wg    sync.WaitGroup // connection goroutines
}

type conn struct {
	net.Conn
	br *bufio.Reader
}

func (s *server) acceptLoop(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.draining.Load() {
				return
			}
			s.log.Warn("accept", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		s.serve(c)
	}
}

func (s *server) serve(nc net.Conn) {
	c := &conn{Conn: nc, br: bufio.NewReader(nc)}
	s.mu.Lock()
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	if s.draining.Load() {
		c.SetReadDeadline(time.Now()) // a handoff started: park it at once
	}
	s.start(c)
}

func (s *server) start(c *conn) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if !s.handle(c) {
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			c.Close()
		}
	}()
}

// handle serves requests on c until the client closes (returns false) or a handoff parks the
// connection between two requests (returns true; the connection stays open for the next binary).
func (s *server) handle(c *conn) bool {
	for {
		// Peek consumes nothing: a deadline set by a handoff interrupts it safely.
		if _, err := c.br.Peek(1); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && s.draining.Load() && c.br.Buffered() == 0 {
				return true
			}
			return false
		}
		req, err := http.ReadRequest(c.br)
		if err != nil {
			return false
		}
		io.Copy(io.Discard, req.Body)
		req.Body.Close()
		status, body := s.respond(req)
		resp := fmt.Sprintf("HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s",
			status, http.StatusText(status), len(body), body)
		if _, err := io.WriteString(c, resp); err != nil {
			return false
		}
		if s.draining.Load() && c.br.Buffered() == 0 {
			return true
		}
	}
}

func (s *server) respond(req *http.Request) (int, string) {
	switch req.URL.Path {
	case "/healthz":
		return http.StatusOK, "ok\n"
	case "/cat":
		b, err := os.ReadFile(req.URL.Query().Get("path"))
		if err != nil {
			return http.StatusNotFound, err.Error() + "\n"
		}
		return http.StatusOK, string(b)
	case "/write":
		q := req.URL.Query()
		if err := os.WriteFile(q.Get("path"), []byte(q.Get("data")), 0o644); err != nil {
			return http.StatusInternalServerError, err.Error() + "\n"
		}
		return http.StatusOK, "written\n"
	}
	n := s.count.Add(1)
	return http.StatusOK, fmt.Sprintf("demo %s count=%d pid=%d\n", version, n, os.Getpid())
}

// reexec parks every connection between requests and execs the binary at its path on disk
// (which an update may have replaced) with the listener, the connections and the counter.
// The process keeps its PID (it may be PID 1 of a container).
func (s *server) reexec() error {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return fmt.Errorf("find own binary: %w", err)
	}
	exe = strings.TrimSuffix(exe, " (deleted)")
	s.draining.Store(true)
	tl := s.ln.(*net.TCPListener)
	tl.SetDeadline(time.Now()) // stop accepting; new connects wait in the backlog
	s.mu.Lock()
	for c := range s.conns {
		c.SetReadDeadline(time.Now())
	}
	s.mu.Unlock()
	s.wg.Wait()

	lf, err := tl.File()
	if err != nil {
		return fmt.Errorf("listener fd: %w", err)
	}
	files := []*os.File{lf}
	s.mu.Lock()
	for c := range s.conns {
		f, err := c.Conn.(*net.TCPConn).File()
		if err != nil {
			s.mu.Unlock()
			return fmt.Errorf("connection fd: %w", err)
		}
		files = append(files, f)
	}
	s.mu.Unlock()
	fds := make([]string, len(files))
	for i, f := range files {
		// File() returns close-on-exec duplicates: let these survive the exec.
		if _, err := unixFcntl(f.Fd(), syscall.F_SETFD, 0); err != nil {
			return fmt.Errorf("clear close-on-exec: %w", err)
		}
		fds[i] = strconv.Itoa(int(f.Fd()))
	}
	env := append(os.Environ(), envCount+"="+strconv.FormatInt(s.count.Load(), 10), envFDs+"="+strings.Join(fds, ","))
	s.log.Info("re-executing", "binary", exe, "connections", len(files)-1, "count", s.count.Load())
	err = syscall.Exec(exe, os.Args, env)
	for _, f := range files {
		f.Close()
	}
	return fmt.Errorf("exec %s: %w", exe, err)
}

// resume undoes a failed handoff: accept again and serve the parked connections.
func (s *server) resume() {
	s.draining.Store(false)
	s.ln.(*net.TCPListener).SetDeadline(time.Time{})
	go s.acceptLoop(s.ln)
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.SetReadDeadline(time.Time{})
		s.start(c)
	}
}

func unixFcntl(fd uintptr, cmd, arg int) (int, error) {
	r, _, e := syscall.Syscall(syscall.SYS_FCNTL, fd, uintptr(cmd), uintptr(arg))
	if e != 0 {
		return int(r), e
	}
	return int(r), nil
}

// adopt rebuilds the listener and the client connections after a re-exec.
func adopt(log *slog.Logger) (net.Listener, []net.Conn) {
	var ln net.Listener
	var conns []net.Conn
	for i, v := range strings.Split(os.Getenv(envFDs), ",") {
		fd, err := strconv.Atoi(v)
		if err != nil {
			log.Error("bad handoff fd list", "value", os.Getenv(envFDs))
			os.Exit(1)
		}
		f := os.NewFile(uintptr(fd), "handoff")
		if i == 0 {
			if ln, err = net.FileListener(f); err != nil {
				log.Error("adopt listener", "fd", fd, "err", err)
				os.Exit(1)
			}
		} else if c, err := net.FileConn(f); err != nil {
			log.Warn("adopt connection", "fd", fd, "err", err)
		} else {
			conns = append(conns, c)
		}
		f.Close()
	}
	os.Unsetenv(envCount)
	os.Unsetenv(envFDs)
	return ln, conns
}
