package kernels

import "fmt"

// ISA names an instruction-set level of the kernels.
type ISA uint8

// Levels, in increasing order of capability.
const (
	ISAGeneric ISA = iota // plain Go
	ISAAVX2               // AVX2 + FMA
	ISAAVX512             // AVX-512 F/BW/VL (+ AVX512_BF16 for MatMulBF16Act where present)
)

func (i ISA) String() string {
	switch i {
	case ISAGeneric:
		return "generic"
	case ISAAVX2:
		return "avx2"
	case ISAAVX512:
		return "avx512"
	}
	return fmt.Sprintf("ISA(%d)", uint8(i))
}

// kernelSet is the table of implementations in use.
type kernelSet struct {
	isa               ISA
	matVecRows        func(y []float32, w *Matrix, x []float32, lo, hi int, scratch []float32)
	matMulRows        func(y []float32, w *Matrix, x []float32, n, lo, hi int, scratch []float32)
	matMulBF16ActRows func(y []float32, w *Matrix, x []float32, n, lo, hi int, scratch []float32)
	dot               func(a, b []float32) float32
	axpy              func(y []float32, a float32, x []float32)
	scale             func(x []float32, a float32)
	add               func(dst, a, b []float32)
	sumSq             func(x []float32) float32
	mulScale          func(out, x, weight []float32, inv float32)
	siluMul           func(out, gate, up []float32)
	expSub            func(x []float32, m float32) float32
	max               func(x []float32) float32
	sigmoid           func(x []float32)
	rope              func(x, cos, sin []float32)
	mla               func(a *mlaArgs, h0, h1 int)
	// Integer-activation products, [0] Q8_0 weights, [1] Q4_0, with the
	// layout of x each wants.
	qdot      [2]qdotFunc
	qlay      [2]*qLayout
	quantSIMD bool // activations rounded by quantSIMDBlocks
}

var genericKernels = kernelSet{
	isa:               ISAGeneric,
	matVecRows:        matVecRowsGeneric,
	matMulRows:        matMulRowsGeneric,
	matMulBF16ActRows: matMulBF16ActRowsGeneric,
	dot:               dotGeneric,
	axpy:              axpyGeneric,
	scale:             scaleGeneric,
	add:               addGeneric,
	sumSq:             sumSqGeneric,
	mulScale:          mulScaleGeneric,
	siluMul:           siluMulGeneric,
	expSub:            expSubGeneric,
	max:               maxGeneric,
	sigmoid:           sigmoidGeneric,
	rope:              ropeGeneric,
	qdot:              [2]qdotFunc{qdotGeneric, qdotGeneric},
	qlay:              [2]*qLayout{genericLayout, genericLayout},
}

var impl kernelSet

func init() {
	// Set here, not in the literal: the generic MLA loop calls through impl,
	// which would make the initialisation cyclic.
	genericKernels.mla = mlaHeadsGeneric
	impl = kernelsFor(BestISA())
}

// ActiveISA is the level the kernels currently use.
func ActiveISA() ISA { return impl.isa }

// SetISA forces a level no higher than BestISA (a hook for tests and
// benchmarks that compare paths). It is not safe to call while kernels run.
func SetISA(isa ISA) error {
	if isa > BestISA() {
		return fmt.Errorf("kernels: ISA %s not supported by this CPU/build (best %s)", isa, BestISA())
	}
	impl = kernelsFor(isa)
	return nil
}

func matVecRows(y []float32, w *Matrix, x []float32, lo, hi int, scratch []float32) {
	impl.matVecRows(y, w, x, lo, hi, scratch)
}

func matMulRows(y []float32, w *Matrix, x []float32, n, lo, hi int, scratch []float32) {
	impl.matMulRows(y, w, x, n, lo, hi, scratch)
}

func matMulBF16ActRows(y []float32, w *Matrix, x []float32, n, lo, hi int, scratch []float32) {
	impl.matMulBF16ActRows(y, w, x, n, lo, hi, scratch)
}
