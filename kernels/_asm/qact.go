package main

import "fmt"

// Integer-activation kernels: weights in Q8_0 or Q4_0 blocks against x
// rounded to Q8_0 blocks (int8 values, one float32 scale per 32), as
// llama.cpp's Q8_0×Q8_0 and Q4_0×Q8_0 dot products. Integer products are
// exact; each block's int32 sum is scaled by the two block scales in
// float32.
//
// func qdot<name>(y *float32, w *byte, stride uintptr, xq *byte, xs *float32, xc *int32, nb int, rows int, s *float32, sstride uintptr)
//
// y[j] = Σ_b s[j][b]·xs[b]·(dot_b(w[j], xq) - xc[b]) for rows consecutive
// rows, each streamed start to end; nb blocks per row; w rows stride
// bytes apart, their scales sstride bytes apart. The caller lays x out
// for the kernel (see kernels/qact.go): xq padded with zeros to whole
// groups of blocks, xs and xc per group in the order the kernel's
// reduction produces block sums (perm below), zero past the last block.
// xc is bias·Σ q of the block: the kernels that feed the hardware an
// unsigned operand offset it (weights XOR 0x80 for Q8, the unsigned
// nibble for Q4) and subtract the offset's share here.
//
// A group is 16 blocks for zmm and 8 for ymm: the block sums of a group
// come out of the reduction together in one vector, which is scaled and
// accumulated with two instructions. The last, partial group loads its
// weights under a mask (or in halves), so no row is read past its end.

type qkind struct {
	name string
	zmm  bool
	q4   bool
	vnni bool
}

var qkinds = []qkind{
	{"Q8VNNI512", true, false, true},
	{"Q4VNNI512", true, true, true},
	{"Q8VNNIAVX2", false, false, true},
	{"Q4VNNIAVX2", false, true, true},
	{"Q8AVX2", false, false, false},
	{"Q4AVX2", false, true, false},
}

// groupBlocks is the blocks per group of a kind.
func (k qkind) groupBlocks() int {
	if k.zmm {
		return 16
	}
	return 8
}

// vecBytes is the width of one weight load.
func (k qkind) vecBytes() int {
	if k.zmm {
		return 64
	}
	return 32
}

// blockBytes is the weight bytes of one 32-value block.
func (k qkind) blockBytes() int {
	if k.q4 {
		return 16
	}
	return 32
}

// nvec is the weight loads (and int32 accumulators) per group.
func (k qkind) nvec() int { return k.groupBlocks() * k.blockBytes() / k.vecBytes() }

// perm is the block order of the reduced vector: position p holds the
// sum of block perm[p] of the group. Must match kernels/qact.go.
func (k qkind) perm() []int {
	G := k.groupBlocks()
	p := make([]int, G)
	switch {
	case k.zmm && !k.q4:
		// Accumulator i holds blocks 2i, 2i+1 (two 128-bit lanes each).
		copy(p, []int{0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15})
	case k.zmm && k.q4:
		// Accumulator i holds blocks 4i..4i+3, one per 128-bit lane;
		// lane j of the reduced vector holds block j of each.
		for q := range p {
			p[q] = 4*(q%4) + q/4
		}
	case !k.zmm && k.q4:
		for q := range p {
			p[q] = 2*(q%4) + q/4
		}
	default:
		for q := range p {
			p[q] = q
		}
	}
	return p
}

func (k qkind) v(i int) string {
	if k.zmm {
		return fmt.Sprintf("Z%d", i)
	}
	return fmt.Sprintf("Y%d", i)
}

func (k qkind) x(i int) string { return fmt.Sprintf("X%d", i) }

// Registers. zmm: accumulators 0-7, weights 8-15, reduction 16-23, dw 24,
// float accumulator 29, perm 30, byte constant 31. ymm: accumulators 0-7,
// temporaries 8-11, float accumulator 12, 13 spare, int16 ones 14, byte
// constant 15.
func (k qkind) regs() (fAcc, perm, konst, ones int) {
	if k.zmm {
		return 29, 30, 31, -1
	}
	return 12, -1, 15, 14
}

// vexDPBUSD: Y[dst] += Σ4 u8(Y[src1])·s8(Y[src2]) per dword: AVX-VNNI's
// VEX form (VEX.256.66.0F38.W0 50 /r), which the Go assembler does not
// know (its VPDPBUSD is the EVEX form, which needs AVX512_VNNI+VL).
func vexDPBUSD(dst, src1, src2 int) string {
	r := (^dst >> 3) & 1
	b := (^src2 >> 3) & 1
	b1 := r<<7 | 1<<6 | b<<5 | 0x02
	b2 := ((^src1)&0xf)<<3 | 1<<2 | 1
	modrm := 0xC0 | (dst&7)<<3 | src2&7
	return fmt.Sprintf("BYTE $0xc4; BYTE $0x%02x; BYTE $0x%02x; BYTE $0x50; BYTE $0x%02x // VPDPBUSD(VEX) Y%d, Y%d, Y%d", b1, b2, modrm, src2, src1, dst)
}

// step accumulates one weight vector (operand wop: memory or register)
// against its x bytes at x offset xo (relative to R9) into accumulator a.
// first: the accumulator holds nothing yet.
func (k qkind) step(g *gen, wop string, xo int, a int, first bool) {
	_, _, konst, ones := k.regs()
	switch {
	case k.zmm && !k.q4: // VNNI, weights as u8 = w XOR 0x80
		g.p("VPXORD %s, Z%d, Z8", wop, konst)
		if first {
			g.p("VPXORD Z%d, Z%d, Z%d", a, a, a)
		}
		g.p("VPDPBUSD %d(R9), Z8, Z%d", xo, a)
	case k.zmm && k.q4: // VNNI, nibbles are u8 already
		g.p("VPANDD %s, Z%d, Z8", wop, konst)
		g.p("VPSRLW $4, %s, Z9", wop)
		g.p("VPANDD Z%d, Z9, Z9", konst)
		if first {
			g.p("VPXORD Z%d, Z%d, Z%d", a, a, a)
		}
		g.p("VPDPBUSD %d(R9), Z8, Z%d", xo, a)
		g.p("VPDPBUSD %d(R9), Z9, Z%d", xo+64, a)
	case !k.q4 && k.vnni:
		g.p("VPXOR %s, Y%d, Y8", wop, konst)
		g.p("VMOVDQU %d(R9), Y9", xo)
		if first {
			g.p("VPXOR Y%d, Y%d, Y%d", a, a, a)
		}
		g.p(vexDPBUSD(a, 8, 9))
	case !k.q4: // AVX2: |w| times x with w's sign (llama.cpp's form)
		g.p("VPABSB %s, Y8", wop)
		g.p("VMOVDQU %d(R9), Y9", xo)
		g.p("VPSIGNB %s, Y9, Y9", wop)
		g.p("VPMADDUBSW Y9, Y8, Y10")
		if first {
			g.p("VPMADDWD Y%d, Y10, Y%d", ones, a)
		} else {
			g.p("VPMADDWD Y%d, Y10, Y10", ones)
			g.p("VPADDD Y10, Y%d, Y%d", a, a)
		}
	case k.vnni: // ymm Q4, AVX-VNNI
		wop = k.inReg(g, wop)
		g.p("VPAND %s, Y%d, Y8", wop, konst)
		g.p("VPSRLW $4, %s, Y9", wop)
		g.p("VPAND Y%d, Y9, Y9", konst)
		g.p("VMOVDQU %d(R9), Y10", xo)
		g.p("VMOVDQU %d(R9), Y11", xo+32)
		if first {
			g.p("VPXOR Y%d, Y%d, Y%d", a, a, a)
		}
		g.p(vexDPBUSD(a, 8, 10))
		g.p(vexDPBUSD(a, 9, 11))
	default: // ymm Q4, AVX2
		wop = k.inReg(g, wop)
		g.p("VPAND %s, Y%d, Y8", wop, konst)
		g.p("VPSRLW $4, %s, Y9", wop)
		g.p("VPAND Y%d, Y9, Y9", konst)
		g.p("VPMADDUBSW %d(R9), Y8, Y8", xo)
		g.p("VPMADDUBSW %d(R9), Y9, Y9", xo+32)
		g.p("VPADDW Y9, Y8, Y8")
		if first {
			g.p("VPMADDWD Y%d, Y8, Y%d", ones, a)
		} else {
			g.p("VPMADDWD Y%d, Y8, Y8", ones)
			g.p("VPADDD Y8, Y%d, Y%d", a, a)
		}
	}
}

// inReg loads a memory weight operand into Y13 (VEX shifts take no
// memory source).
func (k qkind) inReg(g *gen, wop string) string {
	if wop[0] == 'Y' {
		return wop
	}
	g.p("VMOVDQU %s, Y13", wop)
	return "Y13"
}

// xBytesPerVec is the x bytes one weight vector is multiplied with.
func (k qkind) xBytesPerVec() int {
	if k.q4 {
		return 2 * k.vecBytes()
	}
	return k.vecBytes()
}

// unpack4 reduces four int32 vectors a..d to one whose 128-bit lane j is
// [Σ a.Lj, Σ b.Lj, Σ c.Lj, Σ d.Lj] (each the sum of four dwords), using
// t1..t3 as temporaries.
func (k qkind) unpack4(g *gen, a, b, c, d, out, t1, t2, t3 int) {
	v := k.v
	g.p("VPUNPCKLDQ %s, %s, %s", v(b), v(a), v(t1))
	g.p("VPUNPCKHDQ %s, %s, %s", v(b), v(a), v(t2))
	g.p("VPADDD %s, %s, %s", v(t2), v(t1), v(t1))
	g.p("VPUNPCKLDQ %s, %s, %s", v(d), v(c), v(t2))
	g.p("VPUNPCKHDQ %s, %s, %s", v(d), v(c), v(t3))
	g.p("VPADDD %s, %s, %s", v(t3), v(t2), v(t2))
	g.p("VPUNPCKLQDQ %s, %s, %s", v(t2), v(t1), v(t3))
	g.p("VPUNPCKHQDQ %s, %s, %s", v(t2), v(t1), v(t1))
	g.p("VPADDD %s, %s, %s", v(t1), v(t3), v(out))
}

// finish reduces the group's accumulators to block sums, subtracts the
// offsets, scales by x's and the row's block scales and adds to the float
// accumulator. dwMasked: the row's scales are loaded under K2 (zmm) or
// the lane mask in Y11 (ymm).
func (k qkind) finish(g *gen, dwMasked bool) {
	fAcc, perm, _, _ := k.regs()
	var h int
	switch {
	case k.zmm && !k.q4:
		k.unpack4(g, 0, 1, 2, 3, 16, 17, 18, 19)
		k.unpack4(g, 4, 5, 6, 7, 20, 17, 18, 19)
		g.p("VSHUFI32X4 $0x88, Z20, Z16, Z21")
		g.p("VSHUFI32X4 $0xDD, Z20, Z16, Z22")
		g.p("VPADDD Z22, Z21, Z21")
		h = 21
	case k.zmm:
		k.unpack4(g, 0, 1, 2, 3, 21, 17, 18, 19)
		h = 21
	case !k.q4:
		k.unpack4(g, 0, 1, 2, 3, 0, 8, 9, 10)
		k.unpack4(g, 4, 5, 6, 7, 4, 8, 9, 10)
		g.p("VPERM2I128 $0x20, Y4, Y0, Y8")
		g.p("VPERM2I128 $0x31, Y4, Y0, Y9")
		g.p("VPADDD Y9, Y8, Y8")
		h = 8
	default:
		k.unpack4(g, 0, 1, 2, 3, 8, 9, 10, 13)
		h = 8
	}
	hv := k.v(h)
	g.p("VPSUBD (R11)(R14*1), %s, %s", hv, hv)
	g.p("VCVTDQ2PS %s, %s", hv, hv)
	g.p("VMULPS (R10)(R14*1), %s, %s", hv, hv)
	if k.zmm {
		if dwMasked {
			g.p("VMOVUPS.Z (R12)(R14*1), K2, Z24")
			g.p("VPERMPS Z24, Z%d, Z24", perm)
		} else {
			g.p("VPERMPS (R12)(R14*1), Z%d, Z24", perm)
		}
		g.p("VFMADD231PS Z24, %s, Z%d", hv, fAcc)
		return
	}
	if dwMasked {
		g.p("VMASKMOVPS (R12)(R14*1), Y11, Y9")
	} else {
		g.p("VMOVUPS (R12)(R14*1), Y9")
	}
	if k.q4 {
		g.p("VMOVDQU qpermy<>(SB), Y10")
		g.p("VPERMPS Y9, Y10, Y9")
	}
	g.p("VFMADD231PS Y9, %s, Y%d", hv, fAcc)
}

// Software prefetch distances, in bytes ahead of the group being summed:
// the weights and the row scales are streamed from memory once, and the
// hardware prefetchers alone kept the Q8 kernel at 70-75% of the read
// probe on 2048-column rows (VNNI zmm, one and two threads). Weights are
// requested into L1 wPrefetch ahead and into L2 wPrefetchL2 ahead (the
// L2 requests keep more lines in flight than L1's fill buffers allow);
// 3 KiB into L1 alone was slower than 2, and 2 KiB alone left the
// expert-sized products at 87-93% where both reach 91-98%. Rows are
// contiguous in every stored matrix, so prefetching past a row's end
// fetches the next row's start; past the last row it fetches at most
// wPrefetchL2 bytes no one reads.
const (
	wPrefetch   = 2048
	wPrefetchL2 = 4096
	sPrefetch   = 512
)

// prefetch requests the weight lines ahead of the group at AX (a whole
// group's worth, also in the tail: the lines past the row's end are the
// next row's) and the scale line sPrefetch bytes ahead of the group's
// scales.
func (k qkind) prefetch(g *gen) {
	for i := 0; i < k.groupBlocks()*k.blockBytes()/64; i++ {
		g.p("PREFETCHT0 %d(AX)", wPrefetch+64*i)
		g.p("PREFETCHT1 %d(AX)", wPrefetchL2+64*i)
	}
	g.p("PREFETCHT0 %d(R12)(R14*1)", sPrefetch)
}

func genQDot(g *gen, k qkind) {
	fAcc, perm, konst, ones := k.regs()
	G, VB, nvec := k.groupBlocks(), k.vecBytes(), k.nvec()
	xvb := k.xBytesPerVec()
	g.text("qdot"+k.name, 80)
	g.p("MOVQ y+0(FP), DI")
	g.p("MOVQ w+8(FP), R8")
	g.p("MOVQ stride+16(FP), BX")
	g.p("MOVQ xq+24(FP), SI")
	g.p("MOVQ xs+32(FP), R10")
	g.p("MOVQ xc+40(FP), R11")
	g.p("MOVQ rows+56(FP), DX")
	g.p("MOVQ s+64(FP), R12")
	c := 0x80808080
	if k.q4 {
		c = 0x0f0f0f0f
	}
	g.p("MOVL $0x%08x, AX", c)
	if k.zmm {
		g.p("VPBROADCASTD AX, Z%d", konst)
	} else {
		g.p("MOVD AX, X%d", konst)
		g.p("VPBROADCASTD X%d, Y%d", konst, konst)
	}
	if ones >= 0 {
		g.p("MOVL $0x00010001, AX")
		g.p("MOVD AX, X%d", ones)
		g.p("VPBROADCASTD X%d, Y%d", ones, ones)
	}
	if perm >= 0 {
		g.p("VMOVDQU32 qperm%s<>(SB), Z%d", map[bool]string{false: "8", true: "4"}[k.q4], perm)
	}
	g.label("row")
	g.p("MOVQ R8, AX")
	g.p("MOVQ SI, R9")
	g.p("XORQ R14, R14")
	g.p("MOVQ nb+48(FP), CX")
	g.p("VXORPS %s, %s, %s", k.v(fAcc), k.v(fAcc), k.v(fAcc))
	g.p("CMPQ CX, $%d", G)
	g.p("JL tail")
	g.label("loop")
	k.prefetch(g)
	for i := 0; i < nvec; i++ {
		k.step(g, fmt.Sprintf("%d(AX)", VB*i), xvb*i, i, true)
	}
	k.finish(g, false)
	g.p("ADDQ $%d, AX", G*k.blockBytes())
	g.p("ADDQ $%d, R9", 32*G)
	g.p("ADDQ $%d, R14", 4*G)
	g.p("SUBQ $%d, CX", G)
	g.p("CMPQ CX, $%d", G)
	g.p("JGE loop")
	g.label("tail")
	g.p("TESTQ CX, CX")
	g.p("JZ done")
	k.prefetch(g)
	// CX = t blocks left, 0 < t < G.
	xor := "VPXOR" // VEX: the ymm kernels run without AVX-512
	if k.zmm {
		xor = "VPXORD"
	}
	for i := 0; i < nvec; i++ {
		g.p("%s %s, %s, %s", xor, k.v(i), k.v(i), k.v(i))
	}
	if k.zmm {
		// K2: the t scales; CX becomes the weight bytes left.
		g.p("MOVQ $-1, R15")
		g.p("BZHIQ CX, R15, R13")
		g.p("KMOVW R13, K2")
		if k.q4 {
			g.p("SHLQ $4, CX")
		} else {
			g.p("SHLQ $5, CX")
		}
		for i := 0; i < nvec; i++ {
			g.p("CMPQ CX, $%d", VB*(i+1))
			g.p("JGE full%d", i)
			g.p("CMPQ CX, $%d", VB*i)
			g.p("JLE tailsum")
			g.p("LEAQ -%d(CX), R13", VB*i)
			g.p("BZHIQ R13, R15, R13")
			g.p("KMOVQ R13, K1")
			g.p("VMOVDQU8.Z %d(AX), K1, Z15", VB*i)
			g.p("JMP do%d", i)
			g.label(fmt.Sprintf("full%d", i))
			g.p("VMOVDQU64 %d(AX), Z15", VB*i)
			g.label(fmt.Sprintf("do%d", i))
			k.step(g, "Z15", xvb*i, i, false)
		}
	} else {
		bpv := VB / k.blockBytes() // blocks per weight vector: 1 (Q8) or 2 (Q4)
		for i := 0; i < nvec; i++ {
			g.p("CMPQ CX, $%d", bpv*i)
			g.p("JLE tailsum")
			if bpv == 1 {
				g.p("VMOVDQU %d(AX), Y13", VB*i)
			} else {
				g.p("CMPQ CX, $%d", bpv*(i+1))
				g.p("JGE full%d", i)
				g.p("VMOVDQU %d(AX), X13", VB*i) // one block; the upper half is zeroed
				g.p("JMP do%d", i)
				g.label(fmt.Sprintf("full%d", i))
				g.p("VMOVDQU %d(AX), Y13", VB*i)
				g.label(fmt.Sprintf("do%d", i))
			}
			k.step(g, "Y13", xvb*i, i, false)
		}
	}
	g.label("tailsum")
	if !k.zmm {
		// Y11: the lane mask of the t scales (t ones from qmask's middle).
		g.p("MOVQ nb+48(FP), R13")
		g.p("ANDQ $%d, R13", G-1)
		g.p("NEGQ R13")
		g.p("LEAQ qmask<>+32(SB), R15")
		g.p("VMOVDQU (R15)(R13*4), Y11")
	}
	k.finish(g, true)
	g.label("done")
	if k.zmm {
		g.p("VEXTRACTF64X4 $1, Z29, Y1")
		g.p("VADDPS Y1, Y29, Y0")
		g.p("VEXTRACTF128 $1, Y0, X1")
		g.p("VADDPS X1, X0, X0")
		g.p("VHADDPS X0, X0, X0")
		g.p("VHADDPS X0, X0, X0")
		g.p("VMOVSS X0, (DI)")
	} else {
		g.p("VEXTRACTF128 $1, Y12, X13")
		g.p("VADDPS X13, X12, X12")
		g.p("VHADDPS X12, X12, X12")
		g.p("VHADDPS X12, X12, X12")
		g.p("VMOVSS X12, (DI)")
	}
	g.p("ADDQ $4, DI")
	g.p("ADDQ BX, R8")
	g.p("ADDQ sstride+72(FP), R12")
	g.p("DECQ DX")
	g.p("JNZ row")
	g.p("VZEROUPPER")
	g.p("RET")
}

func genQConsts(g *gen) {
	for _, kk := range []qkind{qkinds[0], qkinds[1]} {
		name := map[bool]string{false: "8", true: "4"}[kk.q4]
		for i, v := range kk.perm() {
			g.raw(fmt.Sprintf("DATA qperm%s<>+%d(SB)/4, $%d\n", name, 4*i, v))
		}
		g.raw(fmt.Sprintf("GLOBL qperm%s<>(SB), RODATA|NOPTR, $64\n", name))
	}
	for i, v := range qkinds[3].perm() {
		g.raw(fmt.Sprintf("DATA qpermy<>+%d(SB)/4, $%d\n", 4*i, v))
	}
	g.raw("GLOBL qpermy<>(SB), RODATA|NOPTR, $32\n")
	for i := 0; i < 16; i++ {
		v := "0xffffffff"
		if i >= 8 {
			v = "0"
		}
		g.raw(fmt.Sprintf("DATA qmask<>+%d(SB)/4, $%s\n", 4*i, v))
	}
	g.raw("GLOBL qmask<>(SB), RODATA|NOPTR, $64\n")
}

func genQAct(g *gen) {
	genQConsts(g)
	genQuantAct(g)
	for _, k := range qkinds {
		genQDot(g, k)
	}
}

// genQuantAct emits the activation rounding of QuantizeAct for AVX-512:
// per block of 32 floats, amax (exact), d = amax/127 in scalar IEEE
// arithmetic, q = round-to-nearest-even(x/d) (0 where d = 0)
// (VCVTPS2DQ under the default rounding mode), stored as int8 (|q| <= 127
// by construction, so the truncating VPMOVDB is exact), and Σq. Bit-for-bit
// the plain Go rounding.
// func quantActAVX512(q *int8, d *float32, sum *int32, x *float32, nb int)
func genQuantAct(g *gen) {
	g.text("quantActAVX512", 40)
	g.p("MOVQ q+0(FP), DI")
	g.p("MOVQ d+8(FP), DX")
	g.p("MOVQ sum+16(FP), R8")
	g.p("MOVQ x+24(FP), SI")
	g.p("MOVQ nb+32(FP), CX")
	g.p("MOVL $0x7fffffff, AX")
	g.p("VPBROADCASTD AX, Z10")
	g.p("MOVL $0x42fe0000, AX") // 127.0
	g.p("MOVD AX, X8")
	g.p("MOVL $0x3f800000, AX") // 1.0
	g.p("MOVD AX, X9")
	g.p("VXORPS X6, X6, X6")
	g.label("block")
	g.p("VMOVUPS (SI), Z0")
	g.p("VMOVUPS 64(SI), Z1")
	g.p("VANDPS Z10, Z0, Z2")
	g.p("VANDPS Z10, Z1, Z3")
	g.p("VMAXPS Z3, Z2, Z2")
	g.p("VEXTRACTF64X4 $1, Z2, Y3")
	g.p("VMAXPS Y3, Y2, Y2")
	g.p("VEXTRACTF128 $1, Y2, X3")
	g.p("VMAXPS X3, X2, X2")
	g.p("VPERMILPS $0x4E, X2, X3")
	g.p("VMAXPS X3, X2, X2")
	g.p("VPERMILPS $0xB1, X2, X3")
	g.p("VMAXPS X3, X2, X2")
	g.p("VDIVSS X8, X2, X4") // d = amax/127
	g.p("VMOVSS X4, (DX)")
	g.p("VCMPSS $0, X6, X4, X7")    // d == 0 (then every x is 0)
	g.p("VBLENDVPS X7, X9, X4, X5") // divide by 1 there, else by d
	g.p("VBROADCASTSS X5, Z5")
	g.p("VDIVPS Z5, Z0, Z0")
	g.p("VDIVPS Z5, Z1, Z1")
	g.p("VCVTPS2DQ Z0, Z0")
	g.p("VCVTPS2DQ Z1, Z1")
	g.p("VPMOVDB Z0, (DI)")
	g.p("VPMOVDB Z1, 16(DI)")
	g.p("VPADDD Z1, Z0, Z0")
	g.p("VEXTRACTI64X4 $1, Z0, Y1")
	g.p("VPADDD Y1, Y0, Y0")
	g.p("VEXTRACTI128 $1, Y0, X1")
	g.p("VPADDD X1, X0, X0")
	g.p("VPSHUFD $0x4E, X0, X1")
	g.p("VPADDD X1, X0, X0")
	g.p("VPSHUFD $0xB1, X0, X1")
	g.p("VPADDD X1, X0, X0")
	g.p("VMOVD X0, (R8)")
	g.p("ADDQ $128, SI")
	g.p("ADDQ $32, DI")
	g.p("ADDQ $4, DX")
	g.p("ADDQ $4, R8")
	g.p("DECQ CX")
	g.p("JNZ block")
	g.p("VZEROUPPER")
	g.p("RET")
}
