package sockets

import (
	"testing"
	"time"
)

// BenchmarkRoundTrip compares a keep-alive request/answer round trip over the veth directly
// and through a Holder's pass-through reader (what every packet pays outside a hold).
func BenchmarkRoundTrip(b *testing.B) {
	for _, through := range []bool{false, true} {
		name := "direct"
		if through {
			name = "passthrough"
		}
		b.Run(name, func(b *testing.B) {
			n := newTestNet(b)
			srv := startEchoServer(b, n)
			c := dialClient(b, srv.Addr)
			if through {
				newTestHolder(b, n)
			}
			roundTrips(b, c, 10)
			b.ResetTimer()
			for b.Loop() {
				if _, err := c.roundTrip(2 * time.Second); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkHoldRelease measures one hold cycle as a client sees it: a request sent during
// the hold is answered how long after Release? Reports that gap and the release itself
// (ns/op includes the 1 ms hold and sock_diag look-ups, and means little).
func BenchmarkHoldRelease(b *testing.B) {
	n := newTestNet(b)
	srv := startEchoServer(b, n)
	c := dialClient(b, srv.Addr)
	h := newTestHolder(b, n)
	roundTrips(b, c, 10)
	var gap, release time.Duration
	for b.Loop() {
		// The 1 ms pause lets the request reach the queue before Release.
		r := holdCycle(b, h, c, func(int) { time.Sleep(time.Millisecond) })
		gap += r.AfterRelease
		release += r.Stats.ReleaseDuration
	}
	b.ReportMetric(float64(gap.Microseconds())/float64(b.N), "µs-answer-after-release")
	b.ReportMetric(float64(release.Microseconds())/float64(b.N), "µs-release")
}
