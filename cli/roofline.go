package cli

import (
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/expertmesh/expertmesh/internal/hugemem"
	"github.com/expertmesh/expertmesh/kernels"
)

// rooflineMeter compares each decode step's weight streaming rate with a
// read probe run right after it, on the same thread pool, over a buffer
// far larger than the caches and backed by huge pages like resident
// weights. Pairing every step with its own probe matters here: this
// machine's bandwidth flips between regimes within seconds, so a probe
// taken before or after the whole decode says little about it.
type rooflineMeter struct {
	pool    *kernels.Pool
	buf     []byte
	release func() error
	off     int

	started   bool
	last      time.Time
	lastBytes uint64
	steps     []stepSample
}

// stepSample is one decode step and the probe that followed it.
type stepSample struct {
	bytes    uint64        // weight bytes the step streamed
	time     time.Duration // the step's wall time
	probeBps float64       // the probe's read rate, bytes/s
}

const (
	probeBufBytes  = 1 << 30
	probeStepBytes = 128 << 20 // read per step and pattern, rotating through the buffer
)

func newRooflineMeter(pool *kernels.Pool) (*rooflineMeter, error) {
	buf, release, err := hugemem.Alloc(probeBufBytes)
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
	return &rooflineMeter{pool: pool, buf: buf, release: release}, nil
}

func (m *rooflineMeter) Close() error { return m.release() }

// afterStep is the GenerateRequest.AfterDecodeStep hook. The first call
// only starts the clock: the first step's start is not observable here.
func (m *rooflineMeter) afterStep() {
	now, bytes := time.Now(), m.pool.WeightBytes()
	if m.started {
		chunk := m.buf[m.off : m.off+probeStepBytes]
		m.off = (m.off + probeStepBytes) % len(m.buf)
		m.steps = append(m.steps, stepSample{bytes: bytes - m.lastBytes, time: now.Sub(m.last), probeBps: m.pool.ReadBandwidth(chunk, 1)})
	}
	m.started = true
	m.last, m.lastBytes = time.Now(), m.pool.WeightBytes()
}

// write reports the per-step fractions of the probe and the totals.
func (m *rooflineMeter) write(w io.Writer) {
	if len(m.steps) == 0 {
		fmt.Fprintf(w, "roofline: too few decode steps to measure (need 3 tokens)\n")
		return
	}
	var bytes uint64
	var secs, probeSecs float64
	fracs := make([]float64, len(m.steps))
	for i, s := range m.steps {
		rate := float64(s.bytes) / s.time.Seconds()
		fracs[i] = rate / s.probeBps
		bytes += s.bytes
		secs += s.time.Seconds()
		probeSecs += float64(s.bytes) / s.probeBps
	}
	slices.Sort(fracs)
	q := func(p float64) float64 { return 100 * fracs[int(p*float64(len(fracs)-1)+0.5)] }
	fmt.Fprintf(w, "roofline: %d decode steps streamed %.3f GB of weights each; against a %d MiB read probe run after each step (best of one and two streams per thread): median %.1f%% of the bandwidth roofline (quartiles %.1f-%.1f%%); all steps %.1f GB/s, roofline %.1f tok/s\n",
		len(m.steps), float64(bytes)/float64(len(m.steps))/1e9, probeStepBytes>>20, q(0.5), q(0.25), q(0.75),
		float64(bytes)/secs/1e9, float64(len(m.steps))/probeSecs)
}
