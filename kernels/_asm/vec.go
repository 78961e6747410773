package main

import "fmt"

// Vector kernels. Every function handles n a multiple of its vector width
// (the Go wrappers finish the tails) and n > 0.

// genDot: func dot<ISA>(a, b *float32, n int) float32, four chains.
func genDot(g *gen, s isa) {
	g.text("dot"+s.name, 28)
	g.p("MOVQ a+0(FP), SI")
	g.p("MOVQ b+8(FP), DI")
	g.p("MOVQ n+16(FP), CX")
	zero(g, s, 0, 1, 2, 3)
	step := 4 * s.lanes
	g.p("CMPQ CX, $%d", step)
	g.p("JL tail")
	g.label("loop")
	for u := 0; u < 4; u++ {
		g.p("VMOVUPS %d(SI), %s", 4*s.lanes*u, s.v(4+u))
		g.p("VFMADD231PS %d(DI), %s, %s", 4*s.lanes*u, s.v(4+u), s.v(u))
	}
	g.p("ADDQ $%d, SI", 4*step)
	g.p("ADDQ $%d, DI", 4*step)
	g.p("SUBQ $%d, CX", step)
	g.p("CMPQ CX, $%d", step)
	g.p("JGE loop")
	g.label("tail")
	g.p("TESTQ CX, CX")
	g.p("JZ done")
	g.p("VMOVUPS (SI), %s", s.v(4))
	g.p("VFMADD231PS (DI), %s, %s", s.v(4), s.v(0))
	g.p("ADDQ $%d, SI", 4*s.lanes)
	g.p("ADDQ $%d, DI", 4*s.lanes)
	g.p("SUBQ $%d, CX", s.lanes)
	g.p("JMP tail")
	g.label("done")
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
	g.p("VZEROUPPER")
	g.p("MOVSS X0, ret+24(FP)")
	g.p("RET")
}

// genMap emits a one-pass elementwise kernel: load the inputs of one
// vector, apply op (which reads registers 0..len(ins)-1 and leaves the
// result in register 0), store to out.
func genMap(g *gen, s isa, name string, args int, prologue func(), ins []string, out string, op func()) {
	g.text(name+s.name, args)
	prologue()
	g.label("loop")
	for i, in := range ins {
		g.p("VMOVUPS (%s), %s", in, s.v(i))
	}
	op()
	g.p("VMOVUPS %s, (%s)", s.v(0), out)
	seen := map[string]bool{}
	for _, r := range append(ins, out) {
		if !seen[r] {
			g.p("ADDQ $%d, %s", 4*s.lanes, r)
			seen[r] = true
		}
	}
	g.p("SUBQ $%d, CX", s.lanes)
	g.p("JNZ loop")
	g.p("VZEROUPPER")
	g.p("RET")
}

// expConsts: Cephes expf. Registers 16-27 hold them in the exp kernels.
var expConsts = []struct {
	name string
	v    uint32
}{
	{"hi", 0x42b17218},    // 88.72284: exp overflows above
	{"lo", 0xc2d00000},    // -104: exp is 0 below
	{"log2e", 0x3fb8aa3b}, // 1.44269504
	{"c1", 0x3f318000},    // ln2 high part 0.693359375
	{"c2", 0xb95e8083},    // ln2 low part -2.12194440e-4
	{"p0", 0x39506967},    // 1.9875691500e-4
	{"p1", 0x3ab743ce},    // 1.3981999507e-3
	{"p2", 0x3c088908},    // 8.3334519073e-3
	{"p3", 0x3d2aa9c1},    // 4.1665795894e-2
	{"p4", 0x3e2aaaaa},    // 1.6666665459e-1
	{"p5", 0x3f000000},    // 5.0000001201e-1
	{"one", 0x3f800000},   // 1
}

func genExpConsts(g *gen) {
	for i, c := range expConsts {
		g.raw(fmt.Sprintf("DATA expc<>+%d(SB)/4, $0x%08x\n", 4*i, c.v))
	}
	g.raw(fmt.Sprintf("GLOBL expc<>(SB), RODATA|NOPTR, $%d\n", 4*len(expConsts)))
}

func loadExpConsts(g *gen) {
	for i := range expConsts {
		g.p("VBROADCASTSS expc<>+%d(SB), Z%d", 4*i, 16+i)
	}
}

// exp512 computes Z[dst] = exp(Z[src]) (AVX-512, registers 28-31 scratch):
// n = round(x*log2e), r = x - n*ln2 in two parts, Cephes' degree-5
// polynomial, then VSCALEFPS by n (which also handles underflow to 0).
func exp512(g *gen, src, dst int) {
	g.p("VMINPS Z%d, Z16, Z28", src) // NaN in src propagates (second operand)
	g.p("VMAXPS Z28, Z17, Z28")
	g.p("VMULPS Z18, Z28, Z29")
	g.p("VRNDSCALEPS $0, Z29, Z29")   // n, round to nearest even
	g.p("VFNMADD231PS Z19, Z29, Z28") // r = x - n*c1
	g.p("VFNMADD231PS Z20, Z29, Z28") // r -= n*c2
	g.p("VMOVAPS Z21, Z30")
	g.p("VFMADD213PS Z22, Z28, Z30") // p = p0*r + p1
	g.p("VFMADD213PS Z23, Z28, Z30")
	g.p("VFMADD213PS Z24, Z28, Z30")
	g.p("VFMADD213PS Z25, Z28, Z30")
	g.p("VFMADD213PS Z26, Z28, Z30")
	g.p("VMULPS Z28, Z28, Z31")         // r^2
	g.p("VFMADD213PS Z28, Z31, Z30")    // p*r^2 + r
	g.p("VADDPS Z27, Z30, Z30")         // + 1
	g.p("VSCALEFPS Z29, Z30, Z%d", dst) // * 2^n
}

func genVec(g *gen) {
	genExpConsts(g)
	for _, s := range []isa{avx512, avx2} {
		genDot(g, s)
		// func axpy<ISA>(y *float32, a float32, x *float32, n int)
		genMap(g, s, "axpy", 32, func() {
			g.p("MOVQ y+0(FP), DI")
			g.p("VBROADCASTSS a+8(FP), %s", s.v(15))
			g.p("MOVQ x+16(FP), SI")
			g.p("MOVQ n+24(FP), CX")
		}, []string{"DI", "SI"}, "DI", func() {
			g.p("VFMADD231PS %s, %s, %s", s.v(15), s.v(1), s.v(0))
		})
		// func scale<ISA>(x *float32, a float32, n int)
		genMap(g, s, "scale", 24, func() {
			g.p("MOVQ x+0(FP), DI")
			g.p("VBROADCASTSS a+8(FP), %s", s.v(15))
			g.p("MOVQ n+16(FP), CX")
		}, []string{"DI"}, "DI", func() {
			g.p("VMULPS %s, %s, %s", s.v(15), s.v(0), s.v(0))
		})
		// func add<ISA>(dst, a, b *float32, n int)
		genMap(g, s, "add", 32, func() {
			g.p("MOVQ dst+0(FP), DI")
			g.p("MOVQ a+8(FP), SI")
			g.p("MOVQ b+16(FP), DX")
			g.p("MOVQ n+24(FP), CX")
		}, []string{"SI", "DX"}, "DI", func() {
			g.p("VADDPS %s, %s, %s", s.v(1), s.v(0), s.v(0))
		})
		// func mulScale<ISA>(out, x, weight *float32, inv float32, n int): out = w*(x*inv)
		genMap(g, s, "mulScale", 40, func() {
			g.p("MOVQ out+0(FP), DI")
			g.p("MOVQ x+8(FP), SI")
			g.p("MOVQ weight+16(FP), DX")
			g.p("VBROADCASTSS inv+24(FP), %s", s.v(15))
			g.p("MOVQ n+32(FP), CX")
		}, []string{"SI", "DX"}, "DI", func() {
			g.p("VMULPS %s, %s, %s", s.v(15), s.v(0), s.v(0))
			g.p("VMULPS %s, %s, %s", s.v(1), s.v(0), s.v(0))
		})
	}
	s := avx512
	// func siluMulAVX512(out, gate, up *float32, n int): g/(1+exp(-g))*up
	genMap(g, s, "siluMul", 32, func() {
		g.p("MOVQ out+0(FP), DI")
		g.p("MOVQ gate+8(FP), SI")
		g.p("MOVQ up+16(FP), DX")
		g.p("MOVQ n+24(FP), CX")
		loadExpConsts(g)
		g.p("VXORPS Z15, Z15, Z15")
	}, []string{"SI", "DX"}, "DI", func() {
		g.p("VSUBPS Z0, Z15, Z2") // -g
		exp512(g, 2, 2)
		g.p("VADDPS Z27, Z2, Z2")
		g.p("VDIVPS Z2, Z0, Z0")
		g.p("VMULPS Z1, Z0, Z0")
	})
	// func sigmoidAVX512(x *float32, n int)
	genMap(g, s, "sigmoid", 16, func() {
		g.p("MOVQ x+0(FP), DI")
		g.p("MOVQ n+8(FP), CX")
		loadExpConsts(g)
		g.p("VXORPS Z15, Z15, Z15")
	}, []string{"DI"}, "DI", func() {
		g.p("VSUBPS Z0, Z15, Z2")
		exp512(g, 2, 2)
		g.p("VADDPS Z27, Z2, Z2")
		g.p("VDIVPS Z2, Z27, Z0")
	})
	// func expSubAVX512(x *float32, m float32, n int) float32: x = exp(x-m), returns the sum.
	g.text("expSubAVX512", 28)
	g.p("MOVQ x+0(FP), DI")
	g.p("VBROADCASTSS m+8(FP), Z15")
	g.p("MOVQ n+16(FP), CX")
	loadExpConsts(g)
	g.p("VXORPS Z14, Z14, Z14")
	g.label("loop")
	g.p("VMOVUPS (DI), Z0")
	g.p("VSUBPS Z15, Z0, Z0")
	exp512(g, 0, 0)
	g.p("VMOVUPS Z0, (DI)")
	g.p("VADDPS Z0, Z14, Z14")
	g.p("ADDQ $64, DI")
	g.p("SUBQ $16, CX")
	g.p("JNZ loop")
	g.p("VEXTRACTF64X4 $1, Z14, Y1")
	g.p("VADDPS Y1, Y14, Y0")
	g.p("VEXTRACTF128 $1, Y0, X1")
	g.p("VADDPS X1, X0, X0")
	g.p("VHADDPS X0, X0, X0")
	g.p("VHADDPS X0, X0, X0")
	g.p("VZEROUPPER")
	g.p("MOVSS X0, ret+24(FP)")
	g.p("RET")
	genMax(g, avx512)
	genMax(g, avx2)
	genMLA(g)
	genAxpy8x2(g)
	genMLAOut8(g)
	genDot8x2(g)
	genPermuteEO(g)
}

// genMLA emits the two kernels of absorbed MLA decode, for 8 heads at a
// time so each cache row is read once per 8 heads.
//
// func dot8AVX512(out *float32, q *float32, qstride uintptr, c *float32, n int, pf *float32):
// out[h] = q[h]·c for h < 8, q rows qstride bytes apart; the n floats at pf
// (the next cache row, from L3 at long contexts) are prefetched meanwhile.
// func axpy8AVX512(out *float32, ostride uintptr, p *float32, pstride uintptr, c *float32, n int):
// out[h] += p[h]*c for h < 8, p[h] at p + h*pstride.
func genMLA(g *gen) {
	g.text("dot8AVX512", 48)
	g.p("MOVQ out+0(FP), DX")
	g.p("MOVQ q+8(FP), SI")
	g.p("MOVQ qstride+16(FP), R9")
	g.p("LEAQ (R9)(R9*2), R10")
	g.p("LEAQ (SI)(R9*4), DI")
	g.p("MOVQ c+24(FP), BX")
	g.p("MOVQ n+32(FP), CX")
	g.p("MOVQ pf+40(FP), R11")
	for i := 0; i < 8; i++ {
		g.p("VXORPS Z%d, Z%d, Z%d", i, i, i)
	}
	g.label("loop")
	g.p("PREFETCHT0 (R11)")
	g.p("ADDQ $64, R11")
	g.p("VMOVUPS (BX), Z8")
	for h := 0; h < 8; h++ {
		a, _ := x16Addr(h, 0)
		g.p("VFMADD231PS %s, Z8, Z%d", a, h)
	}
	g.p("ADDQ $64, BX")
	g.p("ADDQ $64, SI")
	g.p("ADDQ $64, DI")
	g.p("SUBQ $16, CX")
	g.p("JNZ loop")
	reduce8(g, 0, 10, 0)
	g.p("VZEROUPPER")
	g.p("RET")

	g.text("axpy8AVX512", 48)
	g.p("MOVQ out+0(FP), SI")
	g.p("MOVQ ostride+8(FP), R9")
	g.p("LEAQ (R9)(R9*2), R10")
	g.p("LEAQ (SI)(R9*4), DI")
	g.p("MOVQ p+16(FP), AX")
	g.p("MOVQ pstride+24(FP), R11")
	g.p("LEAQ (R11)(R11*2), R12")
	g.p("LEAQ (AX)(R11*4), R13")
	g.p("MOVQ c+32(FP), BX")
	g.p("MOVQ n+40(FP), CX")
	pAddr := func(h int) string {
		base := "AX"
		if h >= 4 {
			base = "R13"
		}
		return fmt.Sprintf("(%s)%s", base, []string{"", "(R11*1)", "(R11*2)", "(R12*1)"}[h%4])
	}
	for h := 0; h < 8; h++ {
		g.p("VBROADCASTSS %s, Z%d", pAddr(h), 16+h)
	}
	g.label("loop")
	g.p("VMOVUPS (BX), Z8")
	for h := 0; h < 8; h++ {
		a, _ := x16Addr(h, 0)
		g.p("VMOVUPS %s, Z%d", a, h)
		g.p("VFMADD231PS Z%d, Z8, Z%d", 16+h, h)
		g.p("VMOVUPS Z%d, %s", h, a)
	}
	g.p("ADDQ $64, BX")
	g.p("ADDQ $64, SI")
	g.p("ADDQ $64, DI")
	g.p("SUBQ $16, CX")
	g.p("JNZ loop")
	g.p("VZEROUPPER")
	g.p("RET")
}

// genPermuteEO emits the x reordering of the even/odd BF16 kernels: per
// block of 2*lanes floats, the even-indexed then the odd-indexed ones.
// func permuteEO<ISA>(dst, src *float32, n int), n a positive multiple of 2*lanes.
func genPermuteEO(g *gen) {
	for i := 0; i < 32; i++ { // evens then odds; DATA must ascend
		g.raw(fmt.Sprintf("DATA eoidx<>+%d(SB)/4, $%d\n", 4*i, 2*(i%16)+i/16))
	}
	g.raw("GLOBL eoidx<>(SB), RODATA|NOPTR, $128\n")
	g.text("permuteEOAVX512", 24)
	g.p("MOVQ dst+0(FP), DI")
	g.p("MOVQ src+8(FP), SI")
	g.p("MOVQ n+16(FP), CX")
	g.p("VMOVUPS eoidx<>+0(SB), Z30")
	g.p("VMOVUPS eoidx<>+64(SB), Z31")
	g.label("loop")
	g.p("VMOVUPS (SI), Z0")
	g.p("VMOVAPS Z0, Z1")
	g.p("VPERMT2PS 64(SI), Z30, Z0")
	g.p("VPERMT2PS 64(SI), Z31, Z1")
	g.p("VMOVUPS Z0, (DI)")
	g.p("VMOVUPS Z1, 64(DI)")
	g.p("ADDQ $128, SI")
	g.p("ADDQ $128, DI")
	g.p("SUBQ $32, CX")
	g.p("JNZ loop")
	g.p("VZEROUPPER")
	g.p("RET")

	g.text("permuteEOAVX2", 24)
	g.p("MOVQ dst+0(FP), DI")
	g.p("MOVQ src+8(FP), SI")
	g.p("MOVQ n+16(FP), CX")
	g.label("loop")
	g.p("VMOVUPS (SI), Y0")
	g.p("VMOVUPS 32(SI), Y1")
	g.p("VSHUFPS $0x88, Y1, Y0, Y2") // a0 a2 b0 b2 | a4 a6 b4 b6
	g.p("VSHUFPS $0xDD, Y1, Y0, Y3") // a1 a3 b1 b3 | a5 a7 b5 b7
	g.p("VPERMPD $0xD8, Y2, Y2")     // a0 a2 a4 a6 b0 b2 b4 b6
	g.p("VPERMPD $0xD8, Y3, Y3")
	g.p("VMOVUPS Y2, (DI)")
	g.p("VMOVUPS Y3, 32(DI)")
	g.p("ADDQ $64, SI")
	g.p("ADDQ $64, DI")
	g.p("SUBQ $16, CX")
	g.p("JNZ loop")
	g.p("VZEROUPPER")
	g.p("RET")
}

// genAxpy8x2: out[h] += p[h][0]*c0 + p[h][1]*c1 for h < 8: two tokens per
// pass over the 8 output rows, halving their load/store traffic (the
// limit of the one-token form). The 16 weights live in registers.
// func axpy8x2AVX512(out *float32, ostride uintptr, p *float32, pstride uintptr, c0, c1 *float32, n int, pf0, pf1 *float32)
// (pf0, pf1: the next two rows, prefetched meanwhile)
func genAxpy8x2(g *gen) {
	g.text("axpy8x2AVX512", 72)
	g.p("MOVQ out+0(FP), SI")
	g.p("MOVQ ostride+8(FP), R9")
	g.p("LEAQ (R9)(R9*2), R10")
	g.p("LEAQ (SI)(R9*4), DI")
	g.p("MOVQ p+16(FP), AX")
	g.p("MOVQ pstride+24(FP), R11")
	g.p("LEAQ (R11)(R11*2), R12")
	g.p("LEAQ (AX)(R11*4), R13")
	g.p("MOVQ c0+32(FP), BX")
	g.p("MOVQ c1+40(FP), DX")
	g.p("MOVQ n+48(FP), CX")
	g.p("MOVQ pf0+56(FP), R8")
	g.p("MOVQ pf1+64(FP), R14")
	pAddr := func(h, off int) string {
		base := "AX"
		if h >= 4 {
			base = "R13"
		}
		return fmt.Sprintf("%d(%s)%s", off, base, []string{"", "(R11*1)", "(R11*2)", "(R12*1)"}[h%4])
	}
	for h := 0; h < 8; h++ {
		g.p("VBROADCASTSS %s, Z%d", pAddr(h, 0), 16+h)
		g.p("VBROADCASTSS %s, Z%d", pAddr(h, 4), 24+h)
	}
	g.label("loop")
	g.p("PREFETCHT0 (R8)")
	g.p("PREFETCHT0 (R14)")
	g.p("ADDQ $64, R8")
	g.p("ADDQ $64, R14")
	g.p("VMOVUPS (BX), Z8")
	g.p("VMOVUPS (DX), Z9")
	for h := 0; h < 8; h++ {
		a, _ := x16Addr(h, 0)
		g.p("VMOVUPS %s, Z%d", a, h)
		g.p("VFMADD231PS Z%d, Z8, Z%d", 16+h, h)
		g.p("VFMADD231PS Z%d, Z9, Z%d", 24+h, h)
		g.p("VMOVUPS Z%d, %s", h, a)
	}
	g.p("ADDQ $64, BX")
	g.p("ADDQ $64, DX")
	g.p("ADDQ $64, SI")
	g.p("ADDQ $64, DI")
	g.p("SUBQ $16, CX")
	g.p("JNZ loop")
	g.p("VZEROUPPER")
	g.p("RET")
}

// reduce8 sums each of the accumulators Z(base)..Z(base+7) (base+7 < 16,
// for the VEX horizontal adds) to a scalar and stores the 8 sums at
// off(DX); tmp is a free register.
func reduce8(g *gen, base, tmp, off int) {
	for j := base; j < base+8; j++ {
		g.p("VEXTRACTF64X4 $1, Z%d, Y%d", j, tmp)
		g.p("VADDPS Y%d, Y%d, Y%d", tmp, j, j)
		g.p("VEXTRACTF32X4 $1, Y%d, X%d", j, tmp)
		g.p("VADDPS X%d, X%d, X%d", tmp, j, j)
	}
	b := base
	g.p("VHADDPS X%d, X%d, X%d", b+1, b, b)
	g.p("VHADDPS X%d, X%d, X%d", b+3, b+2, b+2)
	g.p("VHADDPS X%d, X%d, X%d", b+2, b, b)
	g.p("VHADDPS X%d, X%d, X%d", b+5, b+4, b+4)
	g.p("VHADDPS X%d, X%d, X%d", b+7, b+6, b+6)
	g.p("VHADDPS X%d, X%d, X%d", b+6, b+4, b+4)
	g.p("VMOVUPS X%d, %d(DX)", b, off)
	g.p("VMOVUPS X%d, %d(DX)", b+4, off+16)
}

// genMLAOut8 emits the value half of absorbed MLA decode with the outputs
// held in registers: for each 32-column chunk, 8 heads × 2 vectors of
// accumulators stay in Z0-Z15 while every token's probabilities are
// broadcast from memory straight into the FMAs. The axpy form instead
// loads and stores all 8 output rows per token pair and is bound by the
// stores (about half the FMA peak).
//
// func mlaOut8AVX512(out *float32, ostride uintptr, p *float32, pstride uintptr, rows **float32, nt int, r int)
// out[h][c] += sum_{t<nt} p[h][t] * rows[t][c] for h < 8, c < r: out rows
// ostride bytes apart, p rows pstride bytes apart; r a positive multiple
// of 32, nt > 0.
func genMLAOut8(g *gen) {
	g.text("mlaOut8AVX512", 56)
	g.p("MOVQ out+0(FP), SI")
	g.p("MOVQ ostride+8(FP), R9")
	g.p("LEAQ (R9)(R9*2), R10")
	g.p("LEAQ (SI)(R9*4), DI")
	g.p("MOVQ pstride+24(FP), R11")
	g.p("LEAQ (R11)(R11*2), R12")
	g.p("MOVQ r+48(FP), DX")
	g.p("XORQ BX, BX") // byte offset of the column chunk
	oAddr := func(h, off int) string {
		base := "SI"
		if h >= 4 {
			base = "DI"
		}
		return fmt.Sprintf("%d(%s)%s", off, base, []string{"", "(R9*1)", "(R9*2)", "(R10*1)"}[h%4])
	}
	pAddr := func(h int) string {
		base := "AX"
		if h >= 4 {
			base = "R13"
		}
		return fmt.Sprintf("(%s)%s", base, []string{"", "(R11*1)", "(R11*2)", "(R12*1)"}[h%4])
	}
	g.label("chunk")
	for h := 0; h < 8; h++ {
		g.p("VMOVUPS %s, Z%d", oAddr(h, 0), h)
		g.p("VMOVUPS %s, Z%d", oAddr(h, 64), 8+h)
	}
	g.p("MOVQ p+16(FP), AX")
	g.p("LEAQ (AX)(R11*4), R13")
	g.p("MOVQ rows+32(FP), R8")
	g.p("MOVQ nt+40(FP), CX")
	g.label("token")
	g.p("MOVQ (R8), R14")
	g.p("VMOVUPS (R14)(BX*1), Z16")
	g.p("VMOVUPS 64(R14)(BX*1), Z17")
	// The next chunk's two lines of this row: at long contexts the rows
	// come from L3, and each chunk pass would otherwise wait on them.
	g.p("PREFETCHT0 128(R14)(BX*1)")
	g.p("PREFETCHT0 192(R14)(BX*1)")
	for h := 0; h < 8; h++ {
		g.p("VFMADD231PS.BCST %s, Z16, Z%d", pAddr(h), h)
		g.p("VFMADD231PS.BCST %s, Z17, Z%d", pAddr(h), 8+h)
	}
	g.p("ADDQ $8, R8")
	g.p("ADDQ $4, AX")
	g.p("ADDQ $4, R13")
	g.p("DECQ CX")
	g.p("JNZ token")
	for h := 0; h < 8; h++ {
		g.p("VMOVUPS Z%d, %s", h, oAddr(h, 0))
		g.p("VMOVUPS Z%d, %s", 8+h, oAddr(h, 64))
	}
	g.p("ADDQ $128, SI")
	g.p("ADDQ $128, DI")
	g.p("ADDQ $128, BX")
	g.p("SUBQ $32, DX")
	g.p("JNZ chunk")
	g.p("VZEROUPPER")
	g.p("RET")
}

// genDot8x2 is dot8AVX512 for two tokens at once: each query vector
// loaded serves two FMAs, so the loop does 10 loads per 16 FMAs instead
// of 9 per 8 (the one-token form is bound by its loads).
//
// func dot8x2AVX512(out *float32, q *float32, qstride uintptr, c0, c1 *float32, n int, pf0, pf1 *float32)
// out[h] = q[h]·c0 and out[8+h] = q[h]·c1 for h < 8; the n floats at pf0
// and pf1 (the next rows) are prefetched meanwhile.
func genDot8x2(g *gen) {
	g.text("dot8x2AVX512", 64)
	g.p("MOVQ out+0(FP), DX")
	g.p("MOVQ q+8(FP), SI")
	g.p("MOVQ qstride+16(FP), R9")
	g.p("LEAQ (R9)(R9*2), R10")
	g.p("LEAQ (SI)(R9*4), DI")
	g.p("MOVQ c0+24(FP), BX")
	g.p("MOVQ c1+32(FP), R8")
	g.p("MOVQ n+40(FP), CX")
	g.p("MOVQ pf0+48(FP), R11")
	g.p("MOVQ pf1+56(FP), R12")
	for i := 0; i < 16; i++ {
		g.p("VXORPS Z%d, Z%d, Z%d", i, i, i)
	}
	g.label("loop")
	g.p("PREFETCHT0 (R11)")
	g.p("PREFETCHT0 (R12)")
	g.p("ADDQ $64, R11")
	g.p("ADDQ $64, R12")
	g.p("VMOVUPS (BX), Z16")
	g.p("VMOVUPS (R8), Z17")
	for h := 0; h < 8; h++ {
		a, _ := x16Addr(h, 0)
		g.p("VMOVUPS %s, Z%d", a, 18+h%2)
		g.p("VFMADD231PS Z%d, Z16, Z%d", 18+h%2, h)
		g.p("VFMADD231PS Z%d, Z17, Z%d", 18+h%2, 8+h)
	}
	g.p("ADDQ $64, BX")
	g.p("ADDQ $64, R8")
	g.p("ADDQ $64, SI")
	g.p("ADDQ $64, DI")
	g.p("SUBQ $16, CX")
	g.p("JNZ loop")
	reduce8(g, 0, 20, 0)
	reduce8(g, 8, 20, 32)
	g.p("VZEROUPPER")
	g.p("RET")
}

// genMax emits func max<ISA>(x *float32, n int) float32: the largest
// element, NaNs ignored like the plain loop (VMAXPS returns its second
// source, the running maximum, when either input is NaN).
func genMax(g *gen, s isa) {
	g.text("max"+s.name, 20)
	g.p("MOVQ x+0(FP), SI")
	g.p("MOVQ n+8(FP), CX")
	g.p("MOVL $0xFF800000, AX") // -Inf
	if s.r == "Z" {
		g.p("VPBROADCASTD AX, Z0")
	} else {
		g.p("MOVD AX, X0")
		g.p("VPBROADCASTD X0, Y0")
	}
	g.p("%s %s, %s", map[string]string{"Z": "VMOVAPS", "Y": "VMOVAPS"}[s.r], s.v(0), s.v(1))
	g.label("loop")
	g.p("VMOVUPS (SI), %s", s.v(2))
	g.p("VMAXPS %s, %s, %s", s.v(0), s.v(2), s.v(0))
	g.p("ADDQ $%d, SI", 4*s.lanes)
	g.p("SUBQ $%d, CX", s.lanes)
	g.p("JNZ loop")
	if s.r == "Z" {
		g.p("VEXTRACTF64X4 $1, Z0, Y1")
		g.p("VMAXPS Y0, Y1, Y0")
	}
	g.p("VEXTRACTF128 $1, Y0, X1")
	g.p("VMAXPS X0, X1, X0")
	g.p("VPERMILPS $0x4E, X0, X1")
	g.p("VMAXPS X0, X1, X0")
	g.p("VPERMILPS $0xB1, X0, X1")
	g.p("VMAXPS X0, X1, X0")
	g.p("VZEROUPPER")
	g.p("MOVSS X0, ret+16(FP)")
	g.p("RET")
}
