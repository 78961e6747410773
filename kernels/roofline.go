package kernels

import "time"

// ReadBandwidth reads buf end to end passes times, split across the pool's
// threads, once with each read pattern (one sequential stream per thread,
// and two), and returns the faster pattern's mean rate in bytes per second.
// It is the probe a bandwidth-bound phase (decode) is compared with: make
// buf far larger than the caches, and take it close in time to the phase,
// because this machine's bandwidth drifts over seconds.
func (p *Pool) ReadBandwidth(buf []byte, passes int) float64 {
	per := len(buf) / p.Threads() &^ 511
	if per == 0 || passes <= 0 {
		return 0
	}
	var best float64
	for _, two := range []bool{false, true} {
		start := time.Now()
		for range passes {
			p.ParallelFor(p.Threads(), func(lo, hi int) { probeRead(buf[lo*per:hi*per], two) })
		}
		best = max(best, float64(passes*per*p.Threads())/time.Since(start).Seconds())
	}
	return best
}
