package expertnode

import (
	"context"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/expertmesh/expertmesh/internal/wire"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// TestReplyOut: the reply a stream sends, its partial rows encoded
// straight into gRPC's buffer (replyOut), decodes to the reply with the
// rows encoded into a Tensor first (reply): F32 and BF16, 1 and 32 rows,
// and a rejected request's reply, which has no rows.
func TestReplyOut(t *testing.T) {
	cfg := testConfig("all")
	cfg.Threads = 1
	node := startNode(t, cfg)
	for _, c := range []struct {
		rows int
		dt   meshpb.DType
		bad  bool
	}{{1, meshpb.DType_DTYPE_F32, false}, {32, meshpb.DType_DTYPE_F32, false}, {1, meshpb.DType_DTYPE_BF16, false}, {32, meshpb.DType_DTYPE_BF16, false}, {3, meshpb.DType_DTYPE_F32, true}} {
		req := benchRequest(c.rows)
		req.PartialDtype = c.dt
		if c.bad {
			req.K = 0
		}
		j := node.prepare(new(job), req)
		if j.code == 0 {
			node.run(context.Background(), j)
		}
		decode := func(v any) *meshpb.DispatchResponse {
			bs, err := wire.Codec{}.Marshal(v)
			if err != nil {
				t.Fatal(err)
			}
			defer bs.Free()
			r := new(meshpb.DispatchResponse)
			if err := proto.Unmarshal(bs.Materialize(), r); err != nil {
				t.Fatal(err)
			}
			return r
		}
		got := decode(node.replyOut(j))
		want := decode(node.reply(j))
		if !proto.Equal(got, want) {
			t.Errorf("%v rows=%d bad=%v: replyOut decodes to %v, reply to %v", c.dt, c.rows, c.bad, got, want)
		}
		if (want.Partial == nil) != c.bad {
			t.Errorf("%v rows=%d bad=%v: partial %v, code %d", c.dt, c.rows, c.bad, want.Partial != nil, want.Code)
		}
	}
}
