package kernels

import (
	"fmt"
	"runtime"
	"slices"
	"sync/atomic"
	"unsafe"
)

// Pool is a persistent set of worker goroutines (threads-1 workers plus the
// calling goroutine). A call publishes one job, the threads run it (a
// contiguous share each for ParallelFor and MLADecode; claimed chunks of
// output rows for the matrix products, shrinking towards the end for the
// matrix-vector ones), and the call returns when all are done. Nothing is
// allocated and no goroutine is started per call in the steady state.
// Which thread computes a row never changes its value: results are
// bit-identical for any thread count.
//
// A Pool serves one caller at a time: its methods must not be called
// concurrently (give each concurrent caller its own Pool). Close stops the
// workers; the Pool must not be used afterwards.
//
// Workers spin briefly on the job counter before parking on a channel, so
// back-to-back calls (one per layer in decode) do not pay a scheduler
// wake-up each.
type Pool struct {
	threads int
	gen     atomic.Uint64 // incremented once per published job
	pending atomic.Int32  // worker shares of the current job not yet done
	next    atomic.Int64  // row jobs: next chunk to claim; guided jobs: next item
	closed  atomic.Bool
	workers []poolWorker
	job     job
	scratch [][]float32 // per thread (index 0 is the caller), grown on demand
	xb      []uint16    // MatMulBF16Act: x rounded to bf16, shared by all threads
	xr      []float32   // MatMulBF16Act: x rounded to bf16 as float32
	xe      []float32   // dot-form MatMul: x rows in even/odd order
	mlaQ    []float32   // MLADecode: concatenated queries, written per thread for its heads
	mlaRows []*float32  // MLADecode: each token's cache row
	// MatVec and MatVecMany: the end (exclusive) of each product's units
	// in the job's joint unit space, and one-product lists for MatVec.
	unitEnd []int
	oneW    [1]*Matrix
	oneY    [1][]float32
	oneX    [1][]float32
	// Integer-activation products: x rounded per layout (reused), and
	// for MatVecMany each product's entry in acts (-1: float product).
	acts    []actQ8
	actOf   []int
	actKeys []actKey
	actQ    []int8 // MatMulMany's rounded inputs, all of them
	actS    []float32
	actC    []int32
	mmAct   [2]actQ8 // MatMul's and ExpertFFN's rounded inputs
	// MatMulMany: each product's x in dot-form order (nil: not that path),
	// and the buffers behind them.
	xeOf  [][]float32
	xeBuf []float32
	// MLADecodeMany: per-row arguments and the rows' cache pointers.
	mlaArgs []mlaArgs
	// The split AMX path (amxsplit_amd64.go): each distinct input split
	// once per call (splits, from splitSrc, rows ending at splitEnd in the
	// joint row space of the split job), into one buffer kept across
	// calls; per row the largest |x| bits and the scale to undo. For
	// MatMulMany, each product's split (-1: not that path).
	splits   []splitX
	splitSrc [][]float32
	splitEnd []int
	splitOK  []bool
	splitOf  []int
	xsBuf    []uint16
	xsMax    []uint32
	xsInv    []float32

	exited chan struct{}
	// done lets the caller of run sleep, once it has spun spinIters,
	// until the last worker finishes: on a machine whose cores other
	// processes share, a worker the OS descheduled would otherwise have
	// the caller burn a core spinning for its whole time slice. The caller
	// parks by setting pendingParked in pending; the worker whose
	// decrement leaves exactly that bit owes one token on done. Flag and
	// count share one word so that a worker still finishing the previous
	// job (its decrement already seen) cannot mistake the next job's park
	// for its own.
	done chan struct{}
	// streamed counts the weight bytes the products have read (see
	// WeightBytes). Calls into a Pool are serialised by its callers, as
	// job is, so a plain counter suffices.
	streamed uint64
}

type poolWorker struct {
	parked atomic.Bool
	wake   chan struct{}
	_      [48]byte // keep workers' flags on separate cache lines
}

type jobKind uint8

const (
	jobFunc jobKind = iota
	jobMatMul
	jobMatMulBF16
	jobMLA
	jobRoundBF16 // x rows -> bf16 rows of stride kp2 (for the VDPBF16PS path)
	jobRoundF32  // x rows -> bf16-rounded float32 (MatMulBF16Act elsewhere)
	jobMatMulDP
	jobPermuteEO // x rows -> even/odd order for the dot-form kernels
	jobMatMulDot // dot-form BF16 MatMul (xe for f32, xb for bf16 activations)
	jobFFNGateUp // ExpertFFN: gate and up rows, then SiLU·mul into y
	jobRows      // y = W·x by rowsFor
	jobMatVecMany
	jobQuant // x rows -> act (integer activations)
	jobQRows // integer-activation product of W rows against act's rows
	jobMLAMany
	jobSplit       // x rows -> three bf16 parts for the split AMX path
	jobMatMulSplit // y = W·x from split x (split)
)

// job holds the arguments of the current call; storing them in the Pool
// (instead of a closure) is what keeps MatVec allocation-free.
type job struct {
	kind  jobKind
	n     int // items split across threads
	grain int // static shares are multiples of grain
	chunk int // > 0: threads claim chunks of this many items instead (guided: at least this many)
	fn    func(lo, hi int)
	y, x  []float32
	w     *Matrix
	rows  int // MatMul: rows of x
	xb    []uint16
	kp2   int // row stride of xb
	xe    []float32
	dp    bool
	w2    *Matrix   // ExpertFFN: up
	y2    []float32 // ExpertFFN: up outputs
	mla   mlaArgs
	ws    []*Matrix   // MatVecMany, MatMulMany
	ys    [][]float32 // MatVecMany, MatMulMany
	xs    [][]float32 // MatVecMany, MatMulMany
	ns    []int       // MatMulMany: rows of each product's x (nil: all 1)
	mlas  []mlaArgs   // MLADecodeMany: one per query row
	act   *actQ8      // integer activations of x (jobQuant, jobQRows, ExpertFFN)
	act2  *actQ8      // ExpertFFN: of the down product's input
	// guided: threads claim chunks that shrink with the work left (see
	// claimGuided); chunk is then the smallest.
	guided bool
	split  *splitX // x split for the AMX path (jobMatMulSplit, ExpertFFN)
}

// spinIters bounds the busy-wait before a worker parks. About 20-50µs on
// current CPUs: longer than the gap between kernels of one layer, far
// shorter than the gap between tokens.
const spinIters = 1 << 14

// NewPool starts threads-1 workers; threads <= 0 means runtime.GOMAXPROCS(0).
func NewPool(threads int) *Pool {
	if threads <= 0 {
		threads = runtime.GOMAXPROCS(0)
	}
	p := &Pool{
		threads: threads,
		workers: make([]poolWorker, threads-1),
		scratch: make([][]float32, threads),
		exited:  make(chan struct{}, threads),
		done:    make(chan struct{}, 1),
	}
	for i := range p.workers {
		p.workers[i].wake = make(chan struct{}, 1)
		go p.work(i + 1)
	}
	return p
}

// Threads is the number of threads a call is split across.
func (p *Pool) Threads() int { return p.threads }

// Close stops the workers and waits for them to exit. Calling it twice is
// harmless.
func (p *Pool) Close() {
	if p.closed.Swap(true) {
		return
	}
	p.gen.Add(1)
	p.wakeAll()
	for range p.workers {
		<-p.exited
	}
}

func (p *Pool) wakeAll() {
	for i := range p.workers {
		w := &p.workers[i]
		if w.parked.CompareAndSwap(true, false) {
			w.wake <- struct{}{}
		}
	}
}

func (p *Pool) work(id int) {
	defer func() { p.exited <- struct{}{} }()
	w := &p.workers[id-1]
	// Start from generation 0, not gen.Load(): a job published before this
	// goroutine first runs must still be seen, or its caller waits forever.
	var seen uint64
	for {
		g := p.waitGen(w, seen)
		if p.closed.Load() {
			return
		}
		seen = g
		p.runPart(id)
		if p.pending.Add(-1) == pendingParked {
			p.done <- struct{}{}
		}
	}
}

// waitGen returns once the job counter moves past seen: spinning first, then
// parking. The parked flag is set before the final re-check, and whoever
// clears it (the publisher, by CAS) owes one wake token, so no wake-up is lost.
func (p *Pool) waitGen(w *poolWorker, seen uint64) uint64 {
	for i := 0; i < spinIters; i++ {
		if g := p.gen.Load(); g != seen {
			return g
		}
		if i&255 == 255 {
			runtime.Gosched()
		}
	}
	for {
		w.parked.Store(true)
		if g := p.gen.Load(); g != seen {
			if !w.parked.CompareAndSwap(true, false) {
				<-w.wake // the publisher cleared it and sent a token: consume it
			}
			return g
		}
		<-w.wake
	}
}

// share is thread id's contiguous part of [0, job.n), aligned to job.grain.
func (p *Pool) share(id int) (lo, hi int) {
	n, g := p.job.n, p.job.grain
	units := ceilDiv(n, g)
	lo = units * id / p.threads * g
	hi = units * (id + 1) / p.threads * g
	if hi > n {
		hi = n
	}
	if lo > n {
		lo = n
	}
	return lo, hi
}

// run publishes p.job, runs the caller's share and waits for the others.
func (p *Pool) run() {
	if p.closed.Load() {
		panic("kernels: Pool used after Close")
	}
	// Work too small to split (under two chunks of a claiming job) runs on
	// the caller: a round trip would cost more than the split saves.
	if p.threads == 1 || p.job.n <= p.job.grain || p.job.chunk >= p.job.n || (p.job.guided && 2*p.job.chunk > p.job.n) {
		if p.job.n > 0 {
			p.runShare(0, 0, p.job.n)
		}
		p.job = job{}
		return
	}
	p.pending.Store(int32(len(p.workers)))
	p.next.Store(0)
	p.gen.Add(1)
	p.wakeAll()
	p.runPart(0)
	p.waitDone()
	p.job = job{} // drop references to the caller's buffers
}

// pendingParked is set in pending while the caller of run sleeps on done.
const pendingParked = 1 << 30

// waitDone returns once every worker's share of the job is done:
// spinning first, then parking as the workers do.
func (p *Pool) waitDone() {
	for i := 0; i < spinIters; i++ {
		if p.pending.Load() == 0 {
			return
		}
		if i&63 == 63 {
			runtime.Gosched()
		}
	}
	for {
		v := p.pending.Load()
		if v == 0 {
			return
		}
		// Set the bit on the count just read: if a worker decremented in
		// between, the CAS fails and the count is read again.
		if p.pending.CompareAndSwap(v, v|pendingParked) {
			<-p.done // the worker that brings the count to zero sends it
			return
		}
	}
}

// runPart runs thread id's part of the job: its static share, or for row
// jobs (chunk > 0) chunks claimed from a shared counter until none are
// left, fixed-size or guided (claimGuided). Claiming keeps a call from
// waiting on a thread the OS has descheduled (the machines are shared):
// the others take its chunks.
func (p *Pool) runPart(id int) {
	j := &p.job
	if j.guided {
		for {
			lo, hi := p.claimGuided()
			if lo >= hi {
				return
			}
			p.runShare(id, lo, hi)
		}
	}
	if j.chunk == 0 {
		if lo, hi := p.share(id); lo < hi {
			p.runShare(id, lo, hi)
		}
		return
	}
	for {
		lo := int(p.next.Add(1)-1) * j.chunk
		if lo >= j.n {
			return
		}
		p.runShare(id, lo, min(lo+j.chunk, j.n))
	}
}

// claimGuided claims the next chunk of a guided job: a share of what is
// left, 1/(2·threads) of it, and at least job.chunk items. Early chunks
// are long (each thread streams long runs and claims rarely); the last
// ones are short, so the threads finish within a short chunk of each
// other even when one was slowed (the machines are shared).
func (p *Pool) claimGuided() (lo, hi int) {
	n := int64(p.job.n)
	for {
		cur := p.next.Load()
		left := n - cur
		if left <= 0 {
			return 0, 0
		}
		size := min(left, max(int64(p.job.chunk), left/int64(2*p.threads)))
		if p.next.CompareAndSwap(cur, cur+size) {
			return int(cur), int(cur + size)
		}
	}
}

// rowChunk is the claimable unit of a row job over w: about four per
// thread, at least minChunkBytes of weights (claiming and per-chunk set-up
// cost more than the rows of a small matrix), a multiple of rowGrain.
func (p *Pool) rowChunk(w *Matrix) int {
	c := max(ceilDiv(w.Rows, 4*p.threads), ceilDiv(minChunkBytes, max(1, w.rowBytes())))
	return max(rowGrain, ceilDiv(c, rowGrain)*rowGrain)
}

// minChunkBytes: 64 KiB of weights is ~2µs of streaming per chunk.
const minChunkBytes = 64 << 10

func (p *Pool) runShare(id, lo, hi int) {
	j := &p.job
	switch j.kind {
	case jobFunc:
		j.fn(lo, hi)
	case jobMatMul:
		matMulRows(j.y, j.w, j.x, j.rows, lo, hi, p.scratchFor(id, matMulScratch(j.w.Cols)))
	case jobMatMulBF16:
		matMulBF16ActRows(j.y, j.w, j.x, j.rows, lo, hi, p.scratchFor(id, matMulScratch(j.w.Cols)))
	case jobMLA:
		mlaHeads(&j.mla, lo, hi)
	case jobRoundBF16:
		cols := j.w.Cols
		for i := lo; i < hi; i++ {
			roundBF16(j.xb[i*j.kp2:i*j.kp2+cols], j.x[i*cols:(i+1)*cols])
			if cols < j.kp2 {
				j.xb[i*j.kp2+cols] = 0
			}
		}
	case jobRoundF32:
		for i, v := range j.x[lo*j.w.Cols : hi*j.w.Cols] {
			j.y[lo*j.w.Cols+i] = BF16ToF32(F32ToBF16(v))
		}
	case jobFFNGateUp:
		// The gate and up rows [lo,hi) of every token, then SiLU·mul on
		// exactly those rows: no synchronisation in between.
		p.rowsFor(id, j.y, j.w, j.x, j.xe, j.act, j.split, j.rows, lo, hi)
		p.rowsFor(id, j.y2, j.w2, j.x, j.xe, j.act, j.split, j.rows, lo, hi)
		inter := j.w.Rows
		for i := 0; i < j.rows; i++ {
			g := j.y[i*inter+lo : i*inter+hi]
			impl.siluMul(g, g, j.y2[i*inter+lo:i*inter+hi])
		}
	case jobRows:
		p.rowsFor(id, j.y, j.w, j.x, j.xe, j.act, j.split, j.rows, lo, hi)
	case jobSplit:
		p.splitRowsOf(lo, hi)
	case jobMatMulSplit:
		matMulSplitRows(j.y, j.w, j.split, lo, hi, p.scratchFor(id, splitScratch(j.w.Cols)))
	case jobQuant:
		j.act.quantRows(j.x, lo, hi)
	case jobQRows:
		qRows(j.y, j.w, j.act, j.rows, lo, hi)
	case jobPermuteEO:
		permuteRows(j.xe, j.x, j.w.Cols, lo, hi)
	case jobMatMulDot:
		matMulDotRows(j.y, j.w, j.rows, lo, hi, j.dp, j.xe, j.x, j.xb, j.kp2)
	case jobMatMulDP:
		matMulDPRows(j.y, j.w, j.xb, j.rows, lo, hi, p.scratchFor(id, matMulScratch(j.w.Cols)))
	case jobMatVecMany:
		p.manyRows(id, lo, hi)
	case jobMLAMany:
		p.mlaMany(lo, hi)
	}
}

// scratchFor returns thread id's scratch of at least n floats, allocating
// only when it must grow.
func (p *Pool) scratchFor(id, n int) []float32 {
	if cap(p.scratch[id]) < n {
		p.scratch[id] = make([]float32, n)
	}
	return p.scratch[id][:n]
}

// ParallelFor splits [0,n) into contiguous chunks across the threads and
// runs fn(lo,hi) on each, concurrently; it returns when all are done. fn
// must not call back into the Pool. (A closure created per call is the
// caller's allocation; the kernels below keep their arguments in the Pool
// instead.)
func (p *Pool) ParallelFor(n int, fn func(lo, hi int)) {
	if n <= 0 {
		return
	}
	p.job = job{kind: jobFunc, n: n, grain: 1, fn: fn}
	p.run()
}

// WeightBytes is the total size (Matrix.Bytes: data and block scales) of
// the weight matrices the pool's products (MatVec, MatVecMany, MatMul,
// MatMulBF16Act, ExpertFFN) have read since it started, each call counting
// its matrices once: the bytes a decode step streams from memory, which
// its speed is bound by. The attention cache is not counted.
func (p *Pool) WeightBytes() uint64 { return p.streamed }

// rowGrain keeps thread boundaries on multiples of the kernels' row tile.
const rowGrain = 32

// unitRows is the row granularity at which a matrix-vector job splits w:
// the kernels' row tile, or a whole block of FP8 rows, whose scales the
// kernel folds into x once per block.
func unitRows(w *Matrix) int {
	if w.DType == F8E4M3 {
		return F8Block
	}
	return rowGrain
}

// guidedMinBytes is the smallest chunk of weights a thread claims in a
// matrix-vector job: about 10µs of streaming, so claiming (a contended
// atomic) and per-chunk set-up stay negligible while the threads still
// finish within 10µs of each other. (A variable so tests can force fine
// splits of small products.)
var guidedMinBytes = 256 << 10

// MatVecMany computes ys[i] = ws[i]·xs[i] for every i. The rows of all
// the products form one space that the threads claim in guided chunks, so
// independent products (one per attention head; every routed expert's
// gate and up; projections that read the same input) cost one pool round
// trip, and the threads finish together however the sizes fall. Each
// product is computed exactly as MatVec would: which thread computes a
// row never changes its value. The products run concurrently, so no
// output may overlap another product's input.
func (p *Pool) MatVecMany(ys [][]float32, ws []*Matrix, xs [][]float32) {
	if len(ys) != len(ws) || len(xs) != len(ws) {
		panic(fmt.Sprintf("kernels: MatVecMany with %d outputs, %d matrices, %d inputs", len(ys), len(ws), len(xs)))
	}
	for i, w := range ws {
		checkMat("MatVecMany", ys[i], w, xs[i], 1)
	}
	p.matVecMany(ys, ws, xs)
}

// MatMulMany computes ys[i] = ws[i]·xs[i] for ns[i] rows of x each (as
// MatMul would, row for row): MatVecMany for products over several rows.
// One pool call serves every product (the experts of a batched MoE layer,
// every attention head's product), W rows of all of them claimed as one
// space, each W row block streamed once for all its product's x rows.
// No output may overlap another product's input.
func (p *Pool) MatMulMany(ys [][]float32, ws []*Matrix, xs [][]float32, ns []int) {
	if len(ys) != len(ws) || len(xs) != len(ws) || len(ns) != len(ws) {
		panic(fmt.Sprintf("kernels: MatMulMany with %d outputs, %d matrices, %d inputs, %d row counts", len(ys), len(ws), len(xs), len(ns)))
	}
	for i, w := range ws {
		checkMat("MatMulMany", ys[i], w, xs[i], ns[i])
	}
	p.matMulMany(ys, ws, xs, ns)
}

// matVecMany is MatVecMany after its checks.
func (p *Pool) matVecMany(ys [][]float32, ws []*Matrix, xs [][]float32) {
	p.matMulMany(ys, ws, xs, nil)
}

// matMulMany: the split into units and the job (ns nil: one row each).
func (p *Pool) matMulMany(ys [][]float32, ws []*Matrix, xs [][]float32, ns []int) {
	if len(ws) == 0 {
		return
	}
	p.unitEnd = p.unitEnd[:0]
	units, bytes := 0, 0
	for i, w := range ws {
		if ns != nil && ns[i] == 0 {
			p.unitEnd = append(p.unitEnd, units) // no rows: nothing to read
			continue
		}
		p.streamed += uint64(w.Bytes())
		bytes += int(w.Bytes())
		units += ceilDiv(w.Rows, unitRows(w))
		p.unitEnd = append(p.unitEnd, units)
	}
	if units == 0 {
		return
	}
	p.prepActs(ws, xs, ns)
	p.prepSplit(ws, xs, ns)
	p.prepDot(ws, xs, ns)
	// At least guidedMinBytes a chunk, unless that would leave some of
	// many threads without work: then four chunks a thread.
	minUnits := max(1, min(ceilDiv(guidedMinBytes*units, max(1, bytes)), ceilDiv(units, 4*p.threads)))
	p.job = job{kind: jobMatVecMany, n: units, grain: 1, chunk: minUnits, guided: true, ws: ws, ys: ys, xs: xs, ns: ns}
	p.run()
}

// manyRows runs units [lo,hi) of a MatVecMany job on thread id: the
// matching rows of each product they cover.
func (p *Pool) manyRows(id, lo, hi int) {
	j := &p.job
	i, _ := slices.BinarySearch(p.unitEnd, lo+1) // first product ending after lo
	for u := lo; u < hi; i++ {
		start := 0
		if i > 0 {
			start = p.unitEnd[i-1]
		}
		end := min(hi, p.unitEnd[i])
		w, g := j.ws[i], unitRows(j.ws[i])
		r0, r1 := (u-start)*g, min(w.Rows, (end-start)*g)
		n := 1
		if j.ns != nil {
			n = j.ns[i]
		}
		switch a := p.actOf[i]; {
		case n == 0:
		case a >= 0:
			qRows(j.ys[i], w, &p.acts[a], n, r0, r1)
		case j.ns != nil && p.splitOf[i] >= 0:
			matMulSplitRows(j.ys[i], w, &p.splits[p.splitOf[i]], r0, r1, p.scratchFor(id, splitScratch(w.Cols)))
		case n == 1:
			matVecRows(j.ys[i], w, j.xs[i], r0, r1, p.scratchFor(id, w.Cols))
		case p.xeOf[i] != nil:
			matMulDotRows(j.ys[i], w, n, r0, r1, false, p.xeOf[i], j.xs[i], nil, 0)
		default:
			matMulRows(j.ys[i], w, j.xs[i], n, r0, r1, p.scratchFor(id, matMulScratch(w.Cols)))
		}
		u = end
	}
}

// MatVec computes y[r] = sum_c W[r,c]*x[c] with float32 activations and
// float32 accumulation, rows split across threads. len(x) must be Cols and
// len(y) Rows; a mismatch is a programming error and panics.
func (p *Pool) MatVec(y []float32, w *Matrix, x []float32) {
	checkMat("MatVec", y, w, x, 1)
	p.oneY[0], p.oneW[0], p.oneX[0] = y, w, x
	p.matVecMany(p.oneY[:], p.oneW[:], p.oneX[:])
	p.oneY[0], p.oneW[0], p.oneX[0] = nil, nil, nil // drop the caller's buffers
}

// MatMul computes, for i<n, y[i*Rows:(i+1)*Rows] = W · x[i*Cols:(i+1)*Cols]
// with the precision of MatVec. W rows are split across threads; each
// thread streams its W rows once per block of x rows.
func (p *Pool) MatMul(y []float32, w *Matrix, x []float32, n int) {
	checkMat("MatMul", y, w, x, n)
	if n == 0 {
		return
	}
	p.streamed += uint64(w.Bytes())
	if w.IntAct() {
		a := p.quantize(0, w, x, n)
		p.job = job{kind: jobQRows, n: w.Rows, grain: rowGrain, chunk: p.rowChunk(w), y: y, w: w, act: a, rows: n}
		p.run()
		return
	}
	if splitUsed(w, n) {
		if s := p.splitOne(x, n, w.Cols); s != nil {
			p.job = job{kind: jobMatMulSplit, n: w.Rows, grain: rowGrain, chunk: p.rowChunk(w), y: y, w: w, split: s}
			p.run()
			return
		}
	}
	if xe := p.prepare(w, x, n); xe != nil {
		p.job = job{kind: jobMatMulDot, n: w.Rows, grain: rowGrain, chunk: p.rowChunk(w), y: y, w: w, x: x, xe: xe, rows: n}
		p.run()
		return
	}
	p.job = job{kind: jobMatMul, n: w.Rows, grain: rowGrain, chunk: p.rowChunk(w), y: y, w: w, x: x, rows: n}
	p.run()
}

// MatMulBF16Act is MatMul with activations rounded to BF16 (round to
// nearest even) and products accumulated in float32 — VDPBF16PS where the
// CPU has AVX512_BF16, the same arithmetic in software elsewhere. It is an
// opt-in precision trade for prefill; results deviate from MatMul by the
// activation rounding (relative 2^-9 per element).
func (p *Pool) MatMulBF16Act(y []float32, w *Matrix, x []float32, n int) {
	checkMat("MatMulBF16Act", y, w, x, n)
	if n == 0 {
		return
	}
	cols := w.Cols
	switch {
	case dpAvailable(w):
		p.streamed += uint64(w.Bytes())
		kp2 := 2 * ((cols + 1) / 2)
		if cap(p.xb) < n*kp2 {
			p.xb = make([]uint16, n*kp2)
		}
		xb := p.xb[:n*kp2]
		p.job = job{kind: jobRoundBF16, n: n, grain: 1, w: w, x: x, xb: xb, kp2: kp2}
		p.run()
		if dotFormAvailable(w, n, true) {
			p.job = job{kind: jobMatMulDot, n: w.Rows, grain: rowGrain, chunk: p.rowChunk(w), y: y, w: w, xb: xb, kp2: kp2, rows: n, dp: true}
		} else {
			p.job = job{kind: jobMatMulDP, n: w.Rows, grain: rowGrain, chunk: p.rowChunk(w), y: y, w: w, xb: xb, rows: n}
		}
		p.run()
	case impl.isa == ISAGeneric:
		p.streamed += uint64(w.Bytes())
		p.job = job{kind: jobMatMulBF16, n: w.Rows, grain: rowGrain, chunk: p.rowChunk(w), y: y, w: w, x: x, rows: n}
		p.run()
	default:
		// Same arithmetic as the reference: round x once, then the exact
		// float32 kernels.
		if cap(p.xr) < n*cols {
			p.xr = make([]float32, n*cols)
		}
		xr := p.xr[:n*cols]
		p.job = job{kind: jobRoundF32, n: n, grain: 1, w: w, x: x, y: xr}
		p.run()
		p.MatMul(y, w, xr, n)
	}
}

// prepActs rounds the inputs of MatVecMany's integer-activation products
// (once per distinct input and layout) into p.acts and records each
// product's in p.actOf (-1 for float products).
func (p *Pool) prepActs(ws []*Matrix, xs [][]float32, ns []int) {
	// Pass 1: one entry per distinct input and layout, and their storage.
	p.actOf = p.actOf[:0]
	p.actKeys = p.actKeys[:0]
	nq, nsc := 0, 0
	for i, w := range ws {
		n := 1
		if ns != nil {
			n = ns[i]
		}
		if !w.IntAct() || n == 0 {
			p.actOf = append(p.actOf, -1)
			continue
		}
		_, lay := qKernel(w)
		key := actKey{lay: lay, src: &xs[i][0], cols: w.Cols, n: n}
		j := slices.Index(p.actKeys, key)
		if j < 0 {
			j = len(p.actKeys)
			p.actKeys = append(p.actKeys, key)
			q, s := actSize(lay, n, w.Cols)
			nq, nsc = nq+q, nsc+s
		}
		p.actOf = append(p.actOf, j)
	}
	if len(p.actKeys) == 0 {
		return
	}
	// One buffer for all of them, grown with headroom: a call's inputs
	// vary in rows from step to step (batched experts), and the steady
	// state must not allocate.
	if cap(p.actQ) < nq || cap(p.actS) < nsc {
		p.actQ = make([]int8, max(nq, 2*cap(p.actQ)))
		p.actS = make([]float32, max(nsc, 2*cap(p.actS)))
		p.actC = make([]int32, max(nsc, 2*cap(p.actC)))
	}
	for len(p.acts) < len(p.actKeys) {
		p.acts = append(p.acts, actQ8{})
	}
	// Pass 2: round each input into its share.
	oq, os := 0, 0
	for j, k := range p.actKeys {
		q, s := actSize(k.lay, k.n, k.cols)
		a := &p.acts[j]
		// Capacity capped: a later reset of the entry (MatMul, ExpertFFN)
		// gets storage of its own instead of growing into a neighbour's.
		a.resetIn(k.lay, k.n, k.cols, p.actQ[oq:oq+q:oq+q], p.actS[os:os+s:os+s], p.actC[os:os+s:os+s])
		a.quantRows(unsafe.Slice(k.src, k.n*k.cols), 0, k.n)
		oq, os = oq+q, os+s
	}
	clear(p.actKeys) // drop the callers' buffers
}

// actKey names one rounded input of MatMulMany: x, its rows and layout.
type actKey struct {
	lay     *qLayout
	src     *float32
	cols, n int
}

// prepDot reorders the x rows of MatMulMany's products that take the
// dot-form kernels (one buffer for all of them, kept across calls).
func (p *Pool) prepDot(ws []*Matrix, xs [][]float32, ns []int) {
	p.xeOf = p.xeOf[:0]
	total := 0
	for i, w := range ws {
		if ns != nil && !w.IntAct() && p.splitOf[i] < 0 && dotFormAvailable(w, ns[i], false) {
			total += ns[i] * (w.Cols &^ 31)
		}
	}
	if cap(p.xeBuf) < total {
		p.xeBuf = make([]float32, total)
	}
	off := 0
	for i, w := range ws {
		if ns == nil || w.IntAct() || p.splitOf[i] >= 0 || !dotFormAvailable(w, ns[i], false) {
			p.xeOf = append(p.xeOf, nil)
			continue
		}
		sz := ns[i] * (w.Cols &^ 31)
		xe := p.xeBuf[off : off+sz]
		off += sz
		permuteRows(xe, xs[i], w.Cols, 0, ns[i])
		p.xeOf = append(p.xeOf, xe)
	}
}

// quantize rounds n rows of x for products with w into p.mmAct[slot]
// (split across the threads when there are many).
func (p *Pool) quantize(slot int, w *Matrix, x []float32, n int) *actQ8 {
	_, lay := qKernel(w)
	a := &p.mmAct[slot]
	a.reset(lay, n, w.Cols)
	if n*w.Cols < 1<<15 {
		a.quantRows(x, 0, n)
		return a
	}
	p.job = job{kind: jobQuant, n: n, grain: 1, x: x, act: a}
	p.run()
	return a
}

func checkMat(op string, y []float32, w *Matrix, x []float32, n int) {
	if n < 0 || len(x) != n*w.Cols || len(y) != n*w.Rows {
		panic(fmt.Sprintf("kernels: %s %s %dx%d with n=%d: len(x)=%d (want %d), len(y)=%d (want %d)",
			op, w.DType, w.Rows, w.Cols, n, len(x), n*w.Cols, len(y), n*w.Rows))
	}
}

// prepSplit splits the inputs of MatMulMany's products that take the
// split AMX path (once per distinct input) and records each product's
// split in p.splitOf (-1 for the others, and for inputs holding Inf or
// NaN, which take the FMA kernels).
func (p *Pool) prepSplit(ws []*Matrix, xs [][]float32, ns []int) {
	p.splitOf = p.splitOf[:0]
	p.resetSplits()
	for i, w := range ws {
		k := -1
		if ns != nil && !w.IntAct() && splitUsed(w, ns[i]) {
			k = p.addSplit(xs[i], ns[i], w.Cols)
		}
		p.splitOf = append(p.splitOf, k)
	}
	if len(p.splits) == 0 {
		return
	}
	p.runSplits()
	for i, k := range p.splitOf {
		if k >= 0 && !p.splitOK[k] {
			p.splitOf[i] = -1
		}
	}
}

// splitOne splits x (n rows of cols) alone, returning nil if it holds
// Inf or NaN.
func (p *Pool) splitOne(x []float32, n, cols int) *splitX {
	p.resetSplits()
	p.addSplit(x, n, cols)
	p.runSplits()
	if !p.splitOK[0] {
		return nil
	}
	return &p.splits[0]
}

func (p *Pool) resetSplits() {
	clear(p.splitSrc) // drop the callers' buffers
	p.splits, p.splitSrc, p.splitEnd = p.splits[:0], p.splitSrc[:0], p.splitEnd[:0]
}

// addSplit adds x (n rows of cols) to the splits, or finds it there, and
// returns its index.
func (p *Pool) addSplit(x []float32, n, cols int) int {
	for k := range p.splits {
		if s := &p.splits[k]; s.n == n && s.cols == cols && &p.splitSrc[k][0] == &x[0] {
			return k
		}
	}
	end := n
	if k := len(p.splitEnd); k > 0 {
		end += p.splitEnd[k-1]
	}
	p.splits = append(p.splits, splitX{n: n, cols: cols})
	p.splitSrc = append(p.splitSrc, x[:n*cols])
	p.splitEnd = append(p.splitEnd, end)
	return len(p.splits) - 1
}

// runSplits splits every input added since resetSplits, the rows of all
// of them shared by the threads, into one buffer (grown with headroom:
// the batches of MoE layers vary from call to call), then checks each.
func (p *Pool) runSplits() {
	total, rowsTotal := 0, p.splitEnd[len(p.splitEnd)-1]
	for k := range p.splits {
		total += p.splits[k].n * splitRowLen(p.splits[k].cols)
	}
	if cap(p.xsBuf) < total {
		p.xsBuf = make([]uint16, max(total, 2*cap(p.xsBuf)))
	}
	if cap(p.xsMax) < rowsTotal {
		p.xsMax = make([]uint32, max(rowsTotal, 2*cap(p.xsMax)))
		p.xsInv = make([]float32, max(rowsTotal, 2*cap(p.xsInv)))
	}
	off := 0
	for k := range p.splits {
		s := &p.splits[k]
		sz := s.n * splitRowLen(s.cols)
		s.a = p.xsBuf[off : off+sz : off+sz]
		off += sz
	}
	p.job = job{kind: jobSplit, n: rowsTotal, grain: 1}
	p.run()
	p.splitOK = p.splitOK[:0]
	start := 0
	for k := range p.splits {
		end := p.splitEnd[k]
		p.splitOK = append(p.splitOK, finishSplit(&p.splits[k], p.splitSrc[k], p.xsMax[start:end], p.xsInv[start:end]))
		start = end
	}
}

// splitRowsOf splits rows [lo,hi) of the split job's joint row space.
func (p *Pool) splitRowsOf(lo, hi int) {
	k, _ := slices.BinarySearch(p.splitEnd, lo+1) // first input ending after lo
	for u := lo; u < hi; k++ {
		start := 0
		if k > 0 {
			start = p.splitEnd[k-1]
		}
		end := min(hi, p.splitEnd[k])
		s := &p.splits[k]
		amxSplitRows(s.a, p.splitSrc[k], s.cols, u-start, end-start, p.xsMax[start:p.splitEnd[k]])
		u = end
	}
}
