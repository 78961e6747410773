package kernels

import (
	"math/rand/v2"
	"testing"
)

// TestWeightBytes: every product counts its weight matrices once per call,
// whatever path it takes, and nothing else counts.
func TestWeightBytes(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	p := NewPool(2)
	defer p.Close()
	a := randMatrix(rng, BF16, 96, 64, 0)
	b := randMatrix(rng, F32, 40, 96, 0)
	down := randMatrix(rng, BF16, 64, 96, 0)
	up := randMatrix(rng, BF16, 96, 64, 0)
	x := make([]float32, 64*48)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	ya := make([]float32, 96*48)
	yb := make([]float32, 40)
	q, err := QuantizeQ8(a)
	if err != nil {
		t.Fatal(err)
	}
	sizeA, sizeB, sizeQ := uint64(len(a.Data)), uint64(len(b.Data)), uint64(len(q.Data)+4*len(q.Scales))
	ffn := uint64(len(a.Data) + len(up.Data) + len(down.Data))
	steps := []struct {
		name string
		run  func()
		adds uint64
	}{
		{"MatVec", func() { p.MatVec(ya[:96], a, x[:64]) }, sizeA},
		{"MatVec Q8 (data and scales)", func() { p.MatVec(ya[:96], q, x[:64]) }, sizeQ},
		{"MatVecMany", func() { p.MatVecMany([][]float32{ya[:96], yb}, []*Matrix{a, b}, [][]float32{x[:64], x[64:160]}) }, sizeA + sizeB},
		{"MatMul n=48", func() { p.MatMul(ya, a, x, 48) }, sizeA},
		{"MatMul n=0", func() { p.MatMul(nil, a, nil, 0) }, 0},
		{"MatMulBF16Act n=48", func() { p.MatMulBF16Act(ya, a, x, 48) }, sizeA},
		{"ExpertFFN n=3", func() {
			out := make([]float32, 3*64)
			p.ExpertFFN(out, x[:3*64], 3, a, up, down, make([]float32, FFNScratchSize(3, 96)))
		}, ffn},
		{"ParallelFor", func() { p.ParallelFor(10, func(int, int) {}) }, 0},
	}
	for _, isa := range isas() {
		withISA(t, isa, func() {
			for _, s := range steps {
				before := p.WeightBytes()
				s.run()
				if got := p.WeightBytes() - before; got != s.adds {
					t.Errorf("%v %s: counted %d bytes, want %d", isa, s.name, got, s.adds)
				}
			}
		})
	}
}

func TestReadBandwidth(t *testing.T) {
	p := NewPool(2)
	defer p.Close()
	if bw := p.ReadBandwidth(make([]byte, 1<<20), 2); bw <= 0 {
		t.Fatalf("ReadBandwidth = %g", bw)
	}
	if bw := p.ReadBandwidth(make([]byte, 100), 2); bw != 0 {
		t.Fatalf("ReadBandwidth of a buffer smaller than a share = %g, want 0", bw)
	}
}
