package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"time"

	"github.com/expertmesh/expertmesh/controlplane"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
)

// cpFlags are the flags every role shares to join a cluster through etcd.
type cpFlags struct {
	etcd        string
	cluster     string
	leaseTTL    time.Duration
	dialTimeout time.Duration
}

func addControlPlaneFlags(fs *flag.FlagSet) *cpFlags {
	f := &cpFlags{}
	def := controlplane.DefaultConfig()
	fs.StringVar(&f.etcd, "etcd", "", "etcd endpoints host:port[,host:port…] of the cluster's control plane (expertmesh etcd runs one; up runs one itself)")
	fs.StringVar(&f.cluster, "cluster", controlplane.DefaultCluster, "cluster name: the prefix of every etcd key, so several clusters can share one etcd")
	fs.DurationVar(&f.leaseTTL, "lease-ttl", controlplane.DefaultTTL, "membership lease TTL: a node that stops renewing it (killed, frozen, cut off) leaves the cluster this long after its last renewal")
	fs.DurationVar(&f.dialTimeout, "etcd-dial-timeout", def.DialTimeout, "how long to wait for etcd at start")
	return f
}

// enabled says whether --etcd was given.
func (f *cpFlags) enabled() bool { return f.etcd != "" }

// connect opens the store; errors name the flag.
func (f *cpFlags) connect(ctx context.Context, log *slog.Logger) (*controlplane.Store, error) {
	eps, err := controlplane.ParseEndpoints(f.etcd)
	if err != nil {
		return nil, fmt.Errorf("--etcd: %w", err)
	}
	if f.leaseTTL < time.Second {
		return nil, fmt.Errorf("--lease-ttl %v: want at least 1s (etcd counts whole seconds)", f.leaseTTL)
	}
	cfg := controlplane.DefaultConfig()
	cfg.Endpoints, cfg.Cluster, cfg.DialTimeout, cfg.Logger = eps, f.cluster, f.dialTimeout, log
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	s, err := controlplane.Connect(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("--etcd %s: %w", f.etcd, err)
	}
	return s, nil
}

// roleLogger is the text logger every role writes to stderr.
func roleLogger(stderr io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(stderr, nil))
}

// shapeOf reads the model's placement shape.
func shapeOf(dir string) (placement.Shape, *model.Config, error) {
	c, err := model.LoadConfig(dir)
	if err != nil {
		return placement.Shape{}, nil, fmt.Errorf("--model: %w", err)
	}
	return placement.ShapeOf(c), c, nil
}

// nodeID is --node-id, or the default for role on listen's port (empty
// when the port is picked at start: the caller names the node by its
// address then).
func nodeID(flagValue string, role controlplane.Role, listen string) string {
	if flagValue != "" {
		return flagValue
	}
	if port := controlplane.PortOf(listen); port != 0 {
		return controlplane.DefaultNodeID(role, port)
	}
	return ""
}

// advertised is the address other nodes dial to reach a server listening
// on listen: --advertise-addr when given; otherwise listen itself, with an
// unspecified host (0.0.0.0, ::) replaced by this host's first
// non-loopback address, since nobody can dial "[::]:7000".
func advertised(flagValue, listen string) (string, error) {
	if flagValue != "" {
		if _, _, err := net.SplitHostPort(flagValue); err != nil {
			return "", fmt.Errorf("--advertise-addr %q: want host:port: %v", flagValue, err)
		}
		return flagValue, nil
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", err
	}
	if ip := net.ParseIP(host); host != "" && (ip == nil || !ip.IsUnspecified()) {
		return listen, nil
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return "", fmt.Errorf("listening on %s: finding an address to advertise: %v (set --advertise-addr)", listen, err)
	}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && !ipn.IP.IsLoopback() && ipn.IP.To4() != nil {
			return net.JoinHostPort(ipn.IP.String(), port), nil
		}
	}
	return net.JoinHostPort("127.0.0.1", port), nil
}
