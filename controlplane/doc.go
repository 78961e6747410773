// Package controlplane is everything in expertmesh that talks to etcd:
// membership under leases, the coordinator epoch, versioned expert
// placement with make-before-break switching, and an embedded etcd server
// for clusters that have none. This comment is the one description of the
// etcd key layout; keep it in step with keys.go.
//
// # Key layout
//
// Every key of a cluster lives under /expertmesh/<c>/, <c> being the
// cluster name (--cluster, default "default"). Values are JSON unless
// stated otherwise.
//
//	/expertmesh/<c>/model
//	    ModelIdentity {"hash","name","layers","routed_experts"}; no lease.
//	    Written once by the first node to register (a create-if-absent
//	    transaction). A node whose identity hash differs is refused with
//	    ErrModelMismatch, naming both hashes and both model directories.
//	/expertmesh/<c>/epoch
//	    Decimal counter, no lease. Every coordinator start bumps it with a
//	    compare-and-swap (Store.NextEpoch); the value a coordinator got is
//	    its epoch. Steps carry it; attention nodes drop sequences of older
//	    epochs; placement writes are fenced by it (below).
//	/expertmesh/<c>/members/<role>/<id>
//	    Member, under the member's own lease. role is coordinator, attn or
//	    expert; id matches [A-Za-z0-9._-]{1,128} (--node-id, default
//	    hostname-role-port). The key exists exactly while the node is
//	    alive: it vanishes when the node leaves (lease revoked) or stops
//	    keeping its lease alive (TTL expiry).
//	/expertmesh/<c>/placement/versions/<N>
//	    placement.Table (placement.DecodeTable reads it), N zero-padded to
//	    20 digits so that key order is version order. Never rewritten;
//	    deleted once no node can use it.
//	/expertmesh/<c>/placement/target
//	    Decimal N: the version expert nodes should load.
//	/expertmesh/<c>/placement/active
//	    Decimal N: the version attention nodes route new steps by.
//	/expertmesh/<c>/placement/ready/<expert-id>
//	    Decimal N, under the expert node's lease: the node holds every
//	    expert version N assigns it (and everything versions still in use
//	    assign it).
//	/expertmesh/<c>/placement/inuse/<attn-id>
//	    InUse {"oldest":M,"newest":N}, under the attention node's lease:
//	    the versions its running steps still dispatch by.
//	/expertmesh/<c>/load/<attn-id>
//	    LoadReport, under the attention node's lease, rewritten every
//	    --load-report-interval (default 10 s; never per token):
//	    {"at_ms","window_ms","moe_layers","experts","routed","served"}.
//	    routed is base64 of unsigned varints, one per (MoE layer, expert)
//	    in order: tokens the node routed to each expert in its sliding
//	    window (--load-window, default 5 min). served maps expert node id
//	    to base64 varints, one per MoE layer: tokens that node computed
//	    for this one since it started. The controller sums the reports
//	    of live attention nodes: the load it plans for, and /v1/cluster's
//	    load and expert_load.
//	/expertmesh/<c>/drain/<id>
//	    A drain request (`expertmesh placement drain ID`; value: when);
//	    deleted by the controller once the node's member key is gone.
//	/expertmesh/<c>/rebalance
//	    Any write asks the controller to plan again for the load observed
//	    now (`expertmesh placement rebalance`).
//
// The controller (in the coordinator) is the only writer of versions,
// target and active, and of drain deletions; each of its writes is a
// transaction conditioned on /epoch still holding the writer's epoch, so
// a superseded coordinator cannot write (ErrFenced).
//
// # Leases
//
// Every node registers (Register) under a lease of its own, TTL 3 s by
// default (--lease-ttl; etcd counts whole seconds and raises very short
// TTLs to its minimum). Its member key and the keys it owns (ready/,
// inuse/) live under that lease: Registration.Close revokes it and they
// vanish at once (a graceful leave); a killed, frozen or cut-off node's
// keys vanish one TTL after its last keepalive. A registration whose
// lease is lost (expired, revoked, etcd restarted on an empty data
// directory) or whose member key is deleted registers again by itself,
// with backoff and jitter, rewriting every key it owns; etcd being down
// only delays that. An etcd member restarted on its data keeps every
// lease alive (the new leader extends them by a TTL), so nodes whose
// keepalives failed during the outage resume the same lease. A node
// restarted under the same id takes the id over: the previous process's
// lease is revoked first, so nothing it claimed outlives it.
//
// # Make-before-break
//
// Expert placement changes without a token ever being routed to a node
// that lacks its expert:
//
//  1. Plan. When the eligible expert nodes change (live members in state
//     serving, not asked to drain), a rebalance is requested or the
//     schedule finds one worth it (see Load and rebalancing), the
//     controller computes the next table with placement.Plan from the
//     pending target (or the active version) and the observed load,
//     waits a short debounce so
//     that nodes joining together make one version, and publishes it as
//     version N: versions/N and target=N in one transaction. A newer
//     target supersedes an older one that was never activated.
//  2. Make. Each expert agent (ExpertAgent) holds what N assigns its
//     node (ExpertHolder.Hold; and whatever versions still in use assign
//     it, which a restarted node has to load again), then writes ready=N.
//  3. Activate. Once every node N names is a live member with ready=N,
//     the controller writes active=N.
//  4. Switch. Each attention node's AttnView publishes a new Routing;
//     the node pins one routing per step and reports, through
//     AttnView.InUse, the oldest and newest versions its running steps
//     use. A routing gives a node's address only once the node reported
//     ready, so a node restarted since it was placed is not dialled
//     before it has loaded its experts.
//  5. Break. An expert agent releases (ExpertHolder.Release) an expert
//     only when neither the target nor any stored version from the
//     oldest version in use (over every live attention node; an
//     attention node that has not reported counts as using everything
//     stored) up to the active version assigns it to its node. When
//     versions in use are unknown (etcd lost its data) nothing is
//     released.
//  6. Collect. The controller deletes versions below the oldest in use
//     and superseded targets that were never activated.
//
// # Load and rebalancing
//
// Plans are made for a load: the sum of the attention nodes' reports
// (routed tokens per layer and expert over their windows), taken when
// something asks for a plan and kept until the next ask, so that a plan
// stays the plan for its inputs and planning again from it changes
// nothing (a new coordinator adopts the placement it finds, planned for
// a load it never saw, until one of these asks). What asks: the eligible
// expert nodes changing (a join, a leave, a drain), `placement
// rebalance`, and the schedule
// (--rebalance-interval, off by default): it plans only when the current
// placement's weighted imbalance under the observed load exceeds
// --rebalance-threshold (1.10), no switch is in progress and at least 10
// tokens per (layer, expert) were observed, and publishes only a plan
// that cuts the imbalance by --rebalance-margin (2%). Imbalance is
// placement.Imbalance's (see LoadStatus). The planner (placement.Plan)
// weighs the balance a move buys against the expert bytes it loads, and
// sets planned shares per replica that attention nodes follow when a
// dispatch splits an expert's rows (one with few rows goes whole to the
// replica that evens out the dispatch: see package attnnode). A
// rebalance is an ordinary version switch, make-before-break: serving
// goes on by the old version until every node has loaded the new one.
// The controller logs and exports (Controller.Collectors) every switch:
// what caused it, replicas and bytes moved, publish-to-activation time,
// imbalance before and after.
//
// Draining: ExpertAgent.Drain (SIGTERM) or a drain request marks the node
// draining; the controller plans without it; the agent reports Drained
// once nothing that is targeted, active or in use assigns it anything,
// and the process exits. A node that dies simply loses its lease; the
// next plan leaves it out and a target that named it, never ready, is
// superseded.
//
// When etcd is unreachable, everything keeps working on what it last saw:
// attention nodes route by their last routing, expert nodes keep what
// they hold, and membership and placement changes wait for etcd. Nothing
// polls: every component follows etcd watches (Watch from the revision of
// a Get, re-reading after compaction, watch failures and reconnects).
//
// # Who calls what
//
//   - Every role: Connect, IdentifyModel, Register (Close on exit).
//   - Coordinator: Store.NextEpoch, Register with Member.Epoch,
//     StartController; Controller.Status for /v1/cluster and
//     Controller.Collectors for /metrics.
//   - Attention node: NewAttnView as its placement.View; Wait before
//     serving; InUse per step; OnCoordinators to drop sequences of dead
//     coordinator epochs (and serve an epoch again once its coordinator,
//     which had only lost its lease, is a member again); StartLoadReporter
//     with its load statistics.
//   - Expert node: NewExpertAgent with the node as ExpertHolder; Drain on
//     SIGTERM; exit on Drained.
//   - CLI: Show (`placement show`), RequestDrain, RequestRebalance;
//     StartEtcd for `up` and `expertmesh etcd`.
package controlplane
