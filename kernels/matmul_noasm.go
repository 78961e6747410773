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

func dotFormAvailable(*Matrix, int, bool) bool { return false }

func matMulDotRows(y []float32, w *Matrix, n, lo, hi int, dp bool, xe []float32, x []float32, xb []uint16, kp2 int) {
	panic("kernels: no dot-form path in this build")
}

func permuteRows(xe, x []float32, cols, lo, hi int) {
	panic("kernels: no dot-form path in this build")
}
