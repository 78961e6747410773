package controlplane

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"go.etcd.io/etcd/server/v3/embed"
	"google.golang.org/grpc"
)

// EtcdConfig configures an embedded etcd member.
type EtcdConfig struct {
	// Dir is the member's data directory (--etcd-dir); required.
	Dir string
	// Name is the member's name (--etcd-name, default "default"); with
	// InitialCluster it must be one of the names listed there.
	Name string
	// ClientAddr is the host:port clients use (--etcd-listen, default
	// 127.0.0.1:2379). Port 0 picks a free port; ClientAddr() reports it.
	ClientAddr string
	// PeerAddr is the host:port other members use (--etcd-peer, default
	// 127.0.0.1:2380). Port 0 is only valid for a single member: the
	// peers of a static cluster must know each other's URLs up front.
	PeerAddr string
	// InitialCluster lists a static cluster's members,
	// "n1=http://h1:p1,n2=http://h2:p2,n3=http://h3:p3"
	// (--etcd-initial-cluster); empty means a single member.
	InitialCluster string
	// ClusterState is "new" to bootstrap, "existing" to join a running
	// cluster (--etcd-initial-cluster-state, default "new"). A member
	// restarted on its data directory ignores it.
	ClusterState string
	// Logger receives etcd's errors; nil discards them.
	Logger *slog.Logger
}

// DefaultEtcdConfig returns a single-member config serving dir on the
// standard ports of this machine's loopback.
func DefaultEtcdConfig(dir string) EtcdConfig {
	return EtcdConfig{Dir: dir, Name: "default", ClientAddr: "127.0.0.1:2379", PeerAddr: "127.0.0.1:2380", ClusterState: "new"}
}

// Validate checks the config; errors name the flag.
func (c EtcdConfig) Validate() error {
	if c.Dir == "" {
		return fmt.Errorf("%w: --etcd-dir: required", ErrConfig)
	}
	if err := ValidateID(c.Name); err != nil {
		return fmt.Errorf("%w: --etcd-name %q: want 1 to 128 of [A-Za-z0-9._-]", ErrConfig, c.Name)
	}
	for flag, a := range map[string]string{"--etcd-listen": c.ClientAddr, "--etcd-peer": c.PeerAddr} {
		if _, p, err := net.SplitHostPort(a); err != nil {
			return fmt.Errorf("%w: %s %q: want host:port: %v", ErrConfig, flag, a, err)
		} else if n, err := strconv.Atoi(p); err != nil || n < 0 || n > 65535 {
			return fmt.Errorf("%w: %s %q: port %q", ErrConfig, flag, a, p)
		}
	}
	if c.ClusterState != "new" && c.ClusterState != "existing" {
		return fmt.Errorf("%w: --etcd-initial-cluster-state %q: want new or existing", ErrConfig, c.ClusterState)
	}
	if c.InitialCluster != "" {
		if PortOf(c.PeerAddr) == 0 {
			return fmt.Errorf("%w: --etcd-peer %q: a static cluster's members need fixed peer ports", ErrConfig, c.PeerAddr)
		}
		found := false
		for m := range strings.SplitSeq(c.InitialCluster, ",") {
			name, u, ok := strings.Cut(strings.TrimSpace(m), "=")
			if !ok {
				return fmt.Errorf("%w: --etcd-initial-cluster %q: want name=http://host:port,…", ErrConfig, c.InitialCluster)
			}
			if _, err := url.Parse(u); err != nil {
				return fmt.Errorf("%w: --etcd-initial-cluster %q: %v", ErrConfig, c.InitialCluster, err)
			}
			found = found || name == c.Name
		}
		if !found {
			return fmt.Errorf("%w: --etcd-initial-cluster %q does not name this member (--etcd-name %q)", ErrConfig, c.InitialCluster, c.Name)
		}
	}
	return nil
}

// Etcd is an embedded etcd member.
type Etcd struct {
	e          *embed.Etcd
	clientAddr string
	ready      chan struct{}
	errc       chan error
	stop       chan struct{}
	closeOnce  sync.Once
	wg         sync.WaitGroup
	closing    atomic.Bool // mutes etcd's logs of its own shutdown
	grpcMu     sync.Mutex
	grpcs      []*grpc.Server // the client-facing gRPC servers
}

// StartEtcd starts an embedded etcd member and returns once it listens;
// Ready is closed when it serves (for a static cluster: once a quorum of
// members runs, so start them concurrently). A failed start cleans up
// what it began. ctx bounds only the start.
func StartEtcd(ctx context.Context, cfg EtcdConfig) (*Etcd, error) {
	if cfg.Name == "" {
		cfg.Name = "default"
	}
	if cfg.ClientAddr == "" {
		cfg.ClientAddr = "127.0.0.1:2379"
	}
	if cfg.PeerAddr == "" {
		cfg.PeerAddr = "127.0.0.1:2380"
	}
	if cfg.ClusterState == "" {
		cfg.ClusterState = "new"
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ec := embed.NewConfig()
	ec.Name = cfg.Name
	ec.Dir = cfg.Dir
	cu := url.URL{Scheme: "http", Host: cfg.ClientAddr}
	pu := url.URL{Scheme: "http", Host: cfg.PeerAddr}
	ec.ListenClientUrls, ec.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
	ec.ListenPeerUrls, ec.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
	ec.InitialCluster = cfg.InitialCluster
	if ec.InitialCluster == "" {
		ec.InitialCluster = cfg.Name + "=" + pu.String()
	}
	ec.ClusterState = cfg.ClusterState
	ec.InitialClusterToken = "expertmesh"
	ec.Logger = "zap"
	ec.LogLevel = "error"
	x := &Etcd{ready: make(chan struct{}), errc: make(chan error, 1), stop: make(chan struct{})}
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(newZapLogger(cfg.Logger, slog.LevelError, &x.closing))
	ec.ServiceRegister = func(s *grpc.Server) {
		x.grpcMu.Lock()
		x.grpcs = append(x.grpcs, s)
		x.grpcMu.Unlock()
	}
	// Keep history for an hour of revisions: watchers that fall behind
	// re-read instead of failing, and the store stays small.
	ec.AutoCompactionMode = "periodic"
	ec.AutoCompactionRetention = "1h"
	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("%w: starting embedded etcd in %s: %v", ErrConfig, cfg.Dir, err)
	}
	x.e, x.clientAddr = e, e.Clients[0].Addr().String()
	x.wg.Add(2)
	go func() {
		defer x.wg.Done()
		select {
		case <-e.Server.ReadyNotify():
			close(x.ready)
		case <-e.Server.StopNotify():
		case <-x.stop:
		}
	}()
	go func() {
		defer x.wg.Done()
		defer close(x.errc)
		reported := false
		report := func(err error) {
			select {
			case <-x.stop:
				return // errors of our own shutdown
			default:
			}
			if !reported {
				reported = true
				x.errc <- err
			}
		}
		stopped := e.Server.StopNotify()
		for {
			select {
			case err, ok := <-e.Err():
				if !ok {
					return // closed by embed.Etcd.Close, after Close began
				}
				if err != nil {
					report(fmt.Errorf("%w: %v", ErrEtcdStopped, err))
				}
			case <-stopped:
				stopped = nil
				report(fmt.Errorf("%w: the server stopped (removed from the cluster, or a fatal error)", ErrEtcdStopped))
			}
		}
	}()
	return x, nil
}

// Ready is closed once the member serves requests.
func (x *Etcd) Ready() <-chan struct{} { return x.ready }

// Err delivers at most one fatal error and is closed once the member has
// stopped (after Close).
func (x *Etcd) Err() <-chan error { return x.errc }

// ClientAddr is the host:port clients dial (the real port when the
// configured one was 0).
func (x *Etcd) ClientAddr() string { return x.clientAddr }

// PeerAddr is the host:port peers dial.
func (x *Etcd) PeerAddr() string { return x.e.Peers[0].Addr().String() }

// WaitReady waits until the member serves, it fails, or ctx ends.
func (x *Etcd) WaitReady(ctx context.Context) error {
	select {
	case <-x.ready:
		return nil
	case err, ok := <-x.errc:
		if !ok {
			return ErrClosed
		}
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close stops the member: client connections are cut at once (a client
// holding a watch or keepalive stream would otherwise hold etcd's graceful
// stop for its full request timeout; clients re-dial and retry), then
// listeners, the raft server and the goroutines watching it stop.
func (x *Etcd) Close() error {
	x.closeOnce.Do(func() {
		x.closing.Store(true)
		close(x.stop)
		x.grpcMu.Lock()
		for _, s := range x.grpcs {
			s.Stop()
		}
		x.grpcMu.Unlock()
		x.e.Close()
	})
	x.wg.Wait()
	return nil
}
