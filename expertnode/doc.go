// Package expertnode is expertmesh's expert node: a gRPC server that holds
// a shard of a DeepSeek MoE model's routed experts and computes, for rows
// an attention node dispatches to it, one pre-summed weighted partial row
// per input row (proto ExpertService).
//
// The node maps the checkpoint and binds every routed expert as a view of
// the mapping, which reads nothing; it serves only the experts in its held
// set, a placement.Set: Config.Experts at start (the --experts grammar of
// placement.ParseSet), then Hold and Release — the control plane's
// ExpertHolder — or, on a node that is not managed by the control plane,
// the Load and Drop RPCs. Only held experts' bytes are ever read: copied
// into huge-page memory or prefetched. Dispatch requests are validated
// completely before any compute; a malformed one is answered with
// INVALID_ARGUMENT (or FAILED_PRECONDITION for an expert not held) and the
// stream carries on.
//
// One kernel pool per node does all compute, one batch at a time: the pool
// already spreads a batch over every core, and expert batches from
// different streams queue on a mutex rather than contend for cores.
// Receiving, validating and replying run beside compute, per stream.
//
// Like every role, Start returns a running node with Ready, Err, Addr, ID
// and Close (see Close for the order); Shutdown drains first: open streams
// answer what they received, then end. Readiness is the standard gRPC
// health service: SERVING once the weights are bound, NOT_SERVING from the
// start of Shutdown or Close. Registry holds the node's Prometheus metrics
// (expertmesh_expert_*); ExpertLoad and ExpertCompute give the per-expert
// counts the load balancer reads.
package expertnode
