// Package attnnode is the attention node: it owns sequences, their MLA
// latent cache and samplers, drives every layer of a step, and dispatches
// each MoE layer's rows to the expert nodes that hold their routed experts.
//
// A node starts like an embedded server: Start(ctx, cfg) returns a *Node
// with Ready, Err, Addr and Close. With Config.ListenAddr set it serves
// AttentionService over gRPC (expertmesh attn); with it empty it runs
// in-process only (expertmesh serve). The coordinator drives either
// through the same two methods, Step and Info; Client is its handle on a
// remote node.
//
// Steps are atomic: a step is applied to all of its sequences or to none,
// so when no replica of some expert answers within Config.ExpertWait the
// step is answered UNAVAILABLE, nothing of it applied but its releases,
// and the coordinator sends it again. Steps and Info carry the
// coordinator's epoch: an older epoch is refused with
// FAILED_PRECONDITION, a newer one first drops the sequences older epochs
// created, and ExpireEpoch drops a dead coordinator's sequences and
// refuses its epoch until ReviveEpoch (that coordinator had only lost its
// lease and registered again; it rebuilds what was dropped).
//
// Dispatch (RemoteExperts) never does network I/O under the engine's
// compute lock. Each expert node has one long-lived Dispatch stream run by
// its own goroutine. A request has a deadline (Config.DispatchTimeout per
// 256 rows); a failed one is retried on the same node after a redial with
// jittered exponential backoff, then on other replicas, then by the next
// placement Routing; a request in flight to a node that leaves the Routing
// is abandoned at once. A replicated expert with few rows in a
// dispatch (decode) goes whole to the replica that evens out the
// dispatch's work over the nodes, since its weights stream once per node
// it reaches; one with many rows (prefill) is split over its replicas in
// the placement's planned shares, least outstanding rows correcting for
// a node that falls behind (load_share.go). LoadStats counts the tokens
// routed and served for the load balancer. A step pins the placement
// version in force when it starts and moves only to a newer one when a
// failover needs it, reporting the versions in use through
// placement.View.InUse.
package attnnode
