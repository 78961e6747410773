package coordinator

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/attnnode"
	"github.com/expertmesh/expertmesh/model"
)

// BenchmarkServe measures generated tokens per second through the whole
// HTTP path (one in-process attention node on tiny-v2, as `serve` runs)
// with 1, 8 and 32 concurrent clients, and Engine.Generate alone as the
// no-coordinator baseline, in one run so the ratios are comparable.
func BenchmarkServe(b *testing.B) {
	const promptLen, maxTokens = 16, 32
	b.Run("engine-generate", func(b *testing.B) {
		r, err := refOnce()
		if err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		toks := 0
		for i := 0; b.Loop(); i++ {
			res, err := r.eng.Generate(context.Background(), r.cache, model.GenerateRequest{Prompt: prompt(promptLen, i), MaxTokens: maxTokens, Logprobs: -1})
			if err != nil {
				b.Fatal(err)
			}
			toks += len(res.Tokens)
		}
		b.ReportMetric(float64(toks)/time.Since(start).Seconds(), "tok/s")
	})
	for _, conc := range []int{1, 8, 32} {
		b.Run(fmt.Sprintf("http-clients=%d", conc), func(b *testing.B) {
			nc := attnnode.DefaultConfig()
			nc.ModelDir, nc.Threads, nc.CacheBytes = tinyDir, 1, 16<<20
			nc.ListenAddr = ""
			node, err := attnnode.Start(context.Background(), nc)
			if err != nil {
				b.Fatal(err)
			}
			defer node.Close()
			cfg := DefaultConfig()
			cfg.ModelDir, cfg.Addr = tinyDir, "127.0.0.1:0"
			c, err := Start(context.Background(), cfg, map[string]AttentionNode{"serve": node})
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			<-c.Ready()
			cl := &cluster{c: c, url: "http://" + c.Addr()}
			start := time.Now()
			var mu sync.Mutex
			toks := 0
			for i := 0; b.Loop(); i++ {
				var wg sync.WaitGroup
				for j := range conc {
					wg.Go(func() {
						code, out := complete(b, cl, map[string]any{"prompt": prompt(promptLen, i*conc+j), "max_tokens": maxTokens, "temperature": 0, "ignore_eos": true})
						if code != 200 {
							b.Errorf("status %d", code)
							return
						}
						mu.Lock()
						toks += len(out.Choices[0].TokenIDs)
						mu.Unlock()
					})
				}
				wg.Wait()
			}
			b.ReportMetric(float64(toks)/time.Since(start).Seconds(), "tok/s")
		})
	}
}
