// Package bench is `expertmesh bench`: a load generator for any
// OpenAI-compatible server (expertmesh, llama.cpp's llama-server, vLLM)
// whose options and result JSON carry the names of vLLM's `vllm bench
// serve`, so results move between the tools.
//
// A run sends streaming requests (/v1/completions or
// /v1/chat/completions) from a random or file dataset, at a gamma/Poisson
// arrival rate and/or a concurrency cap, and measures each request on the
// client as vLLM does:
//
//   - TTFT: from sending to the first stream event carrying a token;
//   - ITL: the gaps between successive token-carrying events;
//   - E2EL: from sending to the end of the stream;
//   - TPOT: (E2EL − TTFT) / (output tokens − 1), for requests with more
//     than one output token; output tokens are the server's
//     usage.completion_tokens (requested with stream_options.include_usage),
//     else counted from the stream.
//
// The random dataset takes vLLM's --random-prefix-len N: one fixed random
// prefix of N tokens, drawn once, before every random prompt (token ids
// for the completions API, every request's system message for chat), the
// workload of a shared system prompt for measuring prefix caching. When
// the server reports usage.prompt_tokens_details.cached_tokens, the result
// totals it (total_cached_tokens).
//
// One deliberate difference: vLLM also counts events that carry no token
// (the chat API's opening role event and the closing finish_reason event)
// as tokens for TTFT and ITL; this package does not, so its ITLs are the
// gaps between tokens.
//
// Run returns a Result; WriteSummary prints vLLM's summary block, Save
// writes the JSON and a self-contained HTML report (inline SVG, no network),
// and Compare / WriteCompareReport set two results side by side. A Result
// may carry a per-layer breakdown of a step (Breakdown) and the expert load
// per layer and node (ExpertLoad); the report draws them when present.
package bench
