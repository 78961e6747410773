package expertnode

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// benchRows are the batch sizes the benchmarks compare: decode at batch 1,
// 8 and 32 (the throughput points).
var benchRows = []int{1, 8, 32}

// benchRequest is one MoE layer's dispatch at tiny-v2 shape: rows rows,
// k=6 experts each, all held by the node.
func benchRequest(rows int) *meshpb.DispatchRequest {
	rng := rand.New(rand.NewPCG(uint64(rows), 5))
	x := make([]float32, rows*64)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	ids := make([]int32, rows*6)
	w := make([]float32, rows*6)
	for i := range rows {
		for j, e := range rng.Perm(160)[:6] {
			ids[i*6+j], w[i*6+j] = int32(e), rng.Float32()
		}
	}
	return &meshpb.DispatchRequest{Id: 1, Layer: 1, Hidden: wire.F32Matrix(x, rows, 64), K: 6, ExpertIds: ids, GateWeights: w}
}

// BenchmarkDispatchLoopback is one MoE layer's dispatch round trip to an
// expert node over gRPC on loopback: send, validate, compute, reply. Compare
// with BenchmarkLocalCompute (the compute alone) and
// BenchmarkRawTCPRoundTrip (the same bytes over a bare socket).
func BenchmarkDispatchLoopback(b *testing.B) {
	cfg := testConfig("all")
	cfg.Threads = 1 // the client shares the machine; see doc of BenchmarkLocalCompute
	node := startNode(b, cfg)
	_, c := dial(b, node)
	for _, rows := range benchRows {
		b.Run(fmt.Sprintf("rows=%d", rows), func(b *testing.B) {
			st, err := c.Dispatch(context.Background())
			if err != nil {
				b.Fatal(err)
			}
			defer st.CloseSend()
			req := benchRequest(rows)
			var computeUS uint64
			b.SetBytes(int64(proto.Size(req)))
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				req.Id = uint64(i)
				if err := st.Send(req); err != nil {
					b.Fatal(err)
				}
				r, err := st.Recv()
				if err != nil || r.Code != 0 {
					b.Fatalf("%v %v", r, err)
				}
				computeUS += r.ComputeUs
			}
			b.ReportMetric(float64(computeUS)*1e3/float64(b.N), "compute-ns/op")
		})
	}
}

// BenchmarkLocalCompute is the expert computation of one dispatch, in
// process, on a one-thread pool like the benchmarked node.
func BenchmarkLocalCompute(b *testing.B) {
	w, err := model.Load(tinyDir, model.LoadOptions{ExpertsOnly: true})
	if err != nil {
		b.Fatal(err)
	}
	defer w.Close()
	pool := kernels.NewPool(1)
	defer pool.Close()
	r := model.NewLocalExperts(w, pool)
	for _, rows := range benchRows {
		b.Run(fmt.Sprintf("rows=%d", rows), func(b *testing.B) {
			req := benchRequest(rows)
			x := make([]float32, rows*64)
			if err := wire.DecodeF32(x, req.Hidden.Data); err != nil {
				b.Fatal(err)
			}
			out := make([]float32, rows*64)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				clear(out)
				if err := r.Run(1, x, rows, 6, req.ExpertIds, req.GateWeights, out); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRawTCPRoundTrip sends a dispatch's encoded size over a bare
// loopback TCP connection and reads back a reply's encoded size: the floor
// any RPC layer is measured against.
func BenchmarkRawTCPRoundTrip(b *testing.B) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer lis.Close()
	for _, rows := range benchRows {
		b.Run(fmt.Sprintf("rows=%d", rows), func(b *testing.B) {
			req := benchRequest(rows)
			reqBytes := proto.Size(req)
			resp := &meshpb.DispatchResponse{Id: 1 << 40, Partial: wire.F32Matrix(make([]float32, rows*64), rows, 64), ComputeUs: 1000}
			respBytes := proto.Size(resp)
			done := make(chan error, 1)
			go func() {
				conn, err := lis.Accept()
				if err != nil {
					done <- err
					return
				}
				defer conn.Close()
				in, out := make([]byte, reqBytes), make([]byte, respBytes)
				for {
					if _, err := io.ReadFull(conn, in); err != nil {
						done <- nil // client closed
						return
					}
					if _, err := conn.Write(out); err != nil {
						done <- err
						return
					}
				}
			}()
			conn, err := net.Dial("tcp", lis.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			out, in := make([]byte, reqBytes), make([]byte, respBytes)
			b.SetBytes(int64(reqBytes))
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if _, err := conn.Write(out); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(conn, in); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			conn.Close()
			if err := <-done; err != nil {
				b.Fatal(err)
			}
		})
	}
}

// TestSteadyStateAllocs checks the server path (validate, decode, compute,
// encode) allocates nothing once buffers have grown, at 1 and 32 rows and
// with both wire dtypes: an untraced request makes no span.
func TestSteadyStateAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts differ under the race detector")
	}
	cfg := testConfig("all")
	cfg.Threads = 1
	node := startNode(t, cfg)
	ctx := context.Background()
	allocs := map[string]float64{}
	for _, c := range []struct {
		rows int
		dt   meshpb.DType
	}{{1, meshpb.DType_DTYPE_F32}, {32, meshpb.DType_DTYPE_F32}, {1, meshpb.DType_DTYPE_BF16}, {32, meshpb.DType_DTYPE_BF16}} {
		req := benchRequest(c.rows)
		if c.dt == meshpb.DType_DTYPE_BF16 {
			x := make([]float32, c.rows*64)
			if err := wire.Decode(x, req.Hidden); err != nil {
				t.Fatal(err)
			}
			req.Hidden.Dtype, req.Hidden.Data, req.PartialDtype = c.dt, wire.AppendRows(nil, c.dt, x), c.dt
		}
		j := new(job)
		step := func() {
			node.prepare(j, req)
			node.run(ctx, j, false, nil)
			if r := node.reply(j); r.Code != 0 {
				t.Fatalf("%v", r)
			}
		}
		step() // grow the pooled buffers
		allocs[fmt.Sprintf("%v rows=%d", c.dt, c.rows)] = testing.AllocsPerRun(100, step)
	}
	t.Logf("allocs per request: %v", allocs)
	for k, a := range allocs {
		if a > 0 {
			t.Errorf("%s: %v allocations per request, want 0", k, a)
		}
	}
}

// BenchmarkDispatchVsRaw interleaves one gRPC dispatch round trip and one
// raw TCP round trip of the same byte counts per iteration, so both see
// the same machine load, and reports their means and ratios:
// ratio = dispatch / raw, overhead-ratio = (dispatch - compute) / raw,
// where compute is the node's own compute_us.
func BenchmarkDispatchVsRaw(b *testing.B) {
	cfg := testConfig("all")
	cfg.Threads = 1
	node := startNode(b, cfg)
	_, c := dial(b, node)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer lis.Close()
	for _, rows := range benchRows {
		b.Run(fmt.Sprintf("rows=%d", rows), func(b *testing.B) {
			req := benchRequest(rows)
			reqBytes := proto.Size(req)
			resp := &meshpb.DispatchResponse{Id: 1 << 40, Partial: wire.F32Matrix(make([]float32, rows*64), rows, 64), ComputeUs: 1000}
			respBytes := proto.Size(resp)
			done := make(chan error, 1)
			go func() {
				conn, err := lis.Accept()
				if err != nil {
					done <- err
					return
				}
				defer conn.Close()
				in, out := make([]byte, reqBytes), make([]byte, respBytes)
				for {
					if _, err := io.ReadFull(conn, in); err != nil {
						done <- nil
						return
					}
					if _, err := conn.Write(out); err != nil {
						done <- err
						return
					}
				}
			}()
			conn, err := net.Dial("tcp", lis.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			st, err := c.Dispatch(context.Background())
			if err != nil {
				b.Fatal(err)
			}
			out, in := make([]byte, reqBytes), make([]byte, respBytes)
			var rawNS, dispatchNS, computeNS int64
			b.ResetTimer()
			for i := range b.N {
				t0 := time.Now()
				if _, err := conn.Write(out); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(conn, in); err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				req.Id = uint64(i)
				if err := st.Send(req); err != nil {
					b.Fatal(err)
				}
				r, err := st.Recv()
				if err != nil || r.Code != 0 {
					b.Fatalf("%v %v", r, err)
				}
				t2 := time.Now()
				rawNS += t1.Sub(t0).Nanoseconds()
				dispatchNS += t2.Sub(t1).Nanoseconds()
				computeNS += int64(r.ComputeUs) * 1000
			}
			b.StopTimer()
			st.CloseSend()
			conn.Close()
			if err := <-done; err != nil {
				b.Fatal(err)
			}
			nf := float64(b.N)
			b.ReportMetric(float64(dispatchNS)/nf, "dispatch-ns/op")
			b.ReportMetric(float64(rawNS)/nf, "raw-ns/op")
			b.ReportMetric(float64(computeNS)/nf, "compute-ns/op")
			b.ReportMetric(float64(dispatchNS)/float64(rawNS), "ratio")
			b.ReportMetric(float64(dispatchNS-computeNS)/float64(rawNS), "overhead-ratio")
		})
	}
}
