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
// length (the rest of its 6-query tile's range zeroed), then the weighted
// latent sum over that range in token tiles of mlaTile, as decode's kernel
// sums (the same order, so the same result for the same probabilities).
// Both passes go block by block of tokens (mlaScoreBlock for the scores,
// mlaTile for the sums) over all the unit's 6-query tiles, so a block's
// cache rows (1.2 MB and 295 KB at V2's 576 floats) are read from L2 by
// every 6 queries and from L3 or memory once per unit: at long contexts
// the rows do not fit in L2. Elsewhere the plain path.
func mlaChunkUnit(a *mlaArgs, h, q0, q1 int) {
	R, P, H, tc := a.r, a.pe, a.heads, a.sstride
	if impl.isa != ISAAVX512 || R%64 != 0 || P%16 != 0 {
		mlaChunkUnitGeneric(a, h, q0, q1)
		return
	}
	last := a.start + q1 // tokens the unit's last query sees
	for t0 := 0; t0 < last; t0 += mlaScoreBlock {
		for i0 := q0; i0 < q1; i0 += mlaChunkMaxM {
			m := min(mlaChunkMaxM, q1-i0)
			T := a.start + i0 + m // tokens the tile's last query sees
			if t0 >= T {
				continue
			}
			qp := &a.qLat[0] // not read when P == 0
			if P > 0 {
				qp = &a.qPE[(i0*H+h)*P]
			}
			mlaScoreAVX512[m](&a.scratch[(h*a.nq+i0)*tc+t0], uintptr(4*tc), &a.qLat[(i0*H+h)*R], uintptr(4*H*R), qp, uintptr(4*H*P),
				&a.rows[t0], ceilDiv(min(T, t0+mlaScoreBlock)-t0, 4), R, P, a.scale)
		}
	}
	for i := q0; i < q1; i++ {
		n := a.start + i + 1
		T := a.start + min(q1, q0+(i-q0)/mlaChunkMaxM*mlaChunkMaxM+mlaChunkMaxM) // its tile's range
		s := a.scratch[(h*a.nq+i)*tc : (h*a.nq+i)*tc+T]
		Softmax(s[:n])
		clear(s[n:])
		clear(a.out[(i*H+h)*R : (i*H+h+1)*R])
	}
	for t0 := 0; t0 < last; t0 += mlaTile {
		for i0 := q0; i0 < q1; i0 += mlaChunkMaxM {
			m := min(mlaChunkMaxM, q1-i0)
			T := a.start + i0 + m
			if t0 >= T {
				continue
			}
			mlaPVAVX512[m](&a.out[(i0*H+h)*R], uintptr(4*H*R), &a.scratch[(h*a.nq+i0)*tc+t0], uintptr(4*tc), &a.rows[t0], min(mlaTile, T-t0), R)
		}
	}
}

// mlaScoreBlock is the tokens whose scores MLAChunks computes for all of
// a unit's queries before moving on: 512 rows of 576 floats (1.2 MB) stay
// in L2 while the queries q pass over them, and a chunk of at most 512
// tokens (q and its rows alike from L1 and L2) takes one block. With
// 128-token blocks a 512-token chunk ran about 3% slower (q reloaded from
// L2 per block), a chunk after 4032 cached tokens about as fast.
const mlaScoreBlock = 4 * mlaTile
