package attnnode

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// BenchmarkDecodeStep measures attention-node decode throughput (tokens/s
// over a batch of sequences decoding together) with routed experts local
// (what `serve` runs) against experts on three expert nodes over loopback
// gRPC (what `up` runs), with ping-pong micro-batching off (1) and on (2).
// EXPERTMESH_BENCH_MODEL points it at a bigger checkpoint (v2-lite-4l).
//
//	go test -run '^$' -bench DecodeStep -benchtime 20x ./attnnode/
func BenchmarkDecodeStep(b *testing.B) {
	dir := os.Getenv("EXPERTMESH_BENCH_MODEL")
	if dir == "" {
		dir = genTiny(b, "tiny-v2")
	}
	// Expert nodes live for the whole benchmark, shared by the remote modes.
	table, _ := startExperts(b, dir, 3)
	for _, mode := range []struct {
		name   string
		remote bool
		mb     int
	}{{"local", false, 1}, {"remote-pp1", true, 1}, {"remote-pp2", true, 2}} {
		for _, batch := range []int{1, 8, 32} {
			b.Run(fmt.Sprintf("%s/batch=%d", mode.name, batch), func(b *testing.B) {
				cfg := DefaultConfig()
				cfg.ModelDir, cfg.CacheBytes, cfg.MicroBatches = dir, 512<<20, mode.mb
				if mode.remote {
					cfg.Placement = placement.NewStatic(table)
				}
				node, err := Start(context.Background(), inProcess(cfg))
				if err != nil {
					b.Fatal(err)
				}
				defer node.Close()
				benchDecode(b, node, batch)
			})
		}
	}
}

func benchDecode(b *testing.B, node *Node, batch int) {
	const promptLen, span = 16, 256
	ctx := context.Background()
	step := uint64(0)
	last := make([]int32, batch)
	pos := 0
	prefill := func() {
		step++
		req := &meshpb.StepRequest{Step: step}
		for i := range batch {
			id := uint64(i + 1)
			req.Release = append(req.Release, id)
			toks := make([]int32, promptLen)
			for j := range toks {
				toks[j] = int32((i*13 + j*7) % 256)
			}
			req.Work = append(req.Work, &meshpb.SeqWork{SeqId: id, Tokens: toks, Sample: true, ReserveTokens: promptLen + span, Logprobs: -1, Sampling: &meshpb.SamplingParams{}})
		}
		resp, err := node.Step(ctx, req)
		if err != nil {
			b.Fatal(err)
		}
		for i, r := range resp.Results {
			last[i] = r.Token
		}
		pos = promptLen
	}
	prefill()
	b.ResetTimer()
	for range b.N {
		if pos >= promptLen+span-1 {
			b.StopTimer()
			prefill()
			b.StartTimer()
		}
		step++
		req := &meshpb.StepRequest{Step: step}
		for i := range batch {
			req.Work = append(req.Work, &meshpb.SeqWork{SeqId: uint64(i + 1), Tokens: []int32{last[i]}, StartPos: uint32(pos), Sample: true})
		}
		resp, err := node.Step(ctx, req)
		if err != nil {
			b.Fatal(err)
		}
		for i, r := range resp.Results {
			last[i] = r.Token
		}
		pos++
	}
	b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "tokens/s")
}
