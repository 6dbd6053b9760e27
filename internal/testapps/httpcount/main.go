// Command httpcount is a tiny static HTTP server used as a container workload by the
// end-to-end tests: it counts requests in memory and logs each one to stdout. Its
// subcommands give tests something to run with `hot exec`.
//
//	httpcount [serve] [-addr :8080] [-rss MB] [-ghost PATH]
//	                                  serve GET / → "count N\n" (N counts requests); -rss keeps
//	                                  MB of touched memory resident (checkpoint benchmarks),
//	                                  -ghost creates PATH, keeps it open and deletes it (CRIU
//	                                  must save it as a ghost file); GET /ghost reads it back;
//	                                  -go-default-listener keeps Go's default (MPTCP if allowed)
//	httpcount get URL                 print the body of URL (exit 1 on error)
//	httpcount exit CODE               exit with CODE
//	httpcount env                     print the environment
//	httpcount hostname                print the host name
//	httpcount pwd                     print the working directory
//	httpcount cat FILE                print a file (e.g. /proc/self/cgroup)
//	httpcount sleep SECS              sleep, ignoring SIGTERM (tests stop's SIGKILL fallback)
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	args := os.Args[1:]
	if len(args) > 0 && args[0] != "serve" && args[0][0] != '-' {
		os.Exit(sub(args))
	}
	if len(args) > 0 && args[0] == "serve" {
		args = args[1:]
	}
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	addr := fs.String("addr", ":8080", "listen address")
	rssMB := fs.Int("rss", 0, "MB of memory to allocate and keep resident")
	ghost := fs.String("ghost", "", "file to create, keep open and delete")
	goDefault := fs.Bool("go-default-listener", false, "listen like http.ListenAndServe (MPTCP where the kernel allows it) instead of plain TCP")
	fs.Parse(args)
	ballast := make([]byte, *rssMB<<20)
	for i := 0; i < len(ballast); i += 4096 {
		ballast[i] = byte(i>>12) | 1 // touch every page with content that is not a zero page
	}
	if *ghost != "" {
		f, err := os.Create(*ghost)
		if err == nil {
			_, err = f.WriteString("ghost content\n")
		}
		if err == nil {
			err = os.Remove(*ghost)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "httpcount:", err)
			os.Exit(1)
		}
		http.HandleFunc("/ghost", func(w http.ResponseWriter, r *http.Request) {
			buf := make([]byte, 64)
			k, _ := f.ReadAt(buf, 0)
			w.Write(buf[:k])
		})
	}
	var n atomic.Int64
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		c := n.Add(1)
		fmt.Printf("request %d %s %s from %s\n", c, r.Method, r.URL.Path, r.RemoteAddr)
		fmt.Fprintf(w, "count %d\n", c)
	})
	// As PID 1 the kernel delivers no signal we do not handle: handle TERM to stop cleanly.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sig
		fmt.Printf("httpcount: %v, exiting\n", s)
		os.Exit(0)
	}()
	fmt.Printf("httpcount: listening on %s\n", *addr)
	// Go >= 1.24 listens with MPTCP by default where the kernel has it, and CRIU cannot dump
	// MPTCP sockets ("inet: Unsupported proto 262"): ask for plain TCP.
	var lc net.ListenConfig
	if !*goDefault {
		lc.SetMultipathTCP(false)
	}
	ln, err := lc.Listen(context.Background(), "tcp", *addr)
	if err == nil {
		err = http.Serve(ln, nil)
	}
	runtime.KeepAlive(ballast)
	if err != nil {
		fmt.Fprintln(os.Stderr, "httpcount:", err)
		os.Exit(1)
	}
}

func sub(args []string) int {
	switch args[0] {
	case "get":
		if len(args) != 2 {
			fmt.Fprintln(os.Stderr, "usage: httpcount get URL")
			return 2
		}
		resp, err := http.Get(args[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, "httpcount:", err)
			return 1
		}
		defer resp.Body.Close()
		io.Copy(os.Stdout, resp.Body)
		return 0
	case "exit":
		code, _ := strconv.Atoi(args[len(args)-1])
		return code
	case "env":
		for _, e := range os.Environ() {
			fmt.Println(e)
		}
		return 0
	case "sleep":
		signal.Ignore(syscall.SIGTERM)
		secs, _ := strconv.Atoi(args[len(args)-1])
		time.Sleep(time.Duration(secs) * time.Second)
		return 0
	case "cat":
		if len(args) != 2 {
			fmt.Fprintln(os.Stderr, "usage: httpcount cat FILE")
			return 2
		}
		b, err := os.ReadFile(args[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, "httpcount:", err)
			return 1
		}
		os.Stdout.Write(b)
		return 0
	case "pwd":
		d, err := os.Getwd()
		if err != nil {
			fmt.Fprintln(os.Stderr, "httpcount:", err)
			return 1
		}
		fmt.Println(d)
		return 0
	case "hostname":
		h, err := os.Hostname()
		if err != nil {
			fmt.Fprintln(os.Stderr, "httpcount:", err)
			return 1
		}
		fmt.Println(h)
		return 0
	}
	fmt.Fprintf(os.Stderr, "httpcount: unknown subcommand %q\n", args[0])
	return 2
}
