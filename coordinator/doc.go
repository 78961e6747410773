// Package coordinator is expertmesh's front door: an OpenAI-compatible
// HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /tokenize,
// /detokenize, /healthz, /readyz, /metrics) in front of attention nodes
// that it drives step by step.
//
// # Scheduling
//
// The decisions live in a pure state machine (scheduler.go) with no clock,
// network or goroutines: requests wait in arrival order, each is placed on
// the attention node with the most free cache blocks once its whole
// reservation (prompt + max_tokens) fits, and every node's next step is
// planned from what runs on it at that moment, so requests join and leave
// the batch every step (continuous batching). Each running decode feeds
// back one token per step; the rest of the per-step token budget goes to
// prompt chunks, so a long prompt is prefilled over several steps while the
// decodes beside it keep a bounded step time. Finished, failed and
// cancelled sequences are released in their node's next step.
//
// The driver (coordinator.go) runs one loop per node: plan, Step, apply,
// deliver. When a step fails as a whole the node counts as down and each of
// its sequences is rebuilt on another node by re-prefilling its prompt and
// the tokens generated so far, which the coordinator keeps; the client sees
// one uninterrupted answer (greedy tokens unchanged, a sampled one continues
// with a fresh random stream). A sequence whose node fails a second time,
// or that has no live node to go to, gets a 503; requests never hang on a
// dead node. A full waiting queue answers 429 with Retry-After; a client
// that goes away or a request past its timeout is withdrawn and its cache
// blocks freed.
//
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
// Requests may carry ignore_eos, stop_token_ids, top_k (-1 or 0: off) and
// timeout (seconds); omitted sampling parameters take generation_config.json's
// defaults, as in vLLM. Completion choices carry token_ids, the ids behind
// their text (prompt ids first with echo).
package coordinator
