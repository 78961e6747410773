package rpc

import (
	"context"
	"log/slog"
	"net"
	"testing"

	"google.golang.org/grpc"

	meshpb "github.com/expertmesh/expertmesh/proto"
)

// echoDispatch answers every Dispatch request with its id.
type echoDispatch struct {
	meshpb.UnimplementedExpertServiceServer
}

func (echoDispatch) Dispatch(st grpc.BidiStreamingServer[meshpb.DispatchRequest, meshpb.DispatchResponse]) error {
	var req meshpb.DispatchRequest
	var resp meshpb.DispatchResponse
	for {
		if err := st.RecvMsg(&req); err != nil {
			return nil
		}
		resp.Id = req.Id
		if err := st.SendMsg(&resp); err != nil {
			return err
		}
	}
}

// TestDialDispatch: a connection from DialDispatch exchanges Dispatch
// messages with a NewServer like one from Dial, and without the client
// stats handler it allocates less per exchange (gRPC's payload events).
func TestDialDispatch(t *testing.T) {
	if _, err := DialDispatch(""); err == nil {
		t.Error("DialDispatch(\"\") succeeded")
	}
	srv := NewServer(ServerOptions{Logger: slog.New(slog.DiscardHandler)})
	meshpb.RegisterExpertServiceServer(srv, echoDispatch{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(lis) }()
	defer func() {
		srv.Stop()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	allocs := map[string]float64{}
	for name, dial := range map[string]func(string, ...grpc.DialOption) (*grpc.ClientConn, error){"Dial": Dial, "DialDispatch": DialDispatch} {
		cc, err := dial(lis.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		st, err := meshpb.NewExpertServiceClient(cc).Dispatch(ctx)
		if err != nil {
			t.Fatal(err)
		}
		req := &meshpb.DispatchRequest{Layer: 1, K: 1, ExpertIds: make([]int32, 300)}
		var resp meshpb.DispatchResponse
		exchange := func() {
			req.Id++
			if err := st.SendMsg(req); err != nil {
				t.Fatal(err)
			}
			if err := st.RecvMsg(&resp); err != nil || resp.Id != req.Id {
				t.Fatalf("%s: reply %d, %v", name, resp.Id, err)
			}
		}
		for range 50 {
			exchange()
		}
		allocs[name] = testing.AllocsPerRun(500, exchange)
		cancel()
		cc.Close()
	}
	t.Logf("allocations per exchange: %v", allocs)
	if !raceEnabled && allocs["DialDispatch"] > allocs["Dial"]-1 {
		t.Errorf("DialDispatch: %.2f allocations per exchange, Dial %.2f: want at least one fewer", allocs["DialDispatch"], allocs["Dial"])
	}
}
