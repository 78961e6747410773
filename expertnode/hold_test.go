package expertnode

import (
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// tinyShape is tiny-v2's placement shape: layers 1 and 2 MoE, 160 experts.
func tinyShape(t testing.TB) placement.Shape {
	t.Helper()
	mc, err := model.LoadConfig(tinyDir)
	if err != nil {
		t.Fatal(err)
	}
	return placement.ShapeOf(mc)
}

func mustSet(t testing.TB, spec string) placement.Set {
	t.Helper()
	s, err := placement.ParseSet(tinyShape(t), spec)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// dispatchOne sends one row naming one expert and returns the reply.
func dispatchOne(t testing.TB, st meshpb.ExpertService_DispatchClient, id uint64, layer uint32, expert int32) *meshpb.DispatchResponse {
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
	if r.Id != id {
		t.Fatalf("reply %d, want %d", r.Id, id)
	}
	return r
}

// TestExpertsSpec: the node reads --experts with placement's grammar and
// holds exactly that set; a spec the model cannot have fails Start with
// an error naming --experts.
func TestExpertsSpec(t *testing.T) {
	for spec, want := range map[string]string{
		"":                "",
		"none":            "",
		"all":             "1:0-159,2:0-159",
		"0-53":            "1:0-53,2:0-53",
		"1:0-53,2:54-107": "1:0-53,2:54-107",
		" 1:0-3 , 1:4-9 ": "1:0-9",
		"1-2:10-11":       "1:10-11,2:10-11",
		"2:all":           "2:0-159",
	} {
		cfg := testConfig(spec)
		cfg.Weights = model.ResidencyMapped
		node := startNode(t, cfg)
		if got := node.Held().String(); got != want {
			t.Errorf("--experts %q: holds %q, want %q", spec, got, want)
		}
		node.Close()
	}
	for spec, wantMsg := range map[string]string{
		"0:0-3": "dense",
		"0-2:0": "dense",
		"3:0":   "layer 3",
		"0-160": "expert 160",
		"1:x":   "",
		"1,,2":  "empty entry",
	} {
		_, err := Start(context.Background(), testConfig(spec))
		if err == nil || !strings.HasPrefix(err.Error(), "--experts") || !strings.Contains(err.Error(), wantMsg) {
			t.Errorf("--experts %q: Start error %v, want one naming --experts and %q", spec, err, wantMsg)
		}
		if !errors.Is(err, placement.ErrPlacement) {
			t.Errorf("--experts %q: %v does not wrap placement.ErrPlacement", spec, err)
		}
	}
}

// TestHoldRelease: Hold only gains, Release only drops, both are
// idempotent, Held reflects each, and a dispatch naming a released expert
// is refused with FAILED_PRECONDITION.
func TestHoldRelease(t *testing.T) {
	for _, mode := range []model.Residency{model.ResidencyResident, model.ResidencyMapped} {
		t.Run(string(mode), func(t *testing.T) {
			cfg := testConfig("1:0-9")
			cfg.Weights = mode
			cfg.Managed = true
			node := startNode(t, cfg)
			_, c := dial(t, node)
			ctx := testCtx(t)
			st, err := c.Dispatch(ctx)
			if err != nil {
				t.Fatal(err)
			}
			resident := func(want int) {
				t.Helper()
				if mode == model.ResidencyMapped {
					want = 0
				}
				if got := node.ResidentExperts(); got != want {
					t.Errorf("%d resident, want %d", got, want)
				}
			}
			held := func(want string) {
				t.Helper()
				if got := node.Held().String(); got != want {
					t.Fatalf("held %q, want %q", got, want)
				}
			}
			held("1:0-9")
			resident(10)
			if r := dispatchOne(t, st, 1, 1, 15); codes.Code(r.Code) != codes.FailedPrecondition {
				t.Fatalf("expert 15 before Hold: %v", codes.Code(r.Code))
			}

			if err := node.Hold(ctx, mustSet(t, "1:5-19,2:0")); err != nil {
				t.Fatal(err)
			}
			held("1:0-19,2:0")
			resident(21)
			if r := dispatchOne(t, st, 2, 1, 15); r.Code != 0 {
				t.Fatalf("expert 15 after Hold: %v %s", codes.Code(r.Code), r.Message)
			}
			if r := dispatchOne(t, st, 3, 2, 0); r.Code != 0 {
				t.Fatalf("layer 2 expert 0 after Hold: %v %s", codes.Code(r.Code), r.Message)
			}
			// Gains only: holding a subset, or the same set again, drops nothing.
			for _, spec := range []string{"1:3", "1:5-19,2:0", ""} {
				if err := node.Hold(ctx, mustSet(t, spec)); err != nil {
					t.Fatal(err)
				}
				held("1:0-19,2:0")
			}
			// Held is a copy.
			h := node.Held()
			h[1][100] = true
			held("1:0-19,2:0")

			if err := node.Release(mustSet(t, "1:0-4,1:100,2:7")); err != nil {
				t.Fatal(err)
			}
			held("1:5-19,2:0")
			resident(16)
			if r := dispatchOne(t, st, 4, 1, 3); codes.Code(r.Code) != codes.FailedPrecondition {
				t.Fatalf("released expert 3: %v, want FailedPrecondition", codes.Code(r.Code))
			} else if !strings.Contains(r.Message, "not held") {
				t.Errorf("message %q", r.Message)
			}
			if r := dispatchOne(t, st, 5, 1, 5); r.Code != 0 {
				t.Fatalf("kept expert 5: %v %s", codes.Code(r.Code), r.Message)
			}
			if err := node.Release(mustSet(t, "1:0-4")); err != nil {
				t.Fatal(err)
			}
			held("1:5-19,2:0")

			// Another model's set changes nothing.
			bad := placement.NewSet(placement.Shape{Layers: 4, Experts: 200, MoELayers: []int{0, 1, 2, 3}})
			bad[1][3] = true
			bad[0][1] = true
			if err := node.Hold(ctx, bad); !errors.Is(err, placement.ErrPlacement) {
				t.Errorf("Hold of a dense-layer expert: %v", err)
			}
			if err := node.Release(bad); !errors.Is(err, placement.ErrPlacement) {
				t.Errorf("Release of a dense-layer expert: %v", err)
			}
			held("1:5-19,2:0")

			// A cancelled context gains nothing.
			canceled, cancel := context.WithCancel(ctx)
			cancel()
			if err := node.Hold(canceled, mustSet(t, "2:1-9")); !errors.Is(err, context.Canceled) {
				t.Errorf("Hold with a cancelled context: %v", err)
			}
			held("1:5-19,2:0")

			st.CloseSend()
			if err := node.Close(); err != nil {
				t.Fatal(err)
			}
			if err := node.Hold(ctx, mustSet(t, "2:5")); !errors.Is(err, ErrClosed) {
				t.Errorf("Hold after Close: %v, want ErrClosed", err)
			}
			if err := node.Release(mustSet(t, "1:5")); !errors.Is(err, ErrClosed) {
				t.Errorf("Release after Close: %v, want ErrClosed", err)
			}
		})
	}
}

// countdownCtx reports itself cancelled after its Err was asked n times:
// a cancellation that lands between two given experts of a Hold.
type countdownCtx struct {
	context.Context
	left atomic.Int32
}

func (c *countdownCtx) Err() error {
	if c.left.Add(-1) < 0 {
		return context.Canceled
	}
	return nil
}

// TestHoldCancelledBetweenExperts: a Hold whose context ends part way
// keeps the experts it had readied and no others, and a second Hold
// finishes the job.
func TestHoldCancelledBetweenExperts(t *testing.T) {
	cfg := testConfig("")
	cfg.Weights = model.ResidencyResident
	node := startNode(t, cfg)
	ctx := &countdownCtx{Context: context.Background()}
	ctx.left.Store(3)
	if err := node.Hold(ctx, mustSet(t, "1:0-9")); !errors.Is(err, context.Canceled) {
		t.Fatalf("Hold: %v, want Canceled", err)
	}
	if got := node.Held().String(); got != "1:0-2" {
		t.Fatalf("held %q after a Hold cancelled after 3 experts, want 1:0-2", got)
	}
	if got := node.ResidentExperts(); got != 3 {
		t.Fatalf("%d resident, want 3", got)
	}
	if err := node.Hold(context.Background(), mustSet(t, "1:0-9")); err != nil {
		t.Fatal(err)
	}
	if got := node.Held().String(); got != "1:0-9" {
		t.Fatalf("held %q, want 1:0-9", got)
	}
}

// TestManagedRefusesLoadDrop: a managed node answers Load and Drop with
// FAILED_PRECONDITION and changes nothing, while Status, Hold and
// dispatch work.
func TestManagedRefusesLoadDrop(t *testing.T) {
	cfg := testConfig("")
	cfg.Managed = true
	node := startNode(t, cfg)
	_, c := dial(t, node)
	ctx := testCtx(t)
	if err := node.Hold(ctx, mustSet(t, "1:0-9")); err != nil {
		t.Fatal(err)
	}
	rs := []*meshpb.ExpertRange{{Layer: 1, First: 0, Last: 19}}
	_, err := c.Load(ctx, &meshpb.LoadRequest{Experts: rs})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "managed by the control plane") || !strings.Contains(err.Error(), "expertmesh placement") {
		t.Errorf("Load on a managed node: %v", err)
	}
	_, err = c.Drop(ctx, &meshpb.DropRequest{Experts: rs})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "managed by the control plane") {
		t.Errorf("Drop on a managed node: %v", err)
	}
	s, err := c.Status(ctx, &meshpb.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Experts) != 1 || s.Experts[0].Layer != 1 || s.Experts[0].First != 0 || s.Experts[0].Last != 9 {
		t.Errorf("status experts %v, want 1:0-9", s.Experts)
	}
	st, err := c.Dispatch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r := dispatchOne(t, st, 1, 1, 9); r.Code != 0 {
		t.Fatalf("held expert: %v %s", codes.Code(r.Code), r.Message)
	}
	st.CloseSend()
}

// TestHoldReleaseUnderLoad changes the held set over and over while
// streams dispatch to experts that stay held: every reply is correct and
// the race detector sees nothing.
func TestHoldReleaseUnderLoad(t *testing.T) {
	ref := newReference(t)
	cfg := testConfig("1:0-9")
	cfg.Weights = model.ResidencyResident
	node := startNode(t, cfg)
	_, c := dial(t, node)
	ctx := testCtx(t)
	moving, keep := mustSet(t, "1:5-29,2:0-9"), mustSet(t, "1:0-9")
	stop := make(chan struct{})
	errs := make(chan error, 8)
	var mover sync.WaitGroup
	mover.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			var err error
			if i%2 == 0 {
				err = node.Hold(ctx, moving)
			} else {
				// Releases only what Hold added: 1:0-9 stays held.
				err = node.Release(moving.Minus(keep))
			}
			if err != nil {
				errs <- err
				return
			}
		}
	})
	var refMu sync.Mutex // the reference runner serves one caller at a time
	var dispatchers sync.WaitGroup
	for s := range 3 {
		dispatchers.Go(func() {
			st, err := c.Dispatch(ctx)
			if err != nil {
				errs <- err
				return
			}
			defer st.CloseSend()
			rng := rand.New(rand.NewPCG(uint64(s), 1))
			for i := range 30 {
				x, ids, w := randomRows(rng, 4, 3, 64, 10) // experts 0-9 only
				if err := st.Send(&meshpb.DispatchRequest{Id: uint64(i), Layer: 1, Hidden: wire.F32Matrix(x, 4, 64), K: 3, ExpertIds: ids, GateWeights: w}); err != nil {
					errs <- err
					return
				}
				r, err := st.Recv()
				if err != nil {
					errs <- err
					return
				}
				if r.Code != 0 {
					errs <- status.Errorf(codes.Code(r.Code), "%s", r.Message)
					return
				}
				got := make([]float32, 4*64)
				if err := wire.DecodeF32(got, r.Partial.Data); err != nil {
					errs <- err
					return
				}
				refMu.Lock()
				want := make([]float32, 4*64)
				err = ref.r.Run(1, x, 4, 3, ids, w, want)
				refMu.Unlock()
				if err != nil {
					errs <- err
					return
				}
				if !slices.Equal(got, want) {
					errs <- errors.New("partial differs from the reference while the held set changes")
					return
				}
			}
		})
	}
	dispatchers.Wait()
	close(stop)
	mover.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := node.Held(); !got.Has(1, 0) || !got.Has(1, 9) {
		t.Errorf("held %v lost the dispatched experts", got)
	}
}
