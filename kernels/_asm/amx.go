package main

import (
	"fmt"
	"strings"
)

// AMX instructions are VEX.128.W0 in map 0F38; the Go assembler knows none
// of them, so they are emitted as bytes (checked against objdump's decoding
// in amx_test.go).

// vex0F38 encodes VEX.128.pp.0F38.W0 opcode with ModRM.reg = reg, VEX.vvvv =
// vvvv, and either ModRM.rm = register rm (m == nil) or the memory operand
// m, always through a SIB byte when sib is set (TILELOADD/TILESTORED
// require one).
func vex0F38(pp, opcode, reg, vvvv, rm int, m *mem, sib bool) []byte {
	var X, B int
	var tail []byte
	if m == nil {
		B = (rm >> 3) & 1
		tail = []byte{byte(0xC0 | (reg&7)<<3 | rm&7)}
	} else {
		b := gpr[m.base]
		B = (b >> 3) & 1
		var mod int
		var disp []byte
		switch {
		case m.disp == 0 && b&7 != 5:
			mod = 0
		case m.disp >= -128 && m.disp < 128:
			mod, disp = 1, []byte{byte(int8(m.disp))}
		default:
			d := uint32(int32(m.disp))
			mod, disp = 2, []byte{byte(d), byte(d >> 8), byte(d >> 16), byte(d >> 24)}
		}
		if sib || m.index != "" || b&7 == 4 {
			idx := 4 // none
			ss := 0
			if m.index != "" {
				idx = gpr[m.index]
				X = (idx >> 3) & 1
				ss = map[int]int{0: 0, 1: 0, 2: 1, 4: 2, 8: 3}[m.scale]
			}
			tail = []byte{byte(mod<<6 | (reg&7)<<3 | 4), byte(ss<<6 | (idx&7)<<3 | b&7)}
		} else {
			tail = []byte{byte(mod<<6 | (reg&7)<<3 | b&7)}
		}
		tail = append(tail, disp...)
	}
	R := (reg >> 3) & 1
	inv := func(v int) int { return (^v) & 1 }
	b1 := inv(R)<<7 | inv(X)<<6 | inv(B)<<5 | 0x02
	b2 := ((^vvvv)&0xf)<<3 | pp // W0, L0
	return append([]byte{0xC4, byte(b1), byte(b2), byte(opcode)}, tail...)
}

func byteList(bs []byte, comment string) string {
	var parts []string
	for _, x := range bs {
		parts = append(parts, fmt.Sprintf("BYTE $0x%02x", x))
	}
	return strings.Join(parts, "; ") + " // " + comment
}

// ldtilecfg: LDTILECFG m512 (VEX.NP 49 /0).
func ldtilecfg(m mem) string {
	return byteList(vex0F38(0, 0x49, 0, 0, 0, &m, false), "LDTILECFG "+m.String())
}

// tilerelease: TILERELEASE (VEX.NP 49 C0).
func tilerelease() string { return byteList(vex0F38(0, 0x49, 0, 0, 0, nil, false), "TILERELEASE") }

// tilezero: TILEZERO tmm (VEX.F2 49 11:rrr:000).
func tilezero(t int) string {
	return byteList(vex0F38(3, 0x49, t, 0, 0, nil, false), fmt.Sprintf("TILEZERO TMM%d", t))
}

// tileloadd: TILELOADD tmm, [base+index*1+disp] (VEX.F2 4B, SIB; the index
// register holds the row stride in bytes).
func tileloadd(t int, m mem) string {
	return byteList(vex0F38(3, 0x4B, t, 0, 0, &m, true), fmt.Sprintf("TILELOADD %s, TMM%d", m, t))
}

// tilestored: TILESTORED [base+index*1+disp], tmm (VEX.F3 4B, SIB).
func tilestored(m mem, t int) string {
	return byteList(vex0F38(2, 0x4B, t, 0, 0, &m, true), fmt.Sprintf("TILESTORED TMM%d, %s", t, m))
}

// tdpbf16ps: TDPBF16PS c, a, b: C += A·B over bf16 pairs (VEX.F3 5C,
// ModRM.reg = c, ModRM.rm = a, VEX.vvvv = b).
func tdpbf16ps(c, a, b int) string {
	return byteList(vex0F38(2, 0x5C, c, b, a, nil, false), fmt.Sprintf("TDPBF16PS TMM%d, TMM%d, TMM%d", b, a, c))
}

// genAMX writes amx_amd64.s: the AMX-BF16 micro-kernels and the CPUID /
// XGETBV probes that enable them.
//
// func amxBF16{M}x{N}(cfg *amxConfig, a *uint16, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)
//
// C (M x N tiles of up to 16x16 float32, c with row stride cstride) =
// (acc ? C : 0) + sum over ksteps of A·B, where A is M tiles of up to 16
// rows of 32 bf16 (a, row stride astride, tile 1 at 16*astride; each step
// 64 bytes further) and B is N tiles of up to 16 pair rows of 16 pairs (b,
// row stride bstride, tile 1 at +64 bytes; each step 16*bstride further).
// cfg (from Go) sets every tile's shape: TMM0..3 are C00 C01 C10 C11,
// TMM4/5 A0/A1, TMM6/7 B0/B1. Every call ends with TILERELEASE.
func genAMX(g *gen) {
	for _, mt := range []int{1, 2} {
		for _, nt := range []int{1, 2} {
			genAMXKernel(g, mt, nt)
		}
	}
	for _, mt := range []int{1, 2} {
		for _, nt := range []int{1, 2} {
			genAMXSplitKernel(g, mt, nt)
		}
	}
	genAMXSplitRow(g)
	for _, mt := range []int{1, 2} {
		for _, nt := range []int{1, 2} {
			genAMXWAKernel(g, mt, nt)
		}
	}
	genAMXSplitRowAcc(g)
	genAMXPairsT(g)
	genAMXStoreT(g)
	// func amxPeak(cfg *amxConfig, iters int): iters x 4 TDPBF16PS on
	// zeroed tiles, register only (the bench-kernels AMX peak).
	g.text("amxPeak", 16)
	g.p("MOVQ cfg+0(FP), DI")
	g.p(ldtilecfg(mem{base: "DI"}))
	g.p("MOVQ iters+8(FP), CX")
	for t := 0; t < 8; t++ {
		g.p(tilezero(t))
	}
	g.label("amxPeak_loop")
	g.p(tdpbf16ps(0, 4, 6))
	g.p(tdpbf16ps(1, 4, 7))
	g.p(tdpbf16ps(2, 5, 6))
	g.p(tdpbf16ps(3, 5, 7))
	g.p("DECQ CX")
	g.p("JNZ amxPeak_loop")
	g.p(tilerelease())
	g.p("RET")
	g.text("amxCPUID", 24)
	g.p("MOVL leaf+0(FP), AX")
	g.p("MOVL sub+4(FP), CX")
	g.p("CPUID")
	g.p("MOVL AX, a+8(FP)")
	g.p("MOVL BX, b+12(FP)")
	g.p("MOVL CX, c+16(FP)")
	g.p("MOVL DX, d+20(FP)")
	g.p("RET")
	g.text("amxXCR0", 8)
	g.p("MOVL $0, CX")
	g.p("XGETBV")
	g.p("MOVL AX, lo+0(FP)")
	g.p("MOVL DX, hi+4(FP)")
	g.p("RET")
}

// amxKernelHead writes the start of the tile kernels amxBF16x, amxSplit
// and amxWA, whose arguments are (cfg, a, astride, b, bstride, ksteps, c,
// cstride, acc): the tile config loaded, the pointers in SI (A0), R12
// (A1), DX (B), BX (C row 0), R13 (C row 16), the strides in R8, R11 and
// R9, 16*bstride in reg, then the mt x nt C tiles zeroed, or loaded from c
// when acc is set, up to the label NAME_loop. It returns where C tile
// (i, j) lives: its register and its memory.
func amxKernelHead(g *gen, name string, mt, nt int, reg string) func(i, j int) (int, mem) {
	g.text(name, 72)
	g.p("MOVQ cfg+0(FP), DI")
	g.p(ldtilecfg(mem{base: "DI"}))
	g.p("MOVQ a+8(FP), SI")
	g.p("MOVQ astride+16(FP), R8")
	g.p("MOVQ b+24(FP), DX")
	g.p("MOVQ bstride+32(FP), R11")
	g.p("MOVQ ksteps+40(FP), CX")
	g.p("MOVQ c+48(FP), BX")
	g.p("MOVQ cstride+56(FP), R9")
	g.p("MOVQ R8, R12")
	g.p("SHLQ $4, R12")
	g.p("ADDQ SI, R12") // A1
	g.p("MOVQ R9, R13")
	g.p("SHLQ $4, R13")
	g.p("ADDQ BX, R13") // C row 16
	g.p("MOVQ R11, %s", reg)
	g.p("SHLQ $4, %s", reg)
	cTile := func(i, j int) (int, mem) {
		base := "BX"
		if i == 1 {
			base = "R13"
		}
		return 2*i + j, mem{base: base, index: "R9", scale: 1, disp: 64 * j}
	}
	g.p("CMPQ acc+64(FP), $0")
	g.p("JNE %s_load", name)
	for i := 0; i < mt; i++ {
		for j := 0; j < nt; j++ {
			t, _ := cTile(i, j)
			g.p(tilezero(t))
		}
	}
	g.p("JMP %s_loop", name)
	g.label(name + "_load")
	for i := 0; i < mt; i++ {
		for j := 0; j < nt; j++ {
			t, m := cTile(i, j)
			g.p(tileloadd(t, m))
		}
	}
	g.label(name + "_loop")
	return cTile
}

// amxKernelTail ends the tile kernels amxKernelHead starts: the C tiles
// stored back, the tiles released, RET.
func amxKernelTail(g *gen, mt, nt int, cTile func(i, j int) (int, mem)) {
	for i := 0; i < mt; i++ {
		for j := 0; j < nt; j++ {
			t, m := cTile(i, j)
			g.p(tilestored(m, t))
		}
	}
	g.p(tilerelease())
	g.p("RET")
}

func genAMXKernel(g *gen, mt, nt int) {
	name := fmt.Sprintf("amxBF16x%d%d", mt, nt)
	cTile := amxKernelHead(g, name, mt, nt, "R10") // R10: B step
	// Loads interleaved with the products that need them.
	g.p(tileloadd(6, mem{base: "DX", index: "R11", scale: 1}))
	g.p(tileloadd(4, mem{base: "SI", index: "R8", scale: 1}))
	g.p(tdpbf16ps(0, 4, 6))
	if nt == 2 {
		g.p(tileloadd(7, mem{base: "DX", index: "R11", scale: 1, disp: 64}))
		g.p(tdpbf16ps(1, 4, 7))
	}
	if mt == 2 {
		g.p(tileloadd(5, mem{base: "R12", index: "R8", scale: 1}))
		g.p(tdpbf16ps(2, 5, 6))
		if nt == 2 {
			g.p(tdpbf16ps(3, 5, 7))
		}
	}
	g.p("ADDQ $64, SI")
	g.p("ADDQ $64, R12")
	g.p("ADDQ R10, DX")
	g.p("DECQ CX")
	g.p("JNZ %s_loop", name)
	amxKernelTail(g, mt, nt, cTile)
}

// genAMXSplitKernel writes amxSplit{M}{N}, the kernel of the exact
// (float32-activation) AMX path:
//
// func amxSplit{M}{N}(cfg *amxConfig, a *uint16, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)
//
// as amxBF16{M}x{N}, but every 16-pair step of A is three bf16 parts of
// the activations (hi, lo, lo2 of amxSplitRow: 64 bytes each, the step
// 192 bytes long), each multiplied by the same B tiles into the same C:
// C += (hi + lo + lo2)·B, B loaded once for all three. With one A tile
// (M = 1) the parts alternate between TMM4 and TMM5 (cfg shapes both),
// so a part's load does not wait for the products of the one before.
func genAMXSplitKernel(g *gen, mt, nt int) {
	name := fmt.Sprintf("amxSplit%d%d", mt, nt)
	cTile := amxKernelHead(g, name, mt, nt, "R10") // R10: B step
	g.p(tileloadd(6, mem{base: "DX", index: "R11", scale: 1}))
	if nt == 2 {
		g.p(tileloadd(7, mem{base: "DX", index: "R11", scale: 1, disp: 64}))
	}
	for part := 0; part < 3; part++ {
		ta := 4
		if mt == 1 && part == 1 {
			ta = 5
		}
		g.p(tileloadd(ta, mem{base: "SI", index: "R8", scale: 1, disp: 64 * part}))
		g.p(tdpbf16ps(0, ta, 6))
		if nt == 2 {
			g.p(tdpbf16ps(1, ta, 7))
		}
		if mt == 2 {
			g.p(tileloadd(5, mem{base: "R12", index: "R8", scale: 1, disp: 64 * part}))
			g.p(tdpbf16ps(2, 5, 6))
			if nt == 2 {
				g.p(tdpbf16ps(3, 5, 7))
			}
		}
	}
	g.p("ADDQ $192, SI")
	g.p("ADDQ $192, R12")
	g.p("ADDQ R10, DX")
	g.p("DECQ CX")
	g.p("JNZ %s_loop", name)
	amxKernelTail(g, mt, nt, cTile)
}

// genAMXSplitRow writes
//
// func amxSplitRow(dst *uint16, src *float32, steps int, scale float32, mx *[16]uint32)
//
// which splits steps x 32 float32 (each times scale, a power of two) into
// three bf16 parts, all exact: hi = v truncated to bf16 (its top 16 bits),
// lo = (v-hi) truncated, lo2 = v-hi-lo (at most 8 significant bits left,
// so its top 16 bits hold it whole; only a subnormal remainder is
// truncated). Each step writes hi, lo, lo2 as 32 bf16 (64 bytes) one
// after another, 192 bytes a step. mx receives the per-lane maximum of
// |v|'s bits (Inf and NaN above every finite value).
func genAMXSplitRow(g *gen) { genAMXSplitRowInto(g, "amxSplitRow", false) }

// genAMXSplitRowAcc writes amxSplitRowAcc, amxSplitRow whose mx is a
// running maximum: it starts from mx's lanes instead of zero.
func genAMXSplitRowAcc(g *gen) { genAMXSplitRowInto(g, "amxSplitRowAcc", true) }

func genAMXSplitRowInto(g *gen, name string, acc bool) {
	g.text(name, 40)
	g.p("MOVQ dst+0(FP), DI")
	g.p("MOVQ src+8(FP), SI")
	g.p("MOVQ steps+16(FP), CX")
	g.p("VBROADCASTSS scale+24(FP), Z31")
	g.p("MOVL $0xffff0000, AX")
	g.p("VPBROADCASTD AX, Z30")
	g.p("MOVL $0x7fffffff, AX")
	g.p("VPBROADCASTD AX, Z29")
	if acc {
		g.p("MOVQ mx+32(FP), AX")
		g.p("VMOVDQU32 (AX), Z28")
	} else {
		g.p("VPXORD Z28, Z28, Z28")
	}
	g.p("TESTQ CX, CX")
	g.p("JZ %s_done", name)
	g.label(name + "_loop")
	for h := 0; h < 2; h++ {
		v, t, hi, r, lo := 5*h, 5*h+1, 5*h+2, 5*h+3, 5*h+4
		g.p("VMULPS %d(SI), Z31, Z%d", 64*h, v)
		g.p("VPANDD Z29, Z%d, Z%d", v, t)
		g.p("VPMAXUD Z%d, Z28, Z28", t)
		g.p("VPANDD Z30, Z%d, Z%d", v, hi)
		g.p("VSUBPS Z%d, Z%d, Z%d", hi, v, r) // r = v - hi
		g.p("VPANDD Z30, Z%d, Z%d", r, lo)
		g.p("VSUBPS Z%d, Z%d, Z%d", lo, r, r) // lo2 = r - lo
		g.p("VPSRLD $16, Z%d, Z%d", hi, hi)
		g.p("VPSRLD $16, Z%d, Z%d", lo, lo)
		g.p("VPSRLD $16, Z%d, Z%d", r, r)
		g.p("VPMOVDW Z%d, %d(DI)", hi, 32*h)
		g.p("VPMOVDW Z%d, %d(DI)", lo, 64+32*h)
		g.p("VPMOVDW Z%d, %d(DI)", r, 128+32*h)
	}
	g.p("ADDQ $128, SI")
	g.p("ADDQ $192, DI")
	g.p("DECQ CX")
	g.p("JNZ %s_loop", name)
	g.label(name + "_done")
	g.p("MOVQ mx+32(FP), AX")
	g.p("VMOVDQU32 Z28, (AX)")
	g.p("VZEROUPPER")
	g.p("RET")
}

// genAMXWAKernel writes amxWA{M}{N}, the transposed ("W as A") kernel of
// the exact path, C^T = W·x^T:
//
// func amxWA{M}{N}(cfg *amxConfig, a *byte, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)
//
// A is M tiles of up to 16 rows of W itself (bf16, a with row stride
// astride = 2*Cols, tile 1 at 16*astride; each step 64 bytes further), so
// W is read straight from memory without packing. B is N tiles of x split
// by amxSplitRowT: per 16-pair step three parts (hi, lo, lo2) of 16 pair
// rows each (b, row stride bstride; part p at 16*p*bstride, the next step
// at 48*bstride; x block 1 at +64 bytes). Each step loads the A tiles
// once and multiplies them by the three parts' B tiles into the same C.
// C (tile i,j at c + 16*i*cstride + 64*j) = (acc ? C : 0) + the sum; C's
// rows are W rows, its columns x rows (the caller transposes). With one
// B tile (N = 1) the parts alternate between TMM6 and TMM7 (cfg shapes
// both), so a part's load does not wait for the products of the one
// before. Every call ends with TILERELEASE.
func genAMXWAKernel(g *gen, mt, nt int) {
	name := fmt.Sprintf("amxWA%d%d", mt, nt)
	cTile := amxKernelHead(g, name, mt, nt, "DI") // DI: part stride
	g.p(tileloadd(4, mem{base: "SI", index: "R8", scale: 1}))
	if mt == 2 {
		g.p(tileloadd(5, mem{base: "R12", index: "R8", scale: 1}))
	}
	for part := 0; part < 3; part++ {
		tb := 6
		if nt == 1 && part == 1 {
			tb = 7
		}
		g.p(tileloadd(tb, mem{base: "DX", index: "R11", scale: 1}))
		g.p(tdpbf16ps(0, 4, tb))
		if mt == 2 {
			g.p(tdpbf16ps(2, 5, tb))
		}
		if nt == 2 {
			g.p(tileloadd(7, mem{base: "DX", index: "R11", scale: 1, disp: 64}))
			g.p(tdpbf16ps(1, 4, 7))
			if mt == 2 {
				g.p(tdpbf16ps(3, 5, 7))
			}
		}
		g.p("ADDQ DI, DX")
	}
	g.p("ADDQ $64, SI")
	g.p("ADDQ $64, R12")
	g.p("DECQ CX")
	g.p("JNZ %s_loop", name)
	amxKernelTail(g, mt, nt, cTile)
}

// genAMXPairsT writes
//
// func amxPairsT(dst *uint32, dstride uintptr, src *uint16, sstride uintptr, rows, blocks int)
//
// which transposes blocks 16x16 blocks of 32-bit words: block b of source
// row r is the 16 words at src + r*sstride + 64*b, and word q of it goes
// to column r of row 16*b+q of dst (dst + (16*b+q)*dstride + 4*r). Only
// columns r < rows are stored (a masked store), but all 16 source rows
// are read (src must hold 16 rows of 64*blocks bytes). It turns
// amxSplitRow's rows (per step, three parts of 16 pairs) into the pair
// rows of the amxWA kernels' B tiles.
func genAMXPairsT(g *gen) {
	g.text("amxPairsT", 48)
	g.p("MOVQ dst+0(FP), DI")
	g.p("MOVQ dstride+8(FP), R8")
	g.p("MOVQ src+16(FP), SI")
	g.p("MOVQ sstride+24(FP), R9")
	g.p("MOVQ rows+32(FP), CX")
	g.p("MOVL $1, AX")
	g.p("SHLL CX, AX")
	g.p("DECL AX")
	g.p("KMOVW AX, K1")
	g.p("MOVQ blocks+40(FP), CX")
	g.p("TESTQ CX, CX")
	g.p("JZ amxPairsT_done")
	g.label("amxPairsT_loop")
	g.p("MOVQ SI, AX")
	for r := 0; r < 16; r++ {
		g.p("VMOVDQU32 (AX), Z%d", r)
		if r < 15 {
			g.p("ADDQ R9, AX")
		}
	}
	transpose16(g, 0, 16)
	for q := 0; q < 16; q++ {
		g.p("VMOVDQU32 Z%d, K1, (DI)", q)
		g.p("ADDQ R8, DI")
	}
	g.p("ADDQ $64, SI")
	g.p("DECQ CX")
	g.p("JNZ amxPairsT_loop")
	g.label("amxPairsT_done")
	g.p("VZEROUPPER")
	g.p("RET")
}

// genAMXStoreT writes
//
// func amxStoreT(y *float32, ystride uintptr, c *float32, cstride uintptr, m, nx int)
//
// which writes a 16x16 float32 block of C transposed into y: row n < nx
// of y (y + n*ystride) receives column n of C's rows (c + r*cstride),
// r < m (a masked store). All 16 rows of c are read. It stores the amxWA
// kernels' C tiles (W rows by x rows) into y (x rows by W rows).
func genAMXStoreT(g *gen) {
	g.text("amxStoreT", 48)
	g.p("MOVQ y+0(FP), DI")
	g.p("MOVQ ystride+8(FP), R8")
	g.p("MOVQ c+16(FP), SI")
	g.p("MOVQ cstride+24(FP), R9")
	g.p("MOVQ m+32(FP), CX")
	g.p("MOVL $1, AX")
	g.p("SHLL CX, AX")
	g.p("DECL AX")
	g.p("KMOVW AX, K1")
	g.p("MOVQ nx+40(FP), CX")
	for r := 0; r < 16; r++ {
		g.p("VMOVUPS (SI), Z%d", r)
		if r < 15 {
			g.p("ADDQ R9, SI")
		}
	}
	transpose16(g, 0, 16)
	for n := 0; n < 16; n++ {
		g.p("VMOVUPS Z%d, K1, (DI)", n)
		if n < 15 {
			g.p("CMPQ CX, $%d", n+1)
			g.p("JLE amxStoreT_done")
			g.p("ADDQ R8, DI")
		}
	}
	g.label("amxStoreT_done")
	g.p("VZEROUPPER")
	g.p("RET")
}
