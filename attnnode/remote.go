package attnnode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/expertmesh/expertmesh/internal/dataplane"
	"github.com/expertmesh/expertmesh/internal/rpc"
	"github.com/expertmesh/expertmesh/internal/wire"
	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// Dispatch budgets.
const (
	// DefaultDispatchTimeout is the deadline of a dispatch of up to
	// rowsPerTimeout rows (--dispatch-timeout); larger dispatches get one
	// more DispatchTimeout per rowsPerTimeout rows. A V2-Lite row costs
	// about 0.1 GFLOP of expert compute (6 experts × 3 × 2048 × 1408 × 2),
	// so 256 rows take ~0.3 s on one AVX-512 core and ~2.5 s on a 2-core
	// machine at 10 GFLOP/s: 5 s per 256 rows leaves 2× over that slow
	// machine, enough to queue behind one other micro-batch of the same
	// size on the expert node, and a frozen node still costs only seconds.
	DefaultDispatchTimeout = 5 * time.Second
	// DefaultExpertWait is how long a step waits for some replica of a
	// routed expert to answer before it fails with UNAVAILABLE
	// (--expert-wait). It is longer than a membership lease takes to
	// expire and a placement to move the experts elsewhere (seconds), and
	// shorter than the coordinator's 2-minute step timeout, so an expert
	// outage is reported as the experts' fault, never as this node's.
	DefaultExpertWait = 60 * time.Second

	rowsPerTimeout = 256
	// sameReplicaRetries is how many transport failures of one node a
	// dispatch retries on that node (after its redial) before it moves
	// the rows to other replicas: a reset stream is usually a blip.
	sameReplicaRetries = 2
	// Redials of a failed connection back off exponentially with jitter.
	redialBase, redialMax = 50 * time.Millisecond, 2 * time.Second
	// A dispatch with no usable replica re-plans on the next Routing, or
	// after this backoff (an expert node restarting at its address).
	roundBase, roundMax = 100 * time.Millisecond, 2 * time.Second
)

// ErrExpertUnavailable means no replica of some routed expert answered
// within the node's expert-wait budget.
var ErrExpertUnavailable = errors.New("expert unavailable")

// errStreamBroken marks a Dispatch stream that failed under a request.
var errStreamBroken = errors.New("dispatch stream broken")

// errPeerStalled marks a stream failed because a write to the node could
// not finish in time (a data-plane connection whose peer stopped
// reading): like a missed deadline, its requests move to other replicas
// at once rather than wait for the same node's redial.
var errPeerStalled = errors.New("expert node stopped reading")

// DialFunc opens a client connection to an expert node. It must do no
// I/O (grpc.NewClient does none); connecting happens on first use.
type DialFunc func(addr string) (*grpc.ClientConn, error)

// Transport is what carries the Dispatch streams to expert nodes
// (--dispatch-transport).
type Transport string

const (
	// TransportTCP is the data plane (internal/dataplane): framed
	// messages over a plain TCP connection per expert node, on the node's
	// gRPC port. The default. An expert node that refuses its handshake
	// (one that predates it) is served over gRPC instead.
	TransportTCP Transport = "tcp"
	// TransportGRPC is a gRPC Dispatch stream per expert node.
	TransportGRPC Transport = "grpc"
)

// ParseTransport parses --dispatch-transport's value.
func ParseTransport(s string) (Transport, error) {
	switch t := Transport(s); t {
	case TransportTCP, TransportGRPC:
		return t, nil
	case "":
		return TransportTCP, nil
	}
	return "", fmt.Errorf("%q: want tcp or grpc", s)
}

// RemoteConfig tunes RemoteExperts.
type RemoteConfig struct {
	// DispatchTimeout is the deadline of one dispatch of up to 256 rows;
	// see DefaultDispatchTimeout (0: that).
	DispatchTimeout time.Duration
	// ExpertWait bounds how long a step waits for a replica; see
	// DefaultExpertWait (0: that).
	ExpertWait time.Duration
	// Dial opens gRPC connections (nil: rpc.DialDispatch).
	Dial DialFunc
	// Transport carries the Dispatch streams ("": TransportTCP).
	Transport Transport
	// Logger receives the one-time notice that a node is served over
	// gRPC because it refused the data plane (nil: slog.Default()).
	Logger *slog.Logger
	// TracerProvider receives the attn.dispatch spans (nil: the global
	// provider at construction).
	TracerProvider trace.TracerProvider
	// Metrics, if set, records every dispatch attempt per expert node.
	Metrics *Metrics
	// Wire is the activation dtype on the wire (--wire): DTYPE_F32 (and
	// UNSPECIFIED) sends exact float32 rows both ways; DTYPE_BF16 sends
	// hidden rows as BF16 and asks for BF16 partial rows back, half the
	// bytes, each value rounded to 8 significant bits; DTYPE_F8_E4M3
	// sends hidden rows as E4M3 with a scale per 128 values (a quarter of
	// the bytes, 4 significant bits) and asks for BF16 partial rows, as
	// DeepSeek-V3 dispatches in FP8 and combines in BF16.
	Wire meshpb.DType
}

// RemoteExperts is the model.ExpertBackend of an attention node. Each MoE
// layer's rows are grouped by expert node (one message per node, each row
// once, with that node's expert ids and gate weights) and sent over one
// long-lived Dispatch stream per node; the pre-summed partial rows that
// come back are added up. Safe for concurrent use by several micro-batches.
//
// Concurrency: StartRoutedExperts runs under the engine's compute lock, so
// it never blocks on the network: it plans, and sends each request itself
// on its node's open stream when sending cannot block (see trySend), or
// queues it. Every connection has its own goroutine that dials, opens the
// stream and sends what was queued (outside every lock), and a receiver
// that routes replies by id. The wait function, called after the engine
// released the compute lock, does all the waiting and retrying.
//
// Failure policy, per slice of a dispatch sent to one node: a transport
// failure (stream reset, refused dial) is retried on the same node after
// its redial (exponential backoff with jitter), up to sameReplicaRetries
// times; then, or at once for a missed deadline or a FAILED_PRECONDITION,
// on the other replicas; with none left the dispatch waits for the next
// Routing (or re-plans after a backoff) until the step's expert-wait
// budget is spent. INVALID_ARGUMENT is not retried. A request in flight
// to a node that leaves the Routing is abandoned at once.
type RemoteExperts struct {
	view    placement.View
	hidden  int
	wire    meshpb.DType
	timeout time.Duration
	budget  time.Duration
	dial    DialFunc
	tcp     bool // TransportTCP
	log     *slog.Logger
	tracer  trace.Tracer
	metrics *Metrics
	nextID  atomic.Uint64
	// ctx ends with Close: streams are cancelled and waits return.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // connection goroutines
	// onStuck, if set (tests), is called when a dispatch finds no usable
	// replica and starts waiting for a Routing.
	onStuck func()
	// queueAll (tests) sends every attempt from its connection's
	// goroutine, the path trySend short-cuts; sentInline counts the
	// attempts trySend sent.
	queueAll   bool
	sentInline atomic.Uint64
	// inlineMax is the largest message a data-plane stream sends inline
	// to an idle connection (inlineMax; tests raise it).
	inlineMax int
	// load counts routed and served tokens (LoadStats); choice keeps the
	// replica choice's credits (load_share.go).
	load   *LoadStats
	choice shareChoice
	// computeUS sums the compute time expert nodes reported in their
	// replies (compute_us), to tell wire time from compute time.
	computeUS atomic.Uint64

	mu struct {
		sync.Mutex
		conns  map[string]*expertConn
		closed bool
	}
	// free holds finished dispatches for reuse, with their buffers and
	// attempts, so steady-state dispatching allocates nothing. A list
	// rather than a sync.Pool: it survives garbage collections, and it
	// never holds more than the dispatches that ran at once (one per
	// micro-batch).
	free struct {
		sync.Mutex
		list []*dispatch
	}
	use struct {
		sync.Mutex
		oldest, newest uint64
		reported       bool
		running        int // steps between beginStep and endStep
	}
}

// NewRemoteExperts dispatches to the nodes view routes to.
func NewRemoteExperts(view placement.View, hidden int, cfg RemoteConfig) *RemoteExperts {
	r := &RemoteExperts{view: view, hidden: hidden, timeout: cfg.DispatchTimeout, budget: cfg.ExpertWait, dial: cfg.Dial, wire: meshpb.DType_DTYPE_F32}
	if cfg.Wire == meshpb.DType_DTYPE_BF16 || cfg.Wire == meshpb.DType_DTYPE_F8_E4M3 {
		r.wire = cfg.Wire
	}
	if r.timeout <= 0 {
		r.timeout = DefaultDispatchTimeout
	}
	if r.budget <= 0 {
		r.budget = DefaultExpertWait
	}
	if r.dial == nil {
		r.dial = func(addr string) (*grpc.ClientConn, error) { return rpc.DialDispatch(addr) }
	}
	r.tcp = cfg.Transport != TransportGRPC
	r.inlineMax = inlineMax
	r.log = cfg.Logger
	if r.log == nil {
		r.log = slog.Default()
	}
	tp := cfg.TracerProvider
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	r.tracer = tp.Tracer(tracerName)
	r.metrics = cfg.Metrics
	r.load = NewLoadStats(0)
	r.ctx, r.cancel = context.WithCancel(context.Background())
	r.mu.conns = map[string]*expertConn{}
	r.wg.Add(1)
	go r.acknowledge()
	return r
}

// acknowledge reports a new Routing as in use while no step runs: an
// idle node would otherwise keep reporting the version its last step
// used, and expert nodes could never drop what that version assigned
// them (a drain would wait for traffic). A running step reports at its
// end instead.
func (r *RemoteExperts) acknowledge() {
	defer r.wg.Done()
	for {
		rt, ch := r.view.Routing()
		if rt != nil {
			r.ackIdle(rt.Table.Version)
		}
		select {
		case <-ch:
		case <-r.ctx.Done():
			return
		}
	}
}

// ackIdle reports (v, v) unless a step runs or a newer pair was reported.
func (r *RemoteExperts) ackIdle(v uint64) {
	r.use.Lock()
	defer r.use.Unlock()
	if r.use.running > 0 || (r.use.reported && (r.use.newest > v || (r.use.oldest == v && r.use.newest == v))) {
		return
	}
	r.use.oldest, r.use.newest, r.use.reported = v, v, true
	r.view.InUse(v, v)
}

// Close fails every dispatch still waiting, tears down every stream and
// connection and waits for their goroutines.
func (r *RemoteExperts) Close() {
	r.mu.Lock()
	r.mu.closed = true
	r.mu.Unlock()
	r.cancel()
	r.wg.Wait()
}

// conn returns addr's connection, creating it (no I/O) on first use; nil
// once closed.
func (r *RemoteExperts) conn(addr string) *expertConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.mu.closed {
		return nil
	}
	c := r.mu.conns[addr]
	if c == nil {
		c = &expertConn{r: r, addr: addr, wake: make(chan struct{}, 1)}
		r.mu.conns[addr] = c
		r.wg.Add(1)
		go c.run()
	}
	return c
}

// deadline is the time budget of one request of rows rows.
func (r *RemoteExperts) deadline(rows int) time.Duration {
	return r.timeout * time.Duration(1+rows/rowsPerTimeout)
}

// reportInUse tells the view which placement versions steps use, skipping
// repeats. Calls are ordered by the lock.
func (r *RemoteExperts) reportInUse(oldest, newest uint64) {
	r.use.Lock()
	defer r.use.Unlock()
	if r.use.reported && r.use.oldest == oldest && r.use.newest == newest {
		return
	}
	r.use.oldest, r.use.newest, r.use.reported = oldest, newest, true
	r.view.InUse(oldest, newest)
}

// stepPin is the placement one step dispatches by, shared by its
// micro-batches: the Routing in force when the step began, replaced only
// by a newer one when a failover needs it. It also keeps the step's
// expert-wait budget: the wall time during which some dispatch of the
// step had rows no replica had served, counted once however many
// dispatches were waiting at the same time.
type stepPin struct {
	r     *RemoteExperts
	first uint64

	mu       sync.Mutex
	rt       *placement.Routing
	troubled int // dispatches currently without an answer for some rows
	since    time.Time
	used     time.Duration
}

type pinKey struct{}

// beginStep pins the Routing in force for a step and reports its version
// in use.
func (r *RemoteExperts) beginStep() *stepPin {
	rt, _ := r.view.Routing()
	p := &stepPin{r: r, rt: rt, first: rt.Table.Version}
	r.use.Lock()
	r.use.running++
	r.use.Unlock()
	r.reportInUse(p.first, p.first)
	return p
}

// endStep reports that no step uses anything older than the newest
// Routing (the next step pins at least that) and returns the newest
// version the step dispatched by.
func (r *RemoteExperts) endStep(p *stepPin) uint64 {
	v := p.routing().Table.Version
	latest, _ := r.view.Routing()
	lv := max(latest.Table.Version, v)
	r.use.Lock()
	r.use.running--
	r.use.Unlock()
	r.reportInUse(lv, lv)
	return v
}

func (p *stepPin) routing() *placement.Routing {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.rt
}

// advance moves the step to rt, never to an older version.
func (p *stepPin) advance(rt *placement.Routing) {
	p.mu.Lock()
	if rt == p.rt || rt.Table.Version < p.rt.Table.Version {
		p.mu.Unlock()
		return
	}
	p.rt = rt
	p.mu.Unlock()
	p.r.reportInUse(p.first, rt.Table.Version)
}

// enterTrouble and leaveTrouble bracket a dispatch's time without an
// answer for some of its rows.
func (p *stepPin) enterTrouble(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.troubled == 0 {
		p.since = now
	}
	p.troubled++
}

func (p *stepPin) leaveTrouble(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.troubled--
	if p.troubled == 0 {
		p.used += now.Sub(p.since)
	}
}

// giveUp is when the step's budget runs out; only meaningful while the
// caller itself is in trouble.
func (p *stepPin) giveUp() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.since.Add(p.r.budget - p.used)
}

// StartRoutedExperts implements model.ExpertBackend. It runs under the
// engine's compute lock: it plans and queues, and never blocks on the
// network.
func (r *RemoteExperts) StartRoutedExperts(ctx context.Context, layer int, x []float32, n, k int, ids []int32, weights []float32, out []float32) func() error {
	pin, _ := ctx.Value(pinKey{}).(*stepPin)
	if pin == nil {
		pin = r.beginStep()
	}
	d := r.getDispatch()
	d.ctx, d.pin, d.layer, d.n, d.k, d.x, d.ids, d.weights, d.out = ctx, pin, layer, n, k, x, ids, weights, out
	d.latest, d.change = r.view.Routing()
	d.use(pin.routing())
	r.load.route(d.rt.Table.Shape(), layer, ids[:n*k])
	d.need = slices.Grow(d.need[:0], n*k)[:n*k]
	for i, id := range ids[:n*k] {
		d.need[i] = -1
		if id >= 0 {
			d.need[i] = id
			d.pending++
		}
	}
	d.launch(time.Now())
	return d.waitFn
}

// getDispatch returns a reset dispatch from the free list or a new one.
func (r *RemoteExperts) getDispatch() *dispatch {
	r.free.Lock()
	var d *dispatch
	if n := len(r.free.list); n > 0 {
		d = r.free.list[n-1]
		r.free.list[n-1] = nil
		r.free.list = r.free.list[:n-1]
	}
	r.free.Unlock()
	if d == nil {
		d = &dispatch{r: r, signal: make(chan struct{}, 1), avoid: map[string]bool{}, tries: map[string]int{}}
		d.waitFn = d.wait
		d.timer = time.NewTimer(time.Hour)
		d.timer.Stop()
	}
	return d
}

// recycle returns a dispatch that ended cleanly to the free list: nothing
// can touch it any more (every attempt it made was handled, or abandoned
// before it was answered, and so will never be handed back), and the
// attempts it completed go back to its spares with their buffers.
// Attempts that failed are left to the collector: a failure's retry may
// share their slices.
func (r *RemoteExperts) recycle(d *dispatch) {
	for _, a := range d.done {
		a.reset()
		d.spare = append(d.spare, a)
	}
	clear(d.done)
	d.done = d.done[:0]
	clear(d.avoid)
	clear(d.tries)
	d.ctx, d.pin, d.x, d.ids, d.weights, d.out = nil, nil, nil, nil, nil, nil
	d.rt, d.latest, d.change = nil, nil, nil
	d.pending, d.seq, d.troubled, d.stuck, d.round, d.roundWait, d.cause = 0, 0, false, false, 0, 0, nil
	r.free.Lock()
	r.free.list = append(r.free.list, d)
	r.free.Unlock()
}

// dispatch is one StartRoutedExperts call: n rows × k slots, each slot
// served exactly once by some replica. Everything but completions is
// owned by the goroutine that calls StartRoutedExperts and then wait.
type dispatch struct {
	r                *RemoteExperts
	ctx              context.Context
	pin              *stepPin
	layer, n, k      int
	x                []float32
	ids              []int32
	weights, out     []float32
	rt               *placement.Routing // what the dispatch plans by
	latest           *placement.Routing // the newest the view has shown
	change           <-chan struct{}    // closed when the view moves past latest
	usable           []bool             // per rt node: live in latest
	need             []int32            // per slot: the expert still to serve, or -1
	pending          int                // slots in need
	inflight, done   []*attempt
	avoid            map[string]bool // addresses not to plan on until the next round
	tries            map[string]int  // transport failures per address
	seq              int
	troubled         bool
	stuck            bool
	round, roundWait time.Duration
	nextRound        time.Time
	cause            error

	// Kept across reuse (see RemoteExperts.recycle): the wait closure,
	// the loop's timer, plan's scratch and attempts to reuse.
	waitFn func() error
	timer  *time.Timer
	batch  []*attempt
	conns  []*expertConn
	load   []int64
	order  []*attempt
	cands  []candidate
	spare  []*attempt

	handling []*attempt // the loop's spare completed list

	mu        sync.Mutex
	completed []*attempt
	signal    chan struct{}
}

// use makes rt the routing to plan by (the step moves to it too).
func (d *dispatch) use(rt *placement.Routing) {
	d.rt = rt
	d.pin.advance(rt)
	d.refreshUsable()
}

// refreshUsable marks the nodes of rt that are live members of latest:
// the same id at the same address.
func (d *dispatch) refreshUsable() {
	nodes := d.rt.Table.Nodes()
	d.usable = slices.Grow(d.usable[:0], len(nodes))[:len(nodes)]
	for i, id := range nodes {
		a := d.rt.Addrs[i]
		if d.rt == d.latest {
			d.usable[i] = a != ""
			continue
		}
		j := slices.Index(d.latest.Table.Nodes(), id)
		d.usable[i] = a != "" && j >= 0 && d.latest.Addrs[j] == a
	}
}

// alive reports whether an attempt's node is still a live member.
func (d *dispatch) alive(a *attempt) bool {
	j := slices.Index(d.latest.Table.Nodes(), a.nodeID)
	return j >= 0 && d.latest.Addrs[j] == a.addr
}

// observe takes the view's newest Routing.
func (d *dispatch) observe() {
	d.latest, d.change = d.r.view.Routing()
	d.refreshUsable()
}

// launch plans and queues every slot in need; slots no usable replica can
// take move the dispatch to a newer Routing if there is one, or leave it
// stuck until the next Routing or round.
func (d *dispatch) launch(now time.Time) {
	for {
		d.plan(now)
		if d.pending == 0 {
			d.stuck = false
			return
		}
		if d.rt != d.latest {
			d.use(d.latest)
			clear(d.avoid)
			continue
		}
		if !d.stuck {
			d.stuck = true
			d.trouble(now)
			d.round = min(max(2*d.round, roundBase), roundMax)
			d.nextRound = now.Add(jitter(d.round))
			if d.cause == nil {
				d.cause = fmt.Errorf("no live replica in placement version %d", d.rt.Table.Version)
			}
			if d.r.onStuck != nil {
				d.r.onStuck()
			}
		}
		return
	}
}

// newAttempt returns a spare attempt of d (reset, its buffers kept) or a
// new one.
func (d *dispatch) newAttempt() *attempt {
	if n := len(d.spare); n > 0 {
		a := d.spare[n-1]
		d.spare[n-1] = nil
		d.spare = d.spare[:n-1]
		return a
	}
	return &attempt{d: d}
}

// send starts attempt a (number n on its node) and queues it.
func (d *dispatch) send(a *attempt, now time.Time, n int) {
	a.id = d.r.nextID.Add(1)
	a.seq = d.seq
	d.seq++
	a.deadline = now.Add(d.r.deadline(len(a.rows)))
	// One span per (layer, expert node) request; the node's
	// expert.compute span becomes its child through trace_context. Only
	// inside a traced step: with no tracer installed the step's context
	// carries no valid span, and a no-op span and its attributes would
	// still cost allocations per request.
	a.ctx, a.span = d.ctx, noSpan
	if trace.SpanContextFromContext(d.ctx).IsValid() {
		a.ctx, a.span = d.r.tracer.Start(d.ctx, "attn.dispatch", trace.WithAttributes(
			attribute.Int("layer", d.layer), attribute.String("expert_node", a.addr), attribute.String("node_id", a.nodeID),
			attribute.Int("rows", len(a.rows)), attribute.Int("bytes", d.r.rowBytes()*len(a.rows)),
			attribute.Int64("placement_version", int64(a.version)), attribute.Int("attempt", n)))
	}
	a.attemptNo = n
	a.started = now
	d.inflight = append(d.inflight, a)
	a.conn.enqueue(a)
}

// noSpan is the span of an untraced attempt: every method is a no-op.
var noSpan = trace.SpanFromContext(context.Background())

// rowBytes is the wire size of one hidden row.
func (r *RemoteExperts) rowBytes() int {
	if r.wire == meshpb.DType_DTYPE_F8_E4M3 {
		return r.hidden + 4*wire.ScaleBlocks(r.hidden)
	}
	return wire.Size(r.wire) * r.hidden
}

// trouble starts the expert-wait budget of this dispatch.
func (d *dispatch) trouble(now time.Time) {
	if !d.troubled {
		d.troubled = true
		d.pin.enterTrouble(now)
	}
}

// notify is how receivers hand back a completed attempt.
func (d *dispatch) notify(a *attempt) {
	d.mu.Lock()
	d.completed = append(d.completed, a)
	d.mu.Unlock()
	select {
	case d.signal <- struct{}{}:
	default:
	}
}

// wait blocks until every slot is served, then adds the partial rows into
// out in a fixed order (the order attempts were made), so a run is
// reproducible whatever order replies arrive in.
func (d *dispatch) wait() error {
	err := d.loop()
	now := time.Now()
	for _, a := range d.inflight {
		a.abandon()
		a.end(errors.New("abandoned"))
	}
	clear(d.inflight)
	d.inflight = d.inflight[:0]
	if d.troubled {
		d.pin.leaveTrouble(now)
	}
	d.mu.Lock()
	for _, a := range d.completed {
		a.end(errors.New("abandoned"))
	}
	clear(d.completed)
	d.completed = d.completed[:0]
	d.mu.Unlock()
	if err != nil {
		return err // d is left to the collector: a reply may still be on its way to it
	}
	slices.SortFunc(d.done, func(a, b *attempt) int { return a.seq - b.seq })
	h := d.r.hidden
	for _, a := range d.done {
		slots := 0
		for _, id := range a.ids {
			if id >= 0 {
				slots++
			}
		}
		d.r.load.serve(a.nodeID, d.layer, slots)
		for j, row := range a.rows {
			dst := d.out[int(row)*h : int(row+1)*h]
			kernels.Add(dst, dst, a.part[j*h:(j+1)*h])
		}
	}
	d.r.recycle(d)
	return nil
}

func (d *dispatch) loop() error {
	timer := d.timer
	defer timer.Stop()
	for {
		if d.pending == 0 && len(d.inflight) == 0 {
			return nil
		}
		now := time.Now()
		next := now.Add(time.Hour)
		if d.troubled {
			giveUp := d.pin.giveUp()
			if !now.Before(giveUp) {
				return d.unavailable()
			}
			next = giveUp
		}
		for _, a := range d.inflight {
			if a.deadline.Before(next) {
				next = a.deadline
			}
		}
		if d.stuck && d.nextRound.Before(next) {
			next = d.nextRound
		}
		timer.Reset(max(next.Sub(now), 0))
		select {
		case <-d.signal:
			// Swap the list with the spare one so that neither side
			// allocates.
			d.mu.Lock()
			completed := d.completed
			d.completed = d.handling
			d.mu.Unlock()
			for _, a := range completed {
				if err := d.handle(a); err != nil {
					return err // wait ends those still in flight
				}
			}
			clear(completed)
			d.handling = completed[:0]
		case <-d.change:
			d.routingChanged()
		case <-timer.C:
			d.expire(time.Now())
		case <-d.ctx.Done():
			return d.ctx.Err()
		case <-d.r.ctx.Done():
			return ErrClosed
		}
		d.launch(time.Now())
	}
}

// handle takes a completed attempt's reply or failure.
func (d *dispatch) handle(a *attempt) error {
	d.drop(a)
	err := a.err
	if err == nil && a.code != 0 {
		err = status.Errorf(codes.Code(a.code), "expert node %s: %s", a.addr, a.msg)
	}
	if err == nil {
		a.end(nil)
		d.done = append(d.done, a)
		return nil
	}
	now := time.Now()
	d.trouble(now)
	d.cause = err
	switch status.Code(err) {
	case codes.InvalidArgument:
		a.end(err)
		return err // the engine names the layer
	case codes.FailedPrecondition:
		// The node no longer holds an expert this version gave it: plan
		// by a newer Routing, or wait for one.
		d.retry(a, err, "refresh placement")
		d.avoid[a.addr] = true
		d.routingChanged()
		return nil
	}
	if errors.Is(err, errPeerStalled) {
		d.retry(a, err, "other replica")
		d.avoid[a.addr] = true
		return nil
	}
	d.tries[a.addr]++
	if d.tries[a.addr] <= sameReplicaRetries && d.alive(a) {
		// Same node again, after its connection's redial backoff.
		a.event("retry", err, "same replica")
		a.end(err)
		b := &attempt{d: d, conn: a.conn, addr: a.addr, nodeID: a.nodeID, version: a.version, rows: a.rows, ids: a.ids, w: a.w}
		d.send(b, now, a.attemptNo+1)
		return nil
	}
	d.retry(a, err, "other replica")
	d.avoid[a.addr] = true
	return nil
}

// retry returns a's slots to the pool of slots in need.
func (d *dispatch) retry(a *attempt, err error, action string) {
	a.event("retry", err, action)
	a.end(err)
	for j, row := range a.rows {
		for s := range d.k {
			if id := a.ids[j*d.k+s]; id >= 0 {
				d.need[int(row)*d.k+s] = id
				d.pending++
			}
		}
	}
}

// drop removes a from the in-flight list.
func (d *dispatch) drop(a *attempt) {
	if i := slices.Index(d.inflight, a); i >= 0 {
		d.inflight = slices.Delete(d.inflight, i, i+1)
	}
}

// expire abandons requests past their deadline and ends a stuck round.
func (d *dispatch) expire(now time.Time) {
	for _, a := range slices.Clone(d.inflight) {
		if now.Before(a.deadline) || !a.abandon() {
			continue // not yet, or its reply is already on the way to handle
		}
		d.drop(a)
		d.trouble(now)
		a.conn.down.Store(true)
		err := status.Errorf(codes.DeadlineExceeded, "expert node %s: no answer for layer %d within %v", a.addr, d.layer, d.r.deadline(len(a.rows)))
		d.cause = err
		d.retry(a, err, "other replica")
		d.avoid[a.addr] = true
	}
	if d.stuck && !now.Before(d.nextRound) {
		// Try every replica again, by the newest Routing.
		d.stuck = false
		clear(d.avoid)
		clear(d.tries)
		d.routingChanged()
	}
}

// routingChanged takes the view's newest Routing: requests in flight to
// nodes that left are abandoned, and the dispatch moves to the new Routing
// when a failover needs it (slots abandoned or still without a replica).
func (d *dispatch) routingChanged() {
	d.observe()
	failover := d.pending > 0
	for _, a := range slices.Clone(d.inflight) {
		if d.alive(a) || !a.abandon() {
			continue
		}
		d.drop(a)
		err := status.Errorf(codes.Unavailable, "expert node %s (%s) left the placement", a.nodeID, a.addr)
		d.cause = err
		d.retry(a, err, "node left")
		failover = true
	}
	if failover && d.rt != d.latest {
		d.use(d.latest)
		clear(d.avoid)
		d.stuck = false
	}
}

// unavailable is the error of a dispatch whose budget ran out.
func (d *dispatch) unavailable() error {
	var experts []int32
	add := func(id int32) {
		if id >= 0 && !slices.Contains(experts, id) {
			experts = append(experts, id)
		}
	}
	for _, id := range d.need {
		add(id)
	}
	for _, a := range d.inflight {
		for _, id := range a.ids {
			add(id)
		}
	}
	slices.Sort(experts)
	const most = 16
	list := fmt.Sprint(experts)
	if len(experts) > most {
		list = fmt.Sprintf("%v and %d more", experts[:most], len(experts)-most)
	}
	return fmt.Errorf("%w: layer %d experts %s: no replica answered within the %v expert wait (last failure: %v)",
		ErrExpertUnavailable, d.layer, list, d.r.budget, d.cause)
}

func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d/2+1)
}

// Attempt states.
const (
	queued = iota
	sent
	answered
	abandoned
)

// attempt is one DispatchRequest to one node: rows of the dispatch with
// that node's expert ids and weights (-1 for slots served elsewhere).
type attempt struct {
	d         *dispatch
	conn      *expertConn
	addr      string
	nodeID    string
	version   uint64
	rows      []int32
	ids       []int32
	w         []float32
	id        uint64
	seq       int
	attemptNo int
	deadline  time.Time
	ctx       context.Context
	span      trace.Span
	started   time.Time // when send queued it (dispatch metrics)
	sentBytes int       // its request's wire size, once sent (dispatchStream.mu)
	// mu orders the sender's encoding of x against abandonment (once
	// abandon returns, nothing reads the dispatch's buffers) and the
	// receiver's decoding into part against both.
	mu    sync.Mutex
	state int
	code  int32     // the reply's code (0: OK)
	msg   string    // the reply's message
	part  []float32 // the partial rows: a view of frame's, or partBuf
	err   error
	// partBuf holds decoded partial rows, grown and reused; frame the
	// bytes of a data-plane reply whose F32 rows part views in place
	// (swapped with the receiving stream's buffer, see decode).
	partBuf []float32
	frame   []byte
}

// reset clears a completed attempt for reuse, keeping its buffers.
func (a *attempt) reset() {
	a.conn, a.addr, a.nodeID, a.version = nil, "", "", 0
	a.rows, a.ids, a.w = a.rows[:0], a.ids[:0], a.w[:0]
	a.id, a.seq, a.attemptNo = 0, 0, 0
	a.ctx, a.span = nil, nil
	a.state, a.code, a.msg, a.err = queued, 0, "", nil
}

// abandon gives up on a; false if it was already answered.
func (a *attempt) abandon() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.state == answered {
		return false
	}
	a.state = abandoned
	return true
}

// complete records a's failure and hands it to its dispatch, unless the
// dispatch gave up on it.
func (a *attempt) complete(err error) {
	a.mu.Lock()
	if a.state == answered || a.state == abandoned {
		a.mu.Unlock()
		return
	}
	a.state, a.err = answered, err
	a.mu.Unlock()
	a.d.notify(a)
}

// reply records a's reply, decoding its partial rows into a.part straight
// from the receiver's reused message (which the caller may overwrite as
// soon as this returns), and hands it to its dispatch, unless the
// dispatch gave up on it. frame, when not nil, is the buffer the
// message's bytes are in, which a may take (see decode).
func (a *attempt) reply(resp *meshpb.DispatchResponse, h int, frame *[]byte) {
	a.mu.Lock()
	if a.state == answered || a.state == abandoned {
		a.mu.Unlock()
		return
	}
	a.state, a.code, a.msg, a.err = answered, resp.Code, resp.Message, nil
	a.d.r.computeUS.Add(resp.ComputeUs)
	if resp.Code == 0 {
		a.err = a.decode(resp.Partial, h, frame)
	}
	a.mu.Unlock()
	a.d.notify(a)
}

// decode checks the partial rows (F32 or BF16) and decodes them into
// a.partBuf, or, when they are F32 in *frame (a data-plane reply, the
// rows aligned in it), takes the frame in exchange for a's own: a.part
// views the rows where they arrived and the stream receives its next
// reply into the buffer a had (no copy; the same set of buffers goes
// round).
func (a *attempt) decode(t *meshpb.Tensor, h int, frame *[]byte) error {
	rows, err := wire.CheckMatrix(t, h, len(a.rows))
	if err != nil || rows != len(a.rows) {
		return status.Errorf(codes.Internal, "expert node %s: bad partial: %v (rows %d, want %d)", a.addr, err, rows, len(a.rows))
	}
	if frame != nil {
		if x, ok, err := wire.ViewF32(t); ok {
			if err != nil {
				return status.Errorf(codes.Internal, "expert node %s: %v", a.addr, err)
			}
			a.part = x[:rows*h]
			a.frame, *frame = *frame, a.frame
			return nil
		}
	}
	a.partBuf = slices.Grow(a.partBuf[:0], rows*h)[:rows*h]
	a.part = a.partBuf
	if err := wire.Decode(a.part, t); err != nil {
		return status.Errorf(codes.Internal, "expert node %s: %v", a.addr, err)
	}
	return nil
}

func (a *attempt) event(name string, err error, action string) {
	a.span.AddEvent(name, trace.WithAttributes(attribute.String("reason", err.Error()), attribute.String("action", action)))
}

func (a *attempt) end(err error) {
	a.d.r.metrics.observeDispatch(a.nodeID, len(a.rows), a.d.r.rowBytes()*len(a.rows), time.Since(a.started), err)
	if err != nil {
		a.span.RecordError(err)
		a.span.SetStatus(otelcodes.Error, err.Error())
	}
	a.span.End()
}

// expertConn is one expert node's connection: a queue of attempts, the
// goroutine that dials, opens the Dispatch stream and sends them, and the
// stream's receiver. A dispatch sends its attempt itself instead of
// queueing it when the stream is open and idle enough (trySend): the
// common case, with no hand-off to the connection's goroutine. outstanding counts the rows queued or sent and not
// yet answered (abandoned ones included: a node that stopped answering
// keeps its count high, so replica choice avoids it).
type expertConn struct {
	r           *RemoteExperts
	addr        string
	outstanding atomic.Int64
	// down is set while the node looks broken: its last dial or stream
	// failed, or a request to it missed its deadline, and nothing came
	// back since (a reply or a new stream clears it). Replica choice
	// prefers nodes that are not down, so a frozen node costs one
	// deadline, not one per layer.
	down atomic.Bool
	wake chan struct{}
	// flushing is set (under tx) when an inline send left the rest of
	// its frame unwritten: the connection's goroutine writes it before
	// anything else is sent.
	flushing atomic.Bool

	mu struct {
		sync.Mutex
		queue []*attempt
	}

	// tx is held by whoever sends or (re)connects: run, or a dispatch in
	// trySend (which only tries it, so it never waits for a dial). It
	// guards everything below.
	tx       sync.Mutex
	cc       *grpc.ClientConn
	st       *dispatchStream
	grpcOnly bool // the node refused the data plane: gRPC until a stream fails
	fellBack bool // that was logged
	failures int
	retryAt  time.Time
	req      meshpb.DispatchRequest
	out      wire.OutRequest // req with its rows, for inline sends
	hidden   meshpb.Tensor
	shape    [2]int64
	data     []byte
	scales   []float32
	ids      []int32
	w        []float32
	trace    map[string]string
}

// msgStream is what a dispatchStream needs of its transport: a gRPC
// Dispatch client stream (SendMsg through wire.Codec) or a data-plane
// connection. SendMsg takes a *meshpb.DispatchRequest or a
// *wire.OutRequest and RecvMsg decodes a *meshpb.DispatchResponse in
// place; each is called by one goroutine at a time, the two possibly at
// once. The stream ends when the context it was opened with ends.
type msgStream interface {
	SendMsg(m any) error
	RecvMsg(m any) error
}

// dispatchStream is one open Dispatch stream and the requests awaiting
// replies on it.
type dispatchStream struct {
	c        *expertConn
	stream   msgStream
	dp       *dataplane.Conn // the stream, on the data plane; nil on gRPC
	cancel   context.CancelFunc
	recvDone chan struct{}

	mu struct {
		sync.Mutex
		pending map[uint64]*attempt
		// unanswered is the wire bytes of the requests in pending (each
		// attempt's sentBytes): an upper bound on what gRPC may not have
		// written yet, for trySend.
		unanswered int
		err        error
	}

	// Owned by receive: the reply every message is decoded into in place
	// (wire.Codec), and its tensor, kept across replies that carry none;
	// on the data plane, the buffer the next reply's bytes go into
	// (dataplane.Conn.RecvMsgInto; see attempt.decode).
	resp    meshpb.DispatchResponse
	partial *meshpb.Tensor
	buf     []byte
}

// enqueue sends a on the caller's goroutine if that cannot block
// (trySend), or hands it to the connection's goroutine; it never blocks.
func (c *expertConn) enqueue(a *attempt) {
	c.outstanding.Add(int64(len(a.rows)))
	if c.trySend(a) {
		return
	}
	c.mu.Lock()
	c.mu.queue = append(c.mu.queue, a)
	c.mu.Unlock()
	c.poke()
}

// writeQuota is how many bytes of one stream gRPC lets be handed to its
// writer and not yet written before Send blocks (grpc-go's
// defaultWriteQuota): Send blocks only while that many are waiting, for
// flow control or a slow writer.
const writeQuota = 64 << 10

// Inline sends on the data plane: the largest message sent inline to an
// idle connection (larger ones go through the connection's goroutine),
// and how long the dispatching goroutine may wait for the socket to take
// it before it leaves the rest to the connection's goroutine (a busy
// peer reads it later; a frozen one fails the stream after the dispatch
// timeout, as any write). 1 MiB (128 rows of V2-Lite's F32 width)
// leaves the socket in about a millisecond on loopback or 10 GbE and
// 8 ms at 1 Gb/s, and usually fits the socket buffers outright.
const (
	inlineMax          = 1 << 20
	inlineWriteTimeout = 50 * time.Millisecond
)

// trySend sends a itself when that cannot block: nobody else holds tx
// (run dialling or sending), nothing is queued before a, the stream is
// open and healthy, and its requests not yet answered total less than
// writeQuota, so gRPC's writer has less than that left to write and
// Send only hands the message over. Otherwise it reports false and a is
// queued. A dispatch calls it under the engine's compute lock, which a
// Send blocked on a frozen peer's flow control would hold for seconds.
func (c *expertConn) trySend(a *attempt) bool {
	if c.r.queueAll || !c.tx.TryLock() {
		return false
	}
	defer c.tx.Unlock()
	st := c.st
	if st == nil || c.flushing.Load() || !st.quiet(len(a.rows)*c.r.rowBytes()) {
		return false
	}
	c.mu.Lock()
	queued := len(c.mu.queue) > 0
	c.mu.Unlock()
	if queued {
		return false
	}
	c.send(a, true)
	c.r.sentInline.Add(1)
	return true
}

func (c *expertConn) next() *attempt {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.mu.queue) == 0 {
		return nil
	}
	// Shift rather than reslice from the front, so that the queue keeps
	// its capacity and enqueue never allocates in steady state.
	q := c.mu.queue
	a := q[0]
	copy(q, q[1:])
	q[len(q)-1] = nil
	c.mu.queue = q[:len(q)-1]
	return a
}

func (c *expertConn) pushFront(a *attempt) {
	c.mu.Lock()
	c.mu.queue = slices.Insert(c.mu.queue, 0, a)
	c.mu.Unlock()
}

// run is the connection's goroutine: it (re)dials with backoff and sends
// queued attempts in order, until Close.
func (c *expertConn) run() {
	defer c.r.wg.Done()
	defer c.shutdown()
	ctx := c.r.ctx
	for {
		if c.flushing.Load() {
			c.tx.Lock()
			c.flush()
			c.tx.Unlock()
		}
		a := c.next()
		if a == nil {
			select {
			case <-c.wake:
				continue
			case <-ctx.Done():
				return
			}
		}
		if wait := c.sendQueued(a); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return
			}
		}
	}
}

// sendQueued sends a, (re)opening the stream first if needed. If the
// redial backoff has not passed it puts a back and returns how long to
// wait.
func (c *expertConn) sendQueued(a *attempt) time.Duration {
	c.tx.Lock()
	defer c.tx.Unlock()
	c.flush()
	if c.st != nil && c.st.failed() {
		c.dropStream()
	}
	if c.st == nil {
		if wait := time.Until(c.retryAt); wait > 0 {
			c.pushFront(a)
			return wait
		}
		if err := c.open(); err != nil {
			c.pushFront(a)
			c.failQueued(err)
			return 0
		}
	}
	c.send(a, false)
	return 0
}

// backoff schedules the next redial after a failure.
func (c *expertConn) backoff() {
	c.failures++
	d := redialBase << min(c.failures-1, 10)
	c.retryAt = time.Now().Add(jitter(min(d, redialMax)))
	c.down.Store(true)
}

// open dials (if needed) and opens the Dispatch stream, bounded by the
// dispatch timeout: a peer that accepts connections but never answers
// (stopped) must not hold the queue forever.
func (c *expertConn) open() error {
	ctx, cancel := context.WithCancel(c.r.ctx)
	t := time.AfterFunc(c.r.timeout, cancel)
	stream, dp, err := c.openStream(ctx)
	if !t.Stop() && err == nil {
		err = fmt.Errorf("no answer within %v", c.r.timeout)
	}
	if err != nil {
		cancel()
		c.closeConn()
		c.backoff()
		return status.Errorf(codes.Unavailable, "open dispatch stream to %s: %v", c.addr, err)
	}
	st := &dispatchStream{c: c, stream: stream, dp: dp, cancel: cancel, recvDone: make(chan struct{})}
	st.mu.pending = map[uint64]*attempt{}
	c.st = st
	c.failures = 0
	c.down.Store(false)
	c.r.wg.Add(1)
	go st.receive()
	return nil
}

// openStream opens a Dispatch stream that ends with ctx: a data-plane
// connection, unless the transport is gRPC or the node refused the data
// plane's handshake, then a gRPC stream.
func (c *expertConn) openStream(ctx context.Context) (msgStream, *dataplane.Conn, error) {
	if c.r.tcp && !c.grpcOnly {
		dc, err := dataplane.Dial(ctx, c.addr)
		if err == nil {
			context.AfterFunc(ctx, func() { dc.Close() })
			return dc, dc, nil
		}
		if !errors.Is(err, dataplane.ErrRefused) && !errors.Is(err, dataplane.ErrVersion) {
			return nil, nil, err
		}
		c.grpcOnly = true
		if !c.fellBack {
			c.fellBack = true
			c.r.log.Warn("expert node refused the dispatch data plane; dispatching to it over gRPC", "addr", c.addr, "err", err)
		}
	}
	if c.cc == nil {
		cc, err := c.r.dial(c.addr)
		if err != nil {
			return nil, nil, fmt.Errorf("dial: %w", err)
		}
		c.cc = cc
	}
	stream, err := meshpb.NewExpertServiceClient(c.cc).Dispatch(ctx)
	if err != nil {
		return nil, nil, err
	}
	return stream, nil, nil
}

// closeConn closes the gRPC connection, if any.
func (c *expertConn) closeConn() {
	if c.cc != nil {
		c.cc.Close()
		c.cc = nil
	}
}

// dropStream discards a failed stream and its connection; the next
// attempt redials after the backoff (trying the data plane again, should
// the node have been upgraded or its refusal have been a blip).
func (c *expertConn) dropStream() {
	c.flushing.Store(false)
	c.st.cancel()
	<-c.st.recvDone
	c.st = nil
	c.closeConn()
	c.grpcOnly = false
	c.backoff()
}

// send sends a on the connection's reusable request; c.tx is held. The
// dispatch's own goroutine (inline, from trySend) has its rows encoded
// straight into gRPC's message buffer while Send marshals (wire.OutRequest:
// nothing else can change or abandon them meanwhile); the connection's
// goroutine encodes them into its own buffer first, under a.mu, since
// the dispatch may give up on a and reuse the rows as soon as a.mu is
// released.
func (c *expertConn) send(a *attempt, inline bool) {
	rows := int64(len(a.rows))
	a.mu.Lock()
	if a.state != queued {
		a.mu.Unlock()
		c.outstanding.Add(-rows) // abandoned before it left
		return
	}
	d := a.d
	h := c.r.hidden
	// Copies, not aliases: once a.mu is released the attempt may be
	// answered, completed and reused before Send below has marshalled
	// (when the connection's goroutine sends it).
	c.ids = append(c.ids[:0], a.ids...)
	c.w = append(c.w[:0], a.w...)
	c.req.Id, c.req.Layer, c.req.K = a.id, uint32(d.layer), uint32(d.k)
	c.req.ExpertIds, c.req.GateWeights, c.req.Hidden = c.ids, c.w, nil
	c.req.PlacementVersion, c.req.PartialDtype = a.version, wire.PartialFor(c.r.wire)
	c.req.TraceContext = nil
	if trace.SpanContextFromContext(a.ctx).IsValid() {
		if c.trace == nil {
			c.trace = map[string]string{}
		}
		clear(c.trace)
		propagation.TraceContext{}.Inject(a.ctx, propagation.MapCarrier(c.trace))
		c.req.TraceContext = c.trace
	}
	var msg any = &c.req
	if inline {
		// Rows and X are the dispatch's, stable until it handles a
		// completion, which only this goroutine does.
		c.out.Req, c.out.Dtype, c.out.X, c.out.Rows, c.out.Cols = &c.req, c.r.wire, d.x, a.rows, h
		// The data plane's receiver reads each request into an aligned
		// buffer of its own and computes on F32 rows where they are.
		c.out.AlignRows = c.st.dp != nil
		msg = &c.out
	} else {
		c.data, c.scales = c.data[:0], c.scales[:0]
		for _, row := range a.rows {
			x := d.x[int(row)*h : int(row+1)*h]
			if c.r.wire == meshpb.DType_DTYPE_F8_E4M3 {
				c.data, c.scales = wire.AppendF8Rows(c.data, c.scales, x, h)
			} else {
				c.data = wire.AppendRows(c.data, c.r.wire, x)
			}
		}
		c.shape = [2]int64{rows, int64(h)}
		c.hidden = meshpb.Tensor{Dtype: c.r.wire, Shape: c.shape[:], Data: c.data, Scales: c.scales}
		c.req.Hidden = &c.hidden
	}
	st := c.st
	st.mu.Lock()
	if err := st.mu.err; err != nil {
		st.mu.Unlock()
		a.state = answered
		a.err = fmt.Errorf("%s: %w: %v", c.addr, errStreamBroken, err)
		a.mu.Unlock()
		c.outstanding.Add(-rows)
		d.notify(a)
		return
	}
	// gRPC's message header is 5 bytes, and so is the data plane's.
	if inline {
		a.sentBytes = c.out.Size() + 5
	} else {
		a.sentBytes = proto.Size(&c.req) + 5
	}
	st.mu.pending[a.id] = a
	st.mu.unanswered += a.sentBytes
	st.mu.Unlock()
	a.state = sent
	a.mu.Unlock()
	if st.dp != nil {
		// A write blocks only while the socket's buffers are full: the
		// peer is busy or frozen. An inline send (under the engine's
		// compute lock) waits at most inlineWriteTimeout and leaves the
		// rest of its frame to the connection's goroutine (flush); every
		// write gives up after the dispatch timeout, failing the stream
		// with errPeerStalled.
		st.dp.SetWriteTimeout(c.r.timeout)
		if inline {
			done, err := st.dp.TrySendMsg(msg, inlineWriteTimeout)
			if err != nil {
				st.fail(err)
			} else if !done {
				c.flushing.Store(true)
				c.poke()
			}
			return
		}
	}
	if err := st.stream.SendMsg(msg); err != nil {
		st.fail(err)
	}
}

// flush writes the rest of a frame an inline send left (TrySendMsg), on
// the connection's goroutine; c.tx is held.
func (c *expertConn) flush() {
	if !c.flushing.Load() {
		return
	}
	c.flushing.Store(false)
	if c.st != nil && c.st.dp != nil {
		if err := c.st.dp.Flush(); err != nil {
			c.st.fail(err)
		}
	}
}

// poke wakes the connection's goroutine.
func (c *expertConn) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// failQueued fails every queued attempt with err (a dial failed).
func (c *expertConn) failQueued(err error) {
	c.mu.Lock()
	q := c.mu.queue
	c.mu.queue = nil
	c.mu.Unlock()
	for _, a := range q {
		c.outstanding.Add(-int64(len(a.rows)))
		a.complete(err)
	}
}

// shutdown ends the stream and connection at Close.
func (c *expertConn) shutdown() {
	c.tx.Lock()
	defer c.tx.Unlock()
	if c.st != nil {
		c.st.cancel()
		<-c.st.recvDone
	}
	c.closeConn()
	c.failQueued(ErrClosed)
}

func (st *dispatchStream) failed() bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.mu.err != nil
}

// quiet reports whether st is healthy and sending size more bytes on it
// cannot block (see trySend). On gRPC: its writer has less than
// writeQuota left to write, so Send only hands the message over. On the
// data plane the caller writes itself, and a write blocks only when the
// socket's buffers (ours and the peer's) are full, which a live peer
// empties as it reads: it may when nothing sent is unanswered (every
// byte sent was read; the peer's receiving worker waits for more) and
// the message is at most inlineMax, or when what is unanswered and the
// message total less than writeQuota (far below any TCP buffer). A
// busy or frozen peer could still block it; inlineWriteTimeout bounds
// that.
func (st *dispatchStream) quiet(size int) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.mu.err != nil {
		return false
	}
	if st.dp == nil {
		return st.mu.unanswered < writeQuota
	}
	return (st.mu.unanswered == 0 && size <= st.c.r.inlineMax) || st.mu.unanswered+size < writeQuota
}

// receive routes replies to their attempts until the stream fails.
func (st *dispatchStream) receive() {
	defer st.c.r.wg.Done()
	defer close(st.recvDone)
	resp := &st.resp
	for {
		if st.partial != nil {
			resp.Partial = st.partial
		}
		// RecvMsg into the stream's one message (Recv would allocate a
		// new one per reply): wire.Codec decodes it in place. The data
		// plane reads each reply into a buffer the attempt may keep.
		var err error
		var frame *[]byte
		if st.dp != nil {
			frame = &st.buf
			err = st.dp.RecvMsgInto(frame, resp)
		} else {
			err = st.stream.RecvMsg(resp)
		}
		if err != nil {
			st.fail(err)
			return
		}
		if resp.Partial != nil {
			st.partial = resp.Partial
		}
		st.mu.Lock()
		a := st.mu.pending[resp.Id]
		if a != nil {
			delete(st.mu.pending, resp.Id)
			st.mu.unanswered -= a.sentBytes
		}
		st.mu.Unlock()
		st.c.down.Store(false) // it answers
		if a != nil {
			st.c.outstanding.Add(-int64(len(a.rows)))
			a.reply(resp, st.c.r.hidden, frame)
		}
	}
}

// fail marks the stream broken and fails every request awaiting a reply
// on it; they are retried by their dispatches.
func (st *dispatchStream) fail(err error) {
	st.mu.Lock()
	if st.mu.err != nil {
		st.mu.Unlock()
		return
	}
	st.mu.err = err
	pending := st.mu.pending
	st.mu.pending, st.mu.unanswered = nil, 0
	st.mu.Unlock()
	st.c.down.Store(true)
	e := fmt.Errorf("%s: %w: %v", st.c.addr, errStreamBroken, err)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		e = fmt.Errorf("%s: %w: %w: %v", st.c.addr, errStreamBroken, errPeerStalled, err)
	}
	for _, a := range pending {
		st.c.outstanding.Add(-int64(len(a.rows)))
		a.complete(e)
	}
}
