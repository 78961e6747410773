package placement

import (
	"fmt"
	"slices"
)

// Node is an expert node the planner may assign experts to.
type Node struct {
	ID string
	// Slots is the most experts (over all layers) the node may hold; 0
	// means no limit.
	Slots int
}

// PlanInput is everything Plan decides from. It is plain data: no clock,
// no I/O.
type PlanInput struct {
	Shape Shape
	// Nodes are the live expert nodes that may hold experts (draining
	// nodes are left out by the caller).
	Nodes []Node
	// Current is the placement in force (nil: none yet).
	Current *Table
	// Version is the version the result carries.
	Version uint64
	// Load is the observed load per [layer][expert] (tokens routed); nil
	// means uniform.
	Load [][]float64
	// Redundant is how many extra replicas the planner may add to the
	// hottest experts, within the nodes' slots.
	Redundant int
}

// Plan computes the next placement: every routed expert of every MoE
// layer on at least one node of in.Nodes, no node over its slots.
func Plan(in PlanInput) (*Table, error) {
	if len(in.Nodes) == 0 {
		return nil, fmt.Errorf("%w: no expert nodes to place on", ErrPlacement)
	}
	ids := make([]string, len(in.Nodes))
	for i, n := range in.Nodes {
		ids[i] = n.ID
	}
	slices.Sort(ids)
	return Even(in.Shape, ids, in.Version)
}
