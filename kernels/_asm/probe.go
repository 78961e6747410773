package main

// genProbe emits the machine-limit probes RunBench compares kernels with.
func genProbe(g *gen) {
	// func readSumAVX512(p *byte, n int) float32: sums n bytes (multiple
	// of 512) as float32, four independent chains so only memory limits it.
	g.text("readSumAVX512", 20)
	g.p("MOVQ p+0(FP), SI")
	g.p("MOVQ n+8(FP), CX")
	zero(g, avx512, 0, 1, 2, 3)
	g.label("loop")
	for i := 0; i < 8; i++ {
		g.p("VADDPS %d(SI), Z%d, Z%d", 64*i, i%4, i%4)
	}
	g.p("ADDQ $512, SI")
	g.p("SUBQ $512, CX")
	g.p("JNZ loop")
	g.p("VADDPS Z1, Z0, Z0")
	g.p("VADDPS Z3, Z2, Z2")
	g.p("VADDPS Z2, Z0, Z0")
	g.p("VEXTRACTF64X4 $1, Z0, Y1")
	g.p("VADDPS Y1, Y0, Y0")
	g.p("VEXTRACTF128 $1, Y0, X1")
	g.p("VADDPS X1, X0, X0")
	g.p("VHADDPS X0, X0, X0")
	g.p("VHADDPS X0, X0, X0")
	g.p("VZEROUPPER")
	g.p("MOVSS X0, ret+16(FP)")
	g.p("RET")

	// func readSum2AVX512(p *byte, n int) float32: as readSumAVX512 over two
	// halves of the buffer at once (two sequential streams).
	g.text("readSum2AVX512", 20)
	g.p("MOVQ p+0(FP), SI")
	g.p("MOVQ n+8(FP), CX")
	g.p("SHRQ $1, CX")
	g.p("LEAQ (SI)(CX*1), DI")
	zero(g, avx512, 0, 1, 2, 3)
	g.label("loop")
	for i := 0; i < 4; i++ {
		g.p("VADDPS %d(SI), Z%d, Z%d", 64*i, i%4, i%4)
		g.p("VADDPS %d(DI), Z%d, Z%d", 64*i, i%4, i%4)
	}
	g.p("ADDQ $256, SI")
	g.p("ADDQ $256, DI")
	g.p("SUBQ $256, CX")
	g.p("JNZ loop")
	g.p("VADDPS Z1, Z0, Z0")
	g.p("VADDPS Z3, Z2, Z2")
	g.p("VADDPS Z2, Z0, Z0")
	g.p("VEXTRACTF64X4 $1, Z0, Y1")
	g.p("VADDPS Y1, Y0, Y0")
	g.p("VEXTRACTF128 $1, Y0, X1")
	g.p("VADDPS X1, X0, X0")
	g.p("VHADDPS X0, X0, X0")
	g.p("VHADDPS X0, X0, X0")
	g.p("VZEROUPPER")
	g.p("MOVSS X0, ret+16(FP)")
	g.p("RET")

	// func fmaPeakAVX512(iters int): 12 independent chains of 16-lane FMAs,
	// 12 per iteration (384 flops).
	g.text("fmaPeakAVX512", 8)
	g.p("MOVQ iters+0(FP), CX")
	for i := 0; i < 14; i++ {
		g.p("VXORPS Z%d, Z%d, Z%d", i, i, i)
	}
	g.label("loop")
	for i := 0; i < 12; i++ {
		g.p("VFMADD231PS Z12, Z13, Z%d", i)
	}
	g.p("DECQ CX")
	g.p("JNZ loop")
	g.p("VZEROUPPER")
	g.p("RET")

	// func dpbf16PeakAVX512(iters int): 12 chains of VDPBF16PS, 12 per
	// iteration (768 flops: 32 products and 32 adds each).
	g.text("dpbf16PeakAVX512", 8)
	g.p("MOVQ iters+0(FP), CX")
	for i := 0; i < 14; i++ {
		g.p("VXORPS Z%d, Z%d, Z%d", i, i, i)
	}
	g.label("loop")
	for i := 0; i < 12; i++ {
		g.raw("\t" + evexOp(2, 0x52, i, 12, nil, 13, false) + "\n")
	}
	g.p("DECQ CX")
	g.p("JNZ loop")
	g.p("VZEROUPPER")
	g.p("RET")
}
