package kernels

import "time"

// ReadBandwidth reads buf end to end passes times, split across the pool's
// threads, and returns the mean rate in bytes per second over the whole
// run. It is the probe a bandwidth-bound phase (decode) is compared with:
// make buf far larger than the caches and the run about as long as the
// phase, because this machine's bandwidth drifts over seconds.
func (p *Pool) ReadBandwidth(buf []byte, passes int) float64 {
	per := len(buf) / p.Threads() &^ 511
	if per == 0 || passes <= 0 {
		return 0
	}
	start := time.Now()
	for range passes {
		p.ParallelFor(p.Threads(), func(lo, hi int) { probeRead(buf[lo*per : hi*per]) })
	}
	return float64(passes*per*p.Threads()) / time.Since(start).Seconds()
}
