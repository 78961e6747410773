package attnnode

import (
	"context"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"slices"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// mallocsPer is the mean number of heap allocations of f over runs calls,
// counted process-wide (the expert nodes of these tests run in the test
// process, so their allocations count too).
func mallocsPer(runs int, f func()) float64 {
	var a, b runtime.MemStats
	runtime.ReadMemStats(&a)
	for range runs {
		f()
	}
	runtime.ReadMemStats(&b)
	return float64(b.Mallocs-a.Mallocs) / float64(runs)
}

// routedBatch is n rows of one MoE layer of the model in dir, each routed
// to k distinct experts, and how many rows a dispatch of it sends to each
// expert node of table it reaches (one exchange per node).
type routedBatch struct {
	layer, n, k int
	x, w, out   []float32
	ids         []int32
	perNode     map[uint16]int
}

func newRoutedBatch(t testing.TB, c *model.Config, table *placement.Table, n int) *routedBatch {
	t.Helper()
	b := &routedBatch{n: n, k: c.TopK(), layer: -1}
	for l := range c.NumHiddenLayers {
		if c.IsMoELayer(l) {
			b.layer = l
			break
		}
	}
	h := c.HiddenSize
	rng := rand.New(rand.NewPCG(uint64(n), 9))
	b.x, b.out = make([]float32, n*h), make([]float32, n*h)
	for i := range b.x {
		b.x[i] = float32(rng.NormFloat64())
	}
	b.perNode = map[uint16]int{}
	for range n {
		touched := map[uint16]bool{}
		for _, e := range rng.Perm(c.NumExperts())[:b.k] {
			b.ids = append(b.ids, int32(e))
			b.w = append(b.w, rng.Float32())
			touched[table.Replicas(b.layer, e)[0]] = true
		}
		for node := range touched {
			b.perNode[node]++
		}
	}
	return b
}

// dispatch runs one StartRoutedExperts call and its wait.
func (b *routedBatch) dispatch(t testing.TB, ctx context.Context, r *RemoteExperts) {
	clear(b.out)
	if err := r.StartRoutedExperts(ctx, b.layer, b.x, b.n, b.k, b.ids, b.w, b.out)(); err != nil {
		t.Fatal(err)
	}
}

// echoExperts answers every Dispatch with a fixed reply, receiving and
// sending reused messages: what one exchange costs in gRPC alone.
type echoExperts struct {
	meshpb.UnimplementedExpertServiceServer
	reply *meshpb.DispatchResponse
}

func (e *echoExperts) Dispatch(st grpc.BidiStreamingServer[meshpb.DispatchRequest, meshpb.DispatchResponse]) error {
	var req meshpb.DispatchRequest
	resp := &meshpb.DispatchResponse{Partial: e.reply.Partial, ComputeUs: e.reply.ComputeUs}
	for {
		if err := st.RecvMsg(&req); err != nil {
			return nil
		}
		resp.Id = req.Id
		if err := st.SendMsg(resp); err != nil {
			return err
		}
	}
}

// grpcFloor is the allocations of one Dispatch exchange (send a request,
// receive its reply, both messages reused on both sides) with a server
// and client built as given: gRPC's own per-message cost.
func grpcFloor(t testing.TB, req *meshpb.DispatchRequest, reply *meshpb.DispatchResponse, srv *grpc.Server, dial func(string) (*grpc.ClientConn, error)) float64 {
	t.Helper()
	meshpb.RegisterExpertServiceServer(srv, &echoExperts{reply: reply})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	defer srv.Stop()
	cc, err := dial(lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, err := meshpb.NewExpertServiceClient(cc).Dispatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var resp meshpb.DispatchResponse
	exchange := func() {
		req.Id++
		if err := st.SendMsg(req); err != nil {
			t.Fatal(err)
		}
		if err := st.RecvMsg(&resp); err != nil {
			t.Fatal(err)
		}
	}
	for range 100 {
		exchange()
	}
	return mallocsPer(2000, exchange)
}

// TestDispatchAllocations: once warm, a dispatch through RemoteExperts to
// expert nodes on loopback (plan, encode, send, the node's receive,
// validate, compute, reply, receive, decode, sum) allocates nothing beyond
// gRPC's own cost per exchange, measured by the same exchange against an
// echo server: with both wire dtypes, at 1 and 8 rows. Expert nodes run
// in this process, so their allocations are counted too.
func TestDispatchAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts differ under the race detector")
	}
	// Tracing off, as in a process that installs no provider (another
	// test may have left one installed): traced requests make spans,
	// which allocate.
	prev := otel.GetTracerProvider()
	otel.SetTracerProvider(noop.NewTracerProvider())
	t.Cleanup(func() { otel.SetTracerProvider(prev) })
	dir := genTiny(t, "tiny-v2")
	c, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	table, _ := startExperts(t, dir, 3)
	h := c.HiddenSize

	// gRPC's own cost of one exchange of a request and reply of rows rows
	// in dt, with expertmesh's options (the server's otelgrpc stats
	// handler, RemoteExperts' DialDispatch client, wire.Codec, static
	// windows); below gRPC's buffer-pooling threshold
	// (1 KiB) its transport allocates more per message.
	exchange := func(dt meshpb.DType, rows int) (*meshpb.DispatchRequest, *meshpb.DispatchResponse) {
		x := make([]float32, rows*h)
		pdt := wire.PartialFor(dt)
		hidden := &meshpb.Tensor{Dtype: dt, Shape: []int64{int64(rows), int64(h)}}
		if dt == meshpb.DType_DTYPE_F8_E4M3 {
			hidden.Data, hidden.Scales = wire.AppendF8Rows(nil, nil, x, h)
		} else {
			hidden.Data = wire.AppendRows(nil, dt, x)
		}
		part := &meshpb.Tensor{Dtype: pdt, Shape: []int64{int64(rows), int64(h)}, Data: wire.AppendRows(nil, pdt, x)}
		return &meshpb.DispatchRequest{Layer: 1, K: 6, Hidden: hidden, ExpertIds: make([]int32, 6*rows), GateWeights: make([]float32, 6*rows), PartialDtype: pdt},
			&meshpb.DispatchResponse{Partial: part, ComputeUs: 100}
	}
	floors := map[[2]int]float64{}
	floor := func(dt meshpb.DType, rows int) float64 {
		key := [2]int{int(dt), rows}
		if f, ok := floors[key]; ok {
			return f
		}
		req, reply := exchange(dt, rows)
		f := grpcFloor(t, req, reply, rpc.NewServer(rpc.ServerOptions{}).Server, func(a string) (*grpc.ClientConn, error) { return rpc.DialDispatch(a) })
		floors[key] = f
		return f
	}
	// The same with bare gRPC (wire.Codec and the windows only), to tell
	// the stats handlers' share.
	req, reply := exchange(meshpb.DType_DTYPE_F32, 8)
	bare := grpcFloor(t, req, reply, grpc.NewServer(grpc.ForceServerCodecV2(wire.Codec{}), grpc.InitialWindowSize(16<<20), grpc.InitialConnWindowSize(16<<20)),
		func(a string) (*grpc.ClientConn, error) {
			return grpc.NewClient("passthrough:///"+a, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithDefaultCallOptions(grpc.ForceCodecV2(wire.Codec{})),
				grpc.WithInitialWindowSize(16<<20), grpc.WithInitialConnWindowSize(16<<20))
		})
	f8 := floor(meshpb.DType_DTYPE_F32, 8)
	t.Logf("gRPC per exchange of 8 F32 rows: %.2f allocations with expertmesh's options, %.2f bare (stats handlers: %.2f)", f8, bare, f8-bare)

	// On the data plane nothing is left to gRPC: the whole exchange,
	// the expert nodes' side included (they run in this process),
	// allocates nothing.
	for _, tr := range []Transport{TransportTCP, TransportGRPC} {
		for _, dt := range []meshpb.DType{meshpb.DType_DTYPE_F32, meshpb.DType_DTYPE_BF16, meshpb.DType_DTYPE_F8_E4M3} {
			for _, rows := range []int{1, 8} {
				r := NewRemoteExperts(placement.NewStatic(table), h, RemoteConfig{Wire: dt, Transport: tr})
				ctx := context.WithValue(context.Background(), pinKey{}, r.beginStep())
				b := newRoutedBatch(t, c, table, rows)
				for range 50 {
					b.dispatch(t, ctx, r)
				}
				per := mallocsPer(500, func() { b.dispatch(t, ctx, r) })
				r.Close()
				f := 0.0
				if tr == TransportGRPC {
					for _, n := range b.perNode {
						f += floor(dt, n)
					}
				}
				own := per - f
				t.Logf("%s %v rows=%d: %.2f allocations per dispatch of %d exchanges (rows per node %v), gRPC's own %.2f; beyond gRPC's: %.2f", tr, dt, rows, per, len(b.perNode), b.perNode, f, own)
				// Half an allocation of slack for gRPC's own variance (its
				// transport batches writes differently when three streams
				// send at once).
				if own > 0.5 {
					t.Errorf("%s %v rows=%d: %.2f allocations per dispatch beyond gRPC's %.2f", tr, dt, rows, own, f)
				}
			}
		}
	}
}

// TestWireDeviation measures what the BF16 and FP8 activation wires cost
// in accuracy against the exact F32 wire, through real expert nodes:
// teacher-forced logprobs of every position of prompts extended by the
// F32 wire's greedy continuation (max |Δlogprob| of the forced token),
// and whether the greedy argmax agrees at each position.
// EXPERTMESH_WIRE_MODEL points it at another checkpoint (v2-lite-4l).
func TestWireDeviation(t *testing.T) {
	dir := os.Getenv("EXPERTMESH_WIRE_MODEL")
	if dir == "" {
		dir = genTiny(t, "tiny-v2")
	}
	const gen = 16
	table, _ := startExperts(t, dir, 3)
	start := func(dt meshpb.DType) *Node {
		cfg := DefaultConfig()
		cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.Placement, cfg.Wire = dir, 1, 64<<20, placement.NewStatic(table), dt
		n, err := Start(context.Background(), inProcess(cfg))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		return n
	}
	exact := start(meshpb.DType_DTYPE_F32)
	// Greedy continuations on the exact wire, then every wire forced
	// through prompt + continuation.
	tokens, _, _ := drive(t, exact, prompts, gen, 8)
	var seqs [][]int
	for i, p := range prompts {
		seqs = append(seqs, append(append([]int(nil), p...), tokens[i]...))
	}
	want, wantTop := forced(t, exact, seqs)
	// The bounds only catch a broken encoding: tiny random models are far
	// more sensitive than trained ones (on tiny-v2, BF16 gives ~0.015
	// and 98% agreement, FP8 ~0.8 and 87%).
	for _, c := range []struct {
		name  string
		dt    meshpb.DType
		bound float64 // max |Δlogprob| allowed
		agree float64 // least argmax agreement
	}{{"bf16", meshpb.DType_DTYPE_BF16, 0.5, 0.9}, {"fp8", meshpb.DType_DTYPE_F8_E4M3, 2, 0.75}} {
		node := start(c.dt)
		got, gotTop := forced(t, node, seqs)
		maxD, agree, total := 0.0, 0, 0
		for i := range seqs {
			for j := 1; j < len(seqs[i]); j++ {
				maxD = max(maxD, math.Abs(got[i][j]-want[i][j]))
				total++
				if gotTop[i][j] == wantTop[i][j] {
					agree++
				}
			}
		}
		free, _, _ := drive(t, node, prompts, gen, 8)
		same := 0
		for i := range prompts {
			for j := range gen {
				if free[i][j] != tokens[i][j] {
					break
				}
				same++
			}
		}
		t.Logf("%s wire vs f32 on %s: teacher-forced max |Δlogprob| %.4g over %d positions, argmax agreement %d/%d; free-running greedy: %d/%d tokens before the first divergence",
			c.name, dir, maxD, total, agree, total, same, len(prompts)*gen)
		if maxD > c.bound || float64(agree) < c.agree*float64(total) {
			t.Errorf("%s wire deviates too much: max |Δlogprob| %.4g, argmax agreement %d/%d", c.name, maxD, agree, total)
		}
	}
}

// forced runs every sequence through node in one prefill step with
// prompt logprobs and returns, per position j >= 1, the forced token's
// logprob and the most likely token there.
func forced(t *testing.T, node *Node, seqs [][]int) (lp [][]float64, top [][]int32) {
	t.Helper()
	req := &meshpb.StepRequest{Step: 1}
	for i, s := range seqs {
		req.Work = append(req.Work, &meshpb.SeqWork{SeqId: uint64(i + 1), Tokens: toI32(s), Sample: true, EchoLogprobs: true,
			Logprobs: 1, ReserveTokens: uint32(len(s) + 1), Sampling: &meshpb.SamplingParams{}})
		req.Release = append(req.Release, uint64(i+1))
	}
	resp, err := node.Step(context.Background(), req)
	if err != nil || resp.Code != 0 {
		t.Fatalf("%v %v", resp, err)
	}
	for _, r := range resp.Results {
		if r.Code != 0 || len(r.PromptLogprobs) != len(seqs[r.SeqId-1]) {
			t.Fatalf("sequence %d: code %d %s, %d prompt logprobs", r.SeqId, r.Code, r.Message, len(r.PromptLogprobs))
		}
		var l []float64
		var tp []int32
		for _, pl := range r.PromptLogprobs {
			l = append(l, pl.Logprob)
			best := int32(-1)
			if len(pl.Top) > 0 {
				best = pl.Top[0].Token
			}
			tp = append(tp, best)
		}
		lp, top = append(lp, l), append(top, tp)
	}
	// Free the sequences for the next call.
	if _, err := node.Step(context.Background(), &meshpb.StepRequest{Step: 2, Release: req.Release}); err != nil {
		t.Fatal(err)
	}
	return lp, top
}

// TestInlineSend: a dispatch sends its request on the caller's goroutine
// when the stream is open and idle (trySend) and through the connection's
// goroutine otherwise, with the same result bit for bit; and it stops
// sending inline while the node has a writeQuota's worth of requests
// unanswered (a Send could then block under the engine's compute lock),
// here a frozen node holding one 8-row request of V2-Lite's width.
func TestInlineSend(t *testing.T) {
	dir := genWide(t)
	c, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	e := startExpert(t, dir, "a", nil)
	rt := routing(t, dir, 1, e)
	table := rt.Table
	run := func(queueAll bool, batches ...*routedBatch) (inline uint64) {
		r := NewRemoteExperts(newTestView(rt), c.HiddenSize, RemoteConfig{DispatchTimeout: time.Minute})
		defer r.Close()
		r.queueAll = queueAll
		ctx := context.WithValue(context.Background(), pinKey{}, r.beginStep())
		for range 3 { // the first opens the stream
			for _, b := range batches {
				b.dispatch(t, ctx, r)
			}
		}
		return r.sentInline.Load()
	}
	one, eight := newRoutedBatch(t, c, table, 1), newRoutedBatch(t, c, table, 8)
	if n := run(true, one, eight); n != 0 {
		t.Fatalf("queueAll: %d attempts sent inline", n)
	}
	want1, want8 := slices.Clone(one.out), slices.Clone(eight.out)
	if n := run(false, one, eight); n < 4 {
		t.Fatalf("%d of 6 attempts sent inline, want at least the 4 after the stream opened", n)
	}
	if !slices.Equal(one.out, want1) || !slices.Equal(eight.out, want8) {
		t.Fatal("inline sends gave other partial sums than queued ones")
	}

	// A frozen node: the first 8-row request (64 KiB of rows) goes out
	// inline and stays unanswered, so the next is queued, and neither
	// StartRoutedExperts call waits for the node.
	r := NewRemoteExperts(newTestView(rt), c.HiddenSize, RemoteConfig{DispatchTimeout: time.Minute})
	defer r.Close()
	ctx := context.WithValue(context.Background(), pinKey{}, r.beginStep())
	// untilInline dispatches one until a dispatch goes out inline: the
	// connection's goroutine, after it opened the stream or sent a queued
	// request, may still hold the stream when the reply is in.
	untilInline := func(what string) {
		t.Helper()
		before := r.sentInline.Load()
		for i := 0; r.sentInline.Load() == before; i++ {
			if i == 100 {
				t.Fatalf("%s: 100 dispatches to an idle node, none sent inline", what)
			}
			one.dispatch(t, ctx, r)
		}
	}
	untilInline("stream opened")
	base := r.sentInline.Load()
	e.proxy.Freeze()
	second := newRoutedBatch(t, c, table, 8)
	clear(eight.out)
	clear(second.out)
	start := time.Now()
	wait1 := r.StartRoutedExperts(ctx, eight.layer, eight.x, eight.n, eight.k, eight.ids, eight.w, eight.out)
	if got := r.sentInline.Load() - base; got != 1 {
		t.Fatalf("first request to the frozen node: %d sent inline, want 1", got)
	}
	wait2 := r.StartRoutedExperts(ctx, second.layer, second.x, second.n, second.k, second.ids, second.w, second.out)
	if got := r.sentInline.Load() - base; got != 1 {
		t.Fatalf("second request with 64 KiB unanswered: %d sent inline in all, want it queued", got)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("starting two dispatches to a frozen node took %v", d)
	}
	select {
	case <-e.proxy.Held():
	case <-time.After(10 * time.Second):
		t.Fatal("nothing reached the frozen node")
	}
	e.proxy.Thaw()
	if err := wait1(); err != nil {
		t.Fatal(err)
	}
	if err := wait2(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(eight.out, want8) {
		t.Fatal("the request sent to the frozen node summed differently once it thawed")
	}
	// Answered: inline again.
	untilInline("every request answered")
	if !slices.Equal(one.out, want1) {
		t.Error("partial sums changed")
	}
}
