package main

import "fmt"

// isa describes one vector width.
type isa struct {
	name  string // suffix of generated functions
	r     string // register prefix: "Z" or "Y"
	lanes int    // float32 lanes
	nregs int    // vector registers available
}

var (
	avx512 = isa{"AVX512", "Z", 16, 32}
	avx2   = isa{"AVX2", "Y", 8, 16}
)

func (s isa) v(i int) string { return fmt.Sprintf("%s%d", s.r, i) }

// half is the register of half the width (the source of a widening load).
func (s isa) half(i int) string {
	if s.r == "Z" {
		return fmt.Sprintf("Y%d", i)
	}
	return fmt.Sprintf("X%d", i)
}

type dtype struct {
	name  string
	bytes int // bytes per element
}

var (
	dtF32  = dtype{"F32", 4}
	dtBF16 = dtype{"BF16", 2}
	dtF16  = dtype{"F16", 2}
	dtF8   = dtype{"F8", 1}
	dtQ8   = dtype{"Q8", 1}
)

// widen loads s.lanes elements of dt at addr into register t as float32.
// F8 relies on the constant 0xBFFF words in register 15 of the half width.
func widen(g *gen, s isa, dt dtype, addr string, t int) {
	switch dt {
	case dtF32:
		g.p("VMOVUPS %s, %s", addr, s.v(t))
	case dtBF16:
		g.p("VPMOVZXWD %s, %s", addr, s.v(t))
		g.p("VPSLLD $16, %s, %s", s.v(t), s.v(t))
	case dtF16:
		g.p("VCVTPH2PS %s, %s", addr, s.v(t))
	case dtF8:
		// E4M3 byte b -> half with the same exponent field and mantissa:
		// (b<<8) arithmetic-shifted right by 1, bit 14 cleared. The half is
		// the E4M3 value * 2^-8; the caller folds 2^8 into x. VCVTPH2PS
		// handles the subnormals exactly.
		h := s.half(t)
		g.p("VPMOVZXBW %s, %s", addr, h)
		g.p("VPSLLW $8, %s, %s", h, h)
		g.p("VPSRAW $1, %s, %s", h, h)
		g.p("VPAND %s, %s, %s", s.half(15), h, h)
		g.p("VCVTPH2PS %s, %s", h, s.v(t))
	case dtQ8:
		g.p("VPMOVSXBD %s, %s", addr, s.v(t))
		g.p("VCVTDQ2PS %s, %s", s.v(t), s.v(t))
	}
}

func zero(g *gen, s isa, regs ...int) {
	for _, r := range regs {
		g.p("VXORPS %s, %s, %s", s.v(r), s.v(r), s.v(r))
	}
}

// genMVRows: rows consecutive outputs, each row streamed start to end
// before the next. Sequential streams let the hardware prefetchers run at
// full rate (four interleaved row streams measured 15-40% slower on
// short rows); x stays in L1, so re-reading it per row is free. (These
// plain row kernels no longer carry decode's BF16 or Q8_0 weights; the
// kernels that do prefetch, see bf16PF.)
// func mv<DT>R<ISA>(y *float32, w *byte, stride uintptr, x *float32, n int, rows int)
// n is a multiple of s.lanes and > 0, rows > 0.
func genMVRows(g *gen, s isa, dt dtype) {
	g.text(fmt.Sprintf("mv%sR%s", dt.name, s.name), 48)
	g.p("MOVQ y+0(FP), DI")
	g.p("MOVQ w+8(FP), R8")
	g.p("MOVQ stride+16(FP), BX")
	g.p("MOVQ x+24(FP), SI")
	g.p("MOVQ rows+40(FP), DX")
	if dt == dtF8 {
		g.p("MOVL $0xBFFFBFFF, R10")
		g.p("MOVD R10, X15")
		g.p("VPBROADCASTD X15, %s", s.half(15))
	}
	const U = 4
	step := U * s.lanes
	g.label("row")
	g.p("MOVQ R8, AX")
	g.p("MOVQ SI, R9")
	g.p("MOVQ n+32(FP), CX")
	zero(g, s, 0, 1, 2, 3)
	body := func(u int) {
		for uu := 0; uu < u; uu++ {
			addr := fmt.Sprintf("%d(AX)", dt.bytes*s.lanes*uu)
			xa := fmt.Sprintf("%d(R9)", 4*s.lanes*uu)
			if dt == dtF32 {
				g.p("VMOVUPS %s, %s", xa, s.v(8+uu))
				g.p("VFMADD231PS %s, %s, %s", addr, s.v(8+uu), s.v(uu))
				continue
			}
			t := 10 + uu
			widen(g, s, dt, addr, t)
			g.p("VFMADD231PS %s, %s, %s", xa, s.v(t), s.v(uu))
		}
	}
	g.p("CMPQ CX, $%d", step)
	g.p("JL tail")
	g.label("loop")
	body(U)
	g.p("ADDQ $%d, AX", dt.bytes*step)
	g.p("ADDQ $%d, R9", 4*step)
	g.p("SUBQ $%d, CX", step)
	g.p("CMPQ CX, $%d", step)
	g.p("JGE loop")
	g.label("tail")
	g.p("TESTQ CX, CX")
	g.p("JZ done")
	body(1)
	g.p("ADDQ $%d, AX", dt.bytes*s.lanes)
	g.p("ADDQ $%d, R9", 4*s.lanes)
	g.p("SUBQ $%d, CX", s.lanes)
	g.p("JMP tail")
	g.label("done")
	reduce1(g, s)
	g.p("ADDQ $4, DI")
	g.p("ADDQ BX, R8")
	g.p("DECQ DX")
	g.p("JNZ row")
	g.p("VZEROUPPER")
	g.p("RET")
}

// reduce1 sums accumulators 0-3 and stores the scalar at (DI).
func reduce1(g *gen, s isa) {
	g.p("VADDPS %s, %s, %s", s.v(1), s.v(0), s.v(0))
	g.p("VADDPS %s, %s, %s", s.v(3), s.v(2), s.v(2))
	g.p("VADDPS %s, %s, %s", s.v(2), s.v(0), s.v(0))
	if s.r == "Z" {
		g.p("VEXTRACTF64X4 $1, Z0, Y1")
		g.p("VADDPS Y1, Y0, Y0")
	}
	g.p("VEXTRACTF128 $1, Y0, X1")
	g.p("VADDPS X1, X0, X0")
	g.p("VHADDPS X0, X0, X0")
	g.p("VHADDPS X0, X0, X0")
	g.p("VMOVSS X0, (DI)")
}

// genMVQ8Rows is genMVRows for Q8_0: 32-value blocks on separate chains,
// each block's sum scaled once.
// func mvQ8R<ISA>(y *float32, w *byte, stride uintptr, x *float32, n int, rows int, s *float32, sstride uintptr)
// Four blocks per iteration on four chains measured 6% faster than two.
// Weights are prefetched q8PF ahead into L1 and q8PFL2 into L2 and the
// row scales q8PFS ahead: at V2-Lite's expert shapes that took the kernel
// from 70-77% to 80-91% of the read probe (TestMVStream, one and two
// threads, load 3-5); an earlier test of software prefetch without the
// L2 requests had found no gain.
//
// AVX-512 does eight blocks per iteration and issues them grouped by
// operation: all sixteen widenings, then the conversions, the products and
// the scale FMAs. The kernel is bound by the FP pipes (on Zen4 the widening,
// the conversion and the FMAs each have two of the four 256-bit pipes and
// share one); issuing block by block left them unevenly used. Grouped
// measured 4.0 against 4.4 cycles per block from L1 and 8% faster from L2,
// 3-7% faster from memory at one thread; the same order in ymm was 15%
// slower (more loads and instructions).
func genMVQ8Rows(g *gen, s isa) {
	U := 4
	if s.r == "Z" {
		U = 8
	}
	g.text(fmt.Sprintf("mvQ8R%s", s.name), 64)
	g.p("MOVQ y+0(FP), DI")
	g.p("MOVQ w+8(FP), R8")
	g.p("MOVQ stride+16(FP), BX")
	g.p("MOVQ x+24(FP), SI")
	g.p("MOVQ rows+40(FP), DX")
	g.p("MOVQ s+48(FP), R10")
	g.p("MOVQ sstride+56(FP), R11")
	sub := 32 / s.lanes
	g.label("row")
	g.p("MOVQ R8, AX")
	g.p("MOVQ SI, R9")
	g.p("MOVQ R10, R12")
	g.p("MOVQ n+32(FP), CX")
	zero(g, s, 0, 1, 2, 3)
	block := func(b int) {
		t := 4 + b
		for k := 0; k < sub; k++ {
			q := 8 + (b*sub+k)%4
			widen(g, s, dtQ8, fmt.Sprintf("%d(AX)", 32*b+s.lanes*k), q)
			xa := fmt.Sprintf("%d(R9)", 128*b+4*s.lanes*k)
			if k == 0 {
				g.p("VMULPS %s, %s, %s", xa, s.v(q), s.v(t))
			} else {
				g.p("VFMADD231PS %s, %s, %s", xa, s.v(q), s.v(t))
			}
		}
		if s.r == "Z" {
			g.p("VFMADD231PS.BCST %d(R12), %s, %s", 4*b, s.v(t), s.v(b))
		} else {
			g.p("VBROADCASTSS %d(R12), Y14", 4*b)
			g.p("VFMADD231PS Y14, %s, %s", s.v(t), s.v(b))
		}
	}
	// grouped: blocks [0,u) in Z8-Z23 (widened) and Z24-Z31 (sums).
	grouped := func(u int) {
		q := func(b, k int) string { return fmt.Sprintf("Z%d", 8+(2*b+k)%16) }
		t := func(b int) string { return fmt.Sprintf("Z%d", 24+b%8) }
		for b := 0; b < u; b++ {
			for k := 0; k < 2; k++ {
				g.p("VPMOVSXBD %d(AX), %s", 32*b+16*k, q(b, k))
			}
		}
		for b := 0; b < u; b++ {
			for k := 0; k < 2; k++ {
				g.p("VCVTDQ2PS %s, %s", q(b, k), q(b, k))
			}
		}
		for b := 0; b < u; b++ {
			g.p("VMULPS %d(R9), %s, %s", 128*b, q(b, 0), t(b))
			g.p("VFMADD231PS %d(R9), %s, %s", 128*b+64, q(b, 1), t(b))
		}
		for b := 0; b < u; b++ {
			g.p("VFMADD231PS.BCST %d(R12), %s, Z%d", 4*b, t(b), b%4)
		}
	}
	g.p("CMPQ CX, $%d", 32*U)
	g.p("JL tail")
	g.label("loop")
	prefetchW(g, "(AX)", 32*U, q8PF, q8PFL2)
	if q8PFS > 0 {
		g.p("PREFETCHT0 %d(R12)", q8PFS)
	}
	if s.r == "Z" {
		grouped(U)
	} else {
		for b := 0; b < U; b++ {
			block(b)
		}
	}
	g.p("ADDQ $%d, AX", 32*U)
	g.p("ADDQ $%d, R9", 128*U)
	g.p("ADDQ $%d, R12", 4*U)
	g.p("SUBQ $%d, CX", 32*U)
	g.p("CMPQ CX, $%d", 32*U)
	g.p("JGE loop")
	g.label("tail")
	g.p("TESTQ CX, CX")
	g.p("JZ done")
	// The tail's lines too, or each row's last few would go unrequested.
	prefetchW(g, "(AX)", 32, q8PF, q8PFL2)
	if q8PFS > 0 {
		g.p("PREFETCHT0 %d(R12)", q8PFS)
	}
	block(0)
	g.p("ADDQ $32, AX")
	g.p("ADDQ $128, R9")
	g.p("ADDQ $4, R12")
	g.p("SUBQ $32, CX")
	g.p("JMP tail")
	g.label("done")
	reduce1(g, s)
	g.p("ADDQ $4, DI")
	g.p("ADDQ BX, R8")
	g.p("ADDQ R11, R10")
	g.p("DECQ DX")
	g.p("JNZ row")
	g.p("VZEROUPPER")
	g.p("RET")
}

// Software prefetch distances of the batch-1 row kernels (mvBF16EOR,
// mvQ8R), in bytes ahead of the weights (and Q8_0 row scales) being
// summed (0: none). The hardware prefetchers alone left too few lines in
// flight: on V2-Lite's expert shapes the BF16 kernel read at 84-90% of
// the read probe and Q8_0 at 70-77% (TestMVStream -mvstream, one and two
// threads). Weights go into L1 one distance ahead and into L2 a second,
// since the L2 requests keep more lines in flight than L1's fill buffers
// allow (as for the integer-activation kernels, qact.go). Measured
// alternated against each other: BF16 1 KiB + 2 KiB (or 3 KiB) 91-101%;
// 2 KiB + 4 KiB 88-94%; 512 B + 1 KiB 84-94%; 1 KiB into L1 alone
// 88-96%. Q8_0 (2-3 KiB + 4-6 KiB 79-91%, into L1 alone 77-83%): at
// low load 1 KiB + 3 KiB 77-87% against 2 KiB + 4 KiB's 72-82% on the
// expert shapes (3 rounds alternated; 1 + 2, 0.5 + 2 and 1 + 4 KiB in
// between), and decode 81.6-87.9% of its roofline against 83.0-83.2%. Rows are contiguous in every stored matrix, so past a row's
// end the lines are the next row's; past the last row at most a
// distance's worth no one reads. The eight-row BF16 kernel (long rows)
// already reads at 98-107% of the probe and has none.
const (
	bf16PF   = 1024
	bf16PFL2 = 2048
	q8PF     = 1024
	q8PFL2   = 3072
	q8PFS    = 512
)

// prefetchW requests the lines [0, bytes) of the weights at base (a
// memory operand's register part, e.g. "(AX)") l1 bytes ahead into L1
// and l2 ahead into L2.
func prefetchW(g *gen, base string, bytes, l1, l2 int) {
	for off := 0; off < bytes; off += 64 {
		if l1 > 0 {
			g.p("PREFETCHT0 %d%s", l1+off, base)
		}
		if l2 > 0 {
			g.p("PREFETCHT1 %d%s", l2+off, base)
		}
	}
}

func genMatVec(g *gen) {
	for _, s := range []isa{avx512, avx2} {
		for _, dt := range []dtype{dtF32, dtBF16, dtF16, dtF8} {
			genMVRows(g, s, dt)
		}
		genMVQ8Rows(g, s)
		genMVBF16EO(g, s)
	}
	for nx := 8; nx >= 2; nx-- {
		genMVBF16EOMulti(g, nx)
	}
	genMVBF16EONRows(g, 8)
	genMVF8Rows512(g)
}

// genMVBF16EO: BF16 rows without widening shuffles. A 64-byte load holds
// 32 bf16 as 16 dwords; VPSLLD $16 yields the even elements as float32 and
// VPANDD 0xffff0000 the odd ones, so the caller passes x permuted per
// 32-column block as [x0 x2 .. x30 | x1 x3 .. x31] (xp). Two instructions
// per 16 weights instead of three keeps more loads in flight.
// func mvBF16EOR<ISA>(y *float32, w *byte, stride uintptr, xp *float32, n int, rows int)
// n a positive multiple of 2*lanes.
func genMVBF16EO(g *gen, s isa) {
	g.text("mvBF16EOR"+s.name, 48)
	g.p("MOVQ y+0(FP), DI")
	g.p("MOVQ w+8(FP), R8")
	g.p("MOVQ stride+16(FP), BX")
	g.p("MOVQ xp+24(FP), SI")
	g.p("MOVQ rows+40(FP), DX")
	g.p("MOVL $0xFFFF0000, R10")
	g.p("MOVD R10, X15")
	g.p("VPBROADCASTD X15, %s", s.v(15))
	const U = 4
	blk := 2 * s.lanes // elements per load
	g.label("row")
	g.p("MOVQ R8, AX")
	g.p("MOVQ SI, R9")
	g.p("MOVQ n+32(FP), CX")
	zero(g, s, 0, 1, 2, 3, 4, 5, 6, 7)
	body := func(u int) {
		for uu := 0; uu < u; uu++ {
			wa := fmt.Sprintf("%d(AX)", 2*blk*uu)
			lo, hi := 8+uu%2*2, 9+uu%2*2
			g.p("VPSLLD $16, %s, %s", wa, s.v(lo))
			and := "VPAND"
			if s.r == "Z" {
				and = "VPANDD" // the EVEX form's name in Go
			}
			g.p("%s %s, %s, %s", and, wa, s.v(15), s.v(hi))
			g.p("VFMADD231PS %d(R9), %s, %s", 4*blk*uu, s.v(lo), s.v(uu))
			g.p("VFMADD231PS %d(R9), %s, %s", 4*blk*uu+4*s.lanes, s.v(hi), s.v(4+uu))
		}
	}
	step := U * blk
	g.p("CMPQ CX, $%d", step)
	g.p("JL tail")
	g.label("loop")
	prefetchW(g, "(AX)", 2*step, bf16PF, bf16PFL2)
	body(U)
	g.p("ADDQ $%d, AX", 2*step)
	g.p("ADDQ $%d, R9", 4*step)
	g.p("SUBQ $%d, CX", step)
	g.p("CMPQ CX, $%d", step)
	g.p("JGE loop")
	g.label("tail")
	g.p("TESTQ CX, CX")
	g.p("JZ done")
	prefetchW(g, "(AX)", 2*blk, bf16PF, bf16PFL2)
	body(1)
	g.p("ADDQ $%d, AX", 2*blk)
	g.p("ADDQ $%d, R9", 4*blk)
	g.p("SUBQ $%d, CX", blk)
	g.p("JMP tail")
	g.label("done")
	for i := 0; i < 4; i++ {
		g.p("VADDPS %s, %s, %s", s.v(4+i), s.v(i), s.v(i))
	}
	reduce1(g, s)
	g.p("ADDQ $4, DI")
	g.p("ADDQ BX, R8")
	g.p("DECQ DX")
	g.p("JNZ row")
	g.p("VZEROUPPER")
	g.p("RET")
}

// genMVBF16EOMulti: the even/odd BF16 row kernel against nx x vectors at
// once (small batches: a few tokens for one expert, or batched decode), so
// W is streamed once per nx vectors instead of once per vector.
// func mvBF16EOx<nx><ISA>(y *float32, ystride uintptr, w *byte, stride uintptr, xp *float32, xstride uintptr, n int, rows int)
// y[i*ystride/4 + r] = W[r]·x_i; xp rows (permuted by permuteEO) xstride
// bytes apart; n a positive multiple of 32. Weights are prefetched as in
// mvBF16EOR (bf16PF): BF16 MatMul of 1408x2048 from memory went from
// 62-70% to 77-88% of the read probe at 2 and 4 x rows (TestMVStream, one
// and two threads); at 8 rows (x 64 KiB, past L1) 45-47% to 52-54%.
func genMVBF16EOMulti(g *gen, nx int) {
	g.text(fmt.Sprintf("mvBF16EOx%dAVX512", nx), 64)
	g.p("MOVQ y+0(FP), DI")
	g.p("MOVQ ystride+8(FP), R12")
	g.p("LEAQ (R12)(R12*2), R11")
	g.p("MOVQ w+16(FP), R8")
	g.p("MOVQ stride+24(FP), BX")
	g.p("MOVQ xp+32(FP), SI")
	g.p("MOVQ xstride+40(FP), R9")
	g.p("LEAQ (R9)(R9*2), R10")
	g.p("MOVQ rows+56(FP), DX")
	g.p("MOVL $0xFFFF0000, AX")
	g.p("VPBROADCASTD AX, Z31")
	// x rows 0-3 from R13, 4-7 from R14; y rows 0-3 from DI, 4-7 from R15.
	idx := []string{"", "(R9*1)", "(R9*2)", "(R10*1)"}
	xa := func(i, off int) string {
		base := "R13"
		if i >= 4 {
			base = "R14"
		}
		return fmt.Sprintf("%d(%s)%s", off, base, idx[i%4])
	}
	yidx := []string{"", "(R12*1)", "(R12*2)", "(R11*1)"}
	ya := func(i int) string {
		base := "DI"
		if i >= 4 {
			base = "R15"
		}
		return fmt.Sprintf("(%s)%s", base, yidx[i%4])
	}
	g.label("row")
	g.p("MOVQ R8, AX")
	g.p("MOVQ SI, R13")
	if nx > 4 {
		g.p("LEAQ (R13)(R9*4), R14")
	}
	g.p("MOVQ n+48(FP), CX")
	for i := 0; i < 2*nx; i++ {
		g.p("VXORPS Z%d, Z%d, Z%d", i, i, i)
	}
	g.label("loop")
	prefetchW(g, "(AX)", 64, bf16PF, bf16PFL2)
	g.p("VPSLLD $16, (AX), Z16")
	g.p("VPANDD (AX), Z31, Z17")
	for i := 0; i < nx; i++ {
		g.p("VFMADD231PS %s, Z16, Z%d", xa(i, 0), i)
		g.p("VFMADD231PS %s, Z17, Z%d", xa(i, 64), nx+i)
	}
	g.p("ADDQ $64, AX")
	g.p("ADDQ $128, R13")
	if nx > 4 {
		g.p("ADDQ $128, R14")
	}
	g.p("SUBQ $32, CX")
	g.p("JNZ loop")
	for i := 0; i < nx; i++ {
		g.p("VADDPS Z%d, Z%d, Z%d", nx+i, i, i)
		g.p("VEXTRACTF64X4 $1, Z%d, Y18", i)
		g.p("VADDPS Y18, Y%d, Y%d", i, i)
		g.p("VEXTRACTF32X4 $1, Y%d, X18", i)
		g.p("VADDPS X18, X%d, X%d", i, i)
		// (a0+a1)+(a2+a3), the order of every other row kernel here.
		g.p("VHADDPS X%d, X%d, X%d", i, i, i)
		g.p("VHADDPS X%d, X%d, X%d", i, i, i)
	}
	if nx > 4 {
		g.p("LEAQ (DI)(R12*4), R15")
	}
	for i := 0; i < nx; i++ {
		g.p("VMOVSS X%d, %s", i, ya(i))
	}
	g.p("ADDQ $4, DI")
	g.p("ADDQ BX, R8")
	g.p("DECQ DX")
	g.p("JNZ row")
	g.p("VZEROUPPER")
	g.p("RET")
}

// genMVF8Rows512: FP8 E4M3 rows on AVX-512, 32 weights per word-wide step:
// sign-extend bytes to words, shift left 7 and clear bit 14, which is the
// same value as a half times 2^-8 (the caller folds 2^8 and the block
// scale into x), then VCVTPH2PS each 16-word half. Four vector operations
// per 16 weights fewer than widening to dwords first.
// func mvF8WRAVX512(y *float32, w *byte, stride uintptr, x *float32, n int, rows int)
// n a positive multiple of 32.
func genMVF8Rows512(g *gen) {
	g.text("mvF8WRAVX512", 48)
	g.p("MOVQ y+0(FP), DI")
	g.p("MOVQ w+8(FP), R8")
	g.p("MOVQ stride+16(FP), BX")
	g.p("MOVQ x+24(FP), SI")
	g.p("MOVQ rows+40(FP), DX")
	g.p("MOVL $0xBFFFBFFF, R10")
	g.p("VPBROADCASTD R10, Z15")
	body := func(u int) {
		for uu := 0; uu < u; uu++ {
			t, a, b := 8+2*uu, 9+2*uu, 12+uu
			g.p("VPMOVSXBW %d(AX), Z%d", 32*uu, t)
			g.p("VPSLLW $7, Z%d, Z%d", t, t)
			g.p("VPANDD Z15, Z%d, Z%d", t, t)
			g.p("VEXTRACTI64X4 $1, Z%d, Y%d", t, b)
			g.p("VCVTPH2PS Y%d, Z%d", t, a)
			g.p("VCVTPH2PS Y%d, Z%d", b, b)
			g.p("VFMADD231PS %d(R9), Z%d, Z%d", 128*uu, a, 2*uu)
			g.p("VFMADD231PS %d(R9), Z%d, Z%d", 128*uu+64, b, 2*uu+1)
		}
	}
	g.label("row")
	g.p("MOVQ R8, AX")
	g.p("MOVQ SI, R9")
	g.p("MOVQ n+32(FP), CX")
	zero(g, avx512, 0, 1, 2, 3)
	g.p("CMPQ CX, $64")
	g.p("JL tail")
	g.label("loop")
	body(2)
	g.p("ADDQ $64, AX")
	g.p("ADDQ $256, R9")
	g.p("SUBQ $64, CX")
	g.p("CMPQ CX, $64")
	g.p("JGE loop")
	g.label("tail")
	g.p("TESTQ CX, CX")
	g.p("JZ done")
	body(1)
	g.label("done")
	reduce1(g, avx512)
	g.p("ADDQ $4, DI")
	g.p("ADDQ BX, R8")
	g.p("DECQ DX")
	g.p("JNZ row")
	g.p("VZEROUPPER")
	g.p("RET")
}

// genMVBF16EONRows is mvBF16EOR over nr (2, 4 or 8) rows at once, each x
// load shared by them. For long rows (the dense down_proj's 10944 columns:
// 43 KB of x) x does not stay in L1, and the one-row kernel's two x loads
// per 64 bytes of weights miss into L2, taking the miss buffers the weight
// stream needs. On that shape (bench-kernels, alternated in one run) the
// one-row kernel read at 42% of the probe on one core, four rows 64-69%,
// eight rows 83-85% (two cores: 40-67%, 83-95%, 94-99%); two rows were
// slower than four. On 2048-column rows (x in L1) the multi-row kernels
// are slower than one row (four rows: 60-65%), so only long rows take it.
// func mvBF16EOR<nr>AVX512(y *float32, w *byte, stride uintptr, xp *float32, n int, rows int)
// n a positive multiple of 32, rows a positive multiple of nr.
func genMVBF16EONRows(g *gen, nr int) {
	g.text(fmt.Sprintf("mvBF16EOR%dAVX512", nr), 48)
	g.p("MOVQ y+0(FP), DI")
	g.p("MOVQ w+8(FP), R8")
	g.p("MOVQ stride+16(FP), BX")
	g.p("LEAQ (BX)(BX*2), R12")
	g.p("MOVQ xp+24(FP), SI")
	g.p("MOVQ rows+40(FP), DX")
	g.p("MOVL $0xFFFF0000, R10")
	g.p("MOVD R10, X15") // VEX MOVD reaches X0-X15 only; Z15 is zeroed below
	g.p("VPBROADCASTD X15, Z31")
	wAddr := func(r int) string {
		base := "(AX)"
		if r >= 4 {
			base = "(R13)"
		}
		return base + []string{"", "(BX*1)", "(BX*2)", "(R12*1)"}[r%4]
	}
	g.label("group")
	g.p("MOVQ R8, AX")
	if nr > 4 {
		g.p("LEAQ (R8)(BX*4), R13")
	}
	g.p("MOVQ SI, R9")
	g.p("MOVQ n+32(FP), CX")
	for r := 0; r < 2*nr; r++ {
		g.p("VXORPS Z%d, Z%d, Z%d", r, r, r)
	}
	g.label("loop")
	g.p("VMOVUPS (R9), Z16")   // x, even columns of the block
	g.p("VMOVUPS 64(R9), Z17") // x, odd columns
	for r := 0; r < nr; r++ {
		lo, hi := 18+2*(r%2), 19+2*(r%2)
		g.p("VPSLLD $16, %s, Z%d", wAddr(r), lo)
		g.p("VPANDD %s, Z31, Z%d", wAddr(r), hi)
		g.p("VFMADD231PS Z16, Z%d, Z%d", lo, r)
		g.p("VFMADD231PS Z17, Z%d, Z%d", hi, nr+r)
	}
	g.p("ADDQ $64, AX")
	if nr > 4 {
		g.p("ADDQ $64, R13")
	}
	g.p("ADDQ $128, R9")
	g.p("SUBQ $32, CX")
	g.p("JNZ loop")
	// Row r's sum is the lanes of Z(r) + Z(nr+r).
	for r := 0; r < nr; r++ {
		g.p("VADDPS Z%d, Z%d, Z%d", nr+r, r, r)
		g.p("VEXTRACTF64X4 $1, Z%d, Y20", r)
		g.p("VADDPS Y20, Y%d, Y%d", r, r)
		g.p("VEXTRACTF32X4 $1, Y%d, X20", r)
		g.p("VADDPS X20, X%d, X%d", r, r)
	}
	for b := 0; b < nr; b += 4 {
		if nr == 2 {
			g.p("VHADDPS X1, X0, X0")
			g.p("VHADDPS X0, X0, X0")
			g.p("VMOVSD X0, (DI)")
			break
		}
		g.p("VHADDPS X%d, X%d, X%d", b+1, b, b)
		g.p("VHADDPS X%d, X%d, X%d", b+3, b+2, b+2)
		g.p("VHADDPS X%d, X%d, X%d", b+2, b, b)
		g.p("VMOVUPS X%d, %d(DI)", b, 4*b)
	}
	g.p("ADDQ $%d, DI", 4*nr)
	g.p("LEAQ (R8)(BX*%d), R8", nr)
	g.p("SUBQ $%d, DX", nr)
	g.p("JNZ group")
	g.p("VZEROUPPER")
	g.p("RET")
}
