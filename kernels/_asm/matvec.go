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

// rowAddr addresses row j of a 4-row group: base AX, stride BX, 3*stride DX.
func rowAddr(j, off int) string {
	switch j {
	case 0:
		return fmt.Sprintf("%d(AX)", off)
	case 1:
		return fmt.Sprintf("%d(AX)(BX*1)", off)
	case 2:
		return fmt.Sprintf("%d(AX)(BX*2)", off)
	}
	return fmt.Sprintf("%d(AX)(DX*1)", off)
}

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

// reduceStore sums each of acc[0..rows) horizontally and stores the rows
// consecutive float32 results at (DI). Clobbers register 10.
func reduceStore(g *gen, s isa, rows int) {
	for j := 0; j < rows; j++ {
		if s.r == "Z" {
			g.p("VEXTRACTF64X4 $1, Z%d, Y10", j)
			g.p("VADDPS Y10, Y%d, Y%d", j, j)
		}
		g.p("VEXTRACTF128 $1, Y%d, X10", j)
		g.p("VADDPS X10, X%d, X%d", j, j)
	}
	if rows == 4 {
		g.p("VHADDPS X1, X0, X0")
		g.p("VHADDPS X3, X2, X2")
		g.p("VHADDPS X2, X0, X0")
		g.p("VMOVUPS X0, (DI)")
	} else {
		g.p("VHADDPS X0, X0, X0")
		g.p("VHADDPS X0, X0, X0")
		g.p("VMOVSS X0, (DI)")
	}
	g.p("VZEROUPPER")
	g.p("RET")
}

func zero(g *gen, s isa, regs ...int) {
	for _, r := range regs {
		g.p("VXORPS %s, %s, %s", s.v(r), s.v(r), s.v(r))
	}
}

// mvPrefetch is how far ahead (bytes) rows are prefetched; 0 disables.
const mvPrefetch = 0

// genMV: y[0..rows) = W[rows][n] · x[n] for n a multiple of s.lanes.
// func mv<DT>x<rows><ISA>(y *float32, w *byte, stride uintptr, x *float32, n int)
func genMV(g *gen, s isa, dt dtype, rows int) {
	name := fmt.Sprintf("mv%sx%d%s", dt.name, rows, s.name)
	g.text(name, 40)
	g.p("MOVQ y+0(FP), DI")
	g.p("MOVQ w+8(FP), AX")
	g.p("MOVQ stride+16(FP), BX")
	g.p("LEAQ (BX)(BX*2), DX")
	g.p("MOVQ x+24(FP), SI")
	g.p("MOVQ n+32(FP), CX")
	if dt == dtF8 {
		g.p("MOVL $0xBFFFBFFF, R8")
		g.p("MOVD R8, X15")
		g.p("VPBROADCASTD X15, %s", s.half(15))
	}
	const U = 2
	var accs []int
	for i := 0; i < rows*U; i++ {
		accs = append(accs, i)
	}
	zero(g, s, accs...)
	step := U * s.lanes
	body := func(u int) {
		for uu := 0; uu < u; uu++ {
			xr := 8 + uu
			g.p("VMOVUPS %d(SI), %s", 4*s.lanes*uu, s.v(xr))
		}
		for j := 0; j < rows; j++ {
			if mvPrefetch > 0 && u == U {
				g.p("PREFETCHT0 %s", rowAddr(j, mvPrefetch))
			}
			for uu := 0; uu < u; uu++ {
				acc := j*U + uu
				addr := rowAddr(j, dt.bytes*s.lanes*uu)
				if dt == dtF32 {
					g.p("VFMADD231PS %s, %s, %s", addr, s.v(8+uu), s.v(acc))
					continue
				}
				t := 10 + (j*U+uu)%4
				widen(g, s, dt, addr, t)
				g.p("VFMADD231PS %s, %s, %s", s.v(8+uu), s.v(t), s.v(acc))
			}
		}
	}
	g.p("CMPQ CX, $%d", step)
	g.p("JL tail")
	g.label("loop")
	body(U)
	g.p("ADDQ $%d, AX", dt.bytes*step)
	g.p("ADDQ $%d, SI", 4*step)
	g.p("SUBQ $%d, CX", step)
	g.p("CMPQ CX, $%d", step)
	g.p("JGE loop")
	g.label("tail")
	g.p("TESTQ CX, CX")
	g.p("JZ done")
	body(1)
	g.p("ADDQ $%d, AX", dt.bytes*s.lanes)
	g.p("ADDQ $%d, SI", 4*s.lanes)
	g.p("SUBQ $%d, CX", s.lanes)
	g.p("JMP tail")
	g.label("done")
	for j := 0; j < rows; j++ {
		g.p("VADDPS %s, %s, %s", s.v(j*U+1), s.v(j*U), s.v(j))
	}
	reduceStore(g, s, rows)
}

// genMVQ8: like genMV for Q8_0, one 32-value block per iteration, scaled
// once per block: acc += scale * sum(q*x).
// func mvQ8x<rows><ISA>(y *float32, w *byte, stride uintptr, x *float32, n int, s *float32, sstride uintptr)
func genMVQ8(g *gen, s isa, rows int) {
	name := fmt.Sprintf("mvQ8x%d%s", rows, s.name)
	g.text(name, 56)
	g.p("MOVQ y+0(FP), DI")
	g.p("MOVQ w+8(FP), AX")
	g.p("MOVQ stride+16(FP), BX")
	g.p("LEAQ (BX)(BX*2), DX")
	g.p("MOVQ x+24(FP), SI")
	g.p("MOVQ n+32(FP), CX")
	g.p("MOVQ s+40(FP), R8")
	g.p("MOVQ sstride+48(FP), R9")
	g.p("LEAQ (R9)(R9*2), R10")
	sub := 32 / s.lanes
	var accs []int
	for j := 0; j < rows; j++ {
		accs = append(accs, j)
	}
	zero(g, s, accs...)
	sAddr := func(j int) string {
		return []string{"(R8)", "(R8)(R9*1)", "(R8)(R9*2)", "(R8)(R10*1)"}[j]
	}
	g.label("loop")
	for k := 0; k < sub; k++ {
		g.p("VMOVUPS %d(SI), %s", 4*s.lanes*k, s.v(4+k))
	}
	for j := 0; j < rows; j++ {
		t, q := 12+j%2, 10+j%2
		for k := 0; k < sub; k++ {
			widen(g, s, dtQ8, rowAddr(j, s.lanes*k), q)
			if k == 0 {
				g.p("VMULPS %s, %s, %s", s.v(4+k), s.v(q), s.v(t))
			} else {
				g.p("VFMADD231PS %s, %s, %s", s.v(4+k), s.v(q), s.v(t))
			}
		}
		if s.r == "Z" {
			g.p("VFMADD231PS.BCST %s, %s, %s", sAddr(j), s.v(t), s.v(j))
		} else {
			g.p("VBROADCASTSS %s, Y14", sAddr(j))
			g.p("VFMADD231PS Y14, %s, %s", s.v(t), s.v(j))
		}
	}
	g.p("ADDQ $32, AX")
	g.p("ADDQ $128, SI")
	g.p("ADDQ $4, R8")
	g.p("SUBQ $32, CX")
	g.p("JNZ loop")
	reduceStore(g, s, rows)
}

func genMatVec(g *gen) {
	for _, s := range []isa{avx512, avx2} {
		for _, dt := range []dtype{dtF32, dtBF16, dtF16, dtF8} {
			genMV(g, s, dt, 4)
			genMV(g, s, dt, 1)
		}
		genMVQ8(g, s, 4)
		genMVQ8(g, s, 1)
	}
}
