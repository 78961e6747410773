//go:build amd64 && !purego

package kernels

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"runtime/pprof"
	"strings"
	"sync"
	"testing"
	"time"
)

// withAMX runs f with the AMX path forced on (from every batch size) or
// off, restoring both afterwards.
func withAMX(t testing.TB, on bool, f func()) {
	t.Helper()
	withAMXFrom(t, on, &amxMinN, f)
}

// withAMXFrom runs f with AMX on or off and *minN, a path's smallest
// batch, at 1, restoring both afterwards.
func withAMXFrom(t testing.TB, on bool, minN *int, f func()) {
	t.Helper()
	was, n := amxOn, *minN
	defer func() { amxOn, *minN = was, n }()
	if err := SetAMX(on); err != nil {
		t.Skip(err)
	}
	*minN = 1
	f()
}

// amxEps: each float32 sum of K exact products (bf16 x bf16 is exact in
// float32) is within about K*2^-24 * sum|w*x| of the real sum, whatever
// the order, so any two orders (AMX tiles, VDPBF16PS, the plain loop) are
// within twice that of each other; the tests allow K*2^-24 against the
// float64 reference.
func amxTol(cols int) float64 { return float64(cols) * 0x1p-24 }

// TestMatMulAMX compares the AMX path, the VDPBF16PS path and the plain
// twin (matMulRowsPlain with roundX) on the same inputs, against a float64
// reference of the bf16-rounded product, for batch, row and column tails
// (tile rows and columns below 16, 16-pair tails of K, odd columns) and
// 1-3 threads.
func TestMatMulAMX(t *testing.T) {
	if ok, why := AMXAvailable(); !ok {
		t.Skip("AMX unavailable: " + why)
	}
	rng := rand.New(rand.NewPCG(41, 42))
	pools := []*Pool{NewPool(1), NewPool(2), NewPool(3)}
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	shapes := [][2]int{{33, 64}, {48, 97}, {17, 31}, {70, 160}, {16, 40}, {100, 33}, {5, 2}, {64, 1024}}
	var ns []int
	for n := 1; n <= 40; n++ {
		ns = append(ns, n)
	}
	ns = append(ns, 47, 100, 512)
	for si, sh := range shapes {
		rows, cols := sh[0], sh[1]
		w := randMatrix(rng, BF16, rows, cols, 2*(si%2))
		scratch := make([]float32, matMulScratch(cols))
		for _, n := range ns {
			if n == 512 && cols > 160 {
				continue
			}
			x := randVec(rng, n*cols, 0)
			want, mag := refMatMul(w, x, n, true)
			plain := make([]float32, n*rows)
			matMulRowsPlain(plain, w, x, n, 0, rows, scratch, true)
			check := func(what string, y []float32) {
				t.Helper()
				for i := range y {
					if !closeRel(float64(y[i]), want[i], mag[i], amxTol(cols)) {
						t.Fatalf("%s %dx%d n=%d: y[%d]=%g want %g (sum|w*x| %g)", what, rows, cols, n, i, y[i], want[i], mag[i])
					}
				}
			}
			check("plain", plain)
			for _, p := range pools {
				name := fmt.Sprintf("t%d", p.Threads())
				yDP, checkDP := guarded(n * rows)
				withAMX(t, false, func() { p.MatMulBF16Act(yDP, w, x, n) })
				checkDP(t)
				check("DP "+name, yDP)
				yAMX, checkAMX := guarded(n * rows)
				withAMX(t, true, func() { p.MatMulBF16Act(yAMX, w, x, n) })
				checkAMX(t)
				check("AMX "+name, yAMX)
				for i := range yAMX {
					if !closeRel(float64(yAMX[i]), float64(yDP[i]), mag[i], 2*amxTol(cols)) {
						t.Fatalf("AMX/DP %s %dx%d n=%d: y[%d] %g vs %g", name, rows, cols, n, i, yAMX[i], yDP[i])
					}
				}
			}
		}
	}
}

// TestMatMulAMXSpecial: subnormal weights count as zero on AMX and DP
// alike (both flush bf16 subnormal inputs; the plain loop keeps them, a
// difference of about 2^-126 |x| per product), and Inf and NaN reach the
// same outputs on every path.
func TestMatMulAMXSpecial(t *testing.T) {
	if ok, why := AMXAvailable(); !ok {
		t.Skip("AMX unavailable: " + why)
	}
	rng := rand.New(rand.NewPCG(43, 44))
	p := NewPool(2)
	defer p.Close()
	const rows, cols, n = 40, 96, 37
	w := randMatrix(rng, BF16, rows, cols, 0)
	put := func(r, c int, v uint16) { binary.LittleEndian.PutUint16(w.Data[2*(r*cols+c):], v) }
	for r := 0; r < rows; r++ {
		put(r, rng.IntN(cols), 0x0001|uint16(rng.IntN(2))<<15) // subnormal
	}
	put(3, 5, 0x7f80)  // +Inf
	put(7, 90, 0xff80) // -Inf
	put(11, 0, 0x7fc0) // NaN
	put(12, 1, 0x7f80) // +Inf and -Inf in one row: NaN in any order
	put(12, 2, 0xff80)
	x := randVec(rng, n*cols, 0)
	x[5*cols+5] = 0 // Inf * 0 = NaN for token 5, row 3
	scratch := make([]float32, matMulScratch(cols))
	plain := make([]float32, n*rows)
	matMulRowsPlain(plain, w, x, n, 0, rows, scratch, true)
	yDP := make([]float32, n*rows)
	yAMX := make([]float32, n*rows)
	withAMX(t, false, func() { p.MatMulBF16Act(yDP, w, x, n) })
	withAMX(t, true, func() { p.MatMulBF16Act(yAMX, w, x, n) })
	_, mag := refMatMul(w, x, n, true)
	for i := range plain {
		a, d, q := yAMX[i], yDP[i], plain[i]
		fa, fd, fq := float64(a), float64(d), float64(q)
		switch {
		case math.IsNaN(fq) || math.IsInf(fq, 0):
			if !(math.IsNaN(fq) && math.IsNaN(fa) && math.IsNaN(fd)) && !(fa == fq && fd == fq) {
				t.Fatalf("y[%d]: plain %g, DP %g, AMX %g", i, q, d, a)
			}
		case !closeRel(fa, fq, mag[i], amxTol(cols)) || !closeRel(fd, fq, mag[i], amxTol(cols)):
			t.Fatalf("y[%d]: plain %g, DP %g, AMX %g", i, q, d, a)
		}
	}
	if !math.IsNaN(float64(yAMX[5*rows+3])) || !math.IsInf(float64(yAMX[0*rows+3]), 0) || !math.IsNaN(float64(yAMX[12])) {
		t.Fatalf("special values: y[5][3]=%g y[0][3]=%g y[0][12]=%g", yAMX[5*rows+3], yAMX[3], yAMX[12])
	}
}

// TestAMXConfig checks the LDTILECFG layout of a tail configuration.
func TestAMXConfig(t *testing.T) {
	c := amxCfg(16, 4, 16, 3, 5)
	if c[0] != 1 {
		t.Fatalf("palette %d", c[0])
	}
	wantCols := [8]int{64, 12, 64, 12, 20, 20, 64, 12}
	wantRows := [8]int{16, 16, 4, 4, 16, 4, 5, 5}
	for i := 0; i < 8; i++ {
		if got := int(binary.LittleEndian.Uint16(c[16+2*i:])); got != wantCols[i] || int(c[48+i]) != wantRows[i] {
			t.Fatalf("tile %d: %d rows x %d bytes, want %d x %d", i, c[48+i], got, wantRows[i], wantCols[i])
		}
	}
	if c := amxCfg(7, 0, 9, 0, 16); c[48+2] != 0 || c[16+2*3] != 0 || c[48+5] != 0 || c[48+7] != 0 {
		t.Fatalf("unused tiles configured: % x", c)
	}
}

// TestAMXEnvSwitch: EXPERTMESH_AMX=0 in the environment turns the AMX path
// off from the start (checked in a child process, since it is read once).
func TestAMXEnvSwitch(t *testing.T) {
	if os.Getenv("AMX_ENV_CHILD") != "" {
		fmt.Printf("amx-enabled=%v\n", AMXEnabled())
		return
	}
	if ok, why := AMXAvailable(); !ok {
		t.Skip("AMX unavailable: " + why)
	}
	for _, c := range []struct{ env, want string }{{"0", "false"}, {"1", "true"}} {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestAMXEnvSwitch$", "-test.count=1")
		cmd.Env = append(os.Environ(), "AMX_ENV_CHILD=1", "EXPERTMESH_AMX="+c.env)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("child: %v\n%s", err, out)
		}
		if !strings.Contains(string(out), "amx-enabled="+c.want) {
			t.Fatalf("EXPERTMESH_AMX=%s: child says %q, want amx-enabled=%s", c.env, out, c.want)
		}
	}
}

// TestAMXUnderSignals: tile state survives signals (SIGPROF from a CPU
// profile, SIGURG preemption requests to long-running goroutines) and
// goroutines moving between threads: repeated AMX products on 2 threads,
// with spinning goroutines competing for the Ps, all equal bit for bit.
func TestAMXUnderSignals(t *testing.T) {
	if ok, why := AMXAvailable(); !ok {
		t.Skip("AMX unavailable: " + why)
	}
	if err := pprof.StartCPUProfile(io.Discard); err == nil {
		defer pprof.StopCPUProfile()
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				for j := 0; j < 1e6; j++ {
				}
			}
		}()
	}
	defer func() { close(stop); wg.Wait() }()
	rng := rand.New(rand.NewPCG(47, 48))
	const rows, cols, n = 256, 1024, 96
	w := randMatrix(rng, BF16, rows, cols, 0)
	x := randVec(rng, n*cols, 0)
	p := NewPool(2)
	defer p.Close()
	first := make([]float32, n*rows)
	y := make([]float32, n*rows)
	withAMX(t, true, func() {
		p.MatMulBF16Act(first, w, x, n)
		deadline := time.Now().Add(300 * time.Millisecond)
		runs := 0
		for ; time.Now().Before(deadline) || runs < 20; runs++ {
			p.MatMulBF16Act(y, w, x, n)
			for i := range y {
				if math.Float32bits(y[i]) != math.Float32bits(first[i]) {
					t.Fatalf("run %d: y[%d]=%g, first run %g", runs, i, y[i], first[i])
				}
			}
		}
		t.Logf("%d identical runs", runs)
	})
}
