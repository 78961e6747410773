package kernels

import (
	"fmt"
	"testing"
	"time"
)

func TestZZDecode(t *testing.T) {
	if !*runBench {
		t.Skip()
	}
	buf := make([]byte, 1<<30)
	fillRandom(buf, 1)
	shapes := [][2]int{{1408, 2048}, {2048, 1408}, {576, 2048}}
	dts := []DType{BF16, Q8_0, F8E4M3}
	wss := map[string][]*Matrix{}
	for _, dt := range dts {
		for _, sh := range shapes {
			k := fmt.Sprint(dt, sh)
			wss[k] = make([]*Matrix, 60)
			for i := range wss[k] {
				wss[k][i] = benchMatrix(dt, sh[0], sh[1], uint64(i))
			}
		}
	}
	for _, th := range []int{1, 2} {
		p := NewPool(th)
		best := map[string]float64{}
		off := 0
		const chunk = 64 << 20
		for round := 0; round < 30; round++ {
			t0 := time.Now()
			p.ParallelFor(64, func(lo, hi int) { probeRead(buf[off+lo<<20 : off+hi<<20]) })
			best["bw"] = max(best["bw"], chunk/time.Since(t0).Seconds())
			off = (off + chunk) % len(buf)
			for _, dt := range dts {
				for _, sh := range shapes {
					key := fmt.Sprint(dt, sh)
					ws := wss[key]
					x := make([]float32, sh[1])
					y := make([]float32, sh[0])
					t0 := time.Now()
					for k := 0; k < 10; k++ {
						p.MatVec(y, ws[(round*10+k)%len(ws)], x)
					}
					best[key] = max(best[key], 10*float64(ws[0].Bytes())/time.Since(t0).Seconds())
				}
			}
		}
		for _, dt := range dts {
			line := fmt.Sprintf("t%d bw %.1f %s:", th, best["bw"]/1e9, dt)
			for _, sh := range shapes {
				line += fmt.Sprintf(" %v %.1f%%", sh, 100*best[fmt.Sprint(dt, sh)]/best["bw"])
			}
			t.Log(line)
		}
		p.Close()
	}
}
