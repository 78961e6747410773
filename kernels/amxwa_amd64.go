//go:build amd64 && !purego

package kernels

import (
	"math"
	"unsafe"
)

// The transposed ("W as A") split kernels of the exact path: C^T = W·x^T.
//
// matMulSplitRows's packed form makes x the A operand and W the B
// operand, which TDPBF16PS wants as bf16 pairs down the columns: every
// call packs W (packPairsT), and at decode, 8-32 rows, that packing is
// most of the time (57% of the attention node's CPU at 8 streams, 26% of
// exact prefill). Here the roles swap: A tiles are W itself (16 rows of
// 32 bf16, row-major, loaded straight from w.Data at stride 2*Cols) and
// B tiles are x's three parts in pair layout, written once per call by
// the split (splitRowsT): for each 16-pair step and part, 16 pair rows
// of n uint32, pair row q holding (x[i][2q], x[i][2q+1]) of every x row
// i. A C tile is 16 W rows by 16 x rows; the kernel stores it to scratch
// and Go writes it transposed into y. The arithmetic is the split's
// (amxsplit_amd64.go): the same parts and exact products (w·part is
// part·w), which TDPBF16PS adds in the order its pseudocode fixes (pair
// by pair within a step, steps in order, hi lo lo2 within a step in both
// forms) whichever operand is A, so the outputs equal the packed form's
// bit for bit (TestMatMulWAForms and FuzzMatMulSplitAMX check it; so did
// the logprobs of a 512-token exact prefill), with the same bound
// 3K*2^-24*sum|w*x| and the same Inf/NaN, tiny-row and subnormal handling
// (finishSplit, matMulSplitRows).
//
// Odd column counts keep the packed form: the last pair of a W row would
// run into the next row (or past the end of W).

//go:noescape
func amxWA11(cfg *amxConfig, a *byte, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)

//go:noescape
func amxWA12(cfg *amxConfig, a *byte, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)

//go:noescape
func amxWA21(cfg *amxConfig, a *byte, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)

//go:noescape
func amxWA22(cfg *amxConfig, a *byte, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)

//go:noescape
func amxSplitRowAcc(dst *uint16, src *float32, steps int, scale float32, mx *[16]uint32)

//go:noescape
func amxStoreT(y *float32, ystride uintptr, c *float32, cstride uintptr, m, nx int)

//go:noescape
func amxPairsT(dst *uint32, dstride uintptr, src *uint16, sstride uintptr, rows, blocks int)

// waMaxN, waMaxNK: the largest batch, and the largest batch times
// columns (the split x: 6 bytes a value), whose split takes the
// transposed layout and kernels; above either, the packed form. Measured
// with BenchmarkMatMulSplitWA (W hot in cache; 3 alternated rounds, 1
// and 2 threads, load 5.6-5.8), wa/packed median: at n = 8 1.27-2.48 on
// every shape (1408x2048, 2048x1408, 2048x2048, 10944x2048, 2048x10944,
// 3072x512, 512x2048), n = 16 1.37-2.95, n = 32 1.17-1.98, n = 64
// 1.04-1.50 except 2048x10944 (0.70-0.77: n*cols 700k), n = 128
// 0.55-1.16 (below 1 on 10 of 14). Variables for benchmarks and tests.
var waMaxN, waMaxNK = 64, 1 << 19

// waMinN: the smallest batch that takes the split path where the split
// takes the transposed layout (amxSplitMinN for the packed form).
// BenchmarkMatMulSplitWA -wans 4,6 (one thread, 3 alternated rounds,
// load 5.3-5.7), wa/fma median with W streamed from memory (-wacold 768)
// at 1408x2048, 2048x1408, 2048x2048, 512x2048: 0.97-1.07 at 4 rows,
// 1.04-1.42 at 6; with W in cache 0.91-1.21 at 4, 1.18-1.68 at 6.
var waMinN = 6

// waLayout reports whether a split of n rows of cols values takes the
// transposed layout (and matMulSplitRows the amxWA kernels). It depends
// on n and cols only, so every product sharing a split agrees.
func waLayout(n, cols int) bool { return cols%2 == 0 && n <= waMaxN && n*cols <= waMaxNK }

// waRun calls the kernel of one or two A tiles (m2: W blocks of 16 rows)
// by one or two B tiles (n2: x blocks of 16 rows).
func waRun(m2, n2 bool, cfg *amxConfig, a *byte, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int) {
	switch {
	case m2 && n2:
		amxWA22(cfg, a, astride, b, bstride, ksteps, c, cstride, acc)
	case m2:
		amxWA21(cfg, a, astride, b, bstride, ksteps, c, cstride, acc)
	case n2:
		amxWA12(cfg, a, astride, b, bstride, ksteps, c, cstride, acc)
	default:
		amxWA11(cfg, a, astride, b, bstride, ksteps, c, cstride, acc)
	}
}

// waCfg is amxCfg for the amxWA kernels (m: W rows, n: x rows): with one
// B tile (n1 = 0) TMM7 takes B0's shape too (the kernels alternate the
// parts between TMM6 and TMM7).
func waCfg(m0, m1, n0, n1, kc int) amxConfig {
	c := amxCfg(m0, m1, n0, n1, kc)
	if n1 == 0 {
		c[16+2*7] = byte(4 * n0)
		c[17+2*7] = byte((4 * n0) >> 8)
		c[48+7] = byte(kc)
	}
	return c
}

// waChunk: 16-pair steps split per pass of splitRowsT (16 rows of them,
// 12 KiB, on the stack).
const waChunk = 4

// splitRowsT splits rows [b0,b1) of x (at most 16, cols values each, an
// even number), times scale, into buf, the transposed layout of n rows
// (n*splitRowLen(cols)/2 uint32), and stores each row's largest
// |x*scale| bits in mx[i-b0]. Per chunk of waChunk steps the rows are
// split as amxSplitRow does, then amxPairsT turns them into pair rows;
// the tail step (cols%32) is split in Go.
func splitRowsT(buf []uint32, n, cols int, x []float32, b0, b1 int, scale float32, mx []uint32) {
	var tmp [16 * waChunk * 96]uint16
	var lanes [16][16]uint32
	full := cols / 32
	nb := b1 - b0
	_ = mx[nb-1]
	_ = x[b1*cols-1]
	if full > 0 {
		_ = buf[48*n*full-1]
	}
	for s0 := 0; s0 < full; s0 += waChunk {
		ns := min(waChunk, full-s0)
		for r := 0; r < nb; r++ {
			amxSplitRowAcc(&tmp[r*waChunk*96], &x[(b0+r)*cols+32*s0], ns, scale, &lanes[r])
		}
		amxPairsT(&buf[48*n*s0+b0], uintptr(4*n), &tmp[0], 2*waChunk*96, nb, 3*ns)
	}
	for r := 0; r < nb; r++ {
		var m uint32
		for _, v := range lanes[r] {
			m = max(m, v)
		}
		if full*32 < cols {
			// The last step's pairs; pair rows past them are never
			// loaded (the tail tiles have as many rows as pairs).
			base := 48*n*full + b0 + r
			t := x[(b0+r)*cols+32*full : (b0+r+1)*cols]
			for q := 0; q < len(t)/2; q++ {
				v0, v1 := t[2*q]*scale, t[2*q+1]*scale
				m = max(m, math.Float32bits(v0)&0x7fffffff, math.Float32bits(v1)&0x7fffffff)
				h0, l0, ll0 := splitBF16(v0)
				h1, l1, ll1 := splitBF16(v1)
				buf[base+q*n] = uint32(h0) | uint32(h1)<<16
				buf[base+(16+q)*n] = uint32(l0) | uint32(l1)<<16
				buf[base+(32+q)*n] = uint32(ll0) | uint32(ll1)<<16
			}
		}
		mx[r] = m
	}
}

// waBuf is a split's transposed layout as uint32 pairs.
func waBuf(s *splitX) []uint32 {
	return unsafe.Slice((*uint32)(unsafe.Pointer(&s.a[0])), len(s.a)/2)
}

// waGroupRows: W rows run against a block of splitXBlock x rows at a time
// when the batch is larger than one block (128 rows: 512 KiB of W at 2048
// columns stay in L2 while each pair of 16-row x blocks runs against it).
var waGroupRows = 128

// matMulWARows: W (BF16, even Cols) rows [lo,hi) against the split x rows
// in the transposed layout through the amxWA kernels: 32 W rows (two A
// tiles) by 32 x rows (two B tiles) per call, each call's C stored to
// scratch and written transposed into y (amxStoreT). Batches over splitXBlock rows
// run in groups of waGroupRows W rows, each against every block of
// splitXBlock x rows. scratch holds at least 1024 floats. (The caller
// scales tiny rows back.)
func matMulWARows(y []float32, w *Matrix, s *splitX, lo, hi int, scratch []float32) {
	n := s.n
	cols, rows := w.Cols, w.Rows
	kp := cols / 2
	kmain := kp &^ 15 // whole 16-pair steps
	kt := kp - kmain  // pairs of the tail step
	b := waBuf(s)
	c := scratch[:1024]
	_ = y[(n-1)*rows+hi-1]
	_ = w.Data[2*hi*cols-1]
	astride, bstride, cstride := uintptr(2*cols), uintptr(4*n), uintptr(4*32)
	full := waCfg(16, 16, 16, 16, 16)
	grp := hi - lo
	if n > splitXBlock {
		grp = waGroupRows
	}
	for r0 := lo; r0 < hi; r0 += grp {
		r1 := min(hi, r0+grp)
		for s0 := 0; s0 < n; s0 += splitXBlock {
			s1 := min(n, s0+splitXBlock)
			for rq := r0; rq < r1; rq += 32 {
				cnt := min(32, r1-rq)
				m0 := min(16, cnt)
				m1 := cnt - m0
				a := &w.Data[2*rq*cols]
				for i0 := s0; i0 < s1; i0 += 32 {
					n0 := min(16, s1-i0)
					n1 := min(16, s1-i0-n0)
					if kmain > 0 {
						cfg := &full
						var tail amxConfig
						if m1 < 16 || n1 < 16 {
							tail = waCfg(m0, m1, n0, n1, 16)
							cfg = &tail
						}
						waRun(m1 > 0, n1 > 0, cfg, a, astride, &b[i0], bstride, kmain/16, &c[0], cstride, 0)
					}
					if kt > 0 {
						cfg := waCfg(m0, m1, n0, n1, kt)
						waRun(m1 > 0, n1 > 0, &cfg, &w.Data[2*rq*cols+4*kmain], astride, &b[3*kmain*n+i0], bstride, 1, &c[0], cstride, b2i(kmain > 0))
					}
					// C's tiles transposed into y: x rows i0+16j.., W rows rq+16i..
					amxStoreT(&y[i0*rows+rq], 4*uintptr(rows), &c[0], cstride, m0, n0)
					if m1 > 0 {
						amxStoreT(&y[i0*rows+rq+16], 4*uintptr(rows), &c[16*32], cstride, m1, n0)
					}
					if n1 > 0 {
						amxStoreT(&y[(i0+16)*rows+rq], 4*uintptr(rows), &c[16], cstride, m0, n1)
						if m1 > 0 {
							amxStoreT(&y[(i0+16)*rows+rq+16], 4*uintptr(rows), &c[16*32+16], cstride, m1, n1)
						}
					}
				}
			}
		}
	}
}
