//go:build amd64 && !purego

package kernels

import "golang.org/x/sys/cpu"

// BestISA is the highest level this CPU and build support.
func BestISA() ISA {
	switch {
	case cpu.X86.HasAVX512F && cpu.X86.HasAVX512BW && cpu.X86.HasAVX512VL && cpu.X86.HasAVX512DQ:
		return ISAAVX512
	case cpu.X86.HasAVX2 && cpu.X86.HasFMA && cpu.X86.HasF16C:
		return ISAAVX2
	}
	return ISAGeneric
}

// hasBF16 reports AVX512_BF16 (VDPBF16PS) for MatMulBF16Act.
var hasBF16 = cpu.X86.HasAVX512BF16

func kernelsFor(isa ISA) kernelSet {
	k := genericKernels
	switch isa {
	case ISAAVX512:
		k.isa = ISAAVX512
		k.matVecRows = matVecRowsAVX512
		k.matMulRows = matMulRowsAVX512
		k.dot, k.axpy, k.scale, k.add = dotV512, axpyV512, scaleV512, addV512
		k.sumSq, k.mulScale = sumSqV512, mulScaleV512
		k.siluMul, k.sigmoid, k.expSub, k.max = siluMulV512, sigmoidV512, expSubV512, maxV512
		k.mla = mlaHeadsAVX512
		k.quantSIMD = true
		if qVNNI512 {
			k.qdot, k.qlay = qdotVNNI512, qlayVNNI512
		} else {
			k.qdot, k.qlay = qdotYMM()
		}
	case ISAAVX2:
		k.isa = ISAAVX2
		k.matVecRows = matVecRowsAVX2
		k.matMulRows = matMulRowsAVX2
		k.dot, k.axpy, k.scale, k.add = dotV2, axpyV2, scaleV2, addV2
		k.sumSq, k.mulScale = sumSqV2, mulScaleV2
		k.max = maxV2
		k.qdot, k.qlay = qdotYMM()
	}
	return k
}
