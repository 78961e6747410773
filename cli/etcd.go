package cli

import (
	"context"
	"fmt"
	"io"

	"github.com/expertmesh/expertmesh/controlplane"
)

// runEtcd is `expertmesh etcd`: an embedded etcd member on its own, for
// clusters that have no etcd. A single member by default; a static
// cluster of three (or more) with --etcd-initial-cluster and fixed peer
// ports.
func runEtcd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("etcd", stderr)
	cfg := controlplane.DefaultEtcdConfig("")
	fs.StringVar(&cfg.Dir, "etcd-dir", "", "data directory (required; a member restarted on it keeps the cluster's state)")
	fs.StringVar(&cfg.Name, "etcd-name", cfg.Name, "member name (one of those in --etcd-initial-cluster)")
	fs.StringVar(&cfg.ClientAddr, "etcd-listen", cfg.ClientAddr, "client host:port (port 0 picks one)")
	fs.StringVar(&cfg.PeerAddr, "etcd-peer", cfg.PeerAddr, "peer host:port (fixed for a static cluster)")
	fs.StringVar(&cfg.InitialCluster, "etcd-initial-cluster", "", `static cluster "n1=http://h1:p1,n2=http://h2:p2,n3=http://h3:p3" (empty: a single member)`)
	fs.StringVar(&cfg.ClusterState, "etcd-initial-cluster-state", cfg.ClusterState, "new (bootstrap) or existing (join a running cluster)")
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg.Logger = roleLogger(stderr)
	if err := cfg.Validate(); err != nil {
		return err
	}
	e, err := controlplane.StartEtcd(ctx, cfg)
	if err != nil {
		return err
	}
	select {
	case <-e.Ready():
	case err := <-e.Err():
		e.Close()
		return err
	case <-ctx.Done():
		return e.Close()
	}
	fmt.Fprintf(stdout, "etcd member %s listening on %s\n", cfg.Name, e.ClientAddr())
	select {
	case err := <-e.Err():
		e.Close()
		return err
	case <-ctx.Done():
		return e.Close()
	}
}
