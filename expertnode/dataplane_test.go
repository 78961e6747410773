package expertnode

import (
	"context"
	"testing"

	"github.com/expertmesh/expertmesh/internal/dataplane"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// transports are the two ways a Dispatch stream reaches a node, on its
// one listening address.
var transports = []string{"grpc", "dataplane"}

// dispatchClient is the client side of a Dispatch stream on either
// transport.
type dispatchClient interface {
	Send(*meshpb.DispatchRequest) error
	Recv() (*meshpb.DispatchResponse, error)
}

type dpClient struct{ c *dataplane.Conn }

func (d dpClient) Send(r *meshpb.DispatchRequest) error { return d.c.SendMsg(r) }

func (d dpClient) Recv() (*meshpb.DispatchResponse, error) {
	m := new(meshpb.DispatchResponse)
	if err := d.c.RecvMsg(m); err != nil {
		return nil, err
	}
	return m, nil
}

// opener opens Dispatch streams to n over transport tr.
func opener(t testing.TB, n *Node, tr string) func(context.Context) (dispatchClient, error) {
	if tr == "grpc" {
		_, c := dial(t, n)
		return func(ctx context.Context) (dispatchClient, error) { return c.Dispatch(ctx) }
	}
	return func(ctx context.Context) (dispatchClient, error) {
		c, err := dataplane.Dial(ctx, n.Addr())
		if err != nil {
			return nil, err
		}
		t.Cleanup(func() { c.Close() })
		return dpClient{c}, nil
	}
}
