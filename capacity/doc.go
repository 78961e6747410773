// Package capacity is `expertmesh plan`: a pure model of a decode step of
// a DeepSeek MoE model on A attention and E expert nodes, for the question
// users ask before buying nodes — how fast, how many of each, how much
// memory.
//
// # The model
//
// Each attention node holds Concurrency/A sequences and splits them into M
// micro-batches of b rows. Per layer and micro-batch:
//
//   - attention (on the attention node): read the layer's non-expert
//     weights once (q or q LoRA, kv_a, kv_b, o, norms; for a MoE layer the
//     router and shared experts, for a dense layer its MLP) and each row's
//     latent cache (Context × (kv_lora_rank + rope dim) numbers), and do
//     2 flops per weight per row plus absorbed MLA's 2·heads·Context·
//     (2·kv_lora_rank + rope dim) per row; the time is bytes / GB/s +
//     flops / FLOP/s at the node's rates (the sum, not the roofline's
//     larger: the rates are measured apart, and a product of a few rows
//     overlaps its weight stream and its FMAs poorly);
//   - wire: 2 × one-way latency + the dispatch's bytes (hidden rows out in
//     float32 with their expert ids and gates, partial sums back) at the
//     link rate + a per-dispatch software overhead, plus one per expert
//     node the rows reach (E · (1 − (1 − share)^b) nodes) when given;
//   - expert compute (on each expert node, in parallel): the node's share
//     of the b rows (the chance a row touches the node: its k experts
//     spread over all experts, or, with group-limited routing and whole
//     groups per node, its topk_group groups), and of the experts touched
//     (N/E · (1 − (1 − k/N)^b)), each read once: 3·hidden·moe_intermediate
//     weights per touched expert, 6·hidden·moe_intermediate flops per
//     (row, expert) pair;
//   - the wait for the slowest expert node: placement balances the
//     expected load, not one dispatch's draw. A node's count of touched
//     experts is about binomial (N/E experts, each touched with chance
//     q = 1 − (1 − k/N)^b); the slowest of E nodes is about z(E)
//     standard deviations above the mean (z: the expected largest of E
//     standard normals, 0.56 for 2 nodes, 1.03 for 4, 1.42 for 8), capped
//     at all its experts, at the same rates as the mean node (also when
//     all nodes share one machine). The hop is wire + the slowest node.
//
// With M micro-batches sharing the attention node's compute, and each
// expert node answering their M dispatches of the layer one after
// another, a MoE layer takes max(M·attention, M·expert, attention + wire
// + slowest expert) in steady state: the hop is hidden when (M − 1)·attention ≥
// wire + expert, and ping-pong cannot make a layer shorter than its
// expert work for all micro-batches (a slow expert node is not hidden by
// splitting the batch; it is only hidden by more nodes). A dense layer
// takes M·attention, the LM head M·(vocab·hidden weights). Ping-pong is
// not free in decode: every micro-batch reads the layer's weights again.
// The step is the longest of that pipeline, each expert node's compute
// for all A·M dispatches of every MoE layer, and — when every node shares
// one machine of C cores (Setup.Shared, SharedCores) — the CPU time of
// all its processes over the cores. That is three terms, each from
// figures the model has already: every node's work (all micro-batches'
// attention and LM head, all expert nodes' work for every dispatch, not
// just the slowest node's) at the machine's total rates, which are what
// its cores do together; every dispatch's software time (the dispatch
// overhead and its per-node part: encoding, gRPC both ways, the
// hand-offs, measured in a row on loopback, so one core's time) over C,
// once per MoE layer per micro-batch per attention node; and the step's overhead, which nothing
// overlaps. Ping-pong hides a dispatch from the pipeline but not from the
// cores: on one shared machine its second micro-batch costs its weight
// reads again and a second dispatch a layer, and the emulated-link sweep
// (v2-lite-4l on 2 cores, bench-kernels' rates scaled by one fitted
// 0.863) measures 175–196 ms with 2 micro-batches and 2–4 expert nodes
// where this bound gives 170–176 and the pipeline 141–150. Tokens/s follow: one
// token per sequence per step.
//
// Memory per attention node: every weight but the routed experts, plus
// the latent cache of its sequences; per expert node: (routed experts +
// redundant replicas) / E per MoE layer.
//
// Not modelled: prefill, queueing between steps, lasting load imbalance
// between expert nodes (placement balances it; EPLB's redundant replicas
// only add memory here), and the expert nodes' contention
// when several attention nodes' dispatches arrive at once beyond their
// summed busy time.
package capacity
