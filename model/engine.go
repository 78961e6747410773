package model

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/expertmesh/expertmesh/kernels"
)

// ErrBadInput marks a request the engine refuses: token ids outside the
// vocabulary, positions past max_position_embeddings, malformed batches.
var ErrBadInput = errors.New("bad input")

// ExpertBackend computes the routed-expert part of one MoE layer for a
// batch of rows: out[i] += Σ_j weights[i*k+j] · Expert_{ids[i*k+j]}(x[i]).
// The local backend runs the experts in-process; an attention node's
// backend dispatches rows to the expert nodes that hold them. Calls are
// stateless, so a backend may retry them.
//
// StartRoutedExperts begins the work and returns wait, which blocks until
// out is complete; the engine computes the shared experts in between, so a
// remote round trip overlaps local work. x, ids and weights must not change
// and out must not be read until wait returns.
type ExpertBackend interface {
	StartRoutedExperts(ctx context.Context, layer int, x []float32, n, k int, ids []int32, weights []float32, out []float32) (wait func() error)
}

// LoraNormEps is the epsilon of q_a_layernorm and kv_a_layernorm. HF
// builds both as DeepseekV2RMSNorm(rank) with the class default 1e-6,
// ignoring rms_norm_eps; only the hidden-size norms use the config's.
const LoraNormEps = 1e-6

// Row is one token of the batch a Forward call processes: the sequence it
// belongs to, its id and position. Rows of one sequence must come in
// increasing position order and be contiguous from the sequence's Len.
type Row struct {
	Seq    *Sequence
	Token  int
	Pos    int
	Logits bool // compute logits for this row
}

// Engine runs the fast forward pass: absorbed MLA against the paged latent
// cache, batched projections, routed experts through a backend. One caller
// at a time (it owns scratch buffers and a kernel pool).
type Engine struct {
	W       *Weights
	C       *Config
	Pool    *kernels.Pool
	Rope    *Rope
	Experts ExpertBackend

	scale float32
	buf   scratch
	// Trace, if set, receives each MoE layer's routing (tests and stats).
	Trace func(layer int, ids []int32, weights []float32, n, k int)
	// BF16Prefill rounds activations to BF16 in multi-row products
	// (prefill) so the kernels can use BF16 dot-product instructions. It
	// is an explicit precision trade, off by default: BF16 activations can
	// change which experts the router picks (the router itself always
	// stays float32).
	BF16Prefill bool
	// mlaChunkRows, if > 0, is the fewest consecutive rows of one
	// sequence that attention takes as a prefill chunk (MLAChunks); shorter
	// runs go one row at a time (MLADecodeMany). 0 means mlaChunkMinRows.
	// Tests compare the two paths with it.
	mlaChunkRows int
	// Compute, if set, is held while this engine computes and released
	// while it waits for routed experts, so engines of several
	// micro-batches sharing one kernel pool take turns: one computes
	// attention while another's experts are in flight (ping-pong). Local
	// experts compute in place, with nothing in flight, so single-row
	// decode on them keeps the lock through the layer.
	Compute sync.Locker
}

// NewEngine wires weights, a kernel pool and an expert backend. A nil
// backend means every routed expert is local (w must hold them all).
func NewEngine(w *Weights, pool *kernels.Pool, experts ExpertBackend) *Engine {
	e := &Engine{W: w, C: w.Config, Pool: pool, Rope: NewRope(w.Config), Experts: experts}
	e.scale = float32(w.Config.SoftmaxScale())
	if e.Experts == nil {
		e.Experts = NewLocalExperts(w, pool)
	}
	return e
}

// scratch holds every per-step buffer, grown to the largest batch seen so
// steady-state decode allocates nothing.
type scratch struct {
	rows                int
	x, hn               []float32
	qa, q, kva          []float32
	qLat, qPE, attnLat  []float32
	gatherIn, gatherOut []float32
	vcat, o             []float32
	mlpG, mlpU          []float32
	gateLogits          []float32
	ids                 []int32
	weights             []float32
	shared, routed      []float32
	cos, sin            []float32
	mla                 []float32
	routeIDs            []int
	router              []*Router
	headY, headX        [][]float32 // per-head views for MatVecMany
	prod                products    // grouped products of one pool call
	mlaRows             []kernels.MLARow
	mlaChunks           []kernels.MLAChunk
	allLogits           []float32
}

// grow returns b resized to n, reallocating with headroom so buffers that
// grow a little every step (attention scratch follows the context length)
// reallocate O(log n) times, not every step.
func grow(b []float32, n int) []float32 {
	if cap(b) < n {
		return make([]float32, n, max(n, 2*cap(b)))
	}
	return b[:n]
}

func (e *Engine) ensure(n, maxTokens int) {
	c := e.C
	s := &e.buf
	h, heads := c.HiddenSize, c.NumAttentionHeads
	s.x = grow(s.x, n*h)
	s.hn = grow(s.hn, n*h)
	if c.QLoraRank != nil {
		s.qa = grow(s.qa, n**c.QLoraRank)
	}
	s.q = grow(s.q, n*heads*c.QHeadDim())
	s.kva = grow(s.kva, n*c.LatentDim())
	s.qLat = grow(s.qLat, n*heads*c.KVLoraRank)
	s.qPE = grow(s.qPE, n*heads*c.QKRopeHeadDim)
	s.attnLat = grow(s.attnLat, n*heads*c.KVLoraRank)
	s.gatherIn = grow(s.gatherIn, n*heads*max(c.KVLoraRank, c.QKNopeHeadDim))
	s.gatherOut = grow(s.gatherOut, n*heads*max(c.KVLoraRank, c.VHeadDim))
	s.vcat = grow(s.vcat, n*heads*c.VHeadDim)
	s.o = grow(s.o, n*h)
	inter := max(c.IntermediateSize, c.MoEIntermediateSize*max(c.SharedExperts(), 1))
	s.mlpG = grow(s.mlpG, n*inter)
	s.mlpU = grow(s.mlpU, n*inter)
	if c.HasMoE() {
		s.gateLogits = grow(s.gateLogits, n*c.NumExperts())
		if cap(s.ids) < n*c.TopK() {
			s.ids = make([]int32, n*c.TopK())
		}
		s.ids = s.ids[:n*c.TopK()]
		s.weights = grow(s.weights, n*c.TopK())
		if len(s.routeIDs) != c.TopK() {
			s.routeIDs = make([]int, c.TopK())
		}
		if s.router == nil {
			s.router = make([]*Router, c.NumHiddenLayers)
		}
	}
	s.shared = grow(s.shared, n*h)
	s.routed = grow(s.routed, n*h)
	s.cos = grow(s.cos, c.QKRopeHeadDim/2)
	s.sin = grow(s.sin, c.QKRopeHeadDim/2)
	// A chunk's score rows are padded to a multiple of 4 tokens.
	s.mla = grow(s.mla, n*kernels.MLAScratchSize(heads, maxTokens+3))
	if cap(s.mlaRows) < n {
		s.mlaRows = make([]kernels.MLARow, n)
		s.mlaChunks = make([]kernels.MLAChunk, n)
	}
	if len(s.headY) != heads {
		s.headY, s.headX = make([][]float32, heads), make([][]float32, heads)
	}
	s.rows = n
}

// Forward runs rows through the model, writing their latents into their
// sequences' caches, and fills logits[i] (len vocab) for every row with
// Logits set, in row order. Sequences must have cache room reserved.
func (e *Engine) Forward(ctx context.Context, rows []Row, logits [][]float32) error {
	c := e.C
	n := len(rows)
	if n == 0 {
		return nil
	}
	maxTok := 0
	for _, r := range rows {
		if r.Token < 0 || r.Token >= c.VocabSize {
			return fmt.Errorf("%w: token id %d outside vocabulary [0,%d)", ErrBadInput, r.Token, c.VocabSize)
		}
		if r.Pos < 0 || r.Pos >= c.MaxPositionEmbeddings {
			return fmt.Errorf("%w: position %d outside [0,%d)", ErrBadInput, r.Pos, c.MaxPositionEmbeddings)
		}
		if r.Pos >= len(r.Seq.blocks)*r.Seq.cache.blockSize {
			return fmt.Errorf("%w: position %d has no reserved cache block", ErrBadInput, r.Pos)
		}
		maxTok = max(maxTok, r.Pos+1)
	}
	if e.Compute != nil {
		e.Compute.Lock()
		defer e.Compute.Unlock()
	}
	e.ensure(n, maxTok)
	s := &e.buf
	h := c.HiddenSize
	for i, r := range rows {
		e.W.Embed.RowF32(s.x[i*h:(i+1)*h], r.Token)
	}
	for l := range e.W.Layers {
		if err := ctx.Err(); err != nil {
			return err
		}
		e.attention(l, rows)
		if err := e.ffn(ctx, l, n); err != nil {
			return err
		}
	}
	for _, r := range rows {
		if r.Pos+1 > r.Seq.Len {
			r.Seq.Len = r.Pos + 1
		}
	}
	return e.logits(rows, logits)
}

func (e *Engine) logits(rows []Row, out [][]float32) error {
	c := e.C
	h := c.HiddenSize
	s := &e.buf
	// Gather the rows that want logits so lm_head streams once for all.
	m := 0
	for i, r := range rows {
		if !r.Logits {
			continue
		}
		kernels.RMSNorm(s.hn[m*h:(m+1)*h], s.x[i*h:(i+1)*h], e.W.Norm, float32(c.RMSNormEps))
		m++
	}
	if m == 0 {
		return nil
	}
	if len(out) < m {
		return fmt.Errorf("%w: %d rows want logits, %d buffers given", ErrBadInput, m, len(out))
	}
	v := c.VocabSize
	if m == 1 {
		e.Pool.MatVec(out[0][:v], e.W.LMHead, s.hn[:h])
		return nil
	}
	// Several rows (echo or batched decode): one pass over lm_head, into
	// a buffer kept across steps (32 rows of a 102400 vocab is 13 MB).
	s.allLogits = grow(s.allLogits, m*v)
	all := s.allLogits
	e.Pool.MatMul(all, e.W.LMHead, s.hn[:m*h], m)
	for j := range m {
		copy(out[j][:v], all[j*v:(j+1)*v])
	}
	return nil
}

// attention runs the MLA half of layer l: norm, projections, latent cache
// write, absorbed attention, output projection, residual add.
func (e *Engine) attention(l int, rows []Row) {
	c := e.C
	s := &e.buf
	L := &e.W.Layers[l]
	a := &L.Attn
	n := len(rows)
	h, heads := c.HiddenSize, c.NumAttentionHeads
	R, P, dn, dv, qhd := c.KVLoraRank, c.QKRopeHeadDim, c.QKNopeHeadDim, c.VHeadDim, c.QHeadDim()
	eps := float32(c.RMSNormEps)

	for i := range n {
		kernels.RMSNorm(s.hn[i*h:(i+1)*h], s.x[i*h:(i+1)*h], L.InputNorm, eps)
	}
	// The query's first projection and kv_a read the same input: one
	// pool call for both in decode.
	q := s.q[:n*heads*qhd]
	W := c.LatentDim()
	qy, qw := q, a.QProj
	if a.QProj == nil {
		qy, qw = s.qa[:n**c.QLoraRank], a.QA
	}
	e.sameInput(n, s.hn[:n*h], qy, qw, s.kva[:n*W], a.KVA)
	if a.QProj == nil {
		qr := *c.QLoraRank
		for i := range n {
			row := s.qa[i*qr : (i+1)*qr]
			kernels.RMSNorm(row, row, a.QANorm, LoraNormEps)
		}
		e.matmul(q, a.QB, s.qa[:n*qr], n)
	}

	// Cache write: normalised latent, rotated shared rope key. Queries'
	// rope parts are rotated with the same tables.
	for i, r := range rows {
		e.Rope.CosSin(s.cos, s.sin, r.Pos)
		slot := r.Seq.Slot(l, r.Pos)
		kv := s.kva[i*W : (i+1)*W]
		kernels.RMSNorm(slot[:R], kv[:R], a.KVANorm, LoraNormEps)
		copy(slot[R:], kv[R:])
		kernels.RoPEInterleaved(slot[R:], s.cos, s.sin)
		for hd := range heads {
			pe := s.qPE[(i*heads+hd)*P : (i*heads+hd+1)*P]
			copy(pe, q[(i*heads+hd)*qhd+dn:(i*heads+hd+1)*qhd])
			kernels.RoPEInterleaved(pe, s.cos, s.sin)
		}
	}

	// Absorb W_UK into the query: qLat[h] = W_UK[h]^T q_nope[h]. One row
	// (decode) runs every head's small product in one pool call.
	e.headProducts(a.UKT, n,
		func(i, hd int) []float32 { return q[(i*heads+hd)*qhd : (i*heads+hd)*qhd+dn] },
		func(i, hd int) []float32 { return s.qLat[(i*heads+hd)*R : (i*heads+hd+1)*R] })
	// Attention straight against the latent cache: the prefill chunks
	// (runs of one sequence's consecutive positions) in one pool call,
	// which shares each page load among a chunk's queries; the other rows
	// (decode, many sequences) in another.
	mr, mc := s.mlaRows[:0], s.mlaChunks[:0]
	off := 0
	for i := 0; i < n; {
		r := rows[i]
		j := i + 1
		for j < n && rows[j].Seq == r.Seq && rows[j].Pos == rows[j-1].Pos+1 {
			j++
		}
		if j-i < e.mlaChunkMin() {
			j = i + 1
			sz := kernels.MLAScratchSize(heads, r.Pos+1)
			mr = append(mr, kernels.MLARow{Out: s.attnLat[i*heads*R : (i+1)*heads*R], QLat: s.qLat[i*heads*R : (i+1)*heads*R],
				QPE: s.qPE[i*heads*P : (i+1)*heads*P], Blocks: r.Seq.LayerBlocks(l), NTokens: r.Pos + 1, Scratch: s.mla[off : off+sz]})
			off += sz
		} else {
			sz := kernels.MLAChunkScratchSize(heads, r.Pos, j-i)
			mc = append(mc, kernels.MLAChunk{Out: s.attnLat[i*heads*R : j*heads*R], QLat: s.qLat[i*heads*R : j*heads*R],
				QPE: s.qPE[i*heads*P : j*heads*P], Blocks: r.Seq.LayerBlocks(l), Start: r.Pos, NQ: j - i, Scratch: s.mla[off : off+sz]})
			off += sz
		}
		i = j
	}
	bs := rows[0].Seq.cache.blockSize
	if len(mc) > 0 {
		e.Pool.MLAChunks(mc, bs, heads, R, P, e.scale)
	}
	if len(mr) > 0 {
		e.Pool.MLADecodeMany(mr, bs, heads, R, P, e.scale)
	}
	clear(mr) // drop references to the sequences
	clear(mc)
	// Fold W_UV into the output: v[h] = W_UV[h] · attnLat[h].
	e.headProducts(a.UV, n,
		func(i, hd int) []float32 { return s.attnLat[(i*heads+hd)*R : (i*heads+hd+1)*R] },
		func(i, hd int) []float32 { return s.vcat[(i*heads+hd)*dv : (i*heads+hd+1)*dv] })
	e.matmul(s.o[:n*h], a.O, s.vcat[:n*heads*dv], n)
	kernels.Add(s.x[:n*h], s.x[:n*h], s.o[:n*h])
}

// mlaChunkMinRows: below 16 queries MLADecodeMany, whose kernel shares
// each cache row among 8 heads of a query, is as fast or faster than
// MLAChunks, which shares it among up to 6 queries of a head.
// BenchmarkMLAChunk after ~500 cached tokens, MLADecodeMany/MLAChunks
// time, medians of 5 alternated rounds at load 3.8-4.5, 1 and 2 threads:
// 2 queries 0.67, 0.69; 8: 0.98, 1.01; 16: 1.13, 1.18; 32: 1.09, 1.39;
// 64: 1.20, 1.19.
const mlaChunkMinRows = 16

func (e *Engine) mlaChunkMin() int {
	if e.mlaChunkRows > 0 {
		return e.mlaChunkRows
	}
	return mlaChunkMinRows
}

// headProducts computes out(i, h) = ws[h]·in(i, h) for every row i and
// head h: one MatVecMany over all heads for a single row (decode), one
// MatMulMany over all heads' gathered rows for several, or (BF16
// activations) one matrix product per head.
func (e *Engine) headProducts(ws []*kernels.Matrix, n int, in, out func(i, hd int) []float32) {
	s := &e.buf
	if n == 1 {
		for hd := range ws {
			s.headX[hd], s.headY[hd] = in(0, hd), out(0, hd)
		}
		e.Pool.MatVecMany(s.headY, ws, s.headX)
		return
	}
	if !e.BF16Prefill {
		io, oo := 0, 0
		for hd, w := range ws {
			gi, gout := s.gatherIn[io:io+n*w.Cols], s.gatherOut[oo:oo+n*w.Rows]
			for i := range n {
				copy(gi[i*w.Cols:(i+1)*w.Cols], in(i, hd))
			}
			s.prod.addN(gout, w, gi, n)
			io, oo = io+n*w.Cols, oo+n*w.Rows
		}
		s.prod.run(e.Pool)
		oo = 0
		for hd, w := range ws {
			for i := range n {
				copy(out(i, hd), s.gatherOut[oo+i*w.Rows:oo+(i+1)*w.Rows])
			}
			oo += n * w.Rows
		}
		return
	}
	for hd, w := range ws {
		for i := range n {
			copy(s.gatherIn[i*w.Cols:(i+1)*w.Cols], in(i, hd))
		}
		e.matmul(s.gatherOut[:n*w.Rows], w, s.gatherIn[:n*w.Cols], n)
		for i := range n {
			copy(out(i, hd), s.gatherOut[i*w.Rows:(i+1)*w.Rows])
		}
	}
}

// ffn runs the feed-forward half of layer l and adds it to the residual.
func (e *Engine) ffn(ctx context.Context, l, n int) error {
	c := e.C
	s := &e.buf
	L := &e.W.Layers[l]
	h := c.HiddenSize
	for i := range n {
		kernels.RMSNorm(s.hn[i*h:(i+1)*h], s.x[i*h:(i+1)*h], L.PostNorm, float32(c.RMSNormEps))
	}
	if L.Dense != nil {
		e.mlp(s.o[:n*h], L.Dense, s.hn[:n*h], n)
		kernels.Add(s.x[:n*h], s.x[:n*h], s.o[:n*h])
		return nil
	}
	m := L.MoE
	if local, ok := e.Experts.(*ExpertRunner); ok && m.Shared != nil && !e.BF16Prefill && !local.BF16Act {
		return e.moeLocal(l, local, m, n)
	}
	E, k := c.NumExperts(), c.TopK()
	// The router decides routing: always the exact path.
	matmul(e.Pool, s.gateLogits[:n*E], m.Gate, s.hn[:n*h], n, false)
	e.route(l, n)
	clear(s.routed[:n*h])
	wait := e.Experts.StartRoutedExperts(ctx, l, s.hn[:n*h], n, k, s.ids[:n*k], s.weights[:n*k], s.routed[:n*h])
	// Shared experts run while the routed ones are in flight.
	if m.Shared != nil {
		e.mlp(s.shared[:n*h], m.Shared, s.hn[:n*h], n)
	}
	if e.Compute != nil {
		e.Compute.Unlock()
	}
	err := wait()
	if e.Compute != nil {
		e.Compute.Lock()
	}
	if err != nil {
		return fmt.Errorf("layer %d routed experts: %w", l, err)
	}
	// HF: y = Σ routed + shared(x); then residual + y.
	if m.Shared != nil {
		kernels.Add(s.routed[:n*h], s.routed[:n*h], s.shared[:n*h])
	}
	kernels.Add(s.x[:n*h], s.x[:n*h], s.routed[:n*h])
	return nil
}

// route turns the n rows' router logits into their experts and weights.
func (e *Engine) route(l, n int) {
	c, s := e.C, &e.buf
	E, k := c.NumExperts(), c.TopK()
	if s.router[l] == nil {
		s.router[l] = NewRouter(c, e.W.Layers[l].MoE.Bias)
	}
	for i := range n {
		s.router[l].Route(s.gateLogits[i*E:(i+1)*E], s.routeIDs, s.weights[i*k:(i+1)*k])
		for j, id := range s.routeIDs {
			s.ids[i*k+j] = int32(id)
		}
	}
	if e.Trace != nil {
		e.Trace(l, s.ids[:n*k], s.weights[:n*k], n, k)
	}
}

// moeLocal is the MoE half of layer l for n rows on local experts, in
// three pool calls whatever the batch: the router with the shared
// expert's gate and up, then every routed expert's gate and up (all their
// rows) with the shared expert's down, then the routed experts' down. (A
// remote backend instead overlaps the whole shared expert with its round
// trip.)
func (e *Engine) moeLocal(l int, local *ExpertRunner, m *MoE, n int) error {
	c, s := e.C, &e.buf
	h, E, k := c.HiddenSize, c.NumExperts(), c.TopK()
	inter := m.Shared.Gate.Rows
	g, u, hn := s.mlpG[:n*inter], s.mlpU[:n*inter], s.hn[:n*h]
	s.prod.addN(s.gateLogits[:n*E], m.Gate, hn, n) // the router: exact path, as always
	s.prod.addN(g, m.Shared.Gate, hn, n)
	s.prod.addN(u, m.Shared.Up, hn, n)
	s.prod.run(e.Pool)
	e.route(l, n)
	kernels.SiLUMul(g, g, u)
	clear(s.routed[:n*h])
	if err := local.runAlongside(l, hn, n, k, s.ids[:n*k], s.weights[:n*k], s.routed[:n*h], product{s.shared[:n*h], m.Shared.Down, g, n}); err != nil {
		return fmt.Errorf("layer %d routed experts: %w", l, err)
	}
	// HF: y = Σ routed + shared(x); then residual + y.
	kernels.Add(s.routed[:n*h], s.routed[:n*h], s.shared[:n*h])
	kernels.Add(s.x[:n*h], s.x[:n*h], s.routed[:n*h])
	return nil
}

// mlp computes out = down(silu(gate(x)) * up(x)) for n rows.
func (e *Engine) mlp(out []float32, m *MLP, x []float32, n int) {
	inter := m.Gate.Rows
	g, u := e.buf.mlpG[:n*inter], e.buf.mlpU[:n*inter]
	e.sameInput(n, x, g, m.Gate, u, m.Up)
	kernels.SiLUMul(g, g, u)
	e.matmul(out, m.Down, g, n)
}

// sameInput computes y1 = w1·x and y2 = w2·x for n rows of x in one pool
// call (two matrix products with BF16 activations).
func (e *Engine) sameInput(n int, x, y1 []float32, w1 *kernels.Matrix, y2 []float32, w2 *kernels.Matrix) {
	if n != 1 && e.BF16Prefill {
		e.matmul(y1, w1, x, n)
		e.matmul(y2, w2, x, n)
		return
	}
	s := &e.buf
	s.prod.addN(y1, w1, x, n)
	s.prod.addN(y2, w2, x, n)
	s.prod.run(e.Pool)
}

func (e *Engine) matmul(y []float32, w *kernels.Matrix, x []float32, n int) {
	matmul(e.Pool, y, w, x, n, e.BF16Prefill)
}

// matmul picks the kernel for n rows: matrix-vector for one row, BF16
// activations for several when allowed and the weights are BF16.
func matmul(p *kernels.Pool, y []float32, w *kernels.Matrix, x []float32, n int, bf16Act bool) {
	switch {
	case n == 1:
		p.MatVec(y, w, x)
	case bf16Act && w.DType == kernels.BF16:
		p.MatMulBF16Act(y, w, x, n)
	default:
		p.MatMul(y, w, x, n)
	}
}
