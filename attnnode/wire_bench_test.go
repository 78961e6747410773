package attnnode

import (
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/expertmesh/expertmesh/internal/dataplane"
	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// genWide generates a checkpoint with V2-Lite's hidden size (2048), so
// that dispatches carry V2-Lite's bytes, but everything else tiny: two
// routed experts, one per token, 16 wide. An expert's compute costs
// ~10 µs whatever its width (its 2048-row down projection), so with
// V2-Lite's 6 of 64 experts per token the node's compute (70 µs at 1
// row, 450 at 8) and its variance drowned the wire's cost; with one of
// two it is 10-25 µs. The request's expert ids and gate weights shrink
// from 48 to 8 bytes a row (of 8 KiB).
func genWide(t testing.TB) string {
	t.Helper()
	p, _ := model.IsPreset("tiny-v2-lite")
	cfg := map[string]any{}
	for k, v := range p.Config {
		cfg[k] = v
	}
	cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["intermediate_size"], cfg["num_hidden_layers"] = 2048, 16, 64, 2
	cfg["n_routed_experts"], cfg["num_experts_per_tok"] = 2, 1
	p.Config, p.Name = cfg, "wide"
	dir := filepath.Join(t.TempDir(), "wide")
	if err := model.GenerateCheckpoint(dir, p, model.GenOptions{Seed: 3}); err != nil {
		t.Fatal(err)
	}
	return dir
}

// BenchmarkDispatchVsRaw is one MoE layer's dispatch of 1, 8 and 32 rows
// of V2-Lite's width through RemoteExperts (plan, encode, transport, the
// expert node's validation, compute and reply, decode, sum) to one expert
// node holding every expert, over the data plane (tcp) and over gRPC,
// interleaved per iteration with a round trip of the same bytes over a
// bare loopback TCP connection and with bare exchanges of the same
// messages over gRPC and over the data plane (echo servers; messages
// reused), so all see the same machine load. It reports the means and
//
//	ratio-T          = dispatch over T / raw
//	overhead-ratio-T = (dispatch over T - compute) / raw
//	grpc-ratio       = grpc echo / raw
//	dp-ratio         = data-plane echo / raw
//
// where compute is the node's own compute time (compute_us): the second
// is the wire's cost against the floor, the last two the transports' own
// share of it. On a machine shared with other work these wall-clock
// ratios mostly measure how long each goroutine hand-off waits for a
// core, so it also reports process CPU time per round trip (the expert
// node runs in this process), which contention does not inflate:
//
//	cpu-overhead-ratio-T = (dispatch CPU over T - compute) / raw CPU
//	cpu-grpc-ratio       = grpc echo CPU / raw CPU
//	cpu-dp-ratio         = data-plane echo CPU / raw CPU
//
// With every wire dtype (raw and echoes carry each one's bytes).
//
//	go test -run '^$' -bench DispatchVsRaw -benchtime 2000x ./attnnode/
func BenchmarkDispatchVsRaw(b *testing.B) {
	dir := genWide(b)
	c, err := model.LoadConfig(dir)
	if err != nil {
		b.Fatal(err)
	}
	table, _ := startExperts(b, dir, 1)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer lis.Close()
	for _, dt := range []meshpb.DType{meshpb.DType_DTYPE_F32, meshpb.DType_DTYPE_BF16, meshpb.DType_DTYPE_F8_E4M3} {
		for _, rows := range []int{1, 8, 32} {
			b.Run(fmt.Sprintf("wire=%s/rows=%d", map[meshpb.DType]string{meshpb.DType_DTYPE_F32: "f32", meshpb.DType_DTYPE_BF16: "bf16", meshpb.DType_DTYPE_F8_E4M3: "fp8"}[dt], rows), func(b *testing.B) {
				r := NewRemoteExperts(placement.NewStatic(table), c.HiddenSize, RemoteConfig{Wire: dt, Transport: TransportGRPC})
				defer r.Close()
				ctx := context.WithValue(context.Background(), pinKey{}, r.beginStep())
				rt := NewRemoteExperts(placement.NewStatic(table), c.HiddenSize, RemoteConfig{Wire: dt, Transport: TransportTCP})
				defer rt.Close()
				ctxT := context.WithValue(context.Background(), pinKey{}, rt.beginStep())
				batch := newRoutedBatch(b, c, table, rows)
				// The same payload as bytes: what the request and the
				// reply encode to.
				h := c.HiddenSize
				pdt := wire.PartialFor(dt)
				tn := &meshpb.Tensor{Dtype: dt, Shape: []int64{int64(rows), int64(h)}}
				if dt == meshpb.DType_DTYPE_F8_E4M3 {
					tn.Data, tn.Scales = wire.AppendF8Rows(nil, nil, batch.x, h)
				} else {
					tn.Data = wire.AppendRows(nil, dt, batch.x)
				}
				part := &meshpb.Tensor{Dtype: pdt, Shape: []int64{int64(rows), int64(h)}, Data: wire.AppendRows(nil, pdt, batch.x)}
				reqBytes := proto.Size(&meshpb.DispatchRequest{Id: 1 << 40, Layer: uint32(batch.layer), Hidden: tn, K: uint32(batch.k), ExpertIds: batch.ids, GateWeights: batch.w, PartialDtype: pdt})
				respBytes := proto.Size(&meshpb.DispatchResponse{Id: 1 << 40, Partial: part, ComputeUs: 1000})
				conn, done := rawEcho(b, lis, reqBytes, respBytes)
				echoReq := &meshpb.DispatchRequest{Layer: uint32(batch.layer), Hidden: tn, K: uint32(batch.k), ExpertIds: batch.ids, GateWeights: batch.w, PartialDtype: pdt}
				echo, stopEcho := echoStream(b, &meshpb.DispatchResponse{Partial: part, ComputeUs: 1000})
				defer stopEcho()
				dpEcho, stopDP := echoDataPlane(b, &meshpb.DispatchResponse{Partial: part, ComputeUs: 1000})
				defer stopDP()
				var echoResp meshpb.DispatchResponse
				out, in := make([]byte, reqBytes), make([]byte, respBytes)
				for range 20 {
					batch.dispatch(b, ctx, r)
					batch.dispatch(b, ctxT, rt)
				}
				r.computeUS.Store(0)
				rt.computeUS.Store(0)
				var rawNS, dispatchNS, tcpNS, grpcNS, dpNS, rawCPU, dispatchCPU, tcpCPU, grpcCPU, dpCPU int64
				b.ResetTimer()
				for range b.N {
					c0 := cpuNS()
					t0 := time.Now()
					if _, err := conn.Write(out); err != nil {
						b.Fatal(err)
					}
					if _, err := io.ReadFull(conn, in); err != nil {
						b.Fatal(err)
					}
					t1 := time.Now()
					c1 := cpuNS()
					batch.dispatch(b, ctx, r)
					t2 := time.Now()
					c2 := cpuNS()
					echoReq.Id++
					if err := echo.SendMsg(echoReq); err != nil {
						b.Fatal(err)
					}
					if err := echo.RecvMsg(&echoResp); err != nil {
						b.Fatal(err)
					}
					t3 := time.Now()
					c3 := cpuNS()
					batch.dispatch(b, ctxT, rt)
					t4 := time.Now()
					c4 := cpuNS()
					if err := dpEcho.SendMsg(echoReq); err != nil {
						b.Fatal(err)
					}
					if err := dpEcho.RecvMsg(&echoResp); err != nil {
						b.Fatal(err)
					}
					t5 := time.Now()
					c5 := cpuNS()
					rawCPU, dispatchCPU, grpcCPU, tcpCPU, dpCPU = rawCPU+c1-c0, dispatchCPU+c2-c1, grpcCPU+c3-c2, tcpCPU+c4-c3, dpCPU+c5-c4
					rawNS += t1.Sub(t0).Nanoseconds()
					dispatchNS += t2.Sub(t1).Nanoseconds()
					grpcNS += t3.Sub(t2).Nanoseconds()
					tcpNS += t4.Sub(t3).Nanoseconds()
					dpNS += t5.Sub(t4).Nanoseconds()
				}
				b.StopTimer()
				conn.Close()
				if err := <-done; err != nil {
					b.Fatal(err)
				}
				nf := float64(b.N)
				computeNS := float64(r.computeUS.Load()) * 1e3
				computeT := float64(rt.computeUS.Load()) * 1e3
				b.ReportMetric(float64(dispatchNS)/nf, "dispatch-grpc-ns/op")
				b.ReportMetric(float64(tcpNS)/nf, "dispatch-tcp-ns/op")
				b.ReportMetric(float64(rawNS)/nf, "raw-ns/op")
				b.ReportMetric(float64(grpcNS)/float64(rawNS), "grpc-ratio")
				b.ReportMetric(float64(dpNS)/float64(rawNS), "dp-ratio")
				b.ReportMetric((computeNS+computeT)/2/nf, "compute-ns/op")
				b.ReportMetric(float64(dispatchNS)/float64(rawNS), "ratio-grpc")
				b.ReportMetric(float64(tcpNS)/float64(rawNS), "ratio-tcp")
				b.ReportMetric((float64(dispatchNS)-computeNS)/float64(rawNS), "overhead-ratio-grpc")
				b.ReportMetric((float64(tcpNS)-computeT)/float64(rawNS), "overhead-ratio-tcp")
				b.ReportMetric(float64(reqBytes+respBytes), "wire-bytes/op")
				b.ReportMetric((float64(dispatchCPU)-computeNS)/float64(rawCPU), "cpu-overhead-ratio-grpc")
				b.ReportMetric((float64(tcpCPU)-computeT)/float64(rawCPU), "cpu-overhead-ratio-tcp")
				b.ReportMetric(float64(grpcCPU)/float64(rawCPU), "cpu-grpc-ratio")
				b.ReportMetric(float64(dpCPU)/float64(rawCPU), "cpu-dp-ratio")
				b.ReportMetric(float64(rawCPU)/nf, "raw-cpu-ns/op")
				b.ReportMetric((float64(tcpCPU)-computeT)/nf, "tcp-overhead-cpu-ns/op")
				b.ReportMetric((float64(dispatchCPU)-computeNS)/nf, "grpc-overhead-cpu-ns/op")
			})
		}
	}
}

// rawEcho accepts one connection on lis that answers every reqBytes read
// with respBytes, and dials it.
func rawEcho(b *testing.B, lis net.Listener, reqBytes, respBytes int) (net.Conn, <-chan error) {
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
	return conn, done
}

// echoStream opens a Dispatch stream to an echo server built with
// expertmesh's rpc options (the client's, DialDispatch's, as RemoteExperts
// dials) that answers every request with reply.
func echoStream(b *testing.B, reply *meshpb.DispatchResponse) (meshpb.ExpertService_DispatchClient, func()) {
	srv := rpc.NewServer(rpc.ServerOptions{})
	meshpb.RegisterExpertServiceServer(srv.Server, &echoExperts{reply: reply})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go srv.Serve(lis)
	cc, err := rpc.DialDispatch(lis.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	st, err := meshpb.NewExpertServiceClient(cc).Dispatch(ctx)
	if err != nil {
		b.Fatal(err)
	}
	return st, func() {
		cancel()
		cc.Close()
		srv.Stop()
	}
}

// echoDataPlane opens a data-plane connection to an echo server that
// answers every request with reply.
func echoDataPlane(b *testing.B, reply *meshpb.DispatchResponse) (*dataplane.Conn, func()) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	s := dataplane.NewServer(func(c *dataplane.Conn) error {
		var req meshpb.DispatchRequest
		resp := &meshpb.DispatchResponse{Partial: reply.Partial, ComputeUs: reply.ComputeUs}
		for {
			if err := c.RecvMsg(&req); err != nil {
				return nil
			}
			resp.Id = req.Id
			if err := c.SendMsg(resp); err != nil {
				return err
			}
		}
	})
	served := make(chan struct{})
	go func() {
		defer close(served)
		s.Serve(lis)
	}()
	c, err := dataplane.Dial(context.Background(), lis.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	return c, func() {
		c.Close()
		lis.Close()
		<-served
		s.Close()
	}
}

// cpuNS is the CPU time (user + system) the process has used.
func cpuNS() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}
