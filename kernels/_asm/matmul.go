package main

import "fmt"

// Matrix-matrix micro-kernels in the broadcast (outer-product) form: W
// rows are packed k-major ([k][NR] floats, or [k/2][NR] bf16 pairs), so
// each step loads NR weights into vector registers and multiplies them by
// one broadcast x value per x row. Results land in y rows directly, with no
// horizontal reductions. K is not blocked: a packed tile of 32 rows x 2048
// is 256 KiB and stays in L2 while every x row streams past it.
//
// func mm<kind>x<mr><ISA>(x *T, xstride uintptr, p *T, k int, y *float32, ystride uintptr)
// x rows are xstride bytes apart, y rows ystride bytes apart; k counts
// steps (columns, or column pairs for DP).

// x16Addr addresses x row i (0..7) at byte offset off, AVX-512 layout:
// rows 0-3 from SI, 4-7 from DI, with R9 = stride and R10 = 3*stride.
func x16Addr(i, off int) (string, mem) {
	base := "SI"
	if i >= 4 {
		base = "DI"
	}
	idx := []string{"", "R9", "R9", "R10"}[i%4]
	sc := []int{0, 1, 2, 1}[i%4]
	s := fmt.Sprintf("%d(%s)", off, base)
	if idx != "" {
		s += fmt.Sprintf("(%s*%d)", idx, sc)
	}
	return s, mem{base: base, index: idx, scale: sc, disp: off}
}

func y16Addr(i, off int) string {
	base := "DX"
	if i >= 4 {
		base = "R13"
	}
	idx := []string{"", "R11", "R11", "R12"}[i%4]
	sc := []int{0, 1, 2, 1}[i%4]
	s := fmt.Sprintf("%d(%s)", off, base)
	if idx != "" {
		s += fmt.Sprintf("(%s*%d)", idx, sc)
	}
	return s
}

// genMM512 emits the AVX-512 kernel for mr x rows by 32 W rows; dp selects
// VDPBF16PS on bf16 pairs instead of VFMADD231PS on float32.
func genMM512(g *gen, mr int, dp bool) {
	kind := "F32"
	if dp {
		kind = "DP"
	}
	g.text(fmt.Sprintf("mm%sx%dAVX512", kind, mr), 48)
	g.p("MOVQ x+0(FP), SI")
	g.p("MOVQ xstride+8(FP), R9")
	g.p("LEAQ (R9)(R9*2), R10")
	g.p("LEAQ (SI)(R9*4), DI")
	g.p("MOVQ p+16(FP), BX")
	g.p("MOVQ k+24(FP), CX")
	g.p("MOVQ y+32(FP), DX")
	g.p("MOVQ ystride+40(FP), R11")
	g.p("LEAQ (R11)(R11*2), R12")
	g.p("LEAQ (DX)(R11*4), R13")
	for i := 0; i < 2*mr; i++ {
		g.p("VXORPS Z%d, Z%d, Z%d", i, i, i)
	}
	step := func(u int) {
		w0, w1 := 28+2*u, 29+2*u
		for i := 0; i < mr; i++ {
			s, m := x16Addr(i, 4*u)
			if dp {
				g.raw("\t" + vdpbf16psBcst(2*i, w0, m) + "\n")
				g.raw("\t" + vdpbf16psBcst(2*i+1, w1, m) + "\n")
			} else {
				g.p("VFMADD231PS.BCST %s, Z%d, Z%d", s, w0, 2*i)
				g.p("VFMADD231PS.BCST %s, Z%d, Z%d", s, w1, 2*i+1)
			}
		}
	}
	g.label("loop")
	g.p("CMPQ CX, $2")
	g.p("JL tail")
	g.p("VMOVUPS (BX), Z28")
	g.p("VMOVUPS 64(BX), Z29")
	g.p("VMOVUPS 128(BX), Z30")
	g.p("VMOVUPS 192(BX), Z31")
	step(0)
	step(1)
	g.p("ADDQ $8, SI")
	g.p("ADDQ $8, DI")
	g.p("ADDQ $256, BX")
	g.p("SUBQ $2, CX")
	g.p("JMP loop")
	g.label("tail")
	g.p("TESTQ CX, CX")
	g.p("JZ store")
	g.p("VMOVUPS (BX), Z28")
	g.p("VMOVUPS 64(BX), Z29")
	step(0)
	g.label("store")
	for i := 0; i < mr; i++ {
		g.p("VMOVUPS Z%d, %s", 2*i, y16Addr(i, 0))
		g.p("VMOVUPS Z%d, %s", 2*i+1, y16Addr(i, 64))
	}
	g.p("VZEROUPPER")
	g.p("RET")
}

// genMMAVX2 emits the AVX2 kernel for mr (<= 6) x rows by 16 W rows.
// x rows: SI + i*R9 (R10 = 3*, R11 = 5*); y rows: DX + i*R12 (R13 = 3*, AX = 5*).
func genMMAVX2(g *gen, mr int) {
	g.text(fmt.Sprintf("mmF32x%dAVX2", mr), 48)
	g.p("MOVQ x+0(FP), SI")
	g.p("MOVQ xstride+8(FP), R9")
	g.p("LEAQ (R9)(R9*2), R10")
	g.p("LEAQ (R9)(R9*4), R11")
	g.p("MOVQ p+16(FP), BX")
	g.p("MOVQ k+24(FP), CX")
	g.p("MOVQ y+32(FP), DX")
	g.p("MOVQ ystride+40(FP), R12")
	g.p("LEAQ (R12)(R12*2), R13")
	g.p("LEAQ (R12)(R12*4), AX")
	addr := func(base, s1, s3, s5 string, i, off int) string {
		a := fmt.Sprintf("%d(%s)", off, base)
		switch i {
		case 1:
			a += "(" + s1 + "*1)"
		case 2:
			a += "(" + s1 + "*2)"
		case 3:
			a += "(" + s3 + "*1)"
		case 4:
			a += "(" + s1 + "*4)"
		case 5:
			a += "(" + s5 + "*1)"
		}
		return a
	}
	for i := 0; i < 2*mr; i++ {
		g.p("VXORPS Y%d, Y%d, Y%d", i, i, i)
	}
	g.label("loop")
	g.p("VMOVUPS (BX), Y12")
	g.p("VMOVUPS 32(BX), Y13")
	for i := 0; i < mr; i++ {
		g.p("VBROADCASTSS %s, Y14", addr("SI", "R9", "R10", "R11", i, 0))
		g.p("VFMADD231PS Y12, Y14, Y%d", 2*i)
		g.p("VFMADD231PS Y13, Y14, Y%d", 2*i+1)
	}
	g.p("ADDQ $4, SI")
	g.p("ADDQ $64, BX")
	g.p("DECQ CX")
	g.p("JNZ loop")
	for i := 0; i < mr; i++ {
		g.p("VMOVUPS Y%d, %s", 2*i, addr("DX", "R12", "R13", "AX", i, 0))
		g.p("VMOVUPS Y%d, %s", 2*i+1, addr("DX", "R12", "R13", "AX", i, 32))
	}
	g.p("VZEROUPPER")
	g.p("RET")
}

// genCvtBF16 emits func cvtBF16AVX512(dst *uint16, src *float32, n int),
// n a multiple of 32: round to nearest even with VCVTNE2PS2BF16.
func genCvtBF16(g *gen) {
	g.text("cvtBF16AVX512", 24)
	g.p("MOVQ dst+0(FP), DI")
	g.p("MOVQ src+8(FP), SI")
	g.p("MOVQ n+16(FP), CX")
	g.label("loop")
	g.p("VMOVUPS (SI), Z0")
	g.p("VMOVUPS 64(SI), Z1")
	g.raw("\t" + vcvtne2ps2bf16(2, 1, 0) + "\n")
	g.p("VMOVDQU32 Z2, (DI)")
	g.p("ADDQ $128, SI")
	g.p("ADDQ $64, DI")
	g.p("SUBQ $32, CX")
	g.p("JNZ loop")
	g.p("VZEROUPPER")
	g.p("RET")
}

func genMatMul(g *gen) {
	for _, mr := range []int{8, 1} {
		genMM512(g, mr, false)
		genMM512(g, mr, true)
	}
	genMMAVX2(g, 6)
	genMMAVX2(g, 1)
	genCvtBF16(g)
	for _, nx := range []int{4, 1} {
		genMMDot(g, nx, false)
		genMMDot(g, nx, true)
	}
	// A 4x6 bf16 variant (24 accumulators, W loaded per 6 x rows) measured
	// 1-3% slower than 4x4 at n=16..96; not generated.
	genPack(g, "packBF16", true)
	genPack(g, "packPairs", false)
	genPackQ8(g)
	genPackF8(g)
	for _, k := range []string{"Q8", "F8", "BF16", "Pairs", "T32"} {
		genPackT(g, k)
	}
}

// genPack emits the k-major packing loops (scalar: a register transpose
// costs more code than it saves at these sizes). Columns go in blocks of
// 64 so the 64 destination lines being written stay in L1.
//
// func packBF16(dst *float32, src *byte, srcStride uintptr, rows, cols, nr int):
// dst[c*nr+j] = float32 of bf16 src[j][c] for j < rows, c < cols (cols % 64 == 0).
// func packPairs(dst *uint32, src *byte, srcStride uintptr, rows, pairs, nr int):
// dst[p*nr+j] = uint32 src[j][p] (pairs % 64 == 0).
func genPack(g *gen, name string, bf16 bool) {
	g.text(name, 48)
	g.p("MOVQ dst+0(FP), DI")
	g.p("MOVQ src+8(FP), SI")
	g.p("MOVQ srcStride+16(FP), R8")
	g.p("MOVQ rows+24(FP), R9")
	if bf16 {
		g.p("MOVQ cols+32(FP), R10")
	} else {
		g.p("MOVQ pairs+32(FP), R10")
	}
	g.p("MOVQ nr+40(FP), R11")
	g.p("SHLQ $2, R11") // nr in bytes
	esz := 4
	if bf16 {
		esz = 2
	}
	// R12 = column block start (elements); per block: for j < rows: copy 64.
	g.p("XORQ R12, R12")
	g.label("block")
	g.p("XORQ R13, R13") // j
	g.label("row")
	// src pointer: SI + j*srcStride + c0*esz
	g.p("MOVQ R13, AX")
	g.p("IMULQ R8, AX")
	g.p("ADDQ SI, AX")
	g.p("LEAQ (AX)(R12*%d), AX", esz)
	// dst pointer: DI + (c0*nr + j)*4
	g.p("MOVQ R12, BX")
	g.p("IMULQ R11, BX")
	g.p("ADDQ DI, BX")
	g.p("LEAQ (BX)(R13*4), BX")
	g.p("MOVQ $8, CX")
	g.label("inner")
	for u := 0; u < 8; u++ {
		if bf16 {
			g.p("MOVWLZX %d(AX), DX", 2*u)
			g.p("SHLL $16, DX")
		} else {
			g.p("MOVL %d(AX), DX", 4*u)
		}
		g.p("MOVL DX, (BX)")
		g.p("ADDQ R11, BX")
	}
	g.p("ADDQ $%d, AX", 8*esz)
	g.p("DECQ CX")
	g.p("JNZ inner")
	g.p("INCQ R13")
	g.p("CMPQ R13, R9")
	g.p("JL row")
	g.p("ADDQ $64, R12")
	g.p("CMPQ R12, R10")
	g.p("JL block")
	g.p("RET")
}

// genMMDot emits the dot-form BF16 micro-kernel: 4 W rows by nx x rows,
// each output a full-length dot product (reduced horizontally once at the
// end), reading W in its stored layout, so nothing is packed.
//
// f32 activations (dp false): W lines are split into even/odd float32 by
// VPSLLD/VPANDD and x rows are pre-permuted by permuteEO.
// bf16 activations (dp true): VDPBF16PS takes a W line and an x line of bf16
// pairs directly.
//
// func mmDot<F32|DP>4x<nx>AVX512(y *float32, ystride uintptr, w *byte, wstride uintptr, x *float32, xstride uintptr, n int)
// y[i*ystride/4 + j] = W[j]·x_i for j < 4, i < nx; n (columns) a positive
// multiple of 32.
func genMMDot(g *gen, nx int, dp bool) {
	kind := "F32"
	if dp {
		kind = "DP"
	}
	g.text(fmt.Sprintf("mmDot%s4x%dAVX512", kind, nx), 56)
	g.p("MOVQ y+0(FP), DI")
	g.p("MOVQ ystride+8(FP), R12")
	g.p("LEAQ (R12)(R12*2), R13")
	g.p("LEAQ (DI)(R12*4), R11") // y row 4
	g.p("MOVQ w+16(FP), AX")
	g.p("MOVQ wstride+24(FP), BX")
	g.p("LEAQ (BX)(BX*2), DX")
	g.p("MOVQ x+32(FP), SI")
	g.p("MOVQ xstride+40(FP), R9")
	g.p("LEAQ (R9)(R9*2), R10")
	g.p("LEAQ (SI)(R9*4), R8") // x row 4
	g.p("MOVQ n+48(FP), CX")
	if !dp {
		g.p("MOVL $0xFFFF0000, R14")
		g.p("VPBROADCASTD R14, Z31")
	}
	acc := func(i, j int) int { return i*4 + j }
	for i := 0; i < nx; i++ {
		for j := 0; j < 4; j++ {
			g.p("VXORPS Z%d, Z%d, Z%d", acc(i, j), acc(i, j), acc(i, j))
		}
	}
	wa := func(j int) string {
		return "(AX)" + []string{"", "(BX*1)", "(BX*2)", "(DX*1)"}[j]
	}
	rowAddr := func(base4, base, s1, s3 string, i, off int) string {
		if i >= 4 {
			return fmt.Sprintf("%d(%s)%s", off, base4, []string{"", "(" + s1 + "*1)"}[i-4])
		}
		return fmt.Sprintf("%d(%s)%s", off, base, []string{"", "(" + s1 + "*1)", "(" + s1 + "*2)", "(" + s3 + "*1)"}[i])
	}
	xa := func(i, off int) string { return rowAddr("R8", "SI", "R9", "R10", i, off) }
	ya := func(i int) string { return rowAddr("R11", "DI", "R12", "R13", i, 0) }
	g.label("loop")
	if dp {
		// x lines in Z24.. (one per x row); W line in Z31.
		for i := 0; i < nx; i++ {
			g.p("VMOVDQU32 %s, Z%d", xa(i, 0), 24+i)
		}
		for j := 0; j < 4; j++ {
			g.p("VMOVDQU32 %s, Z31", wa(j))
			for i := 0; i < nx; i++ {
				g.raw("\t" + evexOp(2, 0x52, acc(i, j), 31, nil, 24+i, false) + fmt.Sprintf(" // VDPBF16PS Z%d, Z31, Z%d\n", 24+i, acc(i, j)))
			}
		}
		g.p("ADDQ $64, SI")
		g.p("ADDQ $64, R8")
	} else {
		// xe/xo for each x row: Z16+2i, Z17+2i; W halves in Z24, Z25.
		for i := 0; i < nx; i++ {
			g.p("VMOVUPS %s, Z%d", xa(i, 0), 16+2*i)
			g.p("VMOVUPS %s, Z%d", xa(i, 64), 17+2*i)
		}
		for j := 0; j < 4; j++ {
			g.p("VPSLLD $16, %s, Z24", wa(j))
			for i := 0; i < nx; i++ {
				g.p("VFMADD231PS Z%d, Z24, Z%d", 16+2*i, acc(i, j))
			}
			g.p("VPANDD %s, Z31, Z25", wa(j))
			for i := 0; i < nx; i++ {
				g.p("VFMADD231PS Z%d, Z25, Z%d", 17+2*i, acc(i, j))
			}
		}
		g.p("ADDQ $128, SI")
		g.p("ADDQ $128, R8")
	}
	g.p("ADDQ $64, AX")
	g.p("SUBQ $32, CX")
	g.p("JNZ loop")
	// Reduce: for x row i, four accumulators b..b+3 -> [y_i0..y_i3] with
	// 256-bit VHADDPS, which is VEX-only (registers 0-15): rows 4 and 5
	// are moved down once rows 0-3 are stored. Z30 is free scratch.
	reduceRow := func(b int, dst string) {
		for j := 0; j < 4; j++ {
			g.p("VEXTRACTF64X4 $1, Z%d, Y30", b+j)
			g.p("VADDPS Y30, Y%d, Y%d", b+j, b+j)
		}
		g.p("VHADDPS Y%d, Y%d, Y%d", b+1, b, b)
		g.p("VHADDPS Y%d, Y%d, Y%d", b+3, b+2, b+2)
		g.p("VHADDPS Y%d, Y%d, Y%d", b+2, b, b)
		g.p("VEXTRACTF128 $1, Y%d, X%d", b, b+1)
		g.p("VADDPS X%d, X%d, X%d", b+1, b, b)
		g.p("VMOVUPS X%d, %s", b, dst)
	}
	for i := 0; i < nx && i < 4; i++ {
		reduceRow(4*i, ya(i))
	}
	for i := 4; i < nx; i++ {
		for j := 0; j < 4; j++ {
			g.p("VMOVAPS Z%d, Z%d", acc(i, j), j)
		}
		reduceRow(0, ya(i))
	}
	g.p("VZEROUPPER")
	g.p("RET")
}

// genPackQ8 emits func packQ8(dst *float32, src *byte, srcStride uintptr, rows, cols, nr int, s *float32, sstride uintptr):
// dst[c*nr+j] = float32(int8 src[j][c]) * s[j][c/32] (s rows sstride bytes
// apart), cols % 64 == 0; blocked like genPack.
func genPackQ8(g *gen) {
	g.text("packQ8", 64)
	g.p("MOVQ dst+0(FP), DI")
	g.p("MOVQ src+8(FP), SI")
	g.p("MOVQ srcStride+16(FP), R8")
	g.p("MOVQ rows+24(FP), R9")
	g.p("MOVQ cols+32(FP), R10")
	g.p("MOVQ nr+40(FP), R11")
	g.p("SHLQ $2, R11")
	g.p("VXORPS X2, X2, X2")
	g.p("XORQ R12, R12") // column block start
	g.label("block")
	g.p("XORQ R13, R13") // j
	g.label("row")
	g.p("MOVQ R13, AX")
	g.p("IMULQ R8, AX")
	g.p("ADDQ SI, AX")
	g.p("ADDQ R12, AX") // src + j*stride + c0
	g.p("MOVQ R12, BX")
	g.p("IMULQ R11, BX")
	g.p("ADDQ DI, BX")
	g.p("LEAQ (BX)(R13*4), BX") // dst + c0*nr*4 + j*4
	g.p("MOVQ sstride+56(FP), DX")
	g.p("IMULQ R13, DX")
	g.p("ADDQ s+48(FP), DX")
	g.p("MOVQ R12, CX")
	g.p("SHRQ $5, CX")
	g.p("LEAQ (DX)(CX*4), DX") // &s[j][c0/32]
	for half := 0; half < 2; half++ {
		g.p("MOVSS %d(DX), X1", 4*half)
		g.p("MOVQ $4, CX")
		g.label(fmt.Sprintf("inner%d", half))
		for u := 0; u < 8; u++ {
			// VEX 3-operand convert merges into zeroed X2, not into the
			// previous X0: no false dependency chain through the loop.
			x := u % 4
			g.p("MOVBLSX %d(AX), R14", u)
			g.p("VCVTSI2SSL R14, X2, X%d", 4+x)
			g.p("VMULSS X1, X%d, X%d", 4+x, 4+x)
			g.p("VMOVSS X%d, (BX)", 4+x)
			g.p("ADDQ R11, BX")
		}
		g.p("ADDQ $8, AX")
		g.p("DECQ CX")
		g.p(fmt.Sprintf("JNZ inner%d", half))
	}
	g.p("INCQ R13")
	g.p("CMPQ R13, R9")
	g.p("JL row")
	g.p("ADDQ $64, R12")
	g.p("CMPQ R12, R10")
	g.p("JL block")
	g.p("VZEROUPPER")
	g.p("RET")
}

// genPackF8 emits func packF8(dst *float32, src *byte, srcStride uintptr, rows, cols, nr int, table *float32, s *float32):
// dst[c*nr+j] = table[src[j][c]] * s[c/128], cols % 64 == 0. All rows of a
// tile share one 128-row scale block (tiles are 32 rows, 32-aligned), so s
// is that block's row of scales.
func genPackF8(g *gen) {
	g.text("packF8", 64)
	g.p("MOVQ dst+0(FP), DI")
	g.p("MOVQ src+8(FP), SI")
	g.p("MOVQ srcStride+16(FP), R8")
	g.p("MOVQ rows+24(FP), R9")
	g.p("MOVQ cols+32(FP), R10")
	g.p("MOVQ nr+40(FP), R11")
	g.p("SHLQ $2, R11")
	g.p("MOVQ table+48(FP), DX")
	g.p("XORQ R12, R12")
	g.label("block")
	g.p("MOVQ R12, CX")
	g.p("SHRQ $7, CX")
	g.p("MOVQ s+56(FP), AX")
	g.p("MOVSS (AX)(CX*4), X1")
	g.p("XORQ R13, R13")
	g.label("row")
	g.p("MOVQ R13, AX")
	g.p("IMULQ R8, AX")
	g.p("ADDQ SI, AX")
	g.p("ADDQ R12, AX")
	g.p("MOVQ R12, BX")
	g.p("IMULQ R11, BX")
	g.p("ADDQ DI, BX")
	g.p("LEAQ (BX)(R13*4), BX")
	g.p("MOVQ $8, CX")
	g.label("inner")
	for u := 0; u < 8; u++ {
		x := 4 + u%4
		g.p("MOVBLZX %d(AX), R14", u)
		g.p("VMULSS (DX)(R14*4), X1, X%d", x)
		g.p("VMOVSS X%d, (BX)", x)
		g.p("ADDQ R11, BX")
	}
	g.p("ADDQ $8, AX")
	g.p("DECQ CX")
	g.p("JNZ inner")
	g.p("INCQ R13")
	g.p("CMPQ R13, R9")
	g.p("JL row")
	g.p("ADDQ $64, R12")
	g.p("CMPQ R12, R10")
	g.p("JL block")
	g.p("VZEROUPPER")
	g.p("RET")
}

// transpose16 transposes Z[in..in+15] (row i in register in+i, 16 floats)
// into Z[in..in+15] (column c in register in+c), using Z[tmp..tmp+15] as
// scratch; in and tmp are 0 or 16. Unpacks of 32- and 64-bit elements
// build 4x4 blocks inside each 128-bit lane, two VSHUFF32X4 rounds move
// the lanes.
func transpose16(g *gen, in, tmp int) {
	r := func(i int) int { return in + i }
	a := func(i int) int { return tmp + i }
	for i := 0; i < 8; i++ {
		g.p("VUNPCKLPS Z%d, Z%d, Z%d", r(2*i+1), r(2*i), a(2*i))
		g.p("VUNPCKHPS Z%d, Z%d, Z%d", r(2*i+1), r(2*i), a(2*i+1))
	}
	// b[4i+k]: lane L holds column 4L+k of rows 4i..4i+3.
	for i := 0; i < 4; i++ {
		g.p("VUNPCKLPD Z%d, Z%d, Z%d", a(4*i+2), a(4*i), r(4*i+0))
		g.p("VUNPCKHPD Z%d, Z%d, Z%d", a(4*i+2), a(4*i), r(4*i+1))
		g.p("VUNPCKLPD Z%d, Z%d, Z%d", a(4*i+3), a(4*i+1), r(4*i+2))
		g.p("VUNPCKHPD Z%d, Z%d, Z%d", a(4*i+3), a(4*i+1), r(4*i+3))
	}
	// For each k, lanes of B0..B3 = b[k], b[4+k], b[8+k], b[12+k]:
	// c0 = B0.01 B1.01, c1 = B0.23 B1.23, c2 = B2.01 B3.01, c3 = B2.23 B3.23.
	for k := 0; k < 4; k++ {
		b0, b1, b2, b3 := r(k), r(4+k), r(8+k), r(12+k)
		g.p("VSHUFF32X4 $0x44, Z%d, Z%d, Z%d", b1, b0, a(4*k+0))
		g.p("VSHUFF32X4 $0xEE, Z%d, Z%d, Z%d", b1, b0, a(4*k+1))
		g.p("VSHUFF32X4 $0x44, Z%d, Z%d, Z%d", b3, b2, a(4*k+2))
		g.p("VSHUFF32X4 $0xEE, Z%d, Z%d, Z%d", b3, b2, a(4*k+3))
	}
	// Column 4L+k = [B0.L B1.L B2.L B3.L].
	for k := 0; k < 4; k++ {
		c0, c1, c2, c3 := a(4*k), a(4*k+1), a(4*k+2), a(4*k+3)
		g.p("VSHUFF32X4 $0x88, Z%d, Z%d, Z%d", c2, c0, r(0*4+k))
		g.p("VSHUFF32X4 $0xDD, Z%d, Z%d, Z%d", c2, c0, r(1*4+k))
		g.p("VSHUFF32X4 $0x88, Z%d, Z%d, Z%d", c3, c1, r(2*4+k))
		g.p("VSHUFF32X4 $0xDD, Z%d, Z%d, Z%d", c3, c1, r(3*4+k))
	}
}

// genPackT emits a 16x16-transposing tile packer:
// func pack<kind>T(dst *float32, src *byte, srcStride uintptr, rows, cols, nr int, s *float32, sstride uintptr)
// dst[c*nr+j] = widen(src row j, column c) for j < rows (a multiple of 16),
// c < cols (a multiple of 32 for Q8, 16 otherwise). Kinds:
//
//	Q8:    int8 times s[j*sstride/4 + c/32] (Q8_0 block scales)
//	F8:    E4M3 times s[c/128] (the tile's row of block scales; all rows of
//	       a 32-row tile share one 128-row block)
//	BF16:  bf16 widened
//	Pairs: the 32-bit word at column c (bf16 pairs, no conversion)
//	T32:   plain transpose of float32 (s unused)
func genPackT(g *gen, kind string) {
	g.text("pack"+kind+"T", 64)
	g.p("MOVQ dst+0(FP), DI")
	g.p("MOVQ src+8(FP), SI")
	g.p("MOVQ srcStride+16(FP), R8")
	g.p("MOVQ rows+24(FP), R9")
	g.p("MOVQ cols+32(FP), R10")
	g.p("MOVQ nr+40(FP), R11")
	g.p("SHLQ $2, R11") // nr in bytes
	g.p("MOVQ s+48(FP), R14")
	g.p("MOVQ sstride+56(FP), R15")
	esz := map[string]int{"Q8": 1, "F8": 1, "BF16": 2, "Pairs": 4, "T32": 4}[kind]
	g.p("XORQ R13, R13") // j0: first row of the 16
	g.label("rows")
	g.p("XORQ R12, R12") // c0
	g.label("cols")
	// AX = src + j0*stride + c0*esz; BX = 16*stride is not needed: rows by CX.
	g.p("MOVQ R13, AX")
	g.p("IMULQ R8, AX")
	g.p("ADDQ SI, AX")
	g.p("LEAQ (AX)(R12*%d), AX", esz)
	if kind == "Q8" {
		// DX = &s[j0][c0/32]
		g.p("MOVQ R13, DX")
		g.p("IMULQ R15, DX")
		g.p("ADDQ R14, DX")
		g.p("MOVQ R12, CX")
		g.p("SHRQ $5, CX")
		g.p("LEAQ (DX)(CX*4), DX")
	}
	if kind == "F8" {
		// Z16 = s[c0/128] * 2^8 (the half trick's factor), Y17 = 0xBFFF words.
		g.p("MOVQ R12, CX")
		g.p("SHRQ $7, CX")
		g.p("VBROADCASTSS (R14)(CX*4), Z16")
		g.p("MOVL $0x43800000, CX") // 256.0
		g.p("VPBROADCASTD CX, Z18")
		g.p("VMULPS Z18, Z16, Z16")
		g.p("MOVL $0xBFFFBFFF, CX")
		g.p("VPBROADCASTD CX, Z17")
	}
	for i := 0; i < 16; i++ {
		switch kind {
		case "BF16":
			g.p("VPMOVZXWD (AX), Z%d", i)
			g.p("VPSLLD $16, Z%d, Z%d", i, i)
		case "F8":
			g.p("VPMOVSXBW (AX), Y%d", i)
			g.p("VPSLLW $7, Y%d, Y%d", i, i)
			g.p("VPANDD Y17, Y%d, Y%d", i, i)
			g.p("VCVTPH2PS Y%d, Z%d", i, i)
			g.p("VMULPS Z16, Z%d, Z%d", i, i)
		case "Q8":
			g.p("VPMOVSXBD (AX), Z%d", i)
			g.p("VCVTDQ2PS Z%d, Z%d", i, i)
			g.p("VMULPS.BCST (DX), Z%d, Z%d", i, i)
			g.p("ADDQ R15, DX")
		default:
			g.p("VMOVUPS (AX), Z%d", i)
		}
		g.p("ADDQ R8, AX")
	}
	transpose16(g, 0, 16)
	// BX = dst + c0*nr*4 + j0*4; column c at BX + c*nr*4.
	g.p("MOVQ R12, BX")
	g.p("IMULQ R11, BX")
	g.p("ADDQ DI, BX")
	g.p("LEAQ (BX)(R13*4), BX")
	for c := 0; c < 16; c++ {
		g.p("VMOVUPS Z%d, (BX)", c)
		g.p("ADDQ R11, BX")
	}
	g.p("ADDQ $16, R12")
	g.p("CMPQ R12, R10")
	g.p("JL cols")
	g.p("ADDQ $16, R13")
	g.p("CMPQ R13, R9")
	g.p("JL rows")
	g.p("VZEROUPPER")
	g.p("RET")
}
