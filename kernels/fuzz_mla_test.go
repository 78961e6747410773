package kernels

import (
	"math"
	"testing"
)

// FuzzMLADecode: every SIMD level (with both value kernels and both score
// kernels) against the plain path on fuzzer-chosen head counts, latent and
// rope widths, block sizes, context lengths and values.
func FuzzMLADecode(f *testing.F) {
	f.Add(uint8(16), uint8(4), uint8(1), uint8(16), uint16(129), []byte{1, 2, 3})
	f.Add(uint8(3), uint8(1), uint8(0), uint8(5), uint16(11), []byte{0x80})
	f.Add(uint8(9), uint8(6), uint8(2), uint8(1), uint16(300), []byte{7, 9, 200, 13})
	f.Fuzz(func(t *testing.T, heads, r16, p16, bs uint8, tokens uint16, seed []byte) {
		H := int(heads%24) + 1
		R := (int(r16%8) + 1) * 16 // 16..128: multiples of 32 take the register-output kernel
		P := int(p16%3) * 16
		if p16%5 == 4 {
			P = 6 // not a multiple of 16: the plain path
		}
		B := int(bs%64) + 1
		nt := int(tokens % 400)
		stride := R + P
		blocks := make([][]float32, (nt+B-1)/B)
		for b := range blocks {
			blocks[b] = make([]float32, B*stride)
			for i := range blocks[b] {
				blocks[b][i] = float32(int(seed0(seed, b*B*stride+i))-128) / 128
			}
		}
		qLat, qPE := make([]float32, H*R), make([]float32, H*P)
		for i := range qLat {
			qLat[i] = float32(int(seed0(seed, 3*i+1))-128) / 64
		}
		for i := range qPE {
			qPE[i] = float32(int(seed0(seed, 5*i+2))-128) / 64
		}
		scale := float32(1 / math.Sqrt(float64(stride)))
		p := NewPool(2)
		defer p.Close()
		run := func() []float32 {
			out := make([]float32, H*R)
			p.MLADecode(out, qLat, qPE, blocks, B, nt, H, R, P, scale, make([]float32, MLAScratchSize(H, nt)))
			return out
		}
		var want []float32
		withISA(t, ISAGeneric, func() { want = run() })
		defer func() { mlaOutInRegisters, mlaScoresInPairs = true, true }()
		for _, isa := range isas()[1:] {
			for _, newKernels := range []bool{true, false} {
				mlaOutInRegisters, mlaScoresInPairs = newKernels, newKernels
				withISA(t, isa, func() {
					got := run()
					for i := range got {
						// Outputs are convex combinations of cache values in
						// [-1, 1]: an absolute bound is the right one.
						if math.Abs(float64(got[i]-want[i])) > 2e-5 {
							t.Fatalf("%s new=%v H=%d R=%d P=%d B=%d nt=%d: out[%d]=%g, plain %g", isa, newKernels, H, R, P, B, nt, i, got[i], want[i])
						}
					}
				})
			}
		}
	})
}

// FuzzMLAChunks: MLAChunks at every SIMD level against its plain path, and
// the plain path against MLADecode per query (bit for bit), on
// fuzzer-chosen head counts, latent and rope widths, block sizes, chunk
// starts and lengths, and values.
func FuzzMLAChunks(f *testing.F) {
	f.Add(uint8(16), uint8(3), uint8(1), uint8(16), uint16(0), uint8(37), []byte{1, 2, 3})
	f.Add(uint8(3), uint8(1), uint8(0), uint8(5), uint16(11), uint8(1), []byte{0x80})
	f.Add(uint8(9), uint8(7), uint8(2), uint8(1), uint16(300), uint8(25), []byte{7, 9, 200, 13})
	f.Fuzz(func(t *testing.T, heads, r16, p16, bs uint8, start uint16, nq uint8, seed []byte) {
		H := int(heads%24) + 1
		R := (int(r16%8) + 1) * 16 // 16..128: multiples of 64 take the AVX-512 kernels
		P := int(p16%3) * 16
		if p16%5 == 4 {
			P = 6 // not a multiple of 16: the plain path
		}
		B := int(bs%64) + 1
		st, n := int(start%300), int(nq%64)
		stride := R + P
		blocks := make([][]float32, ceilDiv(st+n, B))
		for b := range blocks {
			blocks[b] = make([]float32, B*stride)
			for i := range blocks[b] {
				blocks[b][i] = float32(int(seed0(seed, b*B*stride+i))-128) / 128
			}
		}
		qLat, qPE := make([]float32, n*H*R), make([]float32, n*H*P)
		for i := range qLat {
			qLat[i] = float32(int(seed0(seed, 3*i+1))-128) / 64
		}
		for i := range qPE {
			qPE[i] = float32(int(seed0(seed, 5*i+2))-128) / 64
		}
		scale := float32(1 / math.Sqrt(float64(stride)))
		p := NewPool(2)
		defer p.Close()
		run := func() []float32 {
			out := make([]float32, n*H*R)
			p.MLAChunks([]MLAChunk{{Out: out, QLat: qLat, QPE: qPE, Blocks: blocks, Start: st, NQ: n,
				Scratch: make([]float32, MLAChunkScratchSize(H, st, n))}}, B, H, R, P, scale)
			return out
		}
		var want []float32
		withISA(t, ISAGeneric, func() {
			want = run()
			for q := 0; q < n; q++ {
				nt := st + q + 1
				one := make([]float32, H*R)
				p.MLADecode(one, qLat[q*H*R:], qPE[q*H*P:], blocks, B, nt, H, R, P, scale, make([]float32, MLAScratchSize(H, nt)))
				for i, v := range one {
					if w := want[q*H*R+i]; v != w {
						t.Fatalf("plain H=%d R=%d P=%d B=%d start=%d query %d: out[%d]=%g, MLADecode %g", H, R, P, B, st, q, i, w, v)
					}
				}
			}
		})
		for _, isa := range isas()[1:] {
			withISA(t, isa, func() {
				got := run()
				for i := range got {
					// Convex combinations of cache values in [-1, 1]:
					// FuzzMLADecode's bound.
					if math.Abs(float64(got[i]-want[i])) > 2e-5 {
						t.Fatalf("%s H=%d R=%d P=%d B=%d start=%d nq=%d: out[%d]=%g, plain %g", isa, H, R, P, B, st, n, i, got[i], want[i])
					}
				}
			})
		}
	})
}
