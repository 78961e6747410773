//go:build amd64 && !purego

package kernels

// Generated in mla_amd64.s (kernels/_asm/mla.go): the micro-kernels of
// MLAChunks for m = 1..6 queries of one head.

//go:noescape
func mlaScore1AVX512(s *float32, sstride uintptr, ql *float32, qlstride uintptr, qp *float32, qpstride uintptr, rows **float32, groups int, r int, p int, scale float32)

//go:noescape
func mlaScore2AVX512(s *float32, sstride uintptr, ql *float32, qlstride uintptr, qp *float32, qpstride uintptr, rows **float32, groups int, r int, p int, scale float32)

//go:noescape
func mlaScore3AVX512(s *float32, sstride uintptr, ql *float32, qlstride uintptr, qp *float32, qpstride uintptr, rows **float32, groups int, r int, p int, scale float32)

//go:noescape
func mlaScore4AVX512(s *float32, sstride uintptr, ql *float32, qlstride uintptr, qp *float32, qpstride uintptr, rows **float32, groups int, r int, p int, scale float32)

//go:noescape
func mlaScore5AVX512(s *float32, sstride uintptr, ql *float32, qlstride uintptr, qp *float32, qpstride uintptr, rows **float32, groups int, r int, p int, scale float32)

//go:noescape
func mlaScore6AVX512(s *float32, sstride uintptr, ql *float32, qlstride uintptr, qp *float32, qpstride uintptr, rows **float32, groups int, r int, p int, scale float32)

//go:noescape
func mlaPV1AVX512(out *float32, ostride uintptr, s *float32, sstride uintptr, rows **float32, nt int, r int)

//go:noescape
func mlaPV2AVX512(out *float32, ostride uintptr, s *float32, sstride uintptr, rows **float32, nt int, r int)

//go:noescape
func mlaPV3AVX512(out *float32, ostride uintptr, s *float32, sstride uintptr, rows **float32, nt int, r int)

//go:noescape
func mlaPV4AVX512(out *float32, ostride uintptr, s *float32, sstride uintptr, rows **float32, nt int, r int)

//go:noescape
func mlaPV5AVX512(out *float32, ostride uintptr, s *float32, sstride uintptr, rows **float32, nt int, r int)

//go:noescape
func mlaPV6AVX512(out *float32, ostride uintptr, s *float32, sstride uintptr, rows **float32, nt int, r int)

// mlaChunkMaxM is the most queries one micro-kernel call takes.
const mlaChunkMaxM = 6

var mlaScoreAVX512 = [mlaChunkMaxM + 1]func(s *float32, sstride uintptr, ql *float32, qlstride uintptr, qp *float32, qpstride uintptr, rows **float32, groups int, r int, p int, scale float32){
	nil, mlaScore1AVX512, mlaScore2AVX512, mlaScore3AVX512, mlaScore4AVX512, mlaScore5AVX512, mlaScore6AVX512,
}

var mlaPVAVX512 = [mlaChunkMaxM + 1]func(out *float32, ostride uintptr, s *float32, sstride uintptr, rows **float32, nt int, r int){
	nil, mlaPV1AVX512, mlaPV2AVX512, mlaPV3AVX512, mlaPV4AVX512, mlaPV5AVX512, mlaPV6AVX512,
}

// mlaChunkUnit computes queries [q0,q1) of head h of an MLAChunks chunk:
// on AVX-512 (R a multiple of 64, P of 16) six queries at a time, scores
// for groups of four cache rows, softmax per query over its own causal
// length (the rest of the tile's range zeroed), then the weighted latent
// sum over the tile's range in token tiles of mlaTile, as decode's
// kernel sums (the same order, so the same result for the same
// probabilities). Elsewhere the plain path.
func mlaChunkUnit(a *mlaArgs, h, q0, q1 int) {
	R, P, H, tc := a.r, a.pe, a.heads, a.sstride
	if impl.isa != ISAAVX512 || R%64 != 0 || P%16 != 0 {
		mlaChunkUnitGeneric(a, h, q0, q1)
		return
	}
	for i0 := q0; i0 < q1; i0 += mlaChunkMaxM {
		m := min(mlaChunkMaxM, q1-i0)
		T := a.start + i0 + m // tokens the tile's last query sees
		s := a.scratch[(h*a.nq+i0)*tc : (h*a.nq+i0+m)*tc]
		qp := &a.qLat[0] // not read when P == 0
		if P > 0 {
			qp = &a.qPE[(i0*H+h)*P]
		}
		mlaScoreAVX512[m](&s[0], uintptr(4*tc), &a.qLat[(i0*H+h)*R], uintptr(4*H*R), qp, uintptr(4*H*P),
			&a.rows[0], ceilDiv(T, 4), R, P, a.scale)
		for i := 0; i < m; i++ {
			n := a.start + i0 + i + 1
			Softmax(s[i*tc : i*tc+n])
			clear(s[i*tc+n : i*tc+T])
			clear(a.out[((i0+i)*H+h)*R : ((i0+i)*H+h+1)*R])
		}
		for t0 := 0; t0 < T; t0 += mlaTile {
			mlaPVAVX512[m](&a.out[(i0*H+h)*R], uintptr(4*H*R), &s[t0], uintptr(4*tc), &a.rows[t0], min(mlaTile, T-t0), R)
		}
	}
}
