package kernels

import (
	"math"
	"math/rand/v2"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

func TestParallelForCoversRangeOnce(t *testing.T) {
	for _, threads := range []int{1, 2, 3, 5} {
		p := NewPool(threads)
		for _, n := range []int{0, 1, 2, 3, 7, 100, 1001} {
			hits := make([]atomic.Int32, n)
			p.ParallelFor(n, func(lo, hi int) {
				for i := lo; i < hi; i++ {
					hits[i].Add(1)
				}
			})
			for i := range hits {
				if hits[i].Load() != 1 {
					t.Fatalf("threads %d n %d: index %d run %d times", threads, n, i, hits[i].Load())
				}
			}
		}
		p.Close()
	}
}

// TestPoolNoAllocs: the decode hot path allocates nothing once warm.
func TestPoolNoAllocs(t *testing.T) {
	p := NewPool(2)
	defer p.Close()
	w := fastMatrix(1, BF16, 256, 128)
	x := make([]float32, 8*128)
	y := make([]float32, 8*256)
	blocks := [][]float32{make([]float32, 16*80)}
	out, q, pe := make([]float32, 16*64), make([]float32, 16*64), make([]float32, 16*16)
	scratch := make([]float32, MLAScratchSize(16, 16))
	gate, up, down := fastMatrix(2, BF16, 256, 128), fastMatrix(3, BF16, 256, 128), fastMatrix(4, BF16, 128, 256)
	ffnOut := make([]float32, 20*128)
	ffnX := make([]float32, 20*128)
	ffnScratch := make([]float32, FFNScratchSize(20, 256))
	run := func() {
		p.ExpertFFN(ffnOut[:128], ffnX[:128], 1, gate, up, down, ffnScratch)
		p.ExpertFFN(ffnOut, ffnX, 20, gate, up, down, ffnScratch)
		p.MatVec(y[:256], w, x[:128])
		p.MatMul(y, w, x, 8)
		p.MatMulBF16Act(y, w, x, 8)
		p.MLADecode(out, q, pe, blocks, 16, 16, 16, 64, 16, 0.1, scratch)
	}
	run()
	if a := testing.AllocsPerRun(20, run); a != 0 {
		t.Fatalf("%v allocations per call, want 0", a)
	}
}

func TestPoolCloseStopsWorkers(t *testing.T) {
	before := runtime.NumGoroutine()
	p := NewPool(4)
	p.ParallelFor(10, func(lo, hi int) {})
	p.Close()
	p.Close() // idempotent
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines after Close, %d before", runtime.NumGoroutine(), before)
		}
		runtime.Gosched()
	}
}

// TestPoolParkedWorkersWake: after workers park (idle longer than the
// spin), a call still completes with every share run.
func TestPoolParkedWorkersWake(t *testing.T) {
	p := NewPool(3)
	defer p.Close()
	for round := 0; round < 3; round++ {
		for i := range p.workers {
			for !p.workers[i].parked.Load() {
				runtime.Gosched()
			}
		}
		var sum atomic.Int64
		p.ParallelFor(300, func(lo, hi int) { sum.Add(int64(hi - lo)) })
		if sum.Load() != 300 {
			t.Fatalf("round %d: covered %d of 300", round, sum.Load())
		}
	}
}

// TestPoolCallerParksForSlowWorker: a caller whose worker is still busy
// after the spin parks (it does not burn a core the worker may need) and
// is woken by the worker's finish, with every share run, call after call.
func TestPoolCallerParksForSlowWorker(t *testing.T) {
	p := NewPool(2)
	defer p.Close()
	for round := 0; round < 3; round++ {
		release := make(chan struct{})
		var sum atomic.Int64
		done := make(chan struct{})
		go func() {
			defer close(done)
			p.ParallelFor(2, func(lo, hi int) {
				if lo == 1 { // the worker's share (the caller runs [0, 1))
					<-release
				}
				sum.Add(int64(hi - lo))
			})
		}()
		deadline := time.Now().Add(10 * time.Second)
		for p.pending.Load() != pendingParked|1 { // parked, its one worker not done
			if time.Now().After(deadline) {
				t.Fatalf("round %d: caller never parked while its worker was blocked", round)
			}
			runtime.Gosched()
		}
		select {
		case <-done:
			t.Fatalf("round %d: call returned before its worker's share ran", round)
		default:
		}
		close(release)
		<-done
		if sum.Load() != 2 || p.pending.Load() != pendingParked {
			t.Fatalf("round %d: covered %d of 2, pending %#x after the call, want only the parked bit", round, sum.Load(), p.pending.Load())
		}
	}
}

func TestMatVecPanicsOnBadLengths(t *testing.T) {
	p := NewPool(1)
	defer p.Close()
	w := fastMatrix(1, BF16, 4, 32)
	defer func() {
		if recover() == nil {
			t.Fatal("no panic for short x")
		}
	}()
	p.MatVec(make([]float32, 4), w, make([]float32, 31))
}

// TestResultsIndependentOfThreads: each output row is computed by the same
// kernel whichever thread claims it, so results are bit-identical for any
// thread count (no run-to-run drift from the thread split).
func TestResultsIndependentOfThreads(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	pools := []*Pool{NewPool(1), NewPool(2), NewPool(5)}
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	for _, dt := range allDTypes {
		w := randMatrix(rng, dt, 300, 256, 0)
		for _, n := range []int{1, 5, 20} {
			x := randVec(rng, n*256, 0)
			var ref, refAct []float32
			for i, p := range pools {
				y, ya := make([]float32, n*300), make([]float32, n*300)
				p.MatMul(y, w, x, n)
				p.MatMulBF16Act(ya, w, x, n)
				if i == 0 {
					ref, refAct = y, ya
					continue
				}
				for k := range y {
					if math.Float32bits(y[k]) != math.Float32bits(ref[k]) || math.Float32bits(ya[k]) != math.Float32bits(refAct[k]) {
						t.Fatalf("%s n=%d: y[%d] with %d threads %g/%g, with 1 thread %g/%g", dt, n, k, p.Threads(), y[k], ya[k], ref[k], refAct[k])
					}
				}
			}
		}
	}
}

// TestMatVecManyEqualsMatVec: each product of MatVecMany is bit-identical
// to MatVec on its own on one thread, for every SIMD level, weight type
// and thread count. The guided split cuts the products at many places,
// inside products and across the boundaries between them (with the
// default minimum chunk, and with one unit, the finest split); outputs
// start as NaN so a row no chunk covered shows.
func TestMatVecManyEqualsMatVec(t *testing.T) {
	shapes := [][2]int{{1000, 256}, {128, 512}, {0, 64}, {33, 70}, {300, 256}, {7, 9}, {2048, 128}, {257, 512}}
	defaultMin := guidedMinBytes
	defer func() { guidedMinBytes = defaultMin }()
	for _, isa := range []ISA{ISAGeneric, BestISA()} {
		if err := SetISA(isa); err != nil {
			t.Fatal(err)
		}
		one := NewPool(1)
		for _, dt := range allDTypes {
			var ws []*Matrix
			var xs, want [][]float32
			for i, shape := range shapes {
				if dt == Q8_0 && shape[1]%Q8Block != 0 {
					continue // Q8_0 rows are whole blocks
				}
				w := benchMatrix(nil, dt, shape[0], shape[1], uint64(i+1))
				x := make([]float32, shape[1])
				for j := range x {
					x[j] = float32(j%11) - 5
				}
				y := make([]float32, shape[0])
				one.MatVec(y, w, x)
				ws, xs, want = append(ws, w), append(xs, x), append(want, y)
			}
			for _, split := range []struct {
				threads, minBytes int
			}{{1, defaultMin}, {2, defaultMin}, {3, defaultMin}, {2, 1}, {3, 1}} {
				threads := split.threads
				guidedMinBytes = split.minBytes
				p := NewPool(threads)
				ys := make([][]float32, len(ws))
				for i, w := range ws {
					ys[i] = make([]float32, w.Rows)
					for r := range ys[i] {
						ys[i][r] = float32(math.NaN())
					}
				}
				p.MatVecMany(ys, ws, xs)
				p.Close()
				for i := range ys {
					for r := range ys[i] {
						if math.Float32bits(ys[i][r]) != math.Float32bits(want[i][r]) {
							t.Fatalf("%v %s %d threads, chunks >= %d bytes: product %d (%dx%d) row %d: %g != %g", isa, dt, threads, split.minBytes, i, ws[i].Rows, ws[i].Cols, r, ys[i][r], want[i][r])
						}
					}
				}
			}
		}
		one.Close()
	}
	SetISA(BestISA())
}

// TestClaimGuidedCoversOnce: guided claims tile [0,n) exactly, shrink
// towards the end and never go below the minimum chunk except for the
// last one.
func TestClaimGuidedCoversOnce(t *testing.T) {
	for _, tc := range []struct{ n, min, threads int }{{1, 1, 2}, {100, 1, 2}, {100, 7, 2}, {1000, 3, 5}, {8448, 2, 2}} {
		p := &Pool{threads: tc.threads}
		p.job = job{n: tc.n, chunk: tc.min, guided: true}
		next, prev := 0, tc.n
		for {
			lo, hi := p.claimGuided()
			if lo >= hi {
				break
			}
			if lo != next || hi > tc.n {
				t.Fatalf("%+v: claimed [%d,%d) after %d", tc, lo, hi, next)
			}
			if size := hi - lo; size > prev || (size < tc.min && hi != tc.n) {
				t.Fatalf("%+v: chunk [%d,%d) after one of %d", tc, lo, hi, prev)
			}
			prev, next = hi-lo, hi
		}
		if next != tc.n {
			t.Fatalf("%+v: claims ended at %d", tc, next)
		}
	}
}
