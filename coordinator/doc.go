// Package coordinator is expertmesh's front door: an OpenAI-compatible
// HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /tokenize,
// /detokenize, /healthz, /readyz, /metrics) in front of attention nodes
// that it drives step by step.
//
// # Scheduling
//
// The decisions live in a pure state machine (scheduler.go) with no clock,
// network or goroutines. Priority is arrival order. Latent cache blocks are
// taken as sequences grow, not reserved for prompt + max_tokens: a waiting
// request is placed on the attention node with the most free blocks once
// its prompt fits there (leaving a block for each sequence running beside
// it), and every step takes the blocks its new positions need. When a
// node runs out, the youngest sequences there are preempted by recompute:
// released, queued again by their arrival, and re-prefilled with their
// prompt and generated tokens when placed again (cheap with prefix
// caching: their blocks are likely still cached), so nothing fails for
// lack of cache and no request locks others out. A request that does not
// fit may be overtaken by younger ones that do, but only on borrowed
// blocks: once the free blocks and those of younger sequences make room
// for it, it preempts them, so no request starves. The node's view is
// each answer's free_blocks; the protocol is written down in
// proto/expertmesh.proto (AttentionService.Step).
//
// Every node's next step is planned from what runs on it at that moment,
// so requests join and leave the batch every step (continuous batching).
// Each running decode feeds back one token per step; the rest of the
// per-step token budget goes to prompt chunks, oldest first (except that
// prompts whose rest fits in half a step go before longer ones and may
// take half the budget, so a small request is not held behind whole
// prefills of long prompts, nor can small ones starve a long one), ending on
// block boundaries where they can (so later chunks can take cached
// blocks), so a long prompt is prefilled over several steps while the
// decodes beside it keep a bounded step time. Finished, failed, cancelled
// and preempted sequences are released in their node's next step.
//
// The n choices of one prompt (n > 1) are separate sequences; the 2nd..nth
// wait until the first has prefilled the prompt and then go to its node,
// where prefix caching hands them its blocks: the prompt is computed once.
// Their seeds are seed, seed+1, ...; a list of prompts is indexed
// prompt-major, as in OpenAI's and vLLM's APIs.
//
// The driver (coordinator.go) runs one loop per node: plan, Step, apply,
// deliver. When a step fails as a whole the node counts as down and each of
// its sequences is rebuilt on another node by re-prefilling its prompt and
// the tokens generated so far, which the coordinator keeps; the client sees
// one uninterrupted answer (greedy tokens unchanged, a seeded sampler
// continues its random stream). A sequence the node answers NOT_FOUND for
// (it dropped the sequences of this coordinator's epoch while the
// coordinator's lease had lapsed) is rebuilt the same way. With no usable
// node, requests wait for one up to Config.NodeWait (--node-wait: a node
// whose lease lapsed registers again, one that died restarts), new ones
// included, and are rebuilt on it; past that they get a 503, as does a
// sequence whose node fails a second time: requests never hang on a dead
// node. A full waiting queue answers 429 with Retry-After, before
// any byte of a stream; a client that goes away or a request past its
// timeout is withdrawn and its cache blocks freed.
//
// # Input limits
//
// A body's JSON is checked in one pass before it is decoded: nesting at
// most 64 levels, no array longer than the model's context. Every integer
// parameter is range-checked without overflow, and parameters that would
// change the output but are not implemented (response_format other than
// text, penalties, logit_bias, tools) are refused with a 400 naming them
// rather than ignored.
//
// # Metrics
//
// /metrics counts every request by the status the client got and its
// outcome: a stream that started (200) and ended with an error event is
// code="200", outcome="error", and its error type is counted in
// request_errors_total (see metrics.go). Histograms of request time, time
// to first token (from arrival), time per output token and inter-token
// latency, the queue, the running batch, each attention node's latent
// cache blocks, preemptions and prefix-cache hits follow vLLM's.

// # Determinism
//
// With temperature 0 (or a fixed seed) a request's tokens are those of
// model.Engine.Generate for the same prompt. Logprobs are identical when a
// request runs alone and its prompt fits one step; batched with others or
// prefilled in chunks they may differ in the last float32 bits (about 1e-6)
// because the engine's kernels sum in a row-count-dependent order.
//
// # Non-standard fields
//
// Requests may carry ignore_eos, min_tokens, stop_token_ids, top_k (-1 or
// 0: off) and timeout (seconds); omitted sampling parameters take
// generation_config.json's defaults, as in vLLM. Completion choices carry token_ids, the ids behind
// their text (prompt ids first with echo).
package coordinator
