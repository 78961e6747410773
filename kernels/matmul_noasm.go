//go:build !amd64 || purego

package kernels

func matMulScratchSIMD(cols int) int { return 0 }

func dpAvailable(*Matrix) bool { return false }

func matMulDPRows(y []float32, w *Matrix, xb []uint16, n, lo, hi int, scratch []float32) {
	panic("kernels: no VDPBF16PS path in this build")
}

func roundBF16(dst []uint16, src []float32) {
	for i, v := range src {
		dst[i] = F32ToBF16(v)
	}
}
