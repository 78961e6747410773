// Package expertnode is expertmesh's expert node: a gRPC server that holds
// a shard of a DeepSeek MoE model's routed experts and computes, for rows
// an attention node dispatches to it, one pre-summed weighted partial row
// per input row (proto ExpertService).
//
// The node maps the checkpoint and binds every routed expert as a view of
// the mapping, which reads nothing; it serves only the experts in its held
// set (Config.Experts, changed at run time by Load and Drop) and
// prefetches exactly those experts' bytes. Dispatch requests are validated
// completely before any compute; a malformed one is answered with
// INVALID_ARGUMENT (or FAILED_PRECONDITION for an expert not held) and the
// stream carries on.
//
// One kernel pool per node does all compute, one batch at a time: the pool
// already spreads a batch over every core, and expert batches from
// different streams queue on a mutex rather than contend for cores.
// Receiving, validating and replying run beside compute, per stream.
//
// Start returns a running node; Close stops it (see Close for the order).
// Readiness is the standard gRPC health service: SERVING once the weights
// are bound, NOT_SERVING from the start of Close.
package expertnode
