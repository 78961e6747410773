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

func genAMXKernel(g *gen, mt, nt int) {
	name := fmt.Sprintf("amxBF16x%d%d", mt, nt)
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
	g.p("MOVQ R11, R10")
	g.p("SHLQ $4, R10") // B step
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
	for i := 0; i < mt; i++ {
		for j := 0; j < nt; j++ {
			t, m := cTile(i, j)
			g.p(tilestored(m, t))
		}
	}
	g.p(tilerelease())
	g.p("RET")
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
	g.p("MOVQ R11, R10")
	g.p("SHLQ $4, R10") // B step
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
	for i := 0; i < mt; i++ {
		for j := 0; j < nt; j++ {
			t, m := cTile(i, j)
			g.p(tilestored(m, t))
		}
	}
	g.p(tilerelease())
	g.p("RET")
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
func genAMXSplitRow(g *gen) {
	g.text("amxSplitRow", 40)
	g.p("MOVQ dst+0(FP), DI")
	g.p("MOVQ src+8(FP), SI")
	g.p("MOVQ steps+16(FP), CX")
	g.p("VBROADCASTSS scale+24(FP), Z31")
	g.p("MOVL $0xffff0000, AX")
	g.p("VPBROADCASTD AX, Z30")
	g.p("MOVL $0x7fffffff, AX")
	g.p("VPBROADCASTD AX, Z29")
	g.p("VPXORD Z28, Z28, Z28")
	g.p("TESTQ CX, CX")
	g.p("JZ amxSplitRow_done")
	g.label("amxSplitRow_loop")
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
	g.p("JNZ amxSplitRow_loop")
	g.label("amxSplitRow_done")
	g.p("MOVQ mx+32(FP), AX")
	g.p("VMOVDQU32 Z28, (AX)")
	g.p("VZEROUPPER")
	g.p("RET")
}
