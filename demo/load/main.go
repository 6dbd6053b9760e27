// Command load drives keep-alive HTTP clients against the demo app (or httpcount) and reports
// what they saw: answered and failed requests, whether every client kept its one connection,
// the longest wait for an answer (the client-visible pause), the counter and the versions.
//
//	load -addr 10.199.0.2:8080 [-clients 4] [-interval 5ms] [-duration 0] [-json]
//
// With -duration 0 it runs until SIGINT or SIGTERM. It exits 1 if any request failed.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hotctl/hot/internal/testapps/loadclient"
)

func main() {
	addr := flag.String("addr", "", "server address HOST:PORT")
	clients := flag.Int("clients", 4, "number of keep-alive connections")
	interval := flag.Duration("interval", 5*time.Millisecond, "pause between a client's requests")
	duration := flag.Duration("duration", 0, "how long to run (0: until SIGINT/SIGTERM)")
	asJSON := flag.Bool("json", false, "print the report as JSON")
	flag.Parse()
	if *addr == "" {
		fmt.Fprintln(os.Stderr, "load: -addr HOST:PORT is required")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	l, err := loadclient.Start(ctx, *addr, *clients, *interval)
	if err != nil {
		fmt.Fprintln(os.Stderr, "load:", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "load: %d keep-alive clients on %s\n", *clients, *addr)
	if *duration > 0 {
		select {
		case <-ctx.Done():
		case <-time.After(*duration):
		}
	} else {
		<-ctx.Done()
	}
	rep := l.Stop()
	if *asJSON {
		json.NewEncoder(os.Stdout).Encode(rep)
	} else {
		alive := 0
		for _, n := range rep.PerClient {
			if n > 0 {
				alive++
			}
		}
		fmt.Printf("requests served     %d\n", rep.Requests)
		fmt.Printf("requests failed     %d\n", rep.Failures)
		fmt.Printf("connections kept    %d of %d (each client used one connection throughout)\n", alive-min(alive, rep.Failures), len(rep.PerClient))
		fmt.Printf("longest wait        %.1f ms\n", float64(rep.MaxGap.Microseconds())/1000)
		fmt.Printf("counter             %d (went backwards %d times)\n", rep.LastValue, rep.Regressions)
		fmt.Printf("versions answered   %v\n", rep.Versions)
		for _, e := range rep.Errors {
			fmt.Printf("error               %s\n", e)
		}
	}
	if rep.Failures > 0 || rep.Regressions > 0 {
		os.Exit(1)
	}
}
