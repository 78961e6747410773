package cli

import (
	"fmt"
	"io"
	"time"

	"github.com/expertmesh/expertmesh/internal/hugemem"
	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model"
)

// readProbe measures the read bandwidth decode is bound by, on a buffer
// far larger than the caches and backed by huge pages like resident
// weights, with the same thread pool.
type readProbe struct {
	pool    *kernels.Pool
	buf     []byte
	release func() error
}

const probeBytes = 1 << 30

func newReadProbe(pool *kernels.Pool) (*readProbe, error) {
	buf, release, err := hugemem.Alloc(probeBytes)
	if err != nil {
		return nil, fmt.Errorf("--roofline: probe buffer: %w", err)
	}
	// Write every page: reads of untouched anonymous memory all hit the
	// shared zero page and would measure the cache.
	pool.ParallelFor(len(buf)>>12, func(lo, hi int) {
		for p := lo; p < hi; p++ {
			for i := p << 12; i < (p+1)<<12; i += 64 {
				buf[i] = byte(i>>6) | 1
			}
		}
	})
	return &readProbe{pool: pool, buf: buf, release: release}, nil
}

// measure reads the buffer repeatedly for about d and returns the mean
// rate in bytes/s.
func (r *readProbe) measure(d time.Duration) float64 {
	one := r.pool.ReadBandwidth(r.buf, 1)
	passes := max(1, int(d.Seconds()*one/float64(len(r.buf))))
	return r.pool.ReadBandwidth(r.buf, passes)
}

func (r *readProbe) Close() error { return r.release() }

// writeRoofline reports decode's streamed weight rate against the probe
// measured just before and just after the generation.
func writeRoofline(w io.Writer, res *model.GenerateResult, before, after float64) {
	steps := max(len(res.Tokens)-1, 0)
	if steps == 0 || res.DecodeTime <= 0 {
		fmt.Fprintf(w, "roofline: no decode steps to measure\n")
		return
	}
	perToken := float64(res.DecodeWeightBytes) / float64(steps)
	rate := float64(res.DecodeWeightBytes) / res.DecodeTime.Seconds()
	probe := (before + after) / 2
	fmt.Fprintf(w, "roofline: decode streamed %.3f GB of weights per token at %.1f GB/s; read probe %.1f GB/s (%.1f before, %.1f after): %.1f%% of the bandwidth roofline (%.1f tok/s)\n",
		perToken/1e9, rate/1e9, probe/1e9, before/1e9, after/1e9, 100*rate/probe, probe/perToken)
}
