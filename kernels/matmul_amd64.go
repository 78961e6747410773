//go:build amd64 && !purego

package kernels

import (
	"encoding/binary"
	"math"
	"unsafe"
)

// Generated in matmul_amd64.s; see kernels/_asm/matmul.go for the layout.

//go:noescape
func mmF32x8AVX512(x *float32, xstride uintptr, p *float32, k int, y *float32, ystride uintptr)

//go:noescape
func mmF32x1AVX512(x *float32, xstride uintptr, p *float32, k int, y *float32, ystride uintptr)

//go:noescape
func mmDPx8AVX512(x *float32, xstride uintptr, p *float32, k int, y *float32, ystride uintptr)

//go:noescape
func mmDPx1AVX512(x *float32, xstride uintptr, p *float32, k int, y *float32, ystride uintptr)

//go:noescape
func mmF32x6AVX2(x *float32, xstride uintptr, p *float32, k int, y *float32, ystride uintptr)

//go:noescape
func mmF32x1AVX2(x *float32, xstride uintptr, p *float32, k int, y *float32, ystride uintptr)

//go:noescape
func mvBF16EOx4AVX512(y *float32, ystride uintptr, w *byte, stride uintptr, xp *float32, xstride uintptr, n int, rows int)

//go:noescape
func mvBF16EOx2AVX512(y *float32, ystride uintptr, w *byte, stride uintptr, xp *float32, xstride uintptr, n int, rows int)

//go:noescape
func mvBF16EOx3AVX512(y *float32, ystride uintptr, w *byte, stride uintptr, xp *float32, xstride uintptr, n int, rows int)

//go:noescape
func mvBF16EOx5AVX512(y *float32, ystride uintptr, w *byte, stride uintptr, xp *float32, xstride uintptr, n int, rows int)

//go:noescape
func mvBF16EOx6AVX512(y *float32, ystride uintptr, w *byte, stride uintptr, xp *float32, xstride uintptr, n int, rows int)

//go:noescape
func mvBF16EOx7AVX512(y *float32, ystride uintptr, w *byte, stride uintptr, xp *float32, xstride uintptr, n int, rows int)

//go:noescape
func mvBF16EOx8AVX512(y *float32, ystride uintptr, w *byte, stride uintptr, xp *float32, xstride uintptr, n int, rows int)

// mvBF16Multi[k] is the even/odd BF16 kernel against k x rows at once.
var mvBF16Multi = [9]func(y *float32, ystride uintptr, w *byte, stride uintptr, xp *float32, xstride uintptr, n int, rows int){
	2: mvBF16EOx2AVX512, 3: mvBF16EOx3AVX512, 4: mvBF16EOx4AVX512, 5: mvBF16EOx5AVX512,
	6: mvBF16EOx6AVX512, 7: mvBF16EOx7AVX512, 8: mvBF16EOx8AVX512,
}

//go:noescape
func mmDotF324x4AVX512(y *float32, ystride uintptr, w *byte, wstride uintptr, x *float32, xstride uintptr, n int)

//go:noescape
func mmDotF324x1AVX512(y *float32, ystride uintptr, w *byte, wstride uintptr, x *float32, xstride uintptr, n int)

//go:noescape
func mmDotDP4x4AVX512(y *float32, ystride uintptr, w *byte, wstride uintptr, x *float32, xstride uintptr, n int)

//go:noescape
func mmDotDP4x1AVX512(y *float32, ystride uintptr, w *byte, wstride uintptr, x *float32, xstride uintptr, n int)

//go:noescape
func packBF16(dst *float32, src *byte, srcStride uintptr, rows, cols, nr int)

//go:noescape
func packQ8(dst *float32, src *byte, srcStride uintptr, rows, cols, nr int, s *float32, sstride uintptr)

//go:noescape
func packF8(dst *float32, src *byte, srcStride uintptr, rows, cols, nr int, table *float32, s *float32)

//go:noescape
func packQ8T(dst *float32, src *byte, srcStride uintptr, rows, cols, nr int, s *float32, sstride uintptr)

//go:noescape
func packF8T(dst *float32, src *byte, srcStride uintptr, rows, cols, nr int, s *float32, sstride uintptr)

//go:noescape
func packBF16T(dst *float32, src *byte, srcStride uintptr, rows, cols, nr int, s *float32, sstride uintptr)

//go:noescape
func packPairsT(dst *float32, src *byte, srcStride uintptr, rows, cols, nr int, s *float32, sstride uintptr)

//go:noescape
func packT32T(dst *float32, src *byte, srcStride uintptr, rows, cols, nr int, s *float32, sstride uintptr)

//go:noescape
func packPairs(dst *uint32, src *byte, srcStride uintptr, rows, pairs, nr int)

//go:noescape
func cvtBF16AVX512(dst *uint16, src *float32, n int)

type mmFunc func(x *float32, xstride uintptr, p *float32, k int, y *float32, ystride uintptr)

// mmSet is one ISA's micro-kernels: mr x rows by nr W rows, and 1 by nr.
type mmSet struct {
	mr, nr   int
	big, one mmFunc
	mv       *mvSet
}

var (
	mmAVX512 = mmSet{mr: 8, nr: 32, big: mmF32x8AVX512, one: mmF32x1AVX512, mv: &mvAVX512}
	mmAVX2   = mmSet{mr: 6, nr: 16, big: mmF32x6AVX2, one: mmF32x1AVX2, mv: &mvAVX2}
	mmDP     = mmSet{mr: 8, nr: 32, big: mmDPx8AVX512, one: mmDPx1AVX512}
)

// mmSmallN: below this many x rows, packing W costs more than it saves and
// the row kernels of MatVec run once per x row instead.
const mmSmallN = 4

// mmMultiN: below this many x rows, BF16 MatMul on AVX-512 streams W once
// per 4 x rows with the even/odd row kernel instead of packing tiles.
const mmMultiN = 16

// matMulBF16Multi handles small batches: x rows permuted once into scratch,
// then W rows [lo,hi) in blocks of multiBlockRows, each block against up
// to 8 x rows at a time (as few passes as the batch allows: every pass
// reloads and unpacks the block): the block is read from memory once and
// from L2 for the other passes, so W streams once per call whatever n is.
func matMulBF16Multi(y []float32, w *Matrix, x []float32, n, lo, hi int, scratch []float32) {
	cols, rows := w.Cols, w.Rows
	main := cols &^ 31
	xp := scratch[:n*main]
	for i := 0; i < n; i++ {
		permuteEO(xp[i*main:(i+1)*main], x[i*cols:i*cols+main], 16)
	}
	_ = y[(n-1)*rows+hi-1]
	stride, ys, xs := uintptr(2*cols), uintptr(4*rows), uintptr(4*main)
	step := multiBlockRows(2 * cols)
	for r0 := lo; r0 < hi; r0 += step {
		r1 := min(hi, r0+step)
		wp := &w.Data[2*r0*cols]
		for i := 0; i < n; {
			// Even passes: 11 rows as 6+5, not 8+3.
			k := min(n-i, ceilDiv(n-i, ceilDiv(n-i, 8)))
			if k == 1 {
				mvBF16EORAVX512(&y[i*rows+r0], wp, stride, &xp[i*main], main, r1-r0)
			} else {
				mvBF16Multi[k](&y[i*rows+r0], ys, wp, stride, &xp[i*main], xs, main, r1-r0)
			}
			i += k
		}
	}
	if main < cols {
		for i := 0; i < n; i++ {
			for r := lo; r < hi; r++ {
				y[i*rows+r] += dotTail(w, r, x[i*cols:(i+1)*cols], main, cols)
			}
		}
	}
}

// multiBlockRows is the W rows the small-batch kernels stream once and
// reuse (from L2) for every x row: about 128 KiB of weights, a multiple
// of 8 rows.
func multiBlockRows(rowBytes int) int {
	return max(8, (128<<10)/max(1, rowBytes)&^7)
}

func matMulRowsAVX512(y []float32, w *Matrix, x []float32, n, lo, hi int, scratch []float32) {
	matMulRowsSIMD(&mmAVX512, y, w, x, n, lo, hi, scratch)
}

func matMulRowsAVX2(y []float32, w *Matrix, x []float32, n, lo, hi int, scratch []float32) {
	matMulRowsSIMD(&mmAVX2, y, w, x, n, lo, hi, scratch)
}

// matMulScratchSIMD: one packed tile (nr x Cols, 32 at most), a row
// buffer, and an output tile for partial tiles.
func matMulScratchSIMD(cols int) int { return max(33*cols+8*32+64, mmMultiN*cols) }

// matMulRowsSIMD packs NR W rows at a time k-major (widened once) and runs
// the micro-kernel over all x rows against the packed tile.
func matMulRowsSIMD(s *mmSet, y []float32, w *Matrix, x []float32, n, lo, hi int, scratch []float32) {
	if lo >= hi {
		return
	}
	cols, rows := w.Cols, w.Rows
	if w.DType == BF16 && s.nr == 32 && n < mmMultiN && cols >= 32 {
		matMulBF16Multi(y, w, x, n, lo, hi, scratch)
		return
	}
	if n < mmSmallN {
		// Row blocks against every x row, so W streams once (the block
		// stays in L2 for the other x rows).
		step := multiBlockRows(w.rowBytes())
		if w.DType == F8E4M3 {
			step = F8Block // whole scale blocks
		}
		for r0 := lo; r0 < hi; r0 += step {
			r1 := min(hi, r0+step)
			for i := 0; i < n; i++ {
				matVecRowsSIMD(s.mv, y[i*rows:(i+1)*rows], w, x[i*cols:(i+1)*cols], r0, r1, scratch)
			}
		}
		return
	}
	nr := s.nr
	packed := scratch[:nr*cols]
	rowBuf := scratch[nr*cols : (nr+1)*cols]
	tile := scratch[(nr+1)*cols : (nr+1)*cols+s.mr*nr]
	for r0 := lo; r0 < hi; r0 += nr {
		cnt := min(nr, hi-r0)
		packF32(packed, rowBuf, w, r0, cnt, nr)
		runTiles(s, y, x, packed, cols, rows, n, r0, cnt, tile)
	}
}

// runTiles applies the micro-kernels of s to all n x rows against one
// packed tile of cnt (<= nr) W rows starting at r0; k is the kernel's step
// count (cols, or column pairs) and x rows are xstride bytes apart.
func runTilesK(s *mmSet, y []float32, xp unsafe.Pointer, xstride uintptr, packed []float32, k, rows, n, r0, cnt int, tile []float32) {
	nr, mr := s.nr, s.mr
	ystride := uintptr(4 * rows)
	i := 0
	for ; i+mr <= n; i += mr {
		xi := (*float32)(unsafe.Add(xp, uintptr(i)*xstride))
		if cnt == nr {
			s.big(xi, xstride, &packed[0], k, &y[i*rows+r0], ystride)
			continue
		}
		s.big(xi, xstride, &packed[0], k, &tile[0], uintptr(4*nr))
		for ii := 0; ii < mr; ii++ {
			copy(y[(i+ii)*rows+r0:(i+ii)*rows+r0+cnt], tile[ii*nr:])
		}
	}
	for ; i < n; i++ {
		xi := (*float32)(unsafe.Add(xp, uintptr(i)*xstride))
		if cnt == nr {
			s.one(xi, xstride, &packed[0], k, &y[i*rows+r0], ystride)
			continue
		}
		s.one(xi, xstride, &packed[0], k, &tile[0], uintptr(4*nr))
		copy(y[i*rows+r0:i*rows+r0+cnt], tile[:cnt])
	}
}

func runTiles(s *mmSet, y, x, packed []float32, cols, rows, n, r0, cnt int, tile []float32) {
	_ = x[n*cols-1]
	_ = y[(n-1)*rows+r0+cnt-1]
	runTilesK(s, y, unsafe.Pointer(&x[0]), uintptr(4*cols), packed, cols, rows, n, r0, cnt, tile)
}

// packBlock is the column block of the packing loops.
const packBlock = 64

// packF32 writes rows [r0, r0+cnt) of w as float32 into dst k-major:
// dst[c*nr+j] = W[r0+j][c], zero for j >= cnt.
func packF32(dst, rowBuf []float32, w *Matrix, r0, cnt, nr int) {
	cols := w.Cols
	if cnt < nr {
		clear(dst)
	}
	if impl.isa >= ISAAVX512 && cnt%16 == 0 && cnt > 0 {
		// Whole 16-row groups: widen 16x16 blocks and transpose them in
		// registers (several times the scalar loops below).
		switch {
		case w.DType == Q8_0:
			nb := cols / Q8Block
			packQ8T(&dst[0], &w.Data[r0*cols], uintptr(cols), cnt, cols, nr, &w.Scales[r0*nb], uintptr(4*nb))
			return
		case w.DType == F8E4M3 && cols%16 == 0 && r0%F8Block+cnt <= F8Block:
			nb := ceilDiv(cols, F8Block)
			packF8T(&dst[0], &w.Data[r0*cols], uintptr(cols), cnt, cols, nr, &w.Scales[(r0/F8Block)*nb], 0)
			return
		case w.DType == BF16 && cols%16 == 0:
			packBF16T(&dst[0], &w.Data[2*r0*cols], uintptr(2*cols), cnt, cols, nr, nil, 0)
			return
		case w.DType == F32 && cols%16 == 0:
			packT32T(&dst[0], &w.Data[4*r0*cols], uintptr(4*cols), cnt, cols, nr, nil, 0)
			return
		}
	}
	if w.DType == BF16 && cnt > 0 {
		// The assembly loop takes the columns in blocks of 64 so the
		// destination lines being written stay in L1.
		main := cols &^ 63
		if main > 0 {
			packBF16(&dst[0], &w.Data[2*r0*cols], uintptr(2*cols), cnt, main, nr)
		}
		for j := 0; j < cnt; j++ {
			src := w.Data[2*(r0+j)*cols:]
			for c := main; c < cols; c++ {
				dst[c*nr+j] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(src[2*c:])) << 16)
			}
		}
		return
	}
	if w.DType == Q8_0 && cnt > 0 && cols >= 64 {
		main, nb := cols&^63, cols/Q8Block
		packQ8(&dst[0], &w.Data[r0*cols], uintptr(cols), cnt, main, nr, &w.Scales[r0*nb], uintptr(4*nb))
		for j := 0; j < cnt && main < cols; j++ {
			r := r0 + j
			for c := main; c < cols; c++ {
				dst[c*nr+j] = float32(int8(w.Data[r*cols+c])) * w.Scales[r*nb+c/Q8Block]
			}
		}
		return
	}
	if w.DType == F8E4M3 && cnt > 0 && cols >= 64 && r0%F8Block+cnt <= F8Block {
		main, nb := cols&^63, ceilDiv(cols, F8Block)
		srow := w.Scales[(r0/F8Block)*nb : (r0/F8Block+1)*nb]
		packF8(&dst[0], &w.Data[r0*cols], uintptr(cols), cnt, main, nr, &e4m3Table[0], &srow[0])
		for j := 0; j < cnt && main < cols; j++ {
			for c := main; c < cols; c++ {
				dst[c*nr+j] = e4m3Table[w.Data[(r0+j)*cols+c]] * srow[c/F8Block]
			}
		}
		return
	}
	for j := 0; j < cnt; j++ {
		rowF32Generic(rowBuf, w, r0+j, 0, cols)
		d := dst[j:]
		for c, v := range rowBuf {
			d[c*nr] = v
		}
	}
}

// packBF16Pairs writes BF16 rows [r0, r0+cnt) k-pair-major for VDPBF16PS:
// dst[kp*nr+j] = the two bf16 of W[r0+j][2kp:2kp+2] (odd tail paired with 0).
func packBF16Pairs(dst []uint32, w *Matrix, r0, cnt, nr int) {
	cols := w.Cols
	kp := (cols + 1) / 2
	if cnt < nr {
		clear(dst)
	}
	half := cols / 2
	// (half > 0: packPairsT writes a 16x16 block even of zero pairs; one
	// column once overran dst, which FuzzMatMulSplitAMX found.)
	if impl.isa >= ISAAVX512 && cnt%16 == 0 && cnt > 0 && half > 0 && half%16 == 0 {
		packPairsT((*float32)(unsafe.Pointer(&dst[0])), &w.Data[2*r0*cols], uintptr(2*cols), cnt, half, nr, nil, 0)
	} else if main := half &^ 63; main > 0 && cnt > 0 {
		packPairs(&dst[0], &w.Data[2*r0*cols], uintptr(2*cols), cnt, main, nr)
		for j := 0; j < cnt; j++ {
			src := w.Data[2*(r0+j)*cols:]
			for c := main; c < half; c++ {
				dst[c*nr+j] = binary.LittleEndian.Uint32(src[4*c:])
			}
		}
	} else {
		packPairsGo(dst, w, r0, cnt, nr, half)
	}
	if cols%2 == 1 {
		for j := 0; j < cnt; j++ {
			dst[(kp-1)*nr+j] = uint32(binary.LittleEndian.Uint16(w.Data[2*((r0+j)*cols+cols-1):]))
		}
	}
}

func packPairsGo(dst []uint32, w *Matrix, r0, cnt, nr, half int) {
	cols := w.Cols
	for p0 := 0; p0 < half; p0 += packBlock {
		p1 := min(p0+packBlock, half)
		for j := 0; j < cnt; j++ {
			src := w.Data[2*(r0+j)*cols+4*p0 : 2*(r0+j)*cols+4*p1]
			d := dst[p0*nr+j:]
			for c := 0; c < p1-p0; c++ {
				d[c*nr] = binary.LittleEndian.Uint32(src[4*c:])
			}
		}
	}
}

// matMulDPRows: W (BF16) rows [lo,hi) against xb, the n x rows already
// rounded to bf16 with row stride kp2 = 2*ceil(Cols/2) (zero padded);
// AMX tiles from amxMinN rows where the machine has them (amx_amd64.go).
func matMulDPRows(y []float32, w *Matrix, xb []uint16, n, lo, hi int, scratch []float32) {
	if lo >= hi {
		return
	}
	if amxUsed(w, n) {
		matMulAMXRows(y, w, xb, n, lo, hi, scratch)
		return
	}
	cols, rows := w.Cols, w.Rows
	kp := (cols + 1) / 2
	nr := mmDP.nr
	packedF := scratch[:nr*kp]
	packed := unsafe.Slice((*uint32)(unsafe.Pointer(&packedF[0])), len(packedF))
	tile := scratch[nr*kp : nr*kp+mmDP.mr*nr]
	_ = xb[n*2*kp-1]
	for r0 := lo; r0 < hi; r0 += nr {
		cnt := min(nr, hi-r0)
		packBF16Pairs(packed, w, r0, cnt, nr)
		runTilesK(&mmDP, y, unsafe.Pointer(&xb[0]), uintptr(4*kp), packedF, kp, rows, n, r0, cnt, tile)
	}
}

// roundBF16 writes bf16(src) into dst (same length), vectorised where the
// CPU has AVX512_BF16. (The hardware conversion flushes subnormals to
// zero, a difference below anything activations carry.)
func roundBF16(dst []uint16, src []float32) {
	n := 0
	if hasBF16 && BestISA() >= ISAAVX512 && len(src) >= 32 {
		n = len(src) &^ 31
		cvtBF16AVX512(&dst[0], &src[0], n)
	}
	for i := n; i < len(src); i++ {
		dst[i] = F32ToBF16(src[i])
	}
}

// dpAvailable reports whether MatMulBF16Act can use VDPBF16PS for w.
func dpAvailable(w *Matrix) bool {
	return hasBF16 && impl.isa >= ISAAVX512 && w.DType == BF16
}

// dotFormAvailable reports whether BF16 MatMul of n rows uses the dot-form
// kernels (no packing): AVX-512, BF16 weights, at least 32 columns, and a
// batch in the range where it beat the packed kernels (measured at
// 1408x2048 and 2048x1408, one thread): with float32 activations the dot
// form led up to n=48 (87-92% vs 72-80% of the FMA peak) and the packed
// form from n=96 (88-92%); with bf16 activations the dot form led up to
// n=32 (86% vs 82% of the VDPBF16PS peak), the packed form from n=48.
func dotFormAvailable(w *Matrix, n int, dp bool) bool {
	if impl.isa < ISAAVX512 || w.DType != BF16 || w.Cols < 32 {
		return false
	}
	if dp {
		return n < mmDotMaxDP && !amxUsed(w, n)
	}
	return n >= mmDotMinN && n < mmDotMaxF32
}

const (
	mmDotMaxDP  = 48
	mmDotMaxF32 = 64
)

// mmDotXBlock x rows (8 KiB each at 2048 columns) stay in L2 while a
// thread's W rows stream past them 4 at a time.
const mmDotXBlock = 64

// matMulDotRows: W (BF16) rows [lo,hi) against n x rows in the dot form.
// xk points at the kernel's x rows (permuted float32 for f32 activations,
// bf16 pairs for dp), xstride bytes apart; x is the caller's float32 x for
// the column tail (f32) and xb the bf16 rows (dp, tails too).
func matMulDotRows(y []float32, w *Matrix, n, lo, hi int, dp bool, xe []float32, x []float32, xb []uint16, kp2 int) {
	cols, rows := w.Cols, w.Rows
	main := cols &^ 31
	k4, k1 := mmDotF324x4AVX512, mmDotF324x1AVX512
	var xp unsafe.Pointer
	var xstride uintptr
	if dp {
		k4, k1 = mmDotDP4x4AVX512, mmDotDP4x1AVX512
		_ = xb[n*kp2-1]
		xp, xstride = unsafe.Pointer(&xb[0]), uintptr(2*kp2)
	} else {
		_ = xe[n*main-1]
		xp, xstride = unsafe.Pointer(&xe[0]), uintptr(4*main)
	}
	_ = y[(n-1)*rows+hi-1]
	ys, ws := uintptr(4*rows), uintptr(2*cols)
	r4 := lo + (hi-lo)&^3
	for i0 := 0; i0 < n; i0 += mmDotXBlock {
		i1 := min(n, i0+mmDotXBlock)
		for r := lo; r < r4; r += 4 {
			wp := &w.Data[2*r*cols]
			i := i0
			for ; i+4 <= i1; i += 4 {
				k4(&y[i*rows+r], ys, wp, ws, (*float32)(unsafe.Add(xp, uintptr(i)*xstride)), xstride, main)
			}
			for ; i < i1; i++ {
				k1(&y[i*rows+r], ys, wp, ws, (*float32)(unsafe.Add(xp, uintptr(i)*xstride)), xstride, main)
			}
		}
	}
	// Rows past the last group of 4, and columns past the last 32: in Go.
	for i := 0; i < n; i++ {
		for r := lo; r < hi; r++ {
			c0 := main
			if r >= r4 {
				c0 = 0
				y[i*rows+r] = 0
			}
			if c0 == cols {
				continue
			}
			if dp {
				var s float32
				src := w.Data[2*r*cols:]
				for c := c0; c < cols; c++ {
					s += BF16ToF32(binary.LittleEndian.Uint16(src[2*c:])) * BF16ToF32(xb[i*kp2+c])
				}
				y[i*rows+r] += s
			} else {
				y[i*rows+r] += dotTail(w, r, x[i*cols:(i+1)*cols], c0, cols)
			}
		}
	}
}

// permuteRows writes x rows [lo,hi) permuted for the even/odd kernels into
// xe (row stride main = Cols rounded down to 32).
func permuteRows(xe, x []float32, cols, lo, hi int) {
	main := cols &^ 31
	for i := lo; i < hi; i++ {
		permuteEO(xe[i*main:(i+1)*main], x[i*cols:i*cols+main], 16)
	}
}

// mmDotMinN is the smallest batch that takes the dot form (a variable so
// benchmarks can compare it with the packed path).
var mmDotMinN = mmMultiN
