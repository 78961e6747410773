package capacity_test

import (
	"fmt"
	"time"

	"github.com/expertmesh/expertmesh/capacity"
)

// DeepSeek-V2 on 4 attention and 8 expert nodes of 300 GB/s and 6
// TFLOP/s each, 256 users at 4096 tokens of context, 100 Gbit/s links.
func Example() {
	c, err := capacity.LoadModel("deepseek-v2")
	if err != nil {
		panic(err)
	}
	s := capacity.DefaultSetup(c)
	s.AttnNodes, s.ExpertNodes, s.Concurrency, s.Context = 4, 8, 256, 4096
	s.Attn = capacity.Rates{GBps: 300, GFLOPs: 6000}
	s.Expert = s.Attn
	s.Link = capacity.Link{Latency: 10 * time.Microsecond, Gbps: 100}
	p, err := capacity.Predict(c, s)
	if err != nil {
		panic(err)
	}
	fmt.Printf("step %.0f ms, %.1f tok/s per user, %.0f tok/s total, hop hidden with %d micro-batches\n",
		p.StepMs, p.PerUserTokS, p.TotalTokS, p.HideMicroBatches)
	// Output: step 1284 ms, 0.8 tok/s per user, 199 tok/s total, hop hidden with 2 micro-batches
}
