package coordinator

import (
	"errors"
	"fmt"
	"slices"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"

	meshpb "github.com/expertmesh/expertmesh/proto"
)

// The scheduler is the coordinator's decision core: a pure state machine
// with no clock, network or goroutines inside. The driver (coordinator.go)
// feeds it events — a request arrives, a node answered Info, a step
// returned or failed, a client went away — and turns its decisions into
// StepRequests and deliveries. Tests drive it directly with tables.
//
// Continuous batching falls out of the shape: a node's next step is planned
// from whatever is running on it at that moment, so sequences join as soon
// as they are placed and leave as soon as they finish.

// sequence is one request's generation as the scheduler sees it. Fields
// below "scheduler state" are owned by the scheduler (guarded by the
// coordinator's mutex); the rest is fixed at creation.
type sequence struct {
	id        uint64
	prompt    []int
	maxTokens int
	// stopIDs end the sequence when sampled (the stop token is kept, as
	// Engine.Generate and HF do with eos_token_id).
	stopIDs  []int
	sampling *meshpb.SamplingParams
	// logprobs is the number of alternatives per position (-1: none).
	logprobs int32
	// echoLogprobs asks for the prompt positions' logprobs too.
	echoLogprobs bool
	// span is the request's span, linked from the steps that serve it.
	span trace.SpanContext
	// admission spans the wait from submit to the first step serving the
	// sequence (nil for sequences not made by generate).
	admission trace.Span

	// scheduler state
	node int // -1 while waiting
	// echoed counts prompt positions whose logprobs were delivered, so a
	// rebuilt sequence does not report them twice.
	echoed int
	// rebuilds counts re-prefills after its node failed; rebuilding marks
	// a sequence waiting to be placed again after one.
	rebuilds   int
	rebuilding bool
	blocks     int // cache blocks reserved on node
	// created: the node holds the sequence (a step carrying its first
	// chunk was applied), so its blocks show in the node's own free count.
	created   bool
	sent      int // positions the node holds
	generated []int
	inflight  bool // part of the node's step in flight
	done      bool
}

func (q *sequence) reserveTokens() int { return len(q.prompt) + q.maxTokens }

// prefillEnd is where prefill stops: the prompt's end, or for a sequence
// rebuilt on a new node, just before its last generated token (which the
// next decode feeds back as usual).
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
	blockSize      int
	totalBlocks    int
	// freeBlocks is what the node reported free in its last answer, less
	// the reservations of sequences placed here that it does not hold yet:
	// reset from every answer, so it cannot drift.
	freeBlocks int
	// lastAbort is why the node's last step was not applied (nil after a
	// step that was), to tell a request that times out why.
	lastAbort error
	// running holds the node's sequences in admission order; earlier
	// sequences get prompt budget first.
	running []*sequence
	// release lists sequences the node may still hold; releasing one it
	// does not hold is harmless, so a release is sent until a step
	// carrying it is answered.
	release []uint64
	step    uint64
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
}

type schedConfig struct {
	budget  int // tokens per step per node
	maxSeqs int // running sequences per node
}

type scheduler struct {
	cfg     schedConfig
	waiting []*sequence // arrival order
	nodes   []*nodeState
	// rebuilt counts sequences placed again after their node failed.
	rebuilt int
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
	n.setFree(int(info.FreeBlocks))
}

// setFree takes the node's own free count and subtracts what is promised
// to sequences placed here that it does not hold yet.
func (n *nodeState) setFree(reported int) {
	for _, q := range n.running {
		if !q.created {
			reported -= q.blocks
		}
	}
	n.freeBlocks = reported
}

// setDraining marks node i as taking no new sequences (or taking them
// again); what runs there continues.
func (s *scheduler) setDraining(i int, draining bool) {
	s.nodes[i].draining = draining
}

// usable: up, not leaving, not draining: new sequences may go there.
func (n *nodeState) usable() bool { return n.up && !n.gone && !n.draining }

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
// hold its reservation. It is called before enqueue so that a request that
// can never be placed is refused rather than blocking the queue forever.
func (s *scheduler) check(q *sequence) error {
	if !s.anyUsable() {
		return ErrNoNodes
	}
	best := 0
	for _, n := range s.nodes {
		if n.usable() {
			best = max(best, n.totalBlocks*n.blockSize)
		}
	}
	if t := q.reserveTokens(); blocksFor(t, 1) > best {
		return fmt.Errorf("%w: prompt (%d tokens) + max_tokens (%d) = %d tokens exceed the largest attention node's cache of %d tokens",
			ErrTooLong, len(q.prompt), q.maxTokens, t, best)
	}
	return nil
}

func (s *scheduler) enqueue(q *sequence) {
	q.node = -1
	s.waiting = append(s.waiting, q)
}

// admit places waiting sequences, in arrival order, each on the usable
// node with the most free cache blocks (ties: lowest index) that has a
// free seat. It stops at the first sequence that does not fit anywhere so
// a big request is not overtaken forever by small ones. With no usable
// node every waiting sequence fails. It returns the nodes that got work.
func (s *scheduler) admit() (woken []int, failed []update) {
	if !s.anyUsable() {
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
	for len(s.waiting) > 0 {
		q := s.waiting[0]
		best := -1
		for i, n := range s.nodes {
			if !n.usable() || len(n.running) >= s.cfg.maxSeqs {
				continue
			}
			if best < 0 || n.freeBlocks > s.nodes[best].freeBlocks {
				best = i
			}
		}
		if best < 0 {
			break
		}
		n := s.nodes[best]
		need := blocksFor(q.reserveTokens(), n.blockSize)
		if need > n.freeBlocks {
			break
		}
		n.freeBlocks -= need
		q.node, q.blocks, q.created = best, need, false
		n.running = append(n.running, q)
		s.waiting = s.waiting[1:]
		if q.rebuilding {
			q.rebuilding = false
			s.rebuilt++
		}
		if !slices.Contains(woken, best) {
			woken = append(woken, best)
		}
	}
	return woken, failed
}

// plan builds node i's next step, or nil when it has nothing to do. Every
// decoding sequence feeds back its last token; the remaining budget goes
// to prompt chunks in admission order.
func (s *scheduler) plan(i int) *meshpb.StepRequest {
	n := s.nodes[i]
	if !n.up || n.gone || n.inflight != nil {
		return nil
	}
	req := &meshpb.StepRequest{}
	in := &inflightStep{}
	budget := s.cfg.budget
	for _, q := range n.running {
		if !q.decoding() {
			continue
		}
		last := q.generated[len(q.generated)-1]
		req.Work = append(req.Work, &meshpb.SeqWork{SeqId: q.id, Tokens: []int32{int32(last)}, StartPos: uint32(q.sent), Sample: true})
		in.work = append(in.work, workItem{seq: q, n: 1, sample: true})
		budget--
	}
	for _, q := range n.running {
		if budget <= 0 {
			break
		}
		if !q.prefilling() {
			continue
		}
		k := min(q.prefillEnd()-q.sent, budget)
		budget -= k
		end := q.sent + k
		w := &meshpb.SeqWork{SeqId: q.id, StartPos: uint32(q.sent), EchoLogprobs: q.echoLogprobs && q.echoed < len(q.prompt)}
		w.Tokens = make([]int32, k)
		for j := range k {
			w.Tokens[j] = int32(q.tokenAt(q.sent + j))
		}
		w.Sample = end == len(q.prompt) && len(q.generated) == 0 && q.maxTokens > 0
		if q.sent == 0 {
			w.Sampling = q.sampling
			w.ReserveTokens = uint32(q.reserveTokens())
			w.Logprobs = q.logprobs
		}
		req.Work = append(req.Work, w)
		in.work = append(in.work, workItem{seq: q, n: k, sample: w.Sample})
	}
	in.release = n.release
	n.release = nil
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

// remove takes q off node n's running list and queues its release. A
// sequence the node never saw needs no release; its reservation returns
// at once.
func (s *scheduler) remove(n *nodeState, q *sequence) {
	n.running = slices.DeleteFunc(n.running, func(x *sequence) bool { return x == q })
	q.done = true
	if !q.created && !q.inflight {
		n.freeBlocks += q.blocks
		return
	}
	n.release = append(n.release, q.id)
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
	for _, w := range in.work {
		// The node holds every sequence this step carried work for (a
		// per-sequence failure included: it is released below).
		w.seq.created = true
	}
	defer func() {
		if resp.GetTotalBlocks() > 0 {
			n.setFree(int(resp.FreeBlocks))
		}
	}()
	byID := make(map[uint64]*meshpb.SeqResult, len(resp.GetResults()))
	for _, r := range resp.GetResults() {
		byID[r.SeqId] = r
	}
	var out []update
	for _, w := range in.work {
		q := w.seq
		if q.done { // cancelled while in flight; its release is queued
			q.inflight = false
			continue
		}
		r := byID[q.id]
		// Still marked in flight so a failing sequence gets a release:
		// the node saw its work even if it never held tokens.
		switch {
		case r == nil:
			s.remove(n, q)
			out = append(out, update{seq: q, err: fmt.Errorf("%w: no result for sequence %d in step %d", ErrNodeFailed, q.id, resp.GetStep())})
			continue
		case r.Code != 0:
			s.remove(n, q)
			out = append(out, update{seq: q, err: &NodeSeqError{Code: codes.Code(r.Code), Message: r.Message}})
			continue
		case w.sample && !r.Sampled:
			s.remove(n, q)
			out = append(out, update{seq: q, err: fmt.Errorf("%w: sequence %d was not sampled", ErrNodeFailed, q.id)})
			continue
		}
		q.inflight = false
		start := q.sent
		q.sent += w.n
		u := update{seq: q}
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
			case slices.Contains(q.stopIDs, u.token):
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
		if w.seq.done && !slices.Contains(n.release, w.seq.id) {
			// Cancelled while in flight: remove queued its release already.
			n.release = append(n.release, w.seq.id)
		}
	}
	n.lastAbort = fmt.Errorf("%w: %s", ErrExpertsUnavailable, resp.GetMessage())
	if codes.Code(resp.GetCode()) != codes.Unavailable {
		n.lastAbort = fmt.Errorf("attention node refused the step: %s: %s", codes.Code(resp.GetCode()), resp.GetMessage())
	}
	if resp.GetTotalBlocks() > 0 {
		n.setFree(int(resp.FreeBlocks))
	}
}

// maxRebuilds bounds how often one sequence is moved off a failed node; a
// request that keeps killing nodes must not take the whole cluster down.
const maxRebuilds = 1

// fail takes node i down after a whole-step failure. Its sequences' state
// on the node is unknown, so each is rebuilt elsewhere: back to the head of
// the waiting queue, to be re-prefilled with its prompt and the tokens it
// generated so far (the coordinator keeps both), and continue from there.
// Greedy continuations are unchanged; sampled ones restart their random
// stream. A sequence rebuilt maxRebuilds times already fails with err
// instead, as does everything when no node is left (at the next admit).
// Every sequence gets a release for when the node answers again.
func (s *scheduler) fail(i int, err error) []update {
	n := s.nodes[i]
	n.up = false
	if in := n.inflight; in != nil {
		n.release = append(in.release, n.release...)
		for _, w := range in.work {
			w.seq.inflight = false
			if w.seq.done && !slices.Contains(n.release, w.seq.id) {
				n.release = append(n.release, w.seq.id)
			}
		}
		n.inflight = nil
	}
	var out []update
	var rebuild []*sequence
	for _, q := range n.running {
		q.inflight = false
		n.release = append(n.release, q.id)
		if q.rebuilds >= maxRebuilds {
			q.done = true
			out = append(out, update{seq: q, err: err})
			continue
		}
		q.rebuilds++
		q.rebuilding = true
		q.node, q.blocks, q.sent, q.created = -1, 0, 0, false
		rebuild = append(rebuild, q)
	}
	n.running = nil
	s.waiting = append(rebuild, s.waiting...)
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
