package main

import (
	"fmt"
	"strings"
)

// Register numbers as the hardware encodes them.
var gpr = map[string]int{"AX": 0, "CX": 1, "DX": 2, "BX": 3, "SP": 4, "BP": 5, "SI": 6, "DI": 7,
	"R8": 8, "R9": 9, "R10": 10, "R11": 11, "R12": 12, "R13": 13, "R14": 14, "R15": 15}

// mem is base + index*scale + disp.
type mem struct {
	base, index string
	scale, disp int
}

// evexOp encodes a 512-bit EVEX instruction "op zdst, zsrc1, m32bcst/zmm"
// in map 0F38 with W0: pp is 1 (66), 2 (F3) or 3 (F2). With m == nil the
// second source is register zsrc2. Used for VDPBF16PS (F3 52) and
// VCVTNE2PS2BF16 (F2 72), which the Go assembler does not know.
func evexOp(pp, opcode, dst, src1 int, m *mem, src2 int, bcst bool) string {
	var R, Rp, X, B int
	R, Rp = (dst>>3)&1, (dst>>4)&1
	var modrm, sib []byte
	var disp []byte
	if m == nil {
		B, X = (src2>>3)&1, (src2>>4)&1
		modrm = []byte{byte(0xC0 | (dst&7)<<3 | src2&7)}
	} else {
		b := gpr[m.base]
		B = (b >> 3) & 1
		d := uint32(int32(m.disp))
		disp = []byte{byte(d), byte(d >> 8), byte(d >> 16), byte(d >> 24)}
		if m.index != "" || b&7 == 4 {
			idx := 4 // none
			if m.index != "" {
				idx = gpr[m.index]
				X = (idx >> 3) & 1
			}
			ss := map[int]int{0: 0, 1: 0, 2: 1, 4: 2, 8: 3}[m.scale]
			modrm = []byte{byte(0x80 | (dst&7)<<3 | 4)}
			sib = []byte{byte(ss<<6 | (idx&7)<<3 | b&7)}
		} else {
			modrm = []byte{byte(0x80 | (dst&7)<<3 | b&7)}
		}
	}
	inv := func(v int) int { return (^v) & 1 }
	p0 := inv(R)<<7 | inv(X)<<6 | inv(B)<<5 | inv(Rp)<<4 | 0x02
	p1 := ((^src1)&0xf)<<3 | 1<<2 | pp
	bb := 0
	if bcst {
		bb = 1
	}
	p2 := 2<<5 | bb<<4 | inv((src1>>4)&1)<<3
	bs := []byte{0x62, byte(p0), byte(p1), byte(p2), byte(opcode)}
	bs = append(bs, modrm...)
	bs = append(bs, sib...)
	bs = append(bs, disp...)
	var parts []string
	for _, x := range bs {
		parts = append(parts, fmt.Sprintf("BYTE $0x%02x", x))
	}
	return strings.Join(parts, "; ")
}

// vdpbf16psBcst: Z[dst] += dot pairs of Z[src1] and the broadcast dword at m.
func vdpbf16psBcst(dst, src1 int, m mem) string {
	return evexOp(2, 0x52, dst, src1, &m, 0, true) + fmt.Sprintf(" // VDPBF16PS.BCST %s, Z%d, Z%d", m, src1, dst)
}

// vcvtne2ps2bf16: Z[dst] = bf16(Z[src1]) in the upper half, bf16(Z[src2]) in the lower.
func vcvtne2ps2bf16(dst, src1, src2 int) string {
	return evexOp(3, 0x72, dst, src1, nil, src2, false) + fmt.Sprintf(" // VCVTNE2PS2BF16 Z%d, Z%d, Z%d", src2, src1, dst)
}

func (m mem) String() string {
	s := fmt.Sprintf("%d(%s)", m.disp, m.base)
	if m.index != "" {
		s += fmt.Sprintf("(%s*%d)", m.index, m.scale)
	}
	return s
}
