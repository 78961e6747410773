//go:build amd64 && !purego

package kernels

//go:noescape
func readSumAVX512(p *byte, n int) float32

//go:noescape
func readSum2AVX512(p *byte, n int) float32

func fmaPeakAVX512(iters int)

func dpbf16PeakAVX512(iters int)

// probeRead sums buf (len a multiple of 512) as fast as the CPU can read
// it, in one sequential stream or in two at once (its two halves). Which
// pattern is faster depends on the machine and the page size: on the
// 2-core Zen 4 this was built on, one stream read 27 GB/s from huge pages
// on one core and two streams 20 (4 KiB pages: 21 against 18; two cores:
// 28 against 26), where an earlier measurement had favoured two. Probes
// therefore try both and keep the faster.
func probeRead(buf []byte, twoStreams bool) float32 {
	if BestISA() < ISAAVX512 {
		return probeReadGeneric(buf)
	}
	if twoStreams {
		return readSum2AVX512(&buf[0], len(buf))
	}
	return readSumAVX512(&buf[0], len(buf))
}

// probeFMA runs iters iterations of 12 16-lane FMAs and returns the flops
// done, or 0 where the probe has no SIMD version.
func probeFMA(iters int) float64 {
	if BestISA() < ISAAVX512 {
		return 0
	}
	fmaPeakAVX512(iters)
	return float64(iters) * 12 * 32
}

// probeDPBF16 is probeFMA for VDPBF16PS (64 flops each).
func probeDPBF16(iters int) float64 {
	if BestISA() < ISAAVX512 || !hasBF16 {
		return 0
	}
	dpbf16PeakAVX512(iters)
	return float64(iters) * 12 * 64
}

func probeFMAFlops(iters int) float64 {
	if BestISA() < ISAAVX512 {
		return 0
	}
	return float64(iters) * 12 * 32
}

func probeDPBF16Flops(iters int) float64 {
	if BestISA() < ISAAVX512 || !hasBF16 {
		return 0
	}
	return float64(iters) * 12 * 64
}
