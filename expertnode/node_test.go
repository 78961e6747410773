package expertnode

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// tinyDir holds a tiny-v2 checkpoint generated once for the package:
// 3 layers (layer 0 dense, 1 and 2 MoE), hidden 64, 160 experts, k=6.
var tinyDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "expertnode-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	p, ok := model.IsPreset("tiny-v2")
	if !ok {
		fmt.Fprintln(os.Stderr, "no tiny-v2 preset")
		os.Exit(1)
	}
	if err := model.GenerateCheckpoint(dir, p, model.GenOptions{Seed: 1}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	tinyDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goroutine leak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

func testConfig(experts string) Config {
	cfg := DefaultConfig()
	cfg.ModelDir = tinyDir
	cfg.Experts = experts
	cfg.Threads = 2
	cfg.Logger = slog.New(slog.DiscardHandler)
	return cfg
}

func startNode(t testing.TB, cfg Config) *Node {
	t.Helper()
	n, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	select {
	case <-n.Ready():
	default:
		t.Fatal("Start returned before Ready")
	}
	return n
}

func dial(t testing.TB, n *Node) (*grpc.ClientConn, meshpb.ExpertServiceClient) {
	t.Helper()
	cc, err := rpc.Dial(n.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc, meshpb.NewExpertServiceClient(cc)
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// reference is an in-process ExpertRunner over the full checkpoint.
type reference struct {
	w    *model.Weights
	pool *kernels.Pool
	r    *model.ExpertRunner
}

func newReference(t testing.TB) *reference {
	t.Helper()
	w, err := model.Load(tinyDir, model.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pool := kernels.NewPool(1)
	t.Cleanup(func() { pool.Close(); w.Close() })
	return &reference{w: w, pool: pool, r: model.NewLocalExperts(w, pool)}
}

func (r *reference) run(t testing.TB, layer int, x []float32, rows, k int, ids []int32, weights []float32) []float32 {
	t.Helper()
	out := make([]float32, rows*r.w.Config.HiddenSize)
	if err := r.r.Run(layer, x, rows, k, ids, weights, out); err != nil {
		t.Fatal(err)
	}
	return out
}

// randomRows draws rows of hidden state, k distinct experts per row (with
// some -1 slots, as a real dispatch has) and gate weights.
func randomRows(rng *rand.Rand, rows, k, h, ne int) (x []float32, ids []int32, w []float32) {
	x = make([]float32, rows*h)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	ids = make([]int32, rows*k)
	w = make([]float32, rows*k)
	for i := range rows {
		perm := rng.Perm(ne)
		for j := range k {
			ids[i*k+j] = int32(perm[j])
			if rng.IntN(8) == 0 {
				ids[i*k+j] = -1
			}
			w[i*k+j] = rng.Float32()
		}
	}
	return x, ids, w
}

// mask keeps the ids held(id) and turns the rest into -1.
func mask(ids []int32, held func(int32) bool) []int32 {
	out := slices.Clone(ids)
	for i, id := range out {
		if id >= 0 && !held(id) {
			out[i] = -1
		}
	}
	return out
}

func decodePartial(t testing.TB, r *meshpb.DispatchResponse, rows, h int) []float32 {
	t.Helper()
	if r.Code != 0 {
		t.Fatalf("reply %d: code %v: %s", r.Id, codes.Code(r.Code), r.Message)
	}
	if _, err := wire.CheckMatrix(r.Partial, h, rows); err != nil {
		t.Fatalf("reply %d: %v", r.Id, err)
	}
	if r.Partial.Shape[0] != int64(rows) {
		t.Fatalf("reply %d: %d rows, want %d", r.Id, r.Partial.Shape[0], rows)
	}
	out := make([]float32, rows*h)
	if err := wire.Decode(out, r.Partial); err != nil {
		t.Fatalf("reply %d: %v", r.Id, err)
	}
	return out
}

// TestDispatchMatchesLocal serves the experts from two nodes holding
// disjoint halves and checks that each node's partial equals the local
// runner over the same masked ids exactly, and that the two partials add
// up to the local runner over all ids. Requests are pipelined (all sent
// before any reply is read) and matched up by id.
func TestDispatchMatchesLocal(t *testing.T) {
	ref := newReference(t)
	mc := ref.w.Config
	h, ne, k := mc.HiddenSize, mc.NumExperts(), mc.TopK()
	half := int32(ne / 2)
	inA := func(id int32) bool { return id < half }
	inB := func(id int32) bool { return id >= half }
	nodeA := startNode(t, testConfig(fmt.Sprintf("0-%d", half-1)))
	nodeB := startNode(t, testConfig(fmt.Sprintf("1:%d-%d,2:%d-%d", half, ne-1, half, ne-1)))
	ctx := testCtx(t)
	_, ca := dial(t, nodeA)
	_, cb := dial(t, nodeB)
	sa, err := ca.Dispatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sb, err := cb.Dispatch(ctx)
	if err != nil {
		t.Fatal(err)
	}

	type sent struct {
		layer, rows     int
		x               []float32
		ids, idsA, idsB []int32
		w               []float32
	}
	rng := rand.New(rand.NewPCG(1, 2))
	var reqs []sent
	for _, layer := range []int{1, 2} {
		for _, rows := range []int{1, 2, 8, 32, 100} {
			x, ids, w := randomRows(rng, rows, k, h, ne)
			reqs = append(reqs, sent{layer: layer, rows: rows, x: x, ids: ids, w: w, idsA: mask(ids, inA), idsB: mask(ids, inB)})
		}
	}
	for i, r := range reqs {
		id := uint64(1000 + i)
		if err := sa.Send(&meshpb.DispatchRequest{Id: id, Layer: uint32(r.layer), Hidden: wire.F32Matrix(r.x, r.rows, h), K: uint32(k), ExpertIds: r.idsA, GateWeights: r.w}); err != nil {
			t.Fatal(err)
		}
		if err := sb.Send(&meshpb.DispatchRequest{Id: id, Layer: uint32(r.layer), Hidden: wire.F32Matrix(r.x, r.rows, h), K: uint32(k), ExpertIds: r.idsB, GateWeights: r.w}); err != nil {
			t.Fatal(err)
		}
	}
	sa.CloseSend()
	sb.CloseSend()
	gotA, gotB := map[uint64]*meshpb.DispatchResponse{}, map[uint64]*meshpb.DispatchResponse{}
	for range reqs {
		ra, err := sa.Recv()
		if err != nil {
			t.Fatal(err)
		}
		gotA[ra.Id] = ra
		rb, err := sb.Recv()
		if err != nil {
			t.Fatal(err)
		}
		gotB[rb.Id] = rb
	}
	// The client half-closed: after the last reply the server ends the stream.
	if _, err := sa.Recv(); err == nil {
		t.Error("stream A still open after all replies")
	}

	for i, r := range reqs {
		id := uint64(1000 + i)
		if gotA[id] == nil || gotB[id] == nil {
			t.Fatalf("request %d: no reply (A %v, B %v)", id, gotA[id] != nil, gotB[id] != nil)
		}
		pa := decodePartial(t, gotA[id], r.rows, h)
		pb := decodePartial(t, gotB[id], r.rows, h)
		if want := ref.run(t, r.layer, r.x, r.rows, k, r.idsA, r.w); !slices.Equal(pa, want) {
			t.Errorf("layer %d rows %d: node A partial differs from the local runner: max diff %g", r.layer, r.rows, maxDiff(pa, want))
		}
		if want := ref.run(t, r.layer, r.x, r.rows, k, r.idsB, r.w); !slices.Equal(pb, want) {
			t.Errorf("layer %d rows %d: node B partial differs from the local runner: max diff %g", r.layer, r.rows, maxDiff(pb, want))
		}
		full := ref.run(t, r.layer, r.x, r.rows, k, r.ids, r.w)
		scale := 0.0
		for _, v := range full {
			scale = math.Max(scale, math.Abs(float64(v)))
		}
		for j := range full {
			if d := math.Abs(float64(pa[j] + pb[j] - full[j])); d > 1e-5*math.Max(1, scale) {
				t.Fatalf("layer %d rows %d: A+B differs from all experts at %d: %g + %g vs %g", r.layer, r.rows, j, pa[j], pb[j], full[j])
			}
		}
	}
}

// TestDispatchBF16: a request whose hidden rows travel as BF16 (or FP8
// E4M3 with scales) and that asks for BF16 partial rows gets them, equal
// to the F32 computation on the same (rounded) rows within BF16's
// rounding of the result; an F32 request with partial_dtype UNSPECIFIED
// still gets F32.
func TestDispatchBF16(t *testing.T) {
	ref := newReference(t)
	node := startNode(t, testConfig("0-79"))
	_, c := dial(t, node)
	st, err := c.Dispatch(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	bf := meshpb.DType_DTYPE_BF16
	for i, rows := range []int{1, 8, 32} {
		req := validRequest(uint64(i))
		rng := rand.New(rand.NewPCG(uint64(i), 9))
		x, ids, w := randomRows(rng, rows, 6, 64, 80)
		req.Hidden, req.ExpertIds, req.GateWeights, req.PartialDtype = wire.F32Matrix(x, rows, 64), ids, w, bf
		req.Hidden.Dtype, req.Hidden.Data = bf, wire.AppendRows(nil, bf, x)
		if err := st.Send(req); err != nil {
			t.Fatal(err)
		}
		r, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.Partial == nil || r.Partial.Dtype != bf {
			t.Fatalf("rows %d: reply %v, want a BF16 partial", rows, r)
		}
		got := decodePartial(t, r, rows, 64)
		xr := make([]float32, len(x))
		if err := wire.Decode(xr, req.Hidden); err != nil {
			t.Fatal(err)
		}
		want := ref.run(t, 1, xr, rows, 6, ids, w)
		for j := range want {
			if d := math.Abs(float64(got[j] - want[j])); d > math.Abs(float64(want[j]))/256+1e-30 {
				t.Fatalf("rows %d element %d: %g, want %g within BF16 rounding", rows, j, got[j], want[j])
			}
		}
	}
	if err := st.Send(validRequest(9)); err != nil {
		t.Fatal(err)
	}
	if r, err := st.Recv(); err != nil || r.Partial.GetDtype() != meshpb.DType_DTYPE_F32 {
		t.Fatalf("F32 request: %v %v", r, err)
	}
	// FP8 out, BF16 back: the node computes on the scaled E4M3 values.
	req := validRequest(10)
	x := make([]float32, 3*64)
	if err := wire.Decode(x, req.Hidden); err != nil {
		t.Fatal(err)
	}
	req.Hidden.Dtype, req.PartialDtype = meshpb.DType_DTYPE_F8_E4M3, bf
	req.Hidden.Data, req.Hidden.Scales = wire.AppendF8Rows(nil, nil, x, 64)
	if err := st.Send(req); err != nil {
		t.Fatal(err)
	}
	r, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got := decodePartial(t, r, 3, 64)
	if err := wire.Decode(x, req.Hidden); err != nil {
		t.Fatal(err)
	}
	want := ref.run(t, 1, x, 3, 6, req.ExpertIds, req.GateWeights)
	for j := range want {
		if d := math.Abs(float64(got[j] - want[j])); d > math.Abs(float64(want[j]))/256+1e-30 {
			t.Fatalf("fp8 element %d: %g, want %g within BF16 rounding", j, got[j], want[j])
		}
	}
}

func maxDiff(a, b []float32) float64 {
	m := 0.0
	for i := range a {
		m = math.Max(m, math.Abs(float64(a[i]-b[i])))
	}
	return m
}

// validRequest is a small well-formed dispatch for node "0-79" (layer 1).
func validRequest(id uint64) *meshpb.DispatchRequest {
	rng := rand.New(rand.NewPCG(id, 7))
	x, ids, w := randomRows(rng, 3, 6, 64, 80)
	return &meshpb.DispatchRequest{Id: id, Layer: 1, Hidden: wire.F32Matrix(x, 3, 64), K: 6, ExpertIds: ids, GateWeights: w}
}

func TestDispatchRejectsMalformed(t *testing.T) {
	node := startNode(t, testConfig("0-79"))
	_, c := dial(t, node)
	ctx := testCtx(t)
	st, err := c.Dispatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	nan := float32(math.NaN())
	tests := []struct {
		name   string
		modify func(r *meshpb.DispatchRequest)
		want   codes.Code
	}{
		{"bf16 dtype, f32 bytes", func(r *meshpb.DispatchRequest) { r.Hidden.Dtype = meshpb.DType_DTYPE_BF16 }, codes.InvalidArgument},
		{"NaN in bf16 hidden", func(r *meshpb.DispatchRequest) {
			x := make([]float32, 3*64)
			x[70] = nan
			r.Hidden.Dtype, r.Hidden.Data = meshpb.DType_DTYPE_BF16, wire.AppendRows(nil, meshpb.DType_DTYPE_BF16, x)
		}, codes.InvalidArgument},
		{"unknown partial dtype", func(r *meshpb.DispatchRequest) { r.PartialDtype = 7 }, codes.InvalidArgument},
		{"fp8 partial dtype", func(r *meshpb.DispatchRequest) { r.PartialDtype = meshpb.DType_DTYPE_F8_E4M3 }, codes.InvalidArgument},
		{"fp8 without scales", func(r *meshpb.DispatchRequest) {
			r.Hidden.Dtype, r.Hidden.Data = meshpb.DType_DTYPE_F8_E4M3, make([]byte, 3*64)
		}, codes.InvalidArgument},
		{"unspecified dtype", func(r *meshpb.DispatchRequest) { r.Hidden.Dtype = meshpb.DType_DTYPE_UNSPECIFIED }, codes.InvalidArgument},
		{"missing hidden", func(r *meshpb.DispatchRequest) { r.Hidden = nil }, codes.InvalidArgument},
		{"wrong width", func(r *meshpb.DispatchRequest) { r.Hidden.Shape = []int64{4, 48} }, codes.InvalidArgument},
		{"rank 1", func(r *meshpb.DispatchRequest) { r.Hidden.Shape = []int64{192} }, codes.InvalidArgument},
		{"rank 3", func(r *meshpb.DispatchRequest) { r.Hidden.Shape = []int64{3, 64, 1} }, codes.InvalidArgument},
		{"zero rows", func(r *meshpb.DispatchRequest) { r.Hidden.Shape = []int64{0, 64}; r.Hidden.Data = nil }, codes.InvalidArgument},
		{"negative rows", func(r *meshpb.DispatchRequest) { r.Hidden.Shape = []int64{-3, 64} }, codes.InvalidArgument},
		{"rows over max", func(r *meshpb.DispatchRequest) { r.Hidden.Shape = []int64{DefaultMaxRows + 1, 64} }, codes.InvalidArgument},
		{"short data", func(r *meshpb.DispatchRequest) { r.Hidden.Data = r.Hidden.Data[:len(r.Hidden.Data)-1] }, codes.InvalidArgument},
		{"long data", func(r *meshpb.DispatchRequest) { r.Hidden.Data = append(r.Hidden.Data, 0, 0, 0, 0) }, codes.InvalidArgument},
		{"NaN in hidden", func(r *meshpb.DispatchRequest) { r.Hidden.Data = setF32(r.Hidden.Data, 77, nan) }, codes.InvalidArgument},
		{"Inf in hidden", func(r *meshpb.DispatchRequest) { r.Hidden.Data = setF32(r.Hidden.Data, 0, float32(math.Inf(-1))) }, codes.InvalidArgument},
		{"NaN gate weight", func(r *meshpb.DispatchRequest) { r.GateWeights[5] = nan }, codes.InvalidArgument},
		{"Inf gate weight", func(r *meshpb.DispatchRequest) { r.GateWeights[0] = float32(math.Inf(1)) }, codes.InvalidArgument},
		{"layer out of range", func(r *meshpb.DispatchRequest) { r.Layer = 3 }, codes.InvalidArgument},
		{"layer huge", func(r *meshpb.DispatchRequest) { r.Layer = math.MaxUint32 }, codes.InvalidArgument},
		{"dense layer", func(r *meshpb.DispatchRequest) { r.Layer = 0 }, codes.InvalidArgument},
		{"id past experts", func(r *meshpb.DispatchRequest) { r.ExpertIds[4] = 160 }, codes.InvalidArgument},
		{"id below -1", func(r *meshpb.DispatchRequest) { r.ExpertIds[4] = -2 }, codes.InvalidArgument},
		{"id not held", func(r *meshpb.DispatchRequest) { r.ExpertIds[7] = 100 }, codes.FailedPrecondition},
		{"too few ids", func(r *meshpb.DispatchRequest) { r.ExpertIds = r.ExpertIds[1:] }, codes.InvalidArgument},
		{"too many weights", func(r *meshpb.DispatchRequest) { r.GateWeights = append(r.GateWeights, 1) }, codes.InvalidArgument},
		{"ids for another k", func(r *meshpb.DispatchRequest) { r.K = 5 }, codes.InvalidArgument},
		{"k = 0", func(r *meshpb.DispatchRequest) { r.K = 0; r.ExpertIds, r.GateWeights = nil, nil }, codes.InvalidArgument},
		{"k past experts", func(r *meshpb.DispatchRequest) { r.K = 161 }, codes.InvalidArgument},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bad := validRequest(uint64(2 * i))
			tt.modify(bad)
			if err := st.Send(bad); err != nil {
				t.Fatal(err)
			}
			r, err := st.Recv()
			if err != nil {
				t.Fatalf("stream ended: %v", err)
			}
			if r.Id != bad.Id || codes.Code(r.Code) != tt.want || r.Partial != nil || r.Message == "" {
				t.Errorf("reply id %d code %v partial %v message %q; want id %d code %v, no partial, a message",
					r.Id, codes.Code(r.Code), r.Partial != nil, r.Message, bad.Id, tt.want)
			}
			good := validRequest(uint64(2*i + 1))
			if err := st.Send(good); err != nil {
				t.Fatal(err)
			}
			r, err = st.Recv()
			if err != nil {
				t.Fatalf("stream ended after a rejected request: %v", err)
			}
			if r.Id != good.Id {
				t.Fatalf("reply id %d, want %d", r.Id, good.Id)
			}
			decodePartial(t, r, 3, 64)
		})
	}
}

func setF32(b []byte, i int, v float32) []byte {
	b = slices.Clone(b)
	return append(wire.AppendF32(b[:4*i:4*i], []float32{v}), b[4*i+4:]...)
}

func TestLoadDropStatus(t *testing.T) {
	node := startNode(t, testConfig("1:0-9"))
	_, c := dial(t, node)
	ctx := testCtx(t)
	st, err := c.Dispatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	call := func(id uint64, layer uint32, expert int32) *meshpb.DispatchResponse {
		t.Helper()
		x := make([]float32, 64)
		x[3] = 1
		if err := st.Send(&meshpb.DispatchRequest{Id: id, Layer: layer, Hidden: wire.F32Matrix(x, 1, 64), K: 1,
			ExpertIds: []int32{expert}, GateWeights: []float32{1}}); err != nil {
			t.Fatal(err)
		}
		r, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	status := func() *meshpb.ExpertStatus {
		t.Helper()
		s, err := c.Status(ctx, &meshpb.StatusRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	ranges := func(rs ...[3]uint32) []*meshpb.ExpertRange {
		var out []*meshpb.ExpertRange
		for _, r := range rs {
			out = append(out, &meshpb.ExpertRange{Layer: r[0], First: r[1], Last: r[2]})
		}
		return out
	}
	sameRanges := func(got []*meshpb.ExpertRange, want ...[3]uint32) bool {
		if len(got) != len(want) {
			return false
		}
		for i, g := range got {
			if g.Layer != want[i][0] || g.First != want[i][1] || g.Last != want[i][2] {
				return false
			}
		}
		return true
	}

	s := status()
	if s.NodeId != node.ID() || s.NodeId != "expert@"+node.Addr() {
		t.Errorf("node id %q, want %q", s.NodeId, "expert@"+node.Addr())
	}
	if !sameRanges(s.Experts, [3]uint32{1, 0, 9}) {
		t.Errorf("held %v, want 1:0-9", s.Experts)
	}
	if r := call(1, 1, 5); r.Code != 0 {
		t.Fatalf("held expert: %v %s", codes.Code(r.Code), r.Message)
	}
	if r := call(2, 1, 20); codes.Code(r.Code) != codes.FailedPrecondition {
		t.Fatalf("expert 20 before Load: %v, want FailedPrecondition", codes.Code(r.Code))
	}
	if r := call(3, 2, 5); codes.Code(r.Code) != codes.FailedPrecondition {
		t.Fatalf("layer 2 expert 5 (only layer 1 held): %v, want FailedPrecondition", codes.Code(r.Code))
	}

	lr, err := c.Load(ctx, &meshpb.LoadRequest{Experts: ranges([3]uint32{1, 20, 29}, [3]uint32{2, 0, 0})})
	if err != nil || lr.Loaded != 11 {
		t.Fatalf("Load: %v, %v; want 11 loaded", lr, err)
	}
	// Idempotent: loading again changes nothing.
	if lr, err := c.Load(ctx, &meshpb.LoadRequest{Experts: ranges([3]uint32{1, 25, 29})}); err != nil || lr.Loaded != 0 {
		t.Fatalf("Load again: %v, %v; want 0 loaded", lr, err)
	}
	if r := call(4, 1, 20); r.Code != 0 {
		t.Fatalf("expert 20 after Load: %v %s", codes.Code(r.Code), r.Message)
	}
	if r := call(5, 2, 0); r.Code != 0 {
		t.Fatalf("layer 2 expert 0 after Load: %v %s", codes.Code(r.Code), r.Message)
	}
	if s := status(); !sameRanges(s.Experts, [3]uint32{1, 0, 9}, [3]uint32{1, 20, 29}, [3]uint32{2, 0, 0}) {
		t.Errorf("held after Load %v", s.Experts)
	}

	dr, err := c.Drop(ctx, &meshpb.DropRequest{Experts: ranges([3]uint32{1, 5, 24})})
	if err != nil || dr.Dropped != 10 {
		t.Fatalf("Drop: %v, %v; want 10 dropped (5-9 and 20-24)", dr, err)
	}
	if r := call(6, 1, 5); codes.Code(r.Code) != codes.FailedPrecondition {
		t.Fatalf("dropped expert 5: %v, want FailedPrecondition", codes.Code(r.Code))
	}
	if r := call(7, 1, 4); r.Code != 0 {
		t.Fatalf("kept expert 4: %v %s", codes.Code(r.Code), r.Message)
	}
	s = status()
	if !sameRanges(s.Experts, [3]uint32{1, 0, 4}, [3]uint32{1, 25, 29}, [3]uint32{2, 0, 0}) {
		t.Errorf("held after Drop %v", s.Experts)
	}
	if s.Requests != 7 {
		t.Errorf("requests %d, want 7", s.Requests)
	}
	if s.RowsServed[1] != 3 || s.RowsServed[2] != 1 {
		t.Errorf("rows served %v, want layer 1: 3, layer 2: 1", s.RowsServed)
	}
	if _, ok := s.RowsServed[0]; ok {
		t.Errorf("rows served reports dense layer 0: %v", s.RowsServed)
	}

	bad := []struct {
		name string
		r    [3]uint32
	}{
		{"dense layer", [3]uint32{0, 0, 1}},
		{"layer past model", [3]uint32{3, 0, 1}},
		{"expert past model", [3]uint32{1, 150, 160}},
		{"first > last", [3]uint32{1, 9, 8}},
	}
	for _, b := range bad {
		// The valid first range must not be applied when a later one is bad.
		rs := ranges([3]uint32{2, 100, 100}, b.r)
		if _, err := c.Load(ctx, &meshpb.LoadRequest{Experts: rs}); status2(err) != codes.InvalidArgument {
			t.Errorf("Load %s: %v, want InvalidArgument", b.name, err)
		}
		if _, err := c.Drop(ctx, &meshpb.DropRequest{Experts: rs}); status2(err) != codes.InvalidArgument {
			t.Errorf("Drop %s: %v, want InvalidArgument", b.name, err)
		}
	}
	if s := status(); !sameRanges(s.Experts, [3]uint32{1, 0, 4}, [3]uint32{1, 25, 29}, [3]uint32{2, 0, 0}) {
		t.Errorf("rejected Load/Drop changed the held set: %v", s.Experts)
	}
}

func status2(err error) codes.Code { return status.Code(err) }

func TestHealthServing(t *testing.T) {
	node := startNode(t, testConfig(""))
	cc, _ := dial(t, node)
	h := healthpb.NewHealthClient(cc)
	ctx := testCtx(t)
	for _, svc := range []string{"", meshpb.ExpertService_ServiceDesc.ServiceName} {
		r, err := h.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || r.Status != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("Check(%q) = %v, %v; want SERVING", svc, r, err)
		}
	}
	// Watch sees NOT_SERVING when Close begins.
	w, err := h.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := w.Recv(); err != nil || r.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("first watch: %v, %v", r, err)
	}
	closed := make(chan error, 1)
	go func() { closed <- node.Close() }()
	r, err := w.Recv()
	if err == nil && r.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("watch during Close: %v, want NOT_SERVING or the stream ending", r.Status)
	}
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
}

// TestConcurrentStreams runs several streams against one node at once,
// each with requests pipelined, under the race detector in CI.
func TestConcurrentStreams(t *testing.T) {
	ref := newReference(t)
	node := startNode(t, testConfig("all"))
	_, c := dial(t, node)
	ctx := testCtx(t)
	const streams, perStream = 4, 12
	type result struct {
		layer, rows int
		x           []float32
		ids         []int32
		w           []float32
		got         []float32
	}
	results := make([][]result, streams)
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for s := range streams {
		wg.Go(func() {
			st, err := c.Dispatch(ctx)
			if err != nil {
				errs <- err
				return
			}
			rng := rand.New(rand.NewPCG(uint64(s), 99))
			rs := make([]result, perStream)
			for i := range rs {
				rows := 1 + rng.IntN(16)
				x, ids, w := randomRows(rng, rows, 6, 64, 160)
				rs[i] = result{layer: 1 + i%2, rows: rows, x: x, ids: ids, w: w}
				if err := st.Send(&meshpb.DispatchRequest{Id: uint64(i), Layer: uint32(rs[i].layer), Hidden: wire.F32Matrix(x, rows, 64), K: 6, ExpertIds: ids, GateWeights: w}); err != nil {
					errs <- err
					return
				}
			}
			st.CloseSend()
			for range rs {
				r, err := st.Recv()
				if err != nil {
					errs <- err
					return
				}
				if r.Code != 0 || r.Id >= perStream {
					errs <- fmt.Errorf("stream %d reply %d: %v %s", s, r.Id, codes.Code(r.Code), r.Message)
					return
				}
				got := make([]float32, rs[r.Id].rows*64)
				if err := wire.DecodeF32(got, r.Partial.Data); err != nil {
					errs <- err
					return
				}
				rs[r.Id].got = got
			}
			results[s] = rs
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for s, rs := range results {
		for i, r := range rs {
			if want := ref.run(t, r.layer, r.x, r.rows, 6, r.ids, r.w); !slices.Equal(r.got, want) {
				t.Errorf("stream %d request %d: partial differs, max diff %g", s, i, maxDiff(r.got, want))
			}
		}
	}
}

// TestCloseWithOpenStreams checks Close does not wait for clients to end
// their long-lived streams, and the clients see an error, not a hang.
func TestCloseWithOpenStreams(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) { testCloseWithOpenStreams(t, tr) })
	}
}

func testCloseWithOpenStreams(t *testing.T, tr string) {
	node, err := Start(context.Background(), testConfig("all"))
	if err != nil {
		t.Fatal(err)
	}
	open := opener(t, node, tr)
	ctx := testCtx(t)
	var streams []dispatchClient
	for i := range 3 {
		st, err := open(ctx)
		if err != nil {
			t.Fatal(err)
		}
		r := validRequest(uint64(i))
		if err := st.Send(r); err != nil {
			t.Fatal(err)
		}
		if resp, err := st.Recv(); err != nil || resp.Code != 0 {
			t.Fatalf("stream %d: %v %v", i, resp, err)
		}
		streams = append(streams, st)
	}
	// One more request in flight on the first stream while Close runs.
	if err := streams[0].Send(validRequest(10)); err != nil {
		t.Fatal(err)
	}
	closed := make(chan error, 1)
	go func() { closed <- node.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return within 10s with streams open")
	}
	for i, st := range streams {
		for {
			_, err := st.Recv()
			if err == nil {
				continue // the in-flight request may have been answered first
			}
			// On the data plane Close ends the connection (EOF or a
			// reset, whichever the client sees).
			if c := status.Code(err); tr == "grpc" && c != codes.Unavailable && c != codes.Canceled {
				t.Errorf("stream %d after Close: %v, want Unavailable or Canceled", i, err)
			}
			break
		}
	}
	if err := node.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestStartFailsCleanly(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	tests := []struct {
		name   string
		modify func(*Config)
		ctx    context.Context
	}{
		{"no model", func(c *Config) { c.ModelDir = "" }, nil},
		{"missing model dir", func(c *Config) { c.ModelDir = t.TempDir() + "/nope" }, nil},
		{"empty model dir", func(c *Config) { c.ModelDir = t.TempDir() }, nil},
		{"bad spec syntax", func(c *Config) { c.Experts = "1:x" }, nil},
		{"spec names dense layer", func(c *Config) { c.Experts = "0:0-3" }, nil},
		{"spec past experts", func(c *Config) { c.Experts = "0-160" }, nil},
		{"port in use", func(c *Config) { c.ListenAddr = busy.Addr().String() }, nil},
		{"bad listen address", func(c *Config) { c.ListenAddr = "not an address" }, nil},
		{"negative threads", func(c *Config) { c.Threads = -1 }, nil},
		{"zero max rows", func(c *Config) { c.MaxRows = 0 }, nil},
		{"canceled context", func(c *Config) {}, canceled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig("all")
			tt.modify(&cfg)
			ctx := tt.ctx
			if ctx == nil {
				ctx = context.Background()
			}
			n, err := Start(ctx, cfg)
			if err == nil {
				n.Close()
				t.Fatal("Start succeeded")
			}
			if n != nil {
				t.Errorf("Start returned a node with error %v", err)
			}
			t.Log(err)
			goleak.VerifyNone(t)
		})
	}
}

func TestStartCloseNoLeak(t *testing.T) {
	for range 3 {
		n, err := Start(context.Background(), testConfig("0-9"))
		if err != nil {
			t.Fatal(err)
		}
		cc, err := rpc.Dial(n.Addr())
		if err != nil {
			t.Fatal(err)
		}
		st, err := meshpb.NewExpertServiceClient(cc).Dispatch(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		x := make([]float32, 64)
		if err := st.Send(&meshpb.DispatchRequest{Id: 1, Layer: 2, Hidden: wire.F32Matrix(x, 1, 64), K: 1, ExpertIds: []int32{3}, GateWeights: []float32{1}}); err != nil {
			t.Fatal(err)
		}
		if r, err := st.Recv(); err != nil || r.Code != 0 {
			t.Fatalf("%v %v", r, err)
		}
		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
		cc.Close()
	}
	goleak.VerifyNone(t)
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name     string
		modify   func(*Config)
		wantFlag string
	}{
		{"ok", func(*Config) {}, ""},
		{"model", func(c *Config) { c.ModelDir = "" }, "--model"},
		{"listen", func(c *Config) { c.ListenAddr = "" }, "--listen"},
		{"threads", func(c *Config) { c.Threads = -2 }, "--threads"},
		{"max rows", func(c *Config) { c.MaxRows = -1 }, "--max-rows"},
		{"experts", func(c *Config) { c.Experts = "x" }, "--experts"},
		{"weights", func(c *Config) { c.Weights = "huge" }, "--weights"},
		{"weights resident", func(c *Config) { c.Weights = model.ResidencyResident }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := DefaultConfig()
			c.ModelDir = "/some/dir"
			tt.modify(&c)
			err := c.Validate()
			if tt.wantFlag == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !containsFlag(err.Error(), tt.wantFlag) {
				t.Errorf("Validate() = %v, want an error naming %s", err, tt.wantFlag)
			}
		})
	}
}

func containsFlag(s, flag string) bool {
	return len(s) >= len(flag) && s[:len(flag)] == flag
}
