package coordinator

import (
	"cmp"
	"errors"
	"fmt"
	"slices"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"

	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// The scheduler is the coordinator's decision core: a pure state machine
// with no clock, network or goroutines inside. The driver (coordinator.go)
// feeds it events — a request arrives, a node answered Info, a step
// returned or failed, a client went away — and turns its decisions into
// StepRequests and deliveries. Tests drive it directly with tables and
// golden transcripts (testdata/scheduler).
//
// Continuous batching falls out of the shape: a node's next step is planned
// from whatever is running on it at that moment, so sequences join as soon
// as they are placed and leave as soon as they finish.
//
// Priority is arrival order: every sequence keeps the number it got when
// it first arrived, through preemptions and rebuilds, and older goes
// first everywhere — in the waiting queue, for a node's step budget, for
// cache blocks — with one exception: a prompt whose rest fits in half a
// step is planned before longer ones and may take half the prompt budget
// while they prefill (as vLLM's long-prefill threshold does), so a small
// request does not wait for whole prefills of long prompts ahead of it. Cache blocks are taken as sequences grow (see the proto's
// AttentionService.Step): a sequence is placed once its prompt fits (the
// blocks for its prompt and first token are set aside for it), and each
// step takes blocks for the positions it adds. When a node's blocks run
// out, the youngest sequences running there are preempted by recompute:
// released, and placed again later to re-prefill their prompt and
// generated tokens (cheap with prefix caching: their blocks are likely
// still cached). So:
//
//   - nothing fails for lack of cache once it is admitted (check refuses
//     only what no node's whole cache could hold);
//   - no one locks others out: a sequence holds what it has generated,
//     not what it might;
//   - no one starves: a waiting sequence that does not fit may be
//     overtaken by younger ones that do (backfill), but they run on
//     borrowed blocks: as soon as the blocks free and held by sequences
//     younger than it would make room, it preempts them. The oldest
//     sequence in the system always progresses.

// sequence is one request's generation as the scheduler sees it. Fields
// below "scheduler state" are owned by the scheduler (guarded by the
// coordinator's mutex); the rest is fixed at creation.
type sequence struct {
	id        uint64
	prompt    []int
	maxTokens int
	// minTokens: stop tokens and stop strings count only once this many
	// tokens were generated (the node suppresses stop tokens before).
	minTokens int
	// stopIDs end the sequence when sampled (the stop token is kept, as
	// Engine.Generate and HF do with eos_token_id).
	stopIDs  []int
	sampling *meshpb.SamplingParams
	// logprobs is the number of alternatives per position (-1: none).
	logprobs int32
	// echoLogprobs asks for the prompt positions' logprobs too.
	echoLogprobs bool
	// leader, for the 2nd..nth choice of an n > 1 request: the sequence
	// whose prompt this one shares. It waits until the leader's prompt is
	// prefilled and then goes to the leader's node, so with prefix
	// caching the prompt is computed once.
	leader *sequence
	// span is the request's span, linked from the steps that serve it.
	span trace.SpanContext
	// admission spans the wait from submit to the first step serving the
	// sequence (nil for sequences not made by generate).
	admission trace.Span

	// scheduler state
	// arrival orders sequences by priority (lower is older), kept through
	// preemptions and rebuilds.
	arrival uint64
	node    int // -1 while waiting
	// echoed counts prompt positions whose logprobs were delivered, so a
	// rebuilt sequence does not report them twice.
	echoed int
	// rebuilds counts re-prefills after its node failed; rebuilding marks
	// a sequence waiting to be placed again after one.
	rebuilds   int
	rebuilding bool
	// preemptions counts the times it was preempted to free cache.
	preemptions int
	// claim is the cache blocks counted for it on its node: what the node
	// holds for it (blocksFor(sent)) plus what is set aside for the
	// positions planned next (its prompt at placement, a step's growth).
	claim int
	// created: the node holds the sequence (a step carrying its first
	// chunk was applied), so its blocks show in the node's own free count.
	created bool
	sent    int // positions the node holds
	// cached counts prompt tokens the node took from its prefix cache the
	// first time it prefilled them (usage.prompt_tokens_details).
	cached int
	// keys are the chained block keys of its tokens for block size
	// keysBS, computed as needed (prefixview.go).
	keys      []model.BlockKey
	keysBS    int
	generated []int
	inflight  bool // part of the node's step in flight
	done      bool
}

func (q *sequence) reserveTokens() int { return len(q.prompt) + q.maxTokens }

// prefillEnd is where prefill stops: the prompt's end, or for a sequence
// re-created (rebuilt on a new node, or preempted), just before its last
// generated token (which the next decode feeds back as usual).
func (q *sequence) prefillEnd() int {
	if len(q.generated) == 0 {
		return len(q.prompt)
	}
	return len(q.prompt) + len(q.generated) - 1
}

func (q *sequence) prefilling() bool { return q.sent < q.prefillEnd() }

// tokenAt is position p of prompt followed by generated tokens.
func (q *sequence) tokenAt(p int) int {
	if p < len(q.prompt) {
		return q.prompt[p]
	}
	return q.generated[p-len(q.prompt)]
}

// decoding means the last sampled token still has to be fed back.
func (q *sequence) decoding() bool {
	return len(q.generated) > 0 && q.sent == len(q.prompt)+len(q.generated)-1
}

// placeBlocks is what placing q sets aside on a node of block size bs:
// its prompt (or, re-created, its prompt and generated tokens) and the
// position after, within its own bound.
func (q *sequence) placeBlocks(bs int) int {
	return blocksFor(min(q.prefillEnd()+1, max(q.reserveTokens(), q.prefillEnd())), bs)
}

// update is what one step (or failure) produced for one sequence, for the
// driver to deliver to the waiting request.
type update struct {
	seq *sequence
	// promptLogprobs are this chunk's prompt positions (echo).
	promptLogprobs []*meshpb.TokenLogprob
	sampled        bool
	token          int
	logprob        *meshpb.TokenLogprob
	// finish is "stop" or "length" once the sequence is complete.
	finish string
	err    error
	// cached is the sequence's prompt tokens taken from the node's prefix
	// cache so far.
	cached int
}

// Errors the scheduler reports to requests; the HTTP layer maps them to
// status codes in one table (errors.go).
var (
	ErrNoNodes      = errors.New("no attention node is available")
	ErrNodeFailed   = errors.New("attention node failed")
	ErrOverloaded   = errors.New("too many requests waiting")
	ErrTooLong      = errors.New("request does not fit")
	ErrShuttingDown = errors.New("coordinator is shutting down")
	// ErrExpertsUnavailable: the request's steps kept failing because no
	// replica of some routed expert answered (the expert nodes' fault; the
	// attention node is fine) until the request's own time ran out.
	ErrExpertsUnavailable = errors.New("expert nodes unavailable")
)

// NodeSeqError is a per-sequence failure a node reported in SeqResult.
type NodeSeqError struct {
	Code    codes.Code
	Message string
}

func (e *NodeSeqError) Error() string {
	return fmt.Sprintf("attention node: %s: %s", e.Code, e.Message)
}

type nodeState struct {
	// id is the node's stable identity (its member id); an index into
	// scheduler.nodes is never reused for another node.
	id string
	up bool
	// gone: the node left the cluster (its membership ended); it is never
	// planned again. draining: it takes no new sequences.
	gone, draining bool
	prefixCaching  bool
	// view guesses the node's prefix cache (nil without prefix caching,
	// or without a known max_step_tokens to bound a longer chunk).
	view          *prefixView
	maxStepTokens int
	blockSize     int
	totalBlocks   int
	// reportedFree and cachedBlocks are the node's own figures from its
	// last answer (for metrics and /v1/cluster).
	reportedFree, cachedBlocks int
	// freeBlocks is what the node reported free in its last answer, less
	// what is set aside for its sequences beyond what they hold, plus
	// what the releases not yet sent will give back: reset from every
	// answer, so it cannot drift. It may be optimistic (a released block
	// may still be shared through the prefix cache); the node then
	// answers RESOURCE_EXHAUSTED for the work it cannot cover.
	freeBlocks int
	// lastAbort is why the node's last step was not applied (nil after a
	// step that was), to tell a request that times out why.
	lastAbort error
	// running holds the node's sequences by arrival, oldest first: older
	// sequences get the step budget and cache blocks first.
	running []*sequence
	// release lists sequences the node may still hold; releasing one it
	// does not hold is harmless, so a release is sent until a step
	// carrying it is answered. releaseCredit is the blocks they are
	// expected to give back, counted in freeBlocks already.
	release       []uint64
	releaseCredit int
	step          uint64
	// inflight is the step sent and not yet applied or failed.
	inflight *inflightStep
}

type inflightStep struct {
	work    []workItem
	release []uint64
}

type workItem struct {
	seq    *sequence
	n      int
	sample bool
	// prefill: a chunk of prompt (or re-created) positions.
	prefill bool
}

type schedConfig struct {
	budget  int // tokens per step per node
	maxSeqs int // running sequences per node
}

type scheduler struct {
	cfg     schedConfig
	waiting []*sequence // by arrival
	nodes   []*nodeState
	// arrivals numbers sequences as they first arrive.
	arrivals uint64
	// Counters for metrics: sequences placed again after their node
	// failed (rebuilt) or after a preemption (preempted counts the
	// preemptions), and prefix cache use (prompt tokens sent in prefill
	// chunks, and those the node took from its cache).
	rebuilt, preempted      int
	cacheQueries, cacheHits int
	// hold: with no usable node, waiting sequences wait and new ones are
	// taken (the driver's grace for a node to come back) instead of
	// failing with ErrNoNodes.
	hold bool
}

func newScheduler(cfg schedConfig) *scheduler {
	return &scheduler{cfg: cfg}
}

// addNode makes room for a node that joined, down until its Info. A node
// that comes back under an id seen before inherits the releases its
// previous incarnation never received (it may still hold those
// sequences).
func (s *scheduler) addNode(id string) int {
	n := &nodeState{id: id}
	for _, old := range s.nodes {
		if old.id == id && old.gone {
			n.release, old.release = old.release, nil
		}
	}
	s.nodes = append(s.nodes, n)
	return len(s.nodes) - 1
}

// nodeUp records a node's Info: its free count is the truth now.
func (s *scheduler) nodeUp(i int, info *meshpb.NodeInfo) {
	n := s.nodes[i]
	if n.gone {
		return
	}
	n.up = true
	n.blockSize = max(int(info.BlockSize), 1)
	n.totalBlocks = int(info.TotalBlocks)
	n.draining = n.draining || info.Draining
	n.prefixCaching = info.PrefixCaching
	n.maxStepTokens = int(info.MaxStepTokens)
	n.view = nil // a node that answers Info again may have lost its cache
	if n.prefixCaching && n.maxStepTokens > 0 {
		n.view = newPrefixView(n.totalBlocks)
	}
	n.releaseCredit = 0 // what it still holds shows in its count
	n.setFree(int(info.FreeBlocks), int(info.CachedBlocks))
}

// setFree takes the node's own free count, subtracts what is set aside
// for its sequences beyond what they hold, and adds what the releases not
// yet sent will give back.
func (n *nodeState) setFree(reported, cached int) {
	n.reportedFree, n.cachedBlocks = reported, cached
	for _, q := range n.running {
		if held := blocksFor(q.sent, n.blockSize); q.created && q.claim > held {
			reported -= q.claim - held
		} else if !q.created {
			reported -= q.claim
		}
	}
	n.freeBlocks = reported + n.releaseCredit
}

// setDraining marks node i as taking no new sequences (or taking them
// again); what runs there continues.
func (s *scheduler) setDraining(i int, draining bool) {
	s.nodes[i].draining = draining
}

// usable: up, not leaving, not draining: new sequences may go there.
func (n *nodeState) usable() bool { return n.up && !n.gone && !n.draining }

// watermark is the free blocks a placement must leave beside running
// sequences: a block for each of them (their next block boundary) and at
// least vLLM's 1%, so that a sequence just placed is not preempted at
// once by their growth (and placed again, and preempted: recompute
// thrash). A node running nothing keeps none: any sequence check admits
// must fit there.
func watermark(totalBlocks, running int) int {
	if running == 0 {
		return 0
	}
	return max(totalBlocks/100, running)
}

func (s *scheduler) anyUsable() bool {
	for _, n := range s.nodes {
		if n.usable() {
			return true
		}
	}
	return false
}

func blocksFor(tokens, blockSize int) int { return (tokens + blockSize - 1) / blockSize }

// check says whether q could ever run: some live node's whole cache must
// hold its longest extent (prompt + max_tokens), or it would have to
// preempt itself. It is called before enqueue so that a request that can
// never be placed is refused rather than waiting forever.
//
// While the scheduler holds for a node (hold), a request is checked
// against the caches of the nodes it knew (a node that comes back under
// its id comes back with the same cache), and against nothing if it never
// knew one.
func (s *scheduler) check(q *sequence) error {
	usable := s.anyUsable()
	if !usable && !s.hold {
		return ErrNoNodes
	}
	best := 0
	for _, n := range s.nodes {
		if n.usable() || !usable {
			best = max(best, n.totalBlocks*n.blockSize)
		}
	}
	if !usable && best == 0 {
		return nil
	}
	if t := q.reserveTokens(); t > best {
		return fmt.Errorf("%w: prompt (%d tokens) + max_tokens (%d) = %d tokens exceed the largest attention node's cache of %d tokens",
			ErrTooLong, len(q.prompt), q.maxTokens, t, best)
	}
	return nil
}

// enqueue adds a new sequence to the waiting queue; it is the youngest.
func (s *scheduler) enqueue(q *sequence) {
	s.arrivals++
	q.arrival = s.arrivals
	s.requeue(q)
}

// requeue puts q back among the waiting by its arrival.
func (s *scheduler) requeue(q *sequence) {
	q.node = -1
	at, _ := slices.BinarySearchFunc(s.waiting, q.arrival, func(x *sequence, a uint64) int { return cmp.Compare(x.arrival, a) })
	s.waiting = slices.Insert(s.waiting, at, q)
}

// run adds q to node n's running list by arrival.
func (n *nodeState) run(q *sequence) {
	at, _ := slices.BinarySearchFunc(n.running, q.arrival, func(x *sequence, a uint64) int { return cmp.Compare(x.arrival, a) })
	n.running = slices.Insert(n.running, at, q)
}

// held says whether the node may hold q (or will, once the step in
// flight is applied).
func (q *sequence) held() bool { return q.created || q.inflight }

// preempt takes q off node n to free its blocks (recompute: it re-prefills
// when placed again, keeping its arrival). Called only between steps.
func (s *scheduler) preempt(n *nodeState, q *sequence) {
	n.running = slices.DeleteFunc(n.running, func(x *sequence) bool { return x == q })
	n.releaseLocked(q)
	q.claim, q.sent, q.created = 0, 0, false
	q.preemptions++
	s.preempted++
	s.requeue(q)
}

// blocked says whether q must wait for its leader's prompt: with prefix
// caching there, the 2nd..nth choice of a request goes after the first
// has prefilled, and takes its blocks.
func (s *scheduler) blocked(q *sequence) bool {
	switch l := q.leader; {
	case l == nil || l.done:
		return false
	case l.node < 0:
		return s.anyPrefixCaching()
	default:
		return s.nodes[l.node].prefixCaching && l.sent < len(l.prompt)
	}
}

func (s *scheduler) anyPrefixCaching() bool {
	for _, n := range s.nodes {
		if n.usable() && n.prefixCaching {
			return true
		}
	}
	return false
}

// admit places waiting sequences, oldest first. A sequence goes to the
// usable node with a free seat and the most free blocks beyond what its
// prompt needs (ties: lowest index; the 2nd..nth choice of a request to
// its first choice's node when it fits there). One that fits nowhere may
// preempt sequences younger than itself on one node, the fewest blocks'
// worth, youngest first; failing that it waits, and younger ones behind
// it may still be placed. With no usable node every waiting sequence
// fails, unless the scheduler holds for a node to come (hold): then they
// wait. It returns the nodes that got work.
func (s *scheduler) admit() (woken []int, failed []update) {
	if !s.anyUsable() {
		if s.hold {
			return nil, nil
		}
		for _, q := range s.waiting {
			q.done = true
			err := ErrNoNodes
			if q.rebuilding {
				err = fmt.Errorf("%w: its attention node failed and no other can take it over", ErrNoNodes)
			}
			failed = append(failed, update{seq: q, err: err})
		}
		s.waiting = nil
		return nil, failed
	}
	for i := 0; i < len(s.waiting); {
		q := s.waiting[i]
		best := -1
		if !s.blocked(q) {
			best = s.placeFor(q)
		}
		if best < 0 {
			i++
			continue
		}
		s.waiting = slices.Delete(s.waiting, i, i+1)
		n := s.nodes[best]
		q.node, q.claim, q.created, q.sent = best, q.placeBlocks(n.blockSize), false, 0
		n.freeBlocks -= q.claim
		n.run(q)
		if q.rebuilding {
			q.rebuilding = false
			s.rebuilt++
		}
		if !slices.Contains(woken, best) {
			woken = append(woken, best)
		}
		// Preempted sequences went back to the queue behind q (they are
		// younger): i now points at q's successor.
	}
	return woken, failed
}

// placeFor picks q's node, preempting younger sequences there if it must;
// -1 if there is none.
func (s *scheduler) placeFor(q *sequence) int {
	fits := func(n *nodeState) bool {
		return n.usable() && len(n.running) < s.cfg.maxSeqs && n.freeBlocks-q.placeBlocks(n.blockSize) >= watermark(n.totalBlocks, len(n.running))
	}
	if l := q.leader; l != nil && l.node >= 0 && fits(s.nodes[l.node]) {
		return l.node
	}
	best := -1
	for i, n := range s.nodes {
		if fits(n) && (best < 0 || n.freeBlocks-q.placeBlocks(n.blockSize) > s.nodes[best].freeBlocks-q.placeBlocks(s.nodes[best].blockSize)) {
			best = i
		}
	}
	if best >= 0 {
		return best
	}
	// Preemption: on each node, the youngest sequences younger than q,
	// as many as free enough blocks and a seat.
	cost := -1
	for i, n := range s.nodes {
		if !n.usable() {
			continue
		}
		free, running, blocks := n.freeBlocks, len(n.running), 0
		room := func() bool {
			return running < s.cfg.maxSeqs && free-q.placeBlocks(n.blockSize) >= watermark(n.totalBlocks, running)
		}
		for j := len(n.running) - 1; j >= 0 && !room(); j-- {
			v := n.running[j]
			if v.arrival < q.arrival || v.inflight {
				break // older, or its step is out: not now
			}
			free, running, blocks = free+v.claim, running-1, blocks+v.claim
		}
		if room() && (cost < 0 || blocks < cost) {
			best, cost = i, blocks
		}
	}
	if best < 0 {
		return -1
	}
	n := s.nodes[best]
	for !fits(n) && len(n.running) > 0 {
		s.preempt(n, n.running[len(n.running)-1])
	}
	return best
}

// fitsNow says whether q would be placed at once without preempting
// anyone: the queue is empty and a node has a seat and room.
func (s *scheduler) fitsNow(q *sequence) bool {
	if len(s.waiting) > 0 {
		return false
	}
	for _, n := range s.nodes {
		if n.usable() && len(n.running) < s.cfg.maxSeqs && n.freeBlocks-q.placeBlocks(n.blockSize) >= watermark(n.totalBlocks, len(n.running)) {
			return true
		}
	}
	return false
}

// makeRoom finds need more blocks on node n for q, preempting the
// youngest sequences running there while they are younger than q (they
// have no work in the step being planned: it is planned oldest first).
// If that is not enough q itself is preempted and makeRoom says false.
func (s *scheduler) makeRoom(n *nodeState, q *sequence, need int) bool {
	for n.freeBlocks < need {
		v := n.running[len(n.running)-1]
		if v == q {
			s.preempt(n, q)
			return false
		}
		s.preempt(n, v)
	}
	return true
}

// plan builds node i's next step, or nil when it has nothing to do.
// Sequences are planned oldest first (short prompts before long ones, see
// below): every decoding sequence feeds back its last token, prefilling
// ones share what the budget leaves, in
// chunks that end on a block boundary where they can (so the next chunk
// can take cached blocks); each takes the blocks its positions need,
// preempting younger sequences when there are none (see makeRoom). The
// releases of preempted sequences travel in the same step, ahead of its
// work.
func (s *scheduler) plan(i int) *meshpb.StepRequest {
	n := s.nodes[i]
	if !n.up || n.gone || n.inflight != nil {
		return nil
	}
	req := &meshpb.StepRequest{}
	in := &inflightStep{}
	prefill := s.cfg.budget
	for _, q := range n.running {
		if q.decoding() {
			prefill--
		}
	}
	prefills, tokens := 0, 0
	for _, q := range n.running {
		if q.decoding() {
			tokens++
		}
	}
	// Short prompts (what is left of them fits in half a step) are
	// planned before long ones and may take half the prompt budget while
	// a long one prefills; the long ones, oldest first, take the rest. So
	// a small request is not held behind whole prefills of long prompts
	// admitted before it, and a stream of small ones cannot starve a long
	// one. The oldest prefilling sequence's chunk never waits for a block
	// boundary, so prefill always progresses.
	order := make([]*sequence, 0, len(n.running))
	var longs []*sequence
	var oldest *sequence
	for _, q := range n.running {
		if q.prefilling() && oldest == nil {
			oldest = q
		}
		if q.prefilling() && s.long(q) {
			longs = append(longs, q)
		} else {
			order = append(order, q)
		}
	}
	order = append(order, longs...)
	short := prefill // what short prompts may take
	if len(longs) > 0 {
		short = prefill / 2
	}
	for _, q := range order {
		if q.node != i { // preempted by an older one's growth
			continue
		}
		var k, compute int
		isShort := false
		switch {
		case q.decoding():
			k = 1
		case q.prefilling():
			isShort = !s.long(q)
			avail := prefill
			if isShort {
				avail = min(prefill, short)
			}
			remaining := q.prefillEnd() - q.sent
			// The head the node is expected to take from its cache costs
			// no budget; the chunk stays within the node's step limit.
			limit := remaining
			if q.prefillEnd() == len(q.prompt) && q.maxTokens > 0 {
				limit-- // the sampled position is always computed
			}
			cached := 0
			if n.maxStepTokens > 0 {
				cached = n.predictCached(q, min(limit, n.maxStepTokens-tokens-min(remaining, avail)))
			}
			compute = min(remaining-cached, max(avail, 0))
			if end := q.sent + cached + compute; end < q.prefillEnd() {
				aligned := end / n.blockSize * n.blockSize
				switch {
				case aligned > q.sent:
					compute = aligned - q.sent - cached
				case q != oldest && n.prefixCaching:
					// A sliver that reaches no block boundary would
					// split a block the node might have cached: it waits
					// for a step with more room (the oldest prefilling
					// sequence's chunk never waits, so prefill always
					// progresses).
					continue
				}
			}
			if k = cached + compute; k == 0 {
				continue
			}
			prefills++
		default:
			continue
		}
		end := q.sent + k
		if need := blocksFor(end, n.blockSize) - q.claim; need > 0 {
			decoding := q.decoding()
			if !s.makeRoom(n, q, need) {
				if decoding {
					prefill++ // its budget goes to prompts
				}
				continue
			}
			q.claim += need
			n.freeBlocks -= need
		}
		w := &meshpb.SeqWork{SeqId: q.id, StartPos: uint32(q.sent), EchoLogprobs: q.echoLogprobs && q.echoed < len(q.prompt)}
		w.Tokens = make([]int32, k)
		for j := range k {
			w.Tokens[j] = int32(q.tokenAt(q.sent + j))
		}
		item := workItem{seq: q, n: k}
		tokens += k
		if q.decoding() {
			w.Sample, w.EchoLogprobs = true, false
			tokens-- // counted above
		} else {
			prefill -= compute
			if isShort {
				short -= compute
			}
			item.prefill = true
			w.Sample = end == len(q.prompt) && len(q.generated) == 0 && q.maxTokens > 0
		}
		item.sample = w.Sample
		if q.sent == 0 {
			w.Sampling = q.sampling
			w.ReserveTokens = uint32(q.reserveTokens())
			w.Logprobs = q.logprobs
			w.Generated = uint32(len(q.generated))
			if q.minTokens > len(q.generated) {
				w.MinTokens = uint32(q.minTokens)
				for _, id := range q.stopIDs {
					w.StopIds = append(w.StopIds, int32(id))
				}
			}
		}
		req.Work = append(req.Work, w)
		in.work = append(in.work, item)
	}
	in.release = n.release
	n.release, n.releaseCredit = nil, 0
	req.Release = append(req.Release, in.release...)
	if len(req.Work) == 0 && len(req.Release) == 0 {
		return nil
	}
	for _, w := range in.work {
		w.seq.inflight = true
	}
	n.step++
	req.Step = n.step
	n.inflight = in
	return req
}

// long reports whether what is left of q's prompt to prefill takes more
// than half a step's budget.
func (s *scheduler) long(q *sequence) bool {
	return q.prefillEnd()-q.sent > s.cfg.budget/2
}

// remove takes q off node n's running list: it finished, failed or was
// cancelled. A sequence the node may hold gets a release; its blocks
// count as free at once either way.
func (s *scheduler) remove(n *nodeState, q *sequence) {
	n.running = slices.DeleteFunc(n.running, func(x *sequence) bool { return x == q })
	q.done = true
	n.releaseLocked(q)
}

// releaseLocked gives q's claim back to n's free count: what is set aside
// beyond what the node holds at once, what it holds through a release
// (sent in the next step) if the node may hold it.
func (n *nodeState) releaseLocked(q *sequence) {
	n.freeBlocks += q.claim
	if !q.held() {
		return
	}
	n.release = append(n.release, q.id)
	if q.inflight {
		n.releaseCredit += q.claim // the step out there takes it all
	} else {
		n.releaseCredit += min(q.claim, blocksFor(q.sent, n.blockSize))
	}
}

// apply takes node i's answer to its in-flight step. An answer with a
// whole-step code was not applied (see abort).
func (s *scheduler) apply(i int, resp *meshpb.StepResponse) []update {
	n := s.nodes[i]
	in := n.inflight
	if in == nil {
		return nil
	}
	if resp.GetCode() != 0 {
		s.abort(i, resp)
		return nil
	}
	n.inflight = nil
	n.lastAbort = nil
	byID := make(map[uint64]*meshpb.SeqResult, len(resp.GetResults()))
	for _, r := range resp.GetResults() {
		byID[r.SeqId] = r
	}
	var out []update
	for _, w := range in.work {
		q := w.seq
		r := byID[q.id]
		if r != nil && codes.Code(r.Code) == codes.ResourceExhausted {
			// Not applied: the node could not grow it. What it holds is
			// what it held; its claim goes back to that, so the next
			// plan makes room first (preempting younger sequences, or
			// this one).
			q.inflight = false
			if q.done {
				if !q.created { // its release frees nothing
					n.releaseCredit -= q.claim
				}
				continue
			}
			if !q.created {
				// Its creating chunk: it is not there at all. Back to the
				// queue, to be placed with a fresh view of the cache.
				n.running = slices.DeleteFunc(n.running, func(x *sequence) bool { return x == q })
				q.claim, q.sent = 0, 0
				s.requeue(q)
				continue
			}
			q.claim = blocksFor(q.sent, n.blockSize)
			continue
		}
		if r != nil && codes.Code(r.Code) == codes.NotFound && q.created && !q.done {
			// The node lost it: it dropped this coordinator's sequences
			// while the coordinator's lease had lapsed (a stall, or cut
			// off from etcd) and took its steps again once it was a
			// member again. Rebuilt like a failed node's sequence.
			q.inflight = false
			n.running = slices.DeleteFunc(n.running, func(x *sequence) bool { return x == q })
			n.freeBlocks += q.claim
			out = s.rebuild(q, &NodeSeqError{Code: codes.NotFound, Message: r.Message}, out)
			continue
		}
		// The node holds every other sequence this step carried work
		// for (a per-sequence failure included: it is released below).
		q.created = true
		if q.done { // cancelled while in flight; its release is queued
			q.inflight = false
			continue
		}
		// It gets a release (created is set): the node saw its work even
		// if it never held tokens.
		q.inflight = false
		switch {
		case r == nil:
			s.remove(n, q)
			out = append(out, update{seq: q, err: fmt.Errorf("%w: a step's answer left out a sequence", ErrNodeFailed)})
			continue
		case r.Code != 0:
			s.remove(n, q)
			out = append(out, update{seq: q, err: &NodeSeqError{Code: codes.Code(r.Code), Message: r.Message}})
			continue
		case w.sample && !r.Sampled:
			s.remove(n, q)
			out = append(out, update{seq: q, err: fmt.Errorf("%w: a sequence was not sampled", ErrNodeFailed)})
			continue
		}
		start := q.sent
		q.sent += w.n
		n.committed(q, start)
		if w.prefill {
			s.cacheQueries += w.n
			s.cacheHits += int(r.CachedTokens)
			if q.preemptions == 0 && q.rebuilds == 0 {
				q.cached += min(int(r.CachedTokens), max(0, len(q.prompt)-start))
			}
		}
		u := update{seq: q, cached: q.cached}
		if q.echoLogprobs {
			// Deliver prompt positions not delivered before a rebuild.
			for j, tl := range r.PromptLogprobs {
				if p := start + j; p >= q.echoed && p < len(q.prompt) {
					u.promptLogprobs = append(u.promptLogprobs, tl)
				}
			}
			q.echoed = max(q.echoed, min(q.sent, len(q.prompt)))
		}
		if w.sample {
			u.sampled, u.token = true, int(r.Token)
			if q.logprobs >= 0 {
				u.logprob = r.Logprob
			}
			q.generated = append(q.generated, u.token)
			switch {
			case len(q.generated) > q.minTokens && slices.Contains(q.stopIDs, u.token):
				u.finish = "stop"
			case len(q.generated) >= q.maxTokens:
				u.finish = "length"
			}
		} else if q.sent == len(q.prompt) && len(q.generated) == 0 && q.maxTokens == 0 {
			u.finish = "length"
		}
		if u.finish != "" {
			s.remove(n, q)
		}
		if u.sampled || u.finish != "" || len(u.promptLogprobs) > 0 {
			out = append(out, u)
		}
	}
	if resp.GetTotalBlocks() > 0 {
		n.setFree(int(resp.FreeBlocks), int(resp.CachedBlocks))
	}
	return out
}

// abort takes back node i's in-flight step that the node answered
// without applying (no replica of some expert answered in time, or the
// step was fenced): nothing advanced, so its work is planned again as it
// was. Its releases are sent again too; repeating one is harmless. The
// node stays up: an expert node's fault is not the attention node's.
func (s *scheduler) abort(i int, resp *meshpb.StepResponse) {
	n := s.nodes[i]
	in := n.inflight
	if in == nil {
		return
	}
	n.inflight = nil
	n.release = append(in.release, n.release...)
	for _, w := range in.work {
		w.seq.inflight = false
		if w.seq.done && !w.seq.created {
			// Cancelled while in flight and never created: its release
			// (harmless) frees nothing.
			n.releaseCredit -= w.seq.claim
		}
	}
	n.lastAbort = fmt.Errorf("%w: %s", ErrExpertsUnavailable, resp.GetMessage())
	if codes.Code(resp.GetCode()) != codes.Unavailable {
		n.lastAbort = fmt.Errorf("attention node refused the step: %s: %s", codes.Code(resp.GetCode()), resp.GetMessage())
	}
	if resp.GetTotalBlocks() > 0 {
		n.setFree(int(resp.FreeBlocks), int(resp.CachedBlocks))
	}
}

// maxRebuilds bounds how often one sequence is moved off a failed node; a
// request that keeps killing nodes must not take the whole cluster down.
const maxRebuilds = 1

// fail takes node i down after a whole-step failure. Its sequences' state
// on the node is unknown, so each is rebuilt elsewhere: back to the
// waiting queue (by its arrival, so ahead of what came after it), to be
// re-prefilled with its prompt and the tokens it generated so far (the
// coordinator keeps both), and continue from there; a seeded sampler
// continues its random stream. A sequence rebuilt maxRebuilds times
// already fails with err instead, as does everything when no node is
// left (at the next admit). Every sequence gets a release for when the
// node answers again.
func (s *scheduler) fail(i int, err error) []update {
	n := s.nodes[i]
	n.up = false
	if in := n.inflight; in != nil {
		n.release = append(in.release, n.release...)
		n.inflight = nil
	}
	var out []update
	for _, q := range n.running {
		q.inflight = false
		n.release = append(n.release, q.id)
		out = s.rebuild(q, err, out)
	}
	n.running = nil
	return out
}

// rebuild sends q, taken off its node, back to the waiting queue to be
// re-prefilled elsewhere (or on the same node); one rebuilt maxRebuilds
// times already fails with err instead, appended to out.
func (s *scheduler) rebuild(q *sequence, err error, out []update) []update {
	if q.rebuilds >= maxRebuilds {
		q.done = true
		return append(out, update{seq: q, err: err})
	}
	q.rebuilds++
	q.rebuilding = true
	q.claim, q.sent, q.created = 0, 0, false
	s.requeue(q)
	return out
}

// removeNode takes node i out of the cluster (its membership ended):
// its sequences are rebuilt elsewhere as after a failure, and it is never
// planned again. Releases it never received are kept for a node that
// comes back under the same id.
func (s *scheduler) removeNode(i int, err error) []update {
	n := s.nodes[i]
	out := s.fail(i, err)
	n.gone = true
	return out
}

// cancel withdraws q (client gone, timeout, stop string). It returns the
// node whose next step carries the release, or -1.
func (s *scheduler) cancel(q *sequence) int {
	if q.done {
		return -1
	}
	if q.node < 0 {
		s.waiting = slices.DeleteFunc(s.waiting, func(x *sequence) bool { return x == q })
		q.done = true
		return -1
	}
	n := s.nodes[q.node]
	s.remove(n, q)
	if len(n.release) > 0 {
		return q.node
	}
	return -1
}

// failAll ends every sequence with err (shutdown).
func (s *scheduler) failAll(err error) []update {
	var out []update
	for _, q := range s.waiting {
		q.done = true
		out = append(out, update{seq: q, err: err})
	}
	s.waiting = nil
	for _, n := range s.nodes {
		for _, q := range n.running {
			q.done = true
			out = append(out, update{seq: q, err: err})
		}
		n.running = nil
	}
	return out
}
