package localcluster

import "time"

// Network runs the children somewhere other than this host's loopback:
// Config.Net rewrites each child's command line before it starts (NewNetns
// puts every child in a network namespace of its own, linked by a bridge
// with emulated latency and bandwidth).
type Network interface {
	// Command returns the command line that runs a child: argv is the
	// plain one (binary, role, flags with loopback addresses).
	Command(child, role string, argv []string) ([]string, error)
	// Host is an address of this host that every child reaches; the
	// embedded etcd member listens there.
	Host() string
}

// LinkSpec is an emulated link.
type LinkSpec struct {
	// Delay is the one-way latency between two nodes.
	Delay time.Duration
	// Gbit is each node's link rate in Gbit/s, each direction (0: no
	// limit).
	Gbit float64
}
