//go:build amd64 && !purego

package kernels

import "golang.org/x/sys/cpu"

// Generated in qact_amd64.s (kernels/_asm/qact.go documents the contract).

//go:noescape
func qdotQ8VNNI512(y *float32, w *byte, stride uintptr, xq *int8, xs *float32, xc *int32, nb int, rows int, s *float32, sstride uintptr)

//go:noescape
func qdotQ4VNNI512(y *float32, w *byte, stride uintptr, xq *int8, xs *float32, xc *int32, nb int, rows int, s *float32, sstride uintptr)

//go:noescape
func qdotQ8VNNIAVX2(y *float32, w *byte, stride uintptr, xq *int8, xs *float32, xc *int32, nb int, rows int, s *float32, sstride uintptr)

//go:noescape
func qdotQ4VNNIAVX2(y *float32, w *byte, stride uintptr, xq *int8, xs *float32, xc *int32, nb int, rows int, s *float32, sstride uintptr)

//go:noescape
func qdotQ8AVX2(y *float32, w *byte, stride uintptr, xq *int8, xs *float32, xc *int32, nb int, rows int, s *float32, sstride uintptr)

//go:noescape
func qdotQ4AVX2(y *float32, w *byte, stride uintptr, xq *int8, xs *float32, xc *int32, nb int, rows int, s *float32, sstride uintptr)

//go:noescape
func quantActAVX512(q *int8, d *float32, sum *int32, x *float32, nb int)

func quantSIMDBlocks(q []int8, d []float32, sum []int32, x []float32) {
	if len(d) == 0 {
		return
	}
	_ = q[len(d)*Q8Block-1]
	_ = x[len(d)*Q8Block-1]
	_ = sum[len(d)-1]
	quantActAVX512(&q[0], &d[0], &sum[0], &x[0], len(d))
}

type qdotAsm func(y *float32, w *byte, stride uintptr, xq *int8, xs *float32, xc *int32, nb int, rows int, s *float32, sstride uintptr)

// Which integer instructions the CPU has (variables so tests can take
// each path in turn: SetISA rebuilds the kernel table from them).
var (
	// qVNNI512: AVX512_VNNI (zmm VPDPBUSD) with BMI2 for the tail masks.
	qVNNI512 = cpu.X86.HasAVX512VNNI && cpu.X86.HasBMI2
	// qAVXVNNI: AVX-VNNI (VEX ymm VPDPBUSD, e.g. Alder Lake without
	// AVX-512); otherwise ymm kernels use VPMADDUBSW.
	qAVXVNNI = cpu.X86.HasAVXVNNI
)

// Layouts: must match kernels/_asm/qact.go's perm and offsets. Q8 VNNI
// kernels feed w XOR 0x80 (w+128) as the unsigned operand, so they
// subtract 128·Σq; Q4 kernels feed the unsigned nibble (w+8) and subtract
// 8·Σq; the VPMADDUBSW Q8 kernel moves w's sign onto x and needs no offset.
var (
	qlayVNNI512 = [2]*qLayout{
		newLayout(16, []int{0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15}, 1, 128),
		newLayout(16, []int{0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15}, 4, 8),
	}
	qdotVNNI512 = [2]qdotFunc{qdotWith(qdotQ8VNNI512), qdotWith(qdotQ4VNNI512)}

	qlayQ8Y     = newLayout(8, []int{0, 1, 2, 3, 4, 5, 6, 7}, 1, 128)
	qlayQ8YSign = newLayout(8, []int{0, 1, 2, 3, 4, 5, 6, 7}, 1, 0)
	qlayQ4Y     = newLayout(8, []int{0, 2, 4, 6, 1, 3, 5, 7}, 2, 8)
	qdotQ8VNNIY = qdotWith(qdotQ8VNNIAVX2)
	qdotQ4VNNIY = qdotWith(qdotQ4VNNIAVX2)
	qdotQ8SignY = qdotWith(qdotQ8AVX2)
	qdotQ4MaddY = qdotWith(qdotQ4AVX2)
)

// qdotYMM is the ymm kernels for this CPU.
func qdotYMM() ([2]qdotFunc, [2]*qLayout) {
	if qAVXVNNI {
		return [2]qdotFunc{qdotQ8VNNIY, qdotQ4VNNIY}, [2]*qLayout{qlayQ8Y, qlayQ4Y}
	}
	return [2]qdotFunc{qdotQ8SignY, qdotQ4MaddY}, [2]*qLayout{qlayQ8YSign, qlayQ4Y}
}

func qdotWith(f qdotAsm) qdotFunc {
	return func(y []float32, w *Matrix, a *actQ8, i, lo, hi int) {
		if lo >= hi {
			return
		}
		nb := w.Cols / Q8Block
		rb := w.rowBytes()
		_ = y[hi-1]
		_ = w.Scales[hi*nb-1]
		_ = a.c[(i+1)*a.rowS-1]
		f(&y[lo], &w.Data[lo*rb], uintptr(rb), &a.q[i*a.rowQ], &a.s[i*a.rowS], &a.c[i*a.rowS], nb, hi-lo, &w.Scales[lo*nb], uintptr(4*nb))
	}
}
