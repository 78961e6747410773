package expertnode

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// TestResidentExperts: with resident weights every held expert computes
// from a huge-page copy made at start or Load and freed at Drop, with
// results bit-identical to the mapped checkpoint; with mmap none is copied.
func TestResidentExperts(t *testing.T) {
	ref := newReference(t)
	h, ne := ref.w.Config.HiddenSize, ref.w.Config.NumExperts()
	for _, tc := range []struct {
		mode                          model.Residency
		atStart, afterLoad, afterDrop int
	}{
		{model.ResidencyResident, 10, 20, 10},
		{model.ResidencyMapped, 0, 0, 0},
		// The tiny experts take far less than half the available memory.
		{model.ResidencyAuto, 10, 20, 10},
	} {
		t.Run(string(tc.mode), func(t *testing.T) {
			cfg := testConfig("1:0-9")
			cfg.Weights = tc.mode
			node := startNode(t, cfg)
			_, c := dial(t, node)
			ctx := testCtx(t)
			st, err := c.Dispatch(ctx)
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(3, 4))
			// check dispatches rows naming only held experts and compares
			// with the in-process runner over the mapped checkpoint.
			check := func(step string, held func(int32) bool) {
				t.Helper()
				const rows, k = 5, 3
				x, ids, w := randomRows(rng, rows, k, h, ne)
				ids = mask(ids, held)
				if err := st.Send(&meshpb.DispatchRequest{Id: 1, Layer: 1, Hidden: wire.F32Matrix(x, rows, h), K: k, ExpertIds: ids, GateWeights: w}); err != nil {
					t.Fatal(err)
				}
				r, err := st.Recv()
				if err != nil {
					t.Fatal(err)
				}
				if got, want := decodePartial(t, r, rows, h), ref.run(t, 1, x, rows, k, ids, w); !slices.Equal(got, want) {
					t.Fatalf("%s: partial differs from the mapped checkpoint's", step)
				}
			}
			in := func(lo, hi int32) func(int32) bool { return func(id int32) bool { return id >= lo && id <= hi } }
			if got := node.ResidentExperts(); got != tc.atStart {
				t.Fatalf("at start: %d resident, want %d", got, tc.atStart)
			}
			check("at start", in(0, 9))
			if _, err := c.Load(ctx, &meshpb.LoadRequest{Experts: []*meshpb.ExpertRange{{Layer: 1, First: 20, Last: 29}}}); err != nil {
				t.Fatal(err)
			}
			if got := node.ResidentExperts(); got != tc.afterLoad {
				t.Fatalf("after Load: %d resident, want %d", got, tc.afterLoad)
			}
			check("after Load", func(id int32) bool { return in(0, 9)(id) || in(20, 29)(id) })
			if _, err := c.Drop(ctx, &meshpb.DropRequest{Experts: []*meshpb.ExpertRange{{Layer: 1, First: 5, Last: 24}}}); err != nil {
				t.Fatal(err)
			}
			if got := node.ResidentExperts(); got != tc.afterDrop {
				t.Fatalf("after Drop: %d resident, want %d", got, tc.afterDrop)
			}
			check("after Drop", func(id int32) bool { return in(0, 4)(id) || in(25, 29)(id) })
		})
	}
}
