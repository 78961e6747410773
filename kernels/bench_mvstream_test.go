//go:build linux

package kernels

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

var (
	mvStream      = flag.Bool("mvstream", false, "run TestMVStream's memory-speed report of the float-activation decode products")
	mvStreamCases = flag.String("mvstream.cases", "", "with -mvstream: only the cases whose name contains this")
)

// TestMVStream is TestQActStream for the float-activation matrix-vector
// kernels batch-1 decode runs (matVecRowsSIMD): BF16 (the even/odd row
// kernel, and the eight-row one on the dense down_proj's long rows) and
// Q8_0 with float32 activations, at V2-Lite's shapes, on AVX-512 and
// forced to AVX2 in turn. Each line is the kernel against the read probe
// alternated sample by sample on huge-page copies far larger than the
// caches (qactStreamCase). Run with -mvstream (about a minute).
func TestMVStream(t *testing.T) {
	if !*mvStream {
		t.Skip("run with -mvstream")
	}
	arena := &benchArena{}
	defer arena.free()
	cases := []qactCase{
		{"BF16 1408x2048 expert gate/up", BF16, 1408, 2048, false},
		{"BF16 2048x1408 expert down", BF16, 2048, 1408, false},
		{"BF16 3072x2048 q", BF16, 3072, 2048, false},
		{"BF16 2048x10944 dense down", BF16, 2048, 10944, false},
		{"Q8_0 1408x2048 f32 act", Q8_0, 1408, 2048, false},
		{"Q8_0 2048x1408 f32 act", Q8_0, 2048, 1408, false},
		{"Q8_0 2048x10944 f32 act", Q8_0, 2048, 10944, false},
	}
	defer SetISA(BestISA())
	for _, isa := range []ISA{ISAAVX512, ISAAVX2} {
		if isa > BestISA() {
			continue
		}
		for _, th := range []int{1, 2} {
			p := NewPool(th)
			for _, c := range cases {
				c.name += " " + isa.String()
				if !strings.Contains(c.name, *mvStreamCases) {
					continue
				}
				if err := SetISA(isa); err != nil {
					t.Fatal(err)
				}
				qactStreamCase(t, p, arena, th, c)
			}
			// Small batches (a few decode rows in one step): BF16 MatMul
			// streams W once per call through the multi-x kernels.
			for _, n := range []int{2, 4, 8} {
				name := fmt.Sprintf("BF16 1408x2048 n=%d %s", n, isa)
				if isa == ISAAVX512 && strings.Contains(name, *mvStreamCases) {
					mvStreamBatch(t, p, arena, th, name, 1408, 2048, n)
				}
			}
			p.Close()
		}
	}
}

// mvStreamBatch is qactStreamCase for a BF16 MatMul of n x rows: the
// weights' GB/s against the probe's, alternated on huge-page copies.
func mvStreamBatch(t *testing.T, p *Pool, arena *benchArena, th int, name string, rows, cols, n int) {
	per := rows * cols * 2
	ws := make([]*Matrix, max(2, (384<<20)/per))
	for i := range ws {
		ws[i] = benchMatrix(arena, BF16, rows, cols, uint64(i+3))
	}
	x := make([]float32, n*cols)
	for i := range x {
		x[i] = float32(i%7) - 3
	}
	y := make([]float32, n*rows)
	k := 0
	probe := func(two bool) float64 {
		per := len(ws[k].Data) / p.Threads() &^ 511
		d := ws[k].Data
		t0 := time.Now()
		p.ParallelFor(p.Threads(), func(lo, hi int) { probeRead(d[lo*per:hi*per], two) })
		k = (k + 1) % len(ws)
		return float64(per*p.Threads()) / time.Since(t0).Seconds()
	}
	kernel := func() float64 {
		t0 := time.Now()
		p.MatMul(y, ws[k], x, n)
		k = (k + 1) % len(ws)
		return float64(per) / time.Since(t0).Seconds()
	}
	var ratios []float64
	var bestK, bestP float64
	for r := 0; r < 40; r++ {
		p1, k1, p2, k2 := probe(false), kernel(), probe(true), kernel()
		if r > 0 {
			ratios = append(ratios, (k1+k2)/(2*max(p1, p2)))
			bestK, bestP = max(bestK, k1, k2), max(bestP, p1, p2)
		}
	}
	slices.Sort(ratios)
	t.Logf("t%d %-40s kernel %5.1f GB/s probe %5.1f: best/best %5.1f%%, median round %5.1f%%", th, name, bestK/1e9, bestP/1e9, 100*bestK/bestP, 100*ratios[len(ratios)/2])
	arena.free()
}

// TestMatVecPrefetchPastEnd: the row kernels prefetch up to a few KiB
// beyond the weights (and Q8_0 scales) they sum, past the last row into
// whatever follows. A prefetch never faults, but a load would: here the
// weights and scales end exactly where an inaccessible page begins, and
// each ISA's MatVec (and MatMul of a few rows) must give the same bits
// as on a heap copy of the matrix, MatVec also agreeing with the float64
// reference.
func TestMatVecPrefetchPastEnd(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	p := NewPool(2)
	defer p.Close()
	page := syscall.Getpagesize()
	// tail returns n bytes that end at an inaccessible page.
	tail := func(n int) []byte {
		pages := (n+page-1)/page + 1
		b, err := syscall.Mmap(-1, 0, pages*page, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
		if err != nil {
			t.Skip("mmap:", err)
		}
		t.Cleanup(func() { syscall.Munmap(b) })
		if err := syscall.Mprotect(b[(pages-1)*page:], syscall.PROT_NONE); err != nil {
			t.Skip("mprotect:", err)
		}
		return b[(pages-1)*page-n : (pages-1)*page]
	}
	for _, dt := range []DType{BF16, Q8_0, F32, F16, F8E4M3} {
		for _, sh := range [][2]int{{1, 64}, {3, 128}, {5, 1408}, {9, 2048}, {16, 4096}, {8, 4160}} {
			heap := randMatrix(rng, dt, sh[0], sh[1], 0)
			edge := *heap
			edge.Data = tail(len(heap.Data))
			copy(edge.Data, heap.Data)
			if len(heap.Scales) > 0 {
				b := tail(4 * len(heap.Scales))
				edge.Scales = unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), len(heap.Scales))
				copy(edge.Scales, heap.Scales)
			}
			x := randVec(rng, sh[1], 0)
			want, mag := refMatVec(heap, x)
			for _, isa := range isas() {
				withISA(t, isa, func() {
					y0, y1 := make([]float32, sh[0]), make([]float32, sh[0])
					p.MatVec(y0, heap, x)
					p.MatVec(y1, &edge, x)
					for r := range y0 {
						if y0[r] != y1[r] || !closeRel(float64(y1[r]), want[r], mag[r], 1e-5) {
							t.Fatalf("%s %dx%d %s: y[%d] = %g at the edge, %g on the heap, want %g", dt, sh[0], sh[1], isa, r, y1[r], y0[r], want[r])
						}
					}
					// A few x rows at once (BF16: the multi-x kernels).
					for _, n := range []int{2, 5, 8} {
						xn := randVec(rng, n*sh[1], 0)
						y0, y1 := make([]float32, n*sh[0]), make([]float32, n*sh[0])
						p.MatMul(y0, heap, xn, n)
						p.MatMul(y1, &edge, xn, n)
						for i := range y0 {
							if y0[i] != y1[i] {
								t.Fatalf("%s %dx%d %s n=%d: y[%d] = %g at the edge, %g on the heap", dt, sh[0], sh[1], isa, n, i, y1[i], y0[i])
							}
						}
					}
				})
			}
		}
	}
}
