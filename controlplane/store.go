package controlplane

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/connectivity"
)

// Config says how to reach etcd.
type Config struct {
	// Endpoints are etcd client addresses, host:port (or
	// http://host:port); --etcd host:port[,…].
	Endpoints []string
	// Cluster names the cluster; several clusters may share one etcd
	// (--cluster, default "default").
	Cluster string
	// DialTimeout bounds the first connection (--etcd-dial-timeout).
	DialTimeout time.Duration
	// RequestTimeout bounds each etcd request the package makes on its own
	// (re-registration, watches' re-reads, controller writes).
	RequestTimeout time.Duration
	// Logger receives the package's and the etcd client's log lines; nil
	// discards them.
	Logger *slog.Logger
}

// DefaultConfig returns a Config for an etcd on this machine.
func DefaultConfig() Config {
	return Config{
		Endpoints:      []string{"127.0.0.1:2379"},
		Cluster:        DefaultCluster,
		DialTimeout:    5 * time.Second,
		RequestTimeout: 3 * time.Second,
	}
}

// ParseEndpoints reads --etcd's value: host:port[,host:port…].
func ParseEndpoints(s string) ([]string, error) {
	var out []string
	for e := range strings.SplitSeq(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	c := Config{Endpoints: out, Cluster: DefaultCluster, DialTimeout: time.Second, RequestTimeout: time.Second}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return out, nil
}

// Validate checks the config; errors name the flag.
func (c Config) Validate() error {
	if len(c.Endpoints) == 0 {
		return fmt.Errorf("%w: --etcd: no endpoints (want host:port[,host:port…])", ErrConfig)
	}
	for _, e := range c.Endpoints {
		hp := strings.TrimPrefix(e, "http://")
		if strings.Contains(hp, "://") {
			return fmt.Errorf("%w: --etcd %q: only plain http endpoints are supported", ErrConfig, e)
		}
		host, port, err := net.SplitHostPort(hp)
		if err != nil {
			return fmt.Errorf("%w: --etcd %q: want host:port: %v", ErrConfig, e, err)
		}
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("%w: --etcd %q: port %q", ErrConfig, e, port)
		}
		if host == "" || strings.ContainsAny(host, " /") {
			return fmt.Errorf("%w: --etcd %q: host %q", ErrConfig, e, host)
		}
	}
	if c.Cluster != "" {
		if err := ValidateID(c.Cluster); err != nil {
			return fmt.Errorf("%w: --cluster %q: want 1 to 128 of [A-Za-z0-9._-]", ErrConfig, c.Cluster)
		}
	}
	if c.DialTimeout <= 0 {
		return fmt.Errorf("%w: --etcd-dial-timeout %v: must be positive", ErrConfig, c.DialTimeout)
	}
	if c.RequestTimeout <= 0 {
		return fmt.Errorf("%w: request timeout %v: must be positive", ErrConfig, c.RequestTimeout)
	}
	return nil
}

// Store is a connection to etcd scoped to one cluster's keys. It is safe
// for concurrent use; everything else in the package is built on it.
type Store struct {
	client  *clientv3.Client
	keys    Keys
	log     *slog.Logger
	timeout time.Duration

	mu struct {
		sync.Mutex
		// reconnected is closed (and replaced) whenever the connection to
		// etcd becomes ready again after having been lost; watchers then
		// re-read, since a restarted etcd may have lost its data.
		reconnected chan struct{}
	}
	monitorDone chan struct{}
}

// Connect dials etcd and checks that it answers within DialTimeout (or
// ctx). The client has no endpoint auto-sync (the configured endpoints are
// the cluster), gRPC keepalives that notice a dead etcd within seconds and
// logs through cfg.Logger at warning level and above.
func Connect(ctx context.Context, cfg Config) (*Store, error) {
	if cfg.Cluster == "" {
		cfg.Cluster = DefaultCluster
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = DefaultConfig().DialTimeout
	}
	if cfg.RequestTimeout == 0 {
		cfg.RequestTimeout = DefaultConfig().RequestTimeout
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = discardLogger()
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		DialTimeout: cfg.DialTimeout,
		// etcd's server refuses pings more often than every 5 s
		// (--grpc-keepalive-min-time); 5 s + 2 s notices a silent etcd
		// in 7 s. A stopped etcd closes its connections and is noticed
		// at once.
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
		PermitWithoutStream:  true,
		AutoSyncInterval:     0,
		// gRPC's default reconnect backoff grows to two minutes: after
		// an etcd outage of 20 s a client would stay away for another
		// ten, long enough for every lease to expire once etcd is back.
		// Retry at least every second instead.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: 2 * time.Second,
		})},
		Logger:  newZapLogger(log, slog.LevelWarn),
		Context: context.WithoutCancel(ctx),
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	s := &Store{client: cli, keys: KeysFor(cfg.Cluster), log: log, timeout: cfg.RequestTimeout, monitorDone: make(chan struct{})}
	s.mu.reconnected = make(chan struct{})
	pctx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
	defer cancel()
	if _, err := cli.Get(pctx, s.keys.Epoch()); err != nil {
		cli.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("%w: %s: %v", ErrUnavailable, strings.Join(cfg.Endpoints, ","), err)
	}
	go s.monitor()
	return s, nil
}

// Client is the underlying etcd client, for tests and tools.
func (s *Store) Client() *clientv3.Client { return s.client }

// Keys is the cluster's key builder.
func (s *Store) Keys() Keys { return s.keys }

// Close closes the connection. Registrations, views, agents and
// controllers built on the store stop their etcd work when it closes, but
// must still be closed themselves; close them first (a registration's
// Close revokes its lease through the store).
func (s *Store) Close() error {
	err := s.client.Close()
	<-s.monitorDone
	if err != nil && s.client.Ctx().Err() == nil {
		return fmt.Errorf("%w: closing the etcd client: %v", ErrUnavailable, err)
	}
	return nil
}

// done is closed once the store is closed.
func (s *Store) done() <-chan struct{} { return s.client.Ctx().Done() }

// reconnected returns a channel closed the next time the connection to
// etcd comes back after being lost.
func (s *Store) reconnected() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mu.reconnected
}

// monitor follows the gRPC connection's state (notifications, not polls)
// and signals every return to Ready after a loss.
func (s *Store) monitor() {
	defer close(s.monitorDone)
	conn := s.client.ActiveConnection()
	ctx := s.client.Ctx()
	st := conn.GetState()
	lost := false
	for conn.WaitForStateChange(ctx, st) {
		st = conn.GetState()
		switch st {
		case connectivity.Ready:
			if lost {
				s.log.Info("etcd connection restored")
				s.mu.Lock()
				close(s.mu.reconnected)
				s.mu.reconnected = make(chan struct{})
				s.mu.Unlock()
			}
			lost = false
		case connectivity.TransientFailure, connectivity.Connecting:
			if !lost {
				s.log.Warn("etcd connection lost")
			}
			lost = true
		case connectivity.Shutdown:
			return
		}
	}
}

// reqCtx bounds one etcd request by the store's request timeout.
func (s *Store) reqCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.timeout)
}

// backoff is exponential backoff with jitter for retries against etcd.
type backoff struct {
	base, max time.Duration
	n         int
}

func newBackoff() backoff { return backoff{base: 50 * time.Millisecond, max: time.Second} }

// next returns the next wait: base·2ⁿ capped at max, jittered to
// [d/2, d).
func (b *backoff) next() time.Duration {
	d := b.base << min(b.n, 20)
	if d > b.max || d <= 0 {
		d = b.max
	}
	b.n++
	return d/2 + rand.N(d/2+1)
}

func (b *backoff) reset() { b.n = 0 }

// sleepCtx waits d, or less if ctx or stop ends first; it reports whether
// the full wait elapsed.
func sleepCtx(ctx context.Context, d time.Duration, stop <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	case <-stop:
		return false
	}
}
