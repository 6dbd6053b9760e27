// Command counter is a test workload: an HTTP/1.1 server whose state lives only in memory.
// Every request to / increments a counter and answers its new value, so a client can tell
// whether the state survived a checkpoint/restore (the values continue) or was lost (they
// restart at 1). -rss MB allocates and touches that much memory so benchmarks can vary the
// resident set; -ghost PATH opens a file, writes to it and deletes it while keeping it open
// (CRIU must save it as a ghost file).
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
)

func main() {
	addr := flag.String("addr", ":8080", "listen address")
	rssMB := flag.Int("rss", 0, "MB of memory to allocate and keep resident")
	ghost := flag.String("ghost", "", "file to create, keep open and delete (a ghost file for CRIU)")
	flag.Parse()

	ballast := make([]byte, *rssMB<<20)
	for i := 0; i < len(ballast); i += 4096 {
		ballast[i] = byte(i >> 12) // touch every page, with content that does not dedup to zero pages
	}
	var kept *os.File
	if *ghost != "" {
		f, err := os.Create(*ghost)
		if err != nil {
			log.Fatal(err)
		}
		if _, err := f.WriteString("ghost content\n"); err != nil {
			log.Fatal(err)
		}
		if err := os.Remove(*ghost); err != nil {
			log.Fatal(err)
		}
		kept = f
	}

	var count atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintln(w, count.Add(1))
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/ghost", func(w http.ResponseWriter, r *http.Request) {
		if kept == nil {
			http.Error(w, "no ghost file", http.StatusNotFound)
			return
		}
		buf := make([]byte, 64)
		n, _ := kept.ReadAt(buf, 0)
		w.Write(buf[:n])
	})
	mux.HandleFunc("/rss", func(w http.ResponseWriter, r *http.Request) {
		var sum int
		for i := 0; i < len(ballast); i += 4096 {
			sum += int(ballast[i])
		}
		fmt.Fprintln(w, strconv.Itoa(len(ballast)>>20), sum)
	})
	// Go >= 1.24 listens with MPTCP by default where the kernel has it; CRIU cannot dump MPTCP
	// sockets ("inet: Unsupported proto 262"), so ask for plain TCP.
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	log.Fatal(http.Serve(ln, mux))
}
