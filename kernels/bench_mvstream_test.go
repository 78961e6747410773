//go:build linux

package kernels

import (
	"flag"
	"math/rand/v2"
	"strings"
	"syscall"
	"testing"
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
			p.Close()
		}
	}
}

// TestMatVecPrefetchPastEnd: the row kernels prefetch up to a few KiB
// beyond the weights (and Q8_0 scales) they sum, past the last row into
// whatever follows. A prefetch never faults, but a load would: here the
// weights and scales end exactly where an inaccessible page begins, and
// each ISA's MatVec must give the same bits as on a heap copy of the
// matrix, and agree with the float64 reference.
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
				})
			}
		}
	}
}
