package kernels

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"runtime"
	"strings"
	"time"

	"github.com/expertmesh/expertmesh/internal/hugemem"
)

// RunBench measures this machine's limits and the kernels against them in
// one run, so that the ratios it prints are comparable even when the
// machine's bandwidth drifts: a read-bandwidth probe over a 1 GiB buffer,
// the float32 FMA and VDPBF16PS peaks from register-only loops, and each
// kernel at the DeepSeek-V2-Lite shapes, for every thread count in threads
// (nil means 1 and GOMAXPROCS). Decode kernels read weights from copies
// that together exceed the caches, as decode does. Each figure is the best
// of several timed batches (other processes share the machine). It takes
// about a minute and a half and 2 GiB of memory.
func RunBench(w io.Writer, threads []int) error {
	if len(threads) == 0 {
		threads = []int{1, runtime.GOMAXPROCS(0)}
		if threads[1] == 1 {
			threads = threads[:1]
		}
	}
	for _, t := range threads {
		if t <= 0 {
			return fmt.Errorf("kernels: RunBench: thread count %d must be positive", t)
		}
	}
	amxOK, amxWhy := AMXAvailable()
	if !amxOK {
		amxWhy = " (" + amxWhy + ")"
	}
	fmt.Fprintf(w, "kernels %s (best %s, AVX512_BF16 %v, AMX-BF16 %v%s), threads %v\n", ActiveISA(), BestISA(), dpAvailable(&Matrix{DType: BF16}), AMXEnabled(), amxWhy, threads)
	type limits struct{ bw, fma, dp, amx float64 }
	lim := map[int]limits{}

	// Every buffer is huge-page backed, like resident weights (the
	// default in generate, serve and the nodes): on 4 KiB pages the same
	// loops read about 20% slower on one core.
	arena := &benchArena{}
	defer arena.free()
	buf := arena.bytes(1 << 30)
	fillRandom(buf, 1)
	pools := map[int]*Pool{}
	for _, t := range threads {
		pools[t] = NewPool(t)
	}
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	// Probes as samples, so they can be interleaved with the kernels.
	// readSample reads about size bytes (the size of the kernel sample it
	// is compared with: short samples see less preemption) from a rotating
	// place in buf, split across the pool's threads.
	off := 0
	readSample := func(p *Pool, size int64) func() float64 {
		per := int(size) / p.Threads() &^ 511
		per = max(512, min(per, len(buf)/p.Threads()&^511))
		return func() float64 {
			if off+per*p.Threads() > len(buf) {
				off = 0
			}
			o := off
			off += per * p.Threads()
			two := nextProbePattern()
			p.ParallelFor(p.Threads(), func(lo, hi int) { probeRead(buf[o+lo*per:o+hi*per], two) })
			return float64(per * p.Threads())
		}
	}
	fmaSample := func(p *Pool) func() float64 {
		return func() float64 {
			p.ParallelFor(p.Threads(), func(lo, hi int) { probeFMA(1 << 16 * (hi - lo)) })
			return float64(p.Threads()) * probeFMAFlops(1<<16)
		}
	}
	dpSample := func(p *Pool) func() float64 {
		return func() float64 {
			p.ParallelFor(p.Threads(), func(lo, hi int) { probeDPBF16(1 << 16 * (hi - lo)) })
			return float64(p.Threads()) * probeDPBF16Flops(1<<16)
		}
	}
	amxSample := func(p *Pool) func() float64 {
		return func() float64 {
			p.ParallelFor(p.Threads(), func(lo, hi int) { probeAMX(1 << 12 * (hi - lo)) })
			return float64(p.Threads()) * probeAMXFlops(1<<12)
		}
	}
	for _, t := range threads {
		p := pools[t]
		r := bestRates(40, readSample(p, 32<<20), fmaSample(p), dpSample(p), amxSample(p))
		lim[t] = limits{r[0], r[1], r[2], r[3]}
		fmt.Fprintf(w, "limits t%d: read %.1f GB/s, f32 FMA %.1f GFLOP/s, VDPBF16PS %.1f GFLOP/s", t, r[0]/1e9, r[1]/1e9, r[2]/1e9)
		if AMXEnabled() {
			fmt.Fprintf(w, ", AMX-BF16 %.1f GFLOP/s", r[3]/1e9)
		}
		fmt.Fprintln(w)
	}
	for _, t := range threads {
		if t > 1 && lim[t].fma < 0.75*float64(t)*lim[threads[0]].fma/float64(threads[0]) {
			fmt.Fprintf(w, "warning: t%d FMA peak is %.1fx t%d's: other processes hold cores, t%d figures are not all-core figures\n",
				t, lim[t].fma/lim[threads[0]].fma, threads[0], t)
		}
	}
	fmt.Fprintf(w, "(each kernel's ratio below uses the probe re-measured alternately with it)\n")

	fmt.Fprintf(w, "\n%-34s", "MatVec (decode), weights >> cache")
	for _, t := range threads {
		fmt.Fprintf(w, " | t%d GB/s  of-bw", t)
	}
	fmt.Fprintln(w)
	type mvCase struct {
		name       string
		dt         DType
		rows, cols int
		count      int  // matrices per op (the absorbed per-head products)
		act8       bool // Q8_0 with integer activations
	}
	cases := []mvCase{
		{"BF16 1408x2048 expert gate/up", BF16, 1408, 2048, 1, false},
		{"BF16 2048x1408 expert down", BF16, 2048, 1408, 1, false},
		{"BF16 2048x10944 dense down", BF16, 2048, 10944, 1, false},
		{"BF16 2048x2816 shared down", BF16, 2048, 2816, 1, false},
		{"BF16 3072x2048 q", BF16, 3072, 2048, 1, false},
		{"BF16 576x2048 kv_a", BF16, 576, 2048, 1, false},
		{"BF16 16x(512x128) absorbed", BF16, 512, 128, 16, false},
		{"BF16 102400x2048 lm_head", BF16, 102400, 2048, 1, false},
		{"Q8_0 1408x2048", Q8_0, 1408, 2048, 1, false},
		{"Q8_0 1408x2048 int8 act", Q8_0, 1408, 2048, 1, true},
		{"Q8_0 2048x1408 int8 act", Q8_0, 2048, 1408, 1, true},
		{"Q4_0 1408x2048 (int8 act)", Q4_0, 1408, 2048, 1, false},
		{"Q4_0 2048x1408 (int8 act)", Q4_0, 2048, 1408, 1, false},
		{"F8E4M3 1408x2048", F8E4M3, 1408, 2048, 1, false},
		{"F16 1408x2048", F16, 1408, 2048, 1, false},
		{"F32 1408x2048", F32, 1408, 2048, 1, false},
	}
	for _, c := range cases {
		proto := benchMatrix(arena, c.dt, c.rows, c.cols, 7)
		per := proto.Bytes() * int64(c.count)
		copies := int(max(1, (256<<20)/per)) * c.count
		ws := make([]*Matrix, copies)
		for i := range ws {
			ws[i] = benchMatrix(arena, c.dt, c.rows, c.cols, uint64(i+8))
			ws[i].ActQ8 = c.act8
		}
		x := make([]float32, c.cols)
		y := make([]float32, c.rows)
		for i := range x {
			x[i] = float32(i%7) - 3
		}
		fmt.Fprintf(w, "%-34s", c.name)
		for _, t := range threads {
			p := pools[t]
			k := 0
			rounds := 80
			if per > 64<<20 {
				rounds = 8
			}
			// The probe reads the same weights the kernel does (the next
			// matrices in the rotation): physical placement moves read
			// bandwidth by a few percent between buffers.
			r := bestRates(rounds, func() float64 {
				var done int
				for j := 0; j < c.count; j++ {
					done += probeSplit(p, ws[k].Data)
					k = (k + 1) % len(ws)
				}
				return float64(done)
			}, func() float64 {
				for j := 0; j < c.count; j++ {
					p.MatVec(y, ws[k], x)
					k = (k + 1) % len(ws)
				}
				return float64(per)
			})
			fmt.Fprintf(w, " | %7.1f  %5.1f%%", r[1]/1e9, 100*r[1]/r[0])
		}
		fmt.Fprintln(w)
	}

	// The whole expert (fused gate/up, SiLU·mul, down) for one token.
	{
		gates := make([][3]*Matrix, max(1, (256<<20)/(3*1408*2048*2)))
		for i := range gates {
			gates[i] = [3]*Matrix{benchMatrix(arena, BF16, 1408, 2048, uint64(3*i)), benchMatrix(arena, BF16, 1408, 2048, uint64(3*i+1)), benchMatrix(arena, BF16, 2048, 1408, uint64(3*i+2))}
		}
		per := 3 * gates[0][0].Bytes()
		x, out := make([]float32, 2048), make([]float32, 2048)
		scratch := make([]float32, FFNScratchSize(1, 1408))
		fmt.Fprintf(w, "%-34s", "BF16 ExpertFFN 2048-1408-2048 n=1")
		for _, t := range threads {
			p := pools[t]
			k := 0
			r := bestRates(30, func() float64 {
				e := gates[k]
				k = (k + 1) % len(gates)
				return float64(probeSplit(p, e[0].Data) + probeSplit(p, e[1].Data) + probeSplit(p, e[2].Data))
			}, func() float64 {
				e := gates[k]
				k = (k + 1) % len(gates)
				p.ExpertFFN(out, x, 1, e[0], e[1], e[2], scratch)
				return float64(per)
			})
			fmt.Fprintf(w, " | %7.1f  %5.1f%%", r[1]/1e9, 100*r[1]/r[0])
		}
		fmt.Fprintln(w)
	}

	// Prefill products run for tens of milliseconds on the full shapes, long
	// enough that on a shared machine nearly every sample is preempted. The
	// kernels work on W rows independently, so each thread gets a 128-row
	// slab of the shape (same columns and batch, same per-row work): short
	// samples, best of many.
	fmt.Fprintf(w, "\n%-34s", "MatMul (prefill), 128 W rows/thread")
	for _, t := range threads {
		fmt.Fprintf(w, " | t%d GFLOP/s of-peak", t)
	}
	fmt.Fprintln(w)
	for _, c := range []struct {
		name    string
		dt      DType
		cols    int
		bf16act bool
		n       int
	}{
		{"BF16 x2048 f32 act n=512", BF16, 2048, false, 512},
		{"BF16 x1408 f32 act n=512", BF16, 1408, false, 512},
		{"BF16 x2048 bf16 act n=512 (DP)", BF16, 2048, true, 512},
		{"BF16 x1408 bf16 act n=512 (DP)", BF16, 1408, true, 512},
		{"BF16 x2048 f32 act n=48 (expert)", BF16, 2048, false, 48},
		{"BF16 x2048 bf16 act n=48 (DP)", BF16, 2048, true, 48},
		{"BF16 x2048 bf16 act n=512 (AMX)", BF16, 2048, true, 512},
		{"BF16 x1408 bf16 act n=512 (AMX)", BF16, 1408, true, 512},
		{"BF16 x2048 bf16 act n=48 (AMX)", BF16, 2048, true, 48},
		{"Q8_0 x2048 f32 act n=512", Q8_0, 2048, false, 512},
		{"Q8_0 x2048 f32 act n=48", Q8_0, 2048, false, 48},
		{"Q8_0 x2048 int8 act n=512", Q8_0, 2048, false, 512},
		{"Q4_0 x2048 int8 act n=48", Q4_0, 2048, false, 48},
		{"F8E4M3 x2048 f32 act n=512", F8E4M3, 2048, false, 512},
	} {
		// (AMX) rows run TDPBF16PS tiles, the (DP) rows VDPBF16PS even
		// where AMX would take them.
		useAMX := strings.Contains(c.name, "(AMX)")
		if useAMX && !AMXEnabled() {
			continue
		}
		n := c.n
		x := make([]float32, n*c.cols)
		for i := range x {
			x[i] = float32(i%13)*0.1 - 0.6
		}
		fmt.Fprintf(w, "%-34s", c.name)
		for _, t := range threads {
			rows := 128 * t
			wm := benchMatrix(arena, c.dt, rows, c.cols, 3)
			wm.ActQ8 = c.dt == Q8_0 && strings.Contains(c.name, "int8")
			y := make([]float32, n*rows)
			flops := 2 * float64(n) * float64(rows) * float64(c.cols)
			p := pools[t]
			peak := fmaSample(p)
			if c.bf16act && dpAvailable(wm) {
				peak = dpSample(p)
				if useAMX {
					peak = amxSample(p)
				}
			}
			r := bestRates(30, peak, func() float64 {
				if c.bf16act {
					was := AMXEnabled()
					SetAMX(was && useAMX)
					p.MatMulBF16Act(y, wm, x, n)
					SetAMX(was)
				} else {
					p.MatMul(y, wm, x, n)
				}
				return flops
			})
			fmt.Fprintf(w, " | %8.1f  %5.1f%%", r[1]/1e9, 100*r[1]/r[0])
		}
		fmt.Fprintln(w)
	}

	fmt.Fprintf(w, "\n%-34s", "MLADecode H=16 R=512 P=64")
	for _, t := range threads {
		fmt.Fprintf(w, " | t%d µs  GFLOP/s of-FMA", t)
	}
	fmt.Fprintln(w)
	for _, tokens := range []int{512, 4096} {
		const H, R, P, bs = 16, 512, 64, 64
		blocks := make([][]float32, ceilDiv(tokens, bs))
		for i := range blocks {
			blocks[i] = make([]float32, bs*(R+P))
			for j := range blocks[i] {
				blocks[i][j] = float32((i+j)%11)*0.01 - 0.05
			}
		}
		qLat, qPE, out := make([]float32, H*R), make([]float32, H*P), make([]float32, H*R)
		for i := range qLat {
			qLat[i] = float32(i%5) * 0.1
		}
		scratch := make([]float32, MLAScratchSize(H, tokens))
		fmt.Fprintf(w, "%-34s", fmt.Sprintf("  %d tokens (cache %.1f MB)", tokens, float64(tokens*(R+P)*4)/1e6))
		for _, t := range threads {
			p := pools[t]
			flops := 2 * float64(H*tokens*(2*R+P))
			r := bestRates(20, fmaSample(p), func() float64 {
				p.MLADecode(out, qLat, qPE, blocks, bs, tokens, H, R, P, 0.1, scratch)
				return flops
			})
			fmt.Fprintf(w, " | %6.0f %6.1f %5.1f%%", flops/r[1]*1e6, r[1]/1e9, 100*r[1]/r[0])
		}
		fmt.Fprintln(w)
	}

	// Q8_0 against the BF16 it was quantised from, on Gaussian weights and
	// activations (kernel level; the model's logprob deviation is the
	// engine's to report).
	{
		wb := benchMatrix(arena, BF16, 1408, 2048, 5)
		g := uint64(12345)
		gauss := func() float32 { // sum of 4 uniforms, variance 1
			var s float32
			for k := 0; k < 4; k++ {
				g ^= g << 13
				g ^= g >> 7
				g ^= g << 17
				s += float32(g>>40)/(1<<24) - 0.5
			}
			return s * 1.7320508
		}
		for i := 0; i < len(wb.Data); i += 2 {
			binary.LittleEndian.PutUint16(wb.Data[i:], F32ToBF16(gauss()*0.02))
		}
		wq, err := QuantizeQ8(wb)
		if err != nil {
			return err
		}
		x := make([]float32, 2048)
		for i := range x {
			x[i] = gauss()
		}
		yb, yq := make([]float32, 1408), make([]float32, 1408)
		p := pools[threads[0]]
		p.MatVec(yb, wb, x)
		p.MatVec(yq, wq, x)
		var maxD, sumD2, sumY2 float64
		for i := range yb {
			d := float64(yq[i] - yb[i])
			maxD = max(maxD, math.Abs(d))
			sumD2 += d * d
			sumY2 += float64(yb[i]) * float64(yb[i])
		}
		fmt.Fprintf(w, "\nQ8_0 vs BF16 MatVec 1408x2048 (Gaussian): rms error %.2e of rms output, max |Δ| %.2e (rms output %.3f); bytes %.2fx\n",
			math.Sqrt(sumD2/sumY2), maxD, math.Sqrt(sumY2/1408), float64(wq.Bytes())/float64(wb.Bytes()))
	}

	fmt.Fprintf(w, "\nvector kernels (1 thread, ns/call, 2048 floats unless noted)\n")
	a, b, o := make([]float32, 2048), make([]float32, 2048), make([]float32, 2048)
	for i := range a {
		a[i], b[i] = float32(i%9)*0.1-0.4, float32(i%5)*0.2-0.3
	}
	idx := make([]int, 0, 6)
	for _, v := range []struct {
		name string
		f    func()
	}{
		{"Dot", func() { Dot(a, b) }},
		{"Axpy", func() { Axpy(o, 0.5, a) }},
		{"RMSNorm", func() { RMSNorm(o, a, b, 1e-6) }},
		{"SiLUMul", func() { SiLUMul(o, a, b) }},
		{"Softmax", func() { copy(o, a); Softmax(o) }},
		{"RoPE 64", func() { RoPEInterleaved(o[:64], a[:32], b[:32]) }},
		{"TopK 6 of 64", func() { idx = TopK(idx, a[:64], 6) }},
	} {
		sec := bestOf(20, v.f)
		fmt.Fprintf(w, "  %-12s %8.0f\n", v.name, sec*1e9)
	}
	return nil
}

// bestOf returns the fastest per-call time of f over reps batches of at
// least 1ms each (after one warm-up call). Short batches let some run
// without being preempted on a shared machine.
func bestOf(reps int, f func()) float64 {
	f()
	best := math.Inf(1)
	for r := 0; r < reps; r++ {
		calls := 0
		t0 := time.Now()
		var el time.Duration
		for el < time.Millisecond {
			f()
			calls++
			el = time.Since(t0)
		}
		best = min(best, el.Seconds()/float64(calls))
	}
	return best
}

// probeSplit reads the largest prefix of data whose per-thread shares are
// multiples of 512 bytes, split across the pool, and returns its length.
func probeSplit(p *Pool, data []byte) int {
	per := len(data) / p.Threads() &^ 511
	if per == 0 {
		return 0
	}
	two := nextProbePattern()
	p.ParallelFor(p.Threads(), func(lo, hi int) { probeRead(data[lo*per:hi*per], two) })
	return per * p.Threads()
}

// probeSamples alternates the probe's read pattern between samples, so a
// best-of over samples keeps the faster pattern (see probeRead). RunBench
// runs its samplers on one goroutine.
var probeSamples uint64

func nextProbePattern() bool {
	probeSamples++
	return probeSamples%2 == 0
}

// bestRates runs the samplers alternately (A B A B ...) for rounds rounds
// and returns each one's best rate in units per second; a sampler returns
// the units it did. Alternating makes the ratios of the results
// meaningful while the machine's bandwidth drifts.
func bestRates(rounds int, samplers ...func() float64) []float64 {
	best := make([]float64, len(samplers))
	for _, f := range samplers {
		f() // warm up
	}
	for r := 0; r < rounds; r++ {
		for i, f := range samplers {
			t0 := time.Now()
			u := f()
			best[i] = max(best[i], u/time.Since(t0).Seconds())
		}
	}
	return best
}

// fillRandom fills buf with xorshift bytes (fast; content is irrelevant).
func fillRandom(buf []byte, seed uint64) {
	s := seed*0x9e3779b97f4a7c15 | 1
	for i := 0; i+8 <= len(buf); i += 8 {
		s ^= s << 13
		s ^= s >> 7
		s ^= s << 17
		binary.LittleEndian.PutUint64(buf[i:], s)
	}
}

// benchArena hands out huge-page-backed buffers and frees them together.
type benchArena struct{ release []func() error }

// bytes returns n bytes from the arena; a nil arena (or a failed mapping)
// gives Go heap memory.
func (a *benchArena) bytes(n int) []byte {
	if a == nil {
		return make([]byte, n)
	}
	b, release, err := hugemem.Alloc(n)
	if err != nil {
		return make([]byte, n)
	}
	a.release = append(a.release, release)
	return b
}

func (a *benchArena) free() {
	for _, r := range a.release {
		r()
	}
	a.release = nil
}

// benchMatrix builds a matrix of moderate finite values quickly, its data
// in a (nil: the Go heap).
func benchMatrix(a *benchArena, dt DType, rows, cols int, seed uint64) *Matrix {
	m := &Matrix{DType: dt, Rows: rows, Cols: cols}
	n := rows * cols
	m.Data = a.bytes(rows * m.rowBytes())
	fillRandom(m.Data, seed)
	switch dt {
	case F32:
		for i := 0; i < n; i++ {
			v := binary.LittleEndian.Uint32(m.Data[4*i:])&0x807fffff | 0x3f000000
			binary.LittleEndian.PutUint32(m.Data[4*i:], v)
		}
	case BF16:
		for i := 0; i < n; i++ {
			v := binary.LittleEndian.Uint16(m.Data[2*i:])&0x807f | 0x3f00
			binary.LittleEndian.PutUint16(m.Data[2*i:], v)
		}
	case F16:
		for i := 0; i < n; i++ {
			v := binary.LittleEndian.Uint16(m.Data[2*i:])&0x83ff | 0x3800
			binary.LittleEndian.PutUint16(m.Data[2*i:], v)
		}
	case F8E4M3:
		for i := range m.Data {
			m.Data[i] &= 0xb7
		}
		m.Scales = make([]float32, ceilDiv(rows, F8Block)*ceilDiv(cols, F8Block))
	case Q8_0, Q4_0:
		m.Scales = make([]float32, rows*(cols/Q8Block))
	}
	for i := range m.Scales {
		m.Scales[i] = 0.01
	}
	return m
}
