package attnnode

import (
	"context"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"

	"github.com/expertmesh/expertmesh/expertnode"
	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/internal/testnet"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// testView is a placement.View whose Routing the test replaces: the
// in-memory counterpart of the control plane's etcd-backed view.
type testView struct {
	mu             sync.Mutex
	r              *placement.Routing
	ch             chan struct{}
	oldest, newest uint64
}

func newTestView(r *placement.Routing) *testView {
	return &testView{r: r, ch: make(chan struct{})}
}

func (v *testView) Routing() (*placement.Routing, <-chan struct{}) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.r, v.ch
}

func (v *testView) InUse(oldest, newest uint64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.oldest, v.newest = oldest, newest
}

func (v *testView) inUse() (oldest, newest uint64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.oldest, v.newest
}

// set publishes r and wakes everyone waiting on the previous Routing.
func (v *testView) set(r *placement.Routing) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.r = r
	close(v.ch)
	v.ch = make(chan struct{})
}

// expert is a real in-process expert node holding every expert, reached
// through a proxy that can freeze or reset its connections.
type expert struct {
	id    string
	node  *expertnode.Node
	proxy *testnet.Proxy
}

func startExpert(t testing.TB, dir, id string, tp trace.TracerProvider) *expert {
	t.Helper()
	return startExpertHolding(t, dir, id, "all", tp)
}

// startExpertHolding starts an expert node holding only the experts of
// spec (the --experts grammar), whatever a Routing says it holds.
func startExpertHolding(t testing.TB, dir, id, spec string, tp trace.TracerProvider) *expert {
	t.Helper()
	cfg := expertnode.DefaultConfig()
	cfg.ModelDir, cfg.Experts, cfg.Threads, cfg.NodeID = dir, spec, 1, id
	cfg.Logger = slog.New(slog.DiscardHandler)
	cfg.TracerProvider = tp
	n, err := expertnode.Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	<-n.Ready()
	p, err := testnet.Listen(n.Addr())
	if err != nil {
		n.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Thaw()
		p.Close()
		n.Close()
	})
	return &expert{id: id, node: n, proxy: p}
}

// rowsServed is what the node reports it computed, over all layers.
func (e *expert) rowsServed(t *testing.T) uint64 {
	t.Helper()
	cc, err := rpc.Dial(e.node.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := meshpb.NewExpertServiceClient(cc).Status(ctx, &meshpb.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, r := range st.RowsServed {
		n += r
	}
	return n
}

// routing is placement version v in which every listed node holds every
// expert, in that replica order, dialled through its proxy.
func routing(t testing.TB, dir string, v uint64, es ...*expert) *placement.Routing {
	t.Helper()
	c, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	shape := placement.ShapeOf(c)
	all, err := placement.ParseSet(shape, "all")
	if err != nil {
		t.Fatal(err)
	}
	tab := placement.NewTable(shape, v)
	var addrs []string
	for _, e := range es {
		if err := tab.AddSet(e.id, all); err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, e.proxy.Addr())
	}
	return &placement.Routing{Table: tab, Addrs: addrs}
}

// remoteNode starts an in-process attention node dispatching by view.
func remoteNode(t testing.TB, dir string, view placement.View, dispatch, wait time.Duration) *Node {
	t.Helper()
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.Placement = dir, 1, 8<<20, view
	cfg.ListenAddr, cfg.MicroBatches, cfg.DispatchTimeout, cfg.ExpertWait = "", 2, dispatch, wait
	n, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// timed records the slowest step.
type timed struct {
	stepper
	mu      sync.Mutex
	slowest time.Duration
}

func (s *timed) Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error) {
	start := time.Now()
	resp, err := s.stepper.Step(ctx, req)
	s.mu.Lock()
	s.slowest = max(s.slowest, time.Since(start))
	s.mu.Unlock()
	return resp, err
}

// bounded runs f, failing the test if it takes longer than limit (it is
// left running: the test's cleanup ends it).
func bounded(t *testing.T, limit time.Duration, what string, f func()) time.Duration {
	t.Helper()
	start := time.Now()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(limit):
		t.Fatalf("%s: not done after %v", what, limit)
	}
	return time.Since(start)
}

// TestFrozenReplicaFailsOver: with one of two replicas frozen (SIGSTOP:
// connections open, nothing answers), steps keep completing on the other
// with exact outputs; the frozen node costs one dispatch deadline, not one
// per layer or per step, and no step waits much longer than that.
func TestFrozenReplicaFailsOver(t *testing.T) {
	dir := genTiny(t, "tiny-v2")
	a, b := startExpert(t, dir, "a", nil), startExpert(t, dir, "b", nil)
	view := newTestView(routing(t, dir, 1, a, b))
	const deadline = time.Second
	node := remoteNode(t, dir, view, deadline, 30*time.Second)
	const maxTokens = 5
	var healthy time.Duration
	bounded(t, time.Minute, "undisturbed run", func() {
		start := time.Now()
		drive(t, node, prompts, maxTokens, 4)
		healthy = time.Since(start)
	})

	a.proxy.Freeze()
	ts := &timed{stepper: node}
	var tokens [][]int
	var lps, echo [][]float64
	took := bounded(t, time.Minute, "run with a frozen replica", func() {
		tokens, lps, echo = drive(t, ts, prompts, maxTokens, 4)
	})
	checkAgainstReference(t, dir, tokens, lps, echo, maxTokens)
	t.Logf("undisturbed %v, frozen replica %v, slowest step %v (deadline %v)", healthy, took, ts.slowest, deadline)
	// Without the frozen node being skipped after its first missed
	// deadline, every step's MoE layers would each wait one: ~20 s here.
	if limit := 2*healthy + 4*deadline; took > limit {
		t.Errorf("the run took %v with a frozen replica, want < %v", took, limit)
	}
	if limit := healthy + 2*deadline + time.Second; ts.slowest > limit {
		t.Errorf("slowest step %v, want < %v: a frozen node stalled others beyond its deadline", ts.slowest, limit)
	}
	select {
	case <-a.proxy.Held():
	default:
		t.Fatal("nothing was ever sent to the frozen node: the test proved nothing")
	}
}

// TestTransientResetOnlyReplica: cutting the only replica's connection
// while it computes fails no step (the same replica is retried after a
// redial) and the outputs stay exact.
func TestTransientResetOnlyReplica(t *testing.T) {
	dir := genTiny(t, "tiny-v2")
	var resets atomic.Int32
	const want = 5
	var e *expert
	var eready atomic.Bool
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(onStart(func(s sdktrace.ReadWriteSpan) {
		// Every third computation loses its connection mid-flight.
		if s.Name() == "expert.compute" && eready.Load() && resets.Load() < want && s.SpanContext().SpanID()[0]%3 == 0 {
			resets.Add(1)
			e.proxy.Reset()
		}
	})))
	e = startExpert(t, dir, "a", tp)
	eready.Store(true)
	node := remoteNode(t, dir, newTestView(routing(t, dir, 1, e)), 5*time.Second, 30*time.Second)
	const maxTokens = 6
	var tokens [][]int
	var lps, echo [][]float64
	bounded(t, time.Minute, "run with resets", func() {
		tokens, lps, echo = drive(t, node, prompts, maxTokens, 4)
	})
	checkAgainstReference(t, dir, tokens, lps, echo, maxTokens)
	if resets.Load() == 0 {
		t.Fatal("no connection was reset: the test proved nothing")
	}
	t.Logf("%d resets", resets.Load())
}

// onStart is a span processor calling f as spans start.
type onStart func(sdktrace.ReadWriteSpan)

func (f onStart) OnStart(_ context.Context, s sdktrace.ReadWriteSpan) { f(s) }
func (onStart) OnEnd(sdktrace.ReadOnlySpan)                           {}
func (onStart) Shutdown(context.Context) error                        { return nil }
func (onStart) ForceFlush(context.Context) error                      { return nil }

// TestRoutingChangeWakesWaitingDispatch: with the only replica frozen (a
// request in flight to it) or dead, a new Routing naming a fresh expert
// node lets the waiting step complete on it at once: the dispatch wakes on
// the Routing, not on its 60 s deadline. Outputs stay exact and the step
// reports the new placement version.
func TestRoutingChangeWakesWaitingDispatch(t *testing.T) {
	for _, mode := range []string{"frozen", "dead"} {
		t.Run(mode, func(t *testing.T) {
			dir := genTiny(t, "tiny-v2")
			a := startExpert(t, dir, "a", nil)
			view := newTestView(routing(t, dir, 1, a))
			node := remoteNode(t, dir, view, time.Minute, 90*time.Second)
			drive(t, node, prompts[:1], 1, 8) // streams open: requests really go out
			stuck := make(chan struct{}, 1)
			node.remote.onStuck = func() {
				select {
				case stuck <- struct{}{}:
				default:
				}
			}
			waiting := stuck
			if mode == "frozen" {
				a.proxy.Freeze()
				waiting = make(chan struct{})
				go func() {
					<-a.proxy.Held()
					close(waiting)
				}()
			} else {
				a.node.Close()
			}
			type out struct {
				tokens    [][]int
				lps, echo [][]float64
			}
			done := make(chan out, 1)
			go func() {
				tokens, lps, echo := drive(t, node, prompts, 5, 4)
				done <- out{tokens, lps, echo}
			}()
			select {
			case <-waiting:
			case <-time.After(30 * time.Second):
				t.Fatal("the step never dispatched to the broken node")
			}
			b := startExpert(t, dir, "b", nil)
			swapped := time.Now()
			view.set(routing(t, dir, 2, b))
			select {
			case o := <-done:
				if took := time.Since(swapped); took > 15*time.Second {
					t.Errorf("the run finished %v after the new Routing; the dispatch deadline is 1 min", took)
				}
				checkAgainstReference(t, dir, o.tokens, o.lps, o.echo, 5)
			case <-time.After(40 * time.Second):
				t.Fatal("the waiting step did not move to the new Routing")
			}
			if oldest, newest := view.inUse(); oldest != 2 || newest != 2 {
				t.Errorf("InUse(%d, %d) after the run, want (2, 2)", oldest, newest)
			}
			if s, err := node.Step(context.Background(), &meshpb.StepRequest{Step: 99}); err != nil || s.PlacementVersion != 2 {
				t.Errorf("placement version %d (%v), want 2", s.GetPlacementVersion(), err)
			}
		})
	}
}

// TestNoReplicaAnswersUnavailableAndRetrySucceeds: with no replica at all,
// a step is answered UNAVAILABLE after the expert-wait budget on the open
// stream with nothing applied (no sequence created or advanced, samplers
// and echo state untouched, free blocks unchanged); sending the same
// request again once a replica appears gives exactly the undisturbed
// run's output. Sampling is seeded and random, so a sampler that advanced
// in the failed step would change the tokens.
func TestNoReplicaAnswersUnavailableAndRetrySucceeds(t *testing.T) {
	dir := genTiny(t, "tiny-v2")
	sp := &meshpb.SamplingParams{Temperature: 0.9, Seed: 7}
	const maxTokens = 5

	// Undisturbed run.
	ref := startExpert(t, dir, "ref", nil)
	refNode := remoteNode(t, dir, newTestView(routing(t, dir, 1, ref)), 5*time.Second, 30*time.Second)
	wantTok, wantLP, wantEcho := driveWith(t, refNode, prompts, maxTokens, 4, sp)

	// Disturbed: over gRPC, the only replica dies before step 1 (every
	// sequence is being created) and again before step 3 (sequences mid
	// prefill and decoding).
	a := startExpert(t, dir, "a", nil)
	view := newTestView(routing(t, dir, 1, a))
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.Threads, cfg.CacheBytes, cfg.Placement = dir, 1, 8<<20, view
	cfg.DispatchTimeout, cfg.ExpertWait = time.Second, time.Second
	srv, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	cl, err := Dial(context.Background(), srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	live := a
	version := uint64(1)
	f := &failFirst{t: t, c: cl, node: srv, at: map[uint64]bool{1: true, 3: true}, break_: func() {
		live.node.Close()
	}, repair: func() {
		version++
		live = startExpert(t, dir, "e"+string(rune('0'+version)), nil)
		view.set(routing(t, dir, version, live))
	}}
	var tok [][]int
	var lp, echo [][]float64
	bounded(t, 2*time.Minute, "disturbed run", func() {
		tok, lp, echo = driveWith(t, f, prompts, maxTokens, 4, sp)
	})
	if f.failed != 2 {
		t.Fatalf("%d steps failed, want 2", f.failed)
	}
	for i := range prompts {
		if !equalInts(tok[i], wantTok[i]) {
			t.Fatalf("prompt %d: tokens %v, undisturbed %v", i, tok[i], wantTok[i])
		}
		if !close64(lp[i], wantLP[i]) || !close64(echo[i], wantEcho[i]) {
			t.Fatalf("prompt %d: logprobs %v / echo %v, undisturbed %v / %v", i, lp[i], echo[i], wantLP[i], wantEcho[i])
		}
	}
}

// failFirst sends the steps named in at once with the experts broken,
// checks the failure left nothing behind, repairs them and sends the same
// request again on the same stream.
type failFirst struct {
	t      *testing.T
	c      *Client
	node   *Node
	at     map[uint64]bool
	break_ func()
	repair func()
	failed int
}

func (f *failFirst) Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error) {
	t := f.t
	if !f.at[req.Step] {
		return f.c.Step(ctx, req)
	}
	before, err := f.c.Info(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.c.mu.Lock()
	stream := f.c.stream
	f.c.mu.Unlock()
	f.break_()
	start := time.Now()
	resp, err := f.c.Step(ctx, req)
	if err != nil {
		t.Fatalf("step %d with no replica: stream error %v, want an UNAVAILABLE answer", req.Step, err)
	}
	if codes.Code(resp.Code) != codes.Unavailable || len(resp.Results) != 0 {
		t.Fatalf("step %d with no replica: code %v %q, %d results", req.Step, codes.Code(resp.Code), resp.Message, len(resp.Results))
	}
	t.Logf("step %d answered after %v: %s", req.Step, time.Since(start), resp.Message)
	after, err := f.c.Info(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if after.FreeBlocks != before.FreeBlocks || after.ActiveSequences != before.ActiveSequences ||
		resp.FreeBlocks != after.FreeBlocks || resp.TotalBlocks != after.TotalBlocks {
		t.Fatalf("failed step %d changed the cache: free %d -> %d (answer says %d/%d), sequences %d -> %d",
			req.Step, before.FreeBlocks, after.FreeBlocks, resp.FreeBlocks, resp.TotalBlocks, before.ActiveSequences, after.ActiveSequences)
	}
	f.c.mu.Lock()
	// The failed step came back on the stream it went out on (opened
	// by this step if it was the first), which is still open.
	same := f.c.stream != nil && (stream == nil || f.c.stream == stream)
	f.c.mu.Unlock()
	if !same {
		t.Fatalf("step %d: the failure closed the step stream", req.Step)
	}
	f.failed++
	f.repair()
	resp, err = f.c.Step(ctx, req)
	if err == nil && resp.FreeBlocks != uint32(f.node.cache.FreeBlocks()) {
		t.Errorf("step %d: answer says %d free blocks, node has %d", req.Step, resp.FreeBlocks, f.node.cache.FreeBlocks())
	}
	return resp, err
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func close64(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if math.Abs(a[i]-b[i]) > 1e-4 {
			return false
		}
	}
	return true
}

// TestReplicaChoiceSharesLoad: with two replicas of every expert and a
// steady batch, each node computes about half of the rows. Within one
// dispatch rows alternate between equally loaded replicas (they differ by
// at most one row), and the other micro-batch's rows in flight only shift
// where a dispatch starts; so the split stays near even. 40–60% leaves
// room for single-row dispatches that always go to the first replica when
// both are idle.
func TestReplicaChoiceSharesLoad(t *testing.T) {
	dir := genTiny(t, "tiny-v2-lite")
	a, b := startExpert(t, dir, "a", nil), startExpert(t, dir, "b", nil)
	node := remoteNode(t, dir, newTestView(routing(t, dir, 1, a, b)), 5*time.Second, 30*time.Second)
	many := make([][]int, 12)
	for i := range many {
		many[i] = []int{1 + i, 20 + 3*i, 7, 100 + i}
	}
	bounded(t, time.Minute, "load", func() { drive(t, node, many, 8, 4) })
	ra, rb := a.rowsServed(t), b.rowsServed(t)
	share := float64(ra) / float64(ra+rb)
	t.Logf("rows: a %d, b %d (a's share %.2f)", ra, rb, share)
	if share < 0.4 || share > 0.6 {
		t.Fatalf("a served %.0f%% of the rows, want 40-60%%", 100*share)
	}
}

// TestNotHeldRefreshesRouting: a node that answers FAILED_PRECONDITION
// (the Routing says it holds experts it does not) makes the dispatch wait
// for the next Routing rather than fail, and the step completes by it.
func TestNotHeldRefreshesRouting(t *testing.T) {
	dir := genTiny(t, "tiny-v2")
	empty := startExpertHolding(t, dir, "empty", "", nil)
	view := newTestView(routing(t, dir, 1, empty))
	node := remoteNode(t, dir, view, 5*time.Second, time.Minute)
	stuck := make(chan struct{})
	var once sync.Once
	node.remote.onStuck = func() { once.Do(func() { close(stuck) }) }
	type out struct {
		tokens    [][]int
		lps, echo [][]float64
	}
	done := make(chan out, 1)
	go func() {
		tokens, lps, echo := drive(t, node, prompts, 3, 4)
		done <- out{tokens, lps, echo}
	}()
	select {
	case <-stuck:
	case <-time.After(30 * time.Second):
		t.Fatal("the dispatch never waited for a new Routing")
	}
	full := startExpert(t, dir, "full", nil)
	view.set(routing(t, dir, 2, full))
	select {
	case o := <-done:
		checkAgainstReference(t, dir, o.tokens, o.lps, o.echo, 3)
	case <-time.After(40 * time.Second):
		t.Fatal("the step did not complete by the new Routing")
	}
}

// TestInvalidArgumentIsNotRetried: an expert node that refuses a request
// as malformed (here: it serves another model, with fewer experts) fails
// the step at once with that code; retrying cannot help.
func TestInvalidArgumentIsNotRetried(t *testing.T) {
	dir := genTiny(t, "tiny-v2")                                      // 160 experts
	other := startExpert(t, genTiny(t, "tiny-v2-lite"), "other", nil) // 64
	node := remoteNode(t, dir, newTestView(routing(t, dir, 1, other)), 5*time.Second, time.Minute)
	var resp *meshpb.StepResponse
	took := bounded(t, 30*time.Second, "step", func() {
		var err error
		resp, err = node.Step(context.Background(), &meshpb.StepRequest{Step: 1, Work: []*meshpb.SeqWork{
			{SeqId: 1, Tokens: []int32{1, 2, 3, 4, 5, 6, 7, 8}, Sample: true, ReserveTokens: 16},
		}})
		if err != nil {
			t.Error(err)
		}
	})
	if resp == nil || codes.Code(resp.Code) != codes.InvalidArgument {
		t.Fatalf("answer %v, want INVALID_ARGUMENT", resp)
	}
	if took > 10*time.Second || node.Sequences() != 0 {
		t.Fatalf("took %v (expert wait 1 min), %d sequences left", took, node.Sequences())
	}
	t.Logf("%v: %s", took, resp.Message)
}

// reported is a testView that signals every InUse report.
type reported struct {
	*testView
	ch chan [2]uint64
}

func (r *reported) InUse(oldest, newest uint64) {
	r.testView.InUse(oldest, newest)
	r.ch <- [2]uint64{oldest, newest}
}

// TestIdleNodeAcknowledgesNewRouting: with no step running, a new
// Routing is reported in use at once, so expert nodes can drop what the
// old version assigned them without waiting for traffic.
func TestIdleNodeAcknowledgesNewRouting(t *testing.T) {
	shape := placement.Shape{Layers: 2, Experts: 4, Groups: 1, MoELayers: []int{1}}
	table := func(v uint64) *placement.Routing {
		tb, err := placement.ParseSpec(shape, "a=all")
		if err != nil {
			t.Fatal(err)
		}
		tb.Version = v
		return &placement.Routing{Table: tb, Addrs: []string{"127.0.0.1:1"}}
	}
	v := &reported{testView: newTestView(table(1)), ch: make(chan [2]uint64, 8)}
	r := NewRemoteExperts(v, 8, RemoteConfig{})
	defer r.Close()
	if got := <-v.ch; got != [2]uint64{1, 1} {
		t.Fatalf("first report %v, want [1 1]", got)
	}
	v.set(table(2))
	select {
	case got := <-v.ch:
		if got != [2]uint64{2, 2} {
			t.Fatalf("after the new routing: %v, want [2 2]", got)
		}
	case <-time.After(10 * time.Second): // a missing report, not a slow one
		t.Fatal("an idle node never acknowledged the new routing")
	}
	// While a step runs on version 2, a new routing is not acknowledged
	// (the step still dispatches by 2); the step's end reports it.
	p := r.beginStep()
	v.set(table(3))
	if o, n := v.inUse(); o != 2 || n != 2 {
		t.Fatalf("during the step: in use %d..%d, want 2..2", o, n)
	}
	r.endStep(p)
	if got := <-v.ch; got != [2]uint64{3, 3} {
		t.Fatalf("after the step: %v, want [3 3]", got)
	}
}
