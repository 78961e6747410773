package main

import "fmt"

// mlaMaxM is the most queries a prefill MLA micro-kernel holds in
// registers: 6 queries × 4 vectors of accumulators (24 of the 32 ZMM
// registers), the rest for the shared operand and temporaries.
const mlaMaxM = 6

// genMLAChunk emits the micro-kernels of batched-query (prefill) absorbed
// MLA, one per query count m = 1..mlaMaxM. Both share each cache row they
// load among m queries of one head, which decode's kernels (8 heads of one
// query) cannot do across queries.
func genMLAChunk(g *gen) {
	for i := 0; i < 16; i++ { // element 0 of each 128-bit lane, then zeros
		v := 0
		if i < 4 {
			v = 4 * i
		}
		g.raw(fmt.Sprintf("DATA mlalane0<>+%d(SB)/4, $%d\n", 4*i, v))
	}
	g.raw("GLOBL mlalane0<>(SB), RODATA|NOPTR, $64\n")
	for m := 1; m <= mlaMaxM; m++ {
		genMLAScore(g, m)
	}
	for m := 1; m <= mlaMaxM; m++ {
		genMLAPV(g, m)
	}
}

// rowAddr addresses row i of a set of rows stride bytes apart: rows 0-3
// from base, 4-5 from base4 = base + 4*stride; stride in s1, 3*stride in
// s3.
func rowAddr(i, off int, base, base4, s1, s3 string) string {
	b := base
	if i >= 4 {
		b = base4
	}
	idx := []string{"", "(" + s1 + "*1)", "(" + s1 + "*2)", "(" + s3 + "*1)"}[i%4]
	return fmt.Sprintf("%d(%s)%s", off, b, idx)
}

// genMLAScore emits
//
//	func mlaScore<m>AVX512(s *float32, sstride uintptr, ql *float32, qlstride uintptr, qp *float32, qpstride uintptr, rows **float32, groups int, r int, p int, scale float32)
//
// For each group g < groups of four cache rows rows[4g..4g+3] and each
// query i < m: s[i][4g+j] = scale * (ql[i]·row[:r] + qp[i]·row[r:r+p])
// for j < 4, rows of s, ql and qp sstride, qlstride and qpstride bytes
// apart. r is a positive multiple of 16, p a multiple of 16 (0: no rope
// part). Each row chunk loaded serves m queries and each query chunk four
// rows: 4+m loads per 4m FMAs. The 4m sums are reduced without horizontal
// adds (lane shuffles, all EVEX-encodable for Z16-Z31).
func genMLAScore(g *gen, m int) {
	g.text(fmt.Sprintf("mlaScore%dAVX512", m), 84)
	g.p("MOVQ rows+48(FP), AX")
	g.p("MOVQ s+0(FP), DX")
	g.p("MOVQ groups+56(FP), R14")
	g.p("VBROADCASTSS scale+80(FP), Z31")
	g.p("VMOVUPS mlalane0<>+0(SB), Z30")
	g.label("group")
	g.p("MOVQ 0(AX), R8")
	g.p("MOVQ 8(AX), R11")
	g.p("MOVQ 16(AX), R12")
	g.p("MOVQ 24(AX), R13")
	for i := 0; i < 4*m; i++ {
		g.p("VXORPS Z%d, Z%d, Z%d", i, i, i)
	}
	g.p("XORQ BX, BX")
	loop := func(name string) {
		g.p("LEAQ (R9)(R9*2), R10")
		g.p("LEAQ (SI)(R9*4), DI")
		g.label(name)
		for j, r := range []string{"R8", "R11", "R12", "R13"} {
			g.p("VMOVUPS (%s)(BX*1), Z%d", r, 24+j)
		}
		for i := 0; i < m; i++ {
			q := 28 + i%2
			g.p("VMOVUPS %s, Z%d", rowAddr(i, 0, "SI", "DI", "R9", "R10"), q)
			for j := 0; j < 4; j++ {
				g.p("VFMADD231PS Z%d, Z%d, Z%d", 24+j, q, 4*i+j)
			}
		}
		g.p("ADDQ $64, BX")
		g.p("ADDQ $64, SI")
		g.p("ADDQ $64, DI")
		g.p("SUBQ $16, CX")
		g.p("JNZ " + name)
	}
	g.p("MOVQ ql+16(FP), SI")
	g.p("MOVQ qlstride+24(FP), R9")
	g.p("MOVQ r+64(FP), CX")
	loop("lat")
	g.p("MOVQ p+72(FP), CX")
	g.p("TESTQ CX, CX")
	g.p("JZ reduce")
	g.p("MOVQ qp+32(FP), SI")
	g.p("MOVQ qpstride+40(FP), R9")
	loop("pe")
	g.label("reduce")
	g.p("MOVQ sstride+8(FP), R9")
	g.p("LEAQ (R9)(R9*2), R10")
	g.p("LEAQ (DX)(R9*4), DI")
	for i := 0; i < m; i++ {
		a, b, c, d := 4*i, 4*i+1, 4*i+2, 4*i+3
		// [a.lo256+a.hi256 | b.lo256+b.hi256], the same for c and d.
		g.p("VSHUFF64X2 $0x44, Z%d, Z%d, Z24", b, a)
		g.p("VSHUFF64X2 $0xEE, Z%d, Z%d, Z25", b, a)
		g.p("VADDPS Z25, Z24, Z24")
		g.p("VSHUFF64X2 $0x44, Z%d, Z%d, Z26", d, c)
		g.p("VSHUFF64X2 $0xEE, Z%d, Z%d, Z27", d, c)
		g.p("VADDPS Z27, Z26, Z26")
		// One 128-bit lane per row: [a | b | c | d].
		g.p("VSHUFF32X4 $0x88, Z26, Z24, Z25")
		g.p("VSHUFF32X4 $0xDD, Z26, Z24, Z27")
		g.p("VADDPS Z27, Z25, Z25")
		// Each lane's four floats to its sum, then the lanes' first
		// elements into one XMM.
		g.p("VPERMILPS $0x4E, Z25, Z26")
		g.p("VADDPS Z26, Z25, Z25")
		g.p("VPERMILPS $0xB1, Z25, Z26")
		g.p("VADDPS Z26, Z25, Z25")
		g.p("VPERMPS Z25, Z30, Z25")
		g.p("VMULPS X31, X25, X25")
		g.p("VMOVUPS X25, %s", rowAddr(i, 0, "DX", "DI", "R9", "R10"))
	}
	g.p("ADDQ $32, AX")
	g.p("ADDQ $16, DX")
	g.p("DECQ R14")
	g.p("JNZ group")
	g.p("VZEROUPPER")
	g.p("RET")
}

// genMLAPV emits
//
//	func mlaPV<m>AVX512(out *float32, ostride uintptr, s *float32, sstride uintptr, rows **float32, nt int, r int)
//
// out[i][c] += sum_{t<nt} s[i][t] * rows[t][c] for i < m, c < r: out rows
// ostride bytes apart, s rows sstride bytes apart; r a positive multiple
// of 64, nt > 0. For each 64-column chunk the m×4 output vectors stay in
// registers while the tokens stream by: per token 4 row loads and m
// broadcasts for 4m FMAs.
func genMLAPV(g *gen, m int) {
	g.text(fmt.Sprintf("mlaPV%dAVX512", m), 56)
	g.p("MOVQ out+0(FP), SI")
	g.p("MOVQ ostride+8(FP), R9")
	g.p("LEAQ (R9)(R9*2), R10")
	g.p("LEAQ (SI)(R9*4), DI")
	g.p("MOVQ sstride+24(FP), R11")
	g.p("LEAQ (R11)(R11*2), R12")
	g.p("MOVQ r+48(FP), DX")
	g.p("XORQ BX, BX") // byte offset of the column chunk
	g.label("chunk")
	for i := 0; i < m; i++ {
		for j := 0; j < 4; j++ {
			g.p("VMOVUPS %s, Z%d", rowAddr(i, 64*j, "SI", "DI", "R9", "R10"), 4*i+j)
		}
	}
	g.p("MOVQ s+16(FP), AX")
	g.p("LEAQ (AX)(R11*4), R13")
	g.p("MOVQ rows+32(FP), R8")
	g.p("MOVQ nt+40(FP), CX")
	g.label("token")
	g.p("MOVQ (R8), R14")
	for j := 0; j < 4; j++ {
		g.p("VMOVUPS %d(R14)(BX*1), Z%d", 64*j, 24+j)
	}
	// The next chunk's lines of this row: at long contexts the rows come
	// from L3, and each chunk pass would otherwise wait on them.
	for j := 4; j < 8; j++ {
		g.p("PREFETCHT0 %d(R14)(BX*1)", 64*j)
	}
	for i := 0; i < m; i++ {
		b := 28 + i%2
		g.p("VBROADCASTSS %s, Z%d", rowAddr(i, 0, "AX", "R13", "R11", "R12"), b)
		for j := 0; j < 4; j++ {
			g.p("VFMADD231PS Z%d, Z%d, Z%d", 24+j, b, 4*i+j)
		}
	}
	g.p("ADDQ $8, R8")
	g.p("ADDQ $4, AX")
	g.p("ADDQ $4, R13")
	g.p("DECQ CX")
	g.p("JNZ token")
	for i := 0; i < m; i++ {
		for j := 0; j < 4; j++ {
			g.p("VMOVUPS Z%d, %s", 4*i+j, rowAddr(i, 64*j, "SI", "DI", "R9", "R10"))
		}
	}
	g.p("ADDQ $256, SI")
	g.p("ADDQ $256, DI")
	g.p("ADDQ $256, BX")
	g.p("SUBQ $64, DX")
	g.p("JNZ chunk")
	g.p("VZEROUPPER")
	g.p("RET")
}
