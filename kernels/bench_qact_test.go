package kernels

import (
	"flag"
	"slices"
	"testing"
	"time"
	"unsafe"
)

var qactStream = flag.Bool("qactstream", false, "run TestQActStream's memory-speed report of the integer-activation products")

// TestQActStream reports the decode products at memory speed against the
// read probe, alternated sample by sample (probe, kernel, probe, ...) on
// copies of each matrix that together far exceed the caches, weights and
// scales in huge pages as resident weights are: the best against the
// better probe pattern's best (one stream a thread, or two), and the
// median over rounds (probe one stream, kernel, probe two, kernel) of the
// kernel's mean against the round's better probe. Run with -qactstream (about a minute).
func TestQActStream(t *testing.T) {
	if !*qactStream {
		t.Skip("run with -qactstream")
	}
	arena := &benchArena{}
	defer arena.free()
	cases := []qactCase{
		{"BF16 1408x2048", BF16, 1408, 2048, false},
		{"Q8_0 1408x2048 f32 act", Q8_0, 1408, 2048, false},
		{"Q8_0 1408x2048 int8 act", Q8_0, 1408, 2048, true},
		{"Q8_0 2048x1408 int8 act", Q8_0, 2048, 1408, true},
		{"Q8_0 8192x2048 int8 act", Q8_0, 8192, 2048, true},
		{"Q4_0 1408x2048", Q4_0, 1408, 2048, false},
		{"Q4_0 2048x1408", Q4_0, 2048, 1408, false},
	}
	for _, th := range []int{1, 2} {
		p := NewPool(th)
		for _, c := range cases {
			for _, v := range qVariants() {
				if v.name != "" && !c.act8 && c.dt != Q4_0 {
					continue
				}
				restore := v.set()
				SetISA(BestISA())
				c := c
				c.name += v.name
				qactStreamCase(t, p, arena, th, c)
				restore()
			}
		}
		p.Close()
	}
}

// qactCase is one product of TestQActStream.
type qactCase struct {
	name       string
	dt         DType
	rows, cols int
	act8       bool
}

// qactStreamCase measures c on th threads (see TestQActStream).
func qactStreamCase(t *testing.T, p *Pool, arena *benchArena, th int, c qactCase) {
	proto := benchMatrix(nil, c.dt, c.rows, c.cols, 1)
	per := proto.Bytes()
	ws := make([]*Matrix, max(2, (384<<20)/per))
	for i := range ws {
		m := benchMatrix(arena, c.dt, c.rows, c.cols, uint64(i+3))
		if len(m.Scales) > 0 {
			b := arena.bytes(4 * len(m.Scales))
			s := unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), len(m.Scales))
			copy(s, m.Scales)
			m.Scales = s
		}
		m.ActQ8 = c.act8
		ws[i] = m
	}
	x := make([]float32, c.cols)
	for i := range x {
		x[i] = float32(i%7) - 3
	}
	y := make([]float32, c.rows)
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
		p.MatVec(y, ws[k], x)
		k = (k + 1) % len(ws)
		return float64(per) / time.Since(t0).Seconds()
	}
	var ratios []float64
	var bestK, best1, best2 float64
	for r := 0; r < 40; r++ {
		p1, k1, p2, k2 := probe(false), kernel(), probe(true), kernel()
		if r > 0 {
			ratios = append(ratios, (k1+k2)/(2*max(p1, p2)))
			bestK, best1, best2 = max(bestK, k1, k2), max(best1, p1), max(best2, p2)
		}
	}
	slices.Sort(ratios)
	t.Logf("t%d %-40s kernel %5.1f GB/s probe %5.1f (1 stream) %5.1f (2): best/best %5.1f%%, median round %5.1f%%", th, c.name, bestK/1e9, best1/1e9, best2/1e9, 100*bestK/max(best1, best2), 100*ratios[len(ratios)/2])
	arena.free()
}
