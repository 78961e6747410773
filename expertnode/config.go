package expertnode

import (
	"errors"
	"fmt"
	"log/slog"

	"go.opentelemetry.io/otel/trace"

	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
)

// DefaultMaxRows bounds the rows of one dispatch. 8192 rows cover a large
// prefill chunk at V3's hidden size (8192 × 7168 × 4 B = 235 MB, inside
// rpc.DefaultMaxMsgSize) while refusing a request that would make the node
// allocate without limit.
const DefaultMaxRows = 8192

// Config is everything an expert node needs to start. Build it with
// DefaultConfig and override fields; Validate's errors name the flag.
type Config struct {
	// ModelDir is the checkpoint directory in HF layout (--model).
	ModelDir string
	// NodeID names the node in Status and logs (--node-id); empty means
	// "expert@" + the actual listen address.
	NodeID string
	// ListenAddr is the gRPC listen address (--listen); port 0 picks a
	// free port, reported by Node.Addr.
	ListenAddr string
	// Experts is the initial held set (--experts) in the one grammar of
	// placement.ParseSet: "all", "" (none: wait for Hold or Load), "0-53"
	// (those experts of every MoE layer) or "1:0-53,2:54-107" (per layer).
	// A managed node usually starts with "" and holds what the control
	// plane's placement assigns it.
	Experts string
	// Managed says the node's placement comes from the control plane
	// (etcd), which drives it through Hold and Release: the Load and Drop
	// RPCs are then refused with FAILED_PRECONDITION, so that nobody who
	// merely reaches the port can change what the node holds.
	Managed bool
	// Threads is the compute threads of the node's kernel pool (--threads);
	// 0 means GOMAXPROCS.
	Threads int
	// MaxRows bounds the rows of one dispatch request (--max-rows).
	MaxRows int
	// Weights says where compute reads held experts from (--weights):
	// resident (each held expert copied into huge-page memory when it is
	// loaded, freed when dropped), mmap (the checkpoint's page cache), or
	// auto (the zero value: resident when the experts a start, Hold or
	// Load adds take at most half of the available memory).
	Weights model.Residency
	// Logger receives start/stop and recovered-panic logs; nil means
	// slog.Default().
	Logger *slog.Logger
	// TracerProvider receives the gRPC server spans and one
	// "expert.compute" span per dispatch; nil means the global provider
	// (a no-op until the process installs one).
	TracerProvider trace.TracerProvider
}

// DefaultConfig holds every expert of the model and listens on a free
// loopback port.
func DefaultConfig() Config {
	return Config{
		ListenAddr: "127.0.0.1:0",
		Experts:    "all",
		MaxRows:    DefaultMaxRows,
	}
}

// Validate checks what can be checked without the model: the expert spec's
// syntax is checked here (placement.CheckSyntax), its ranges against the
// model at Start (placement.ParseSet).
func (c *Config) Validate() error {
	if c.ModelDir == "" {
		return errors.New("--model is required")
	}
	if c.ListenAddr == "" {
		return errors.New("--listen is required (host:port; port 0 picks one)")
	}
	if c.Threads < 0 {
		return fmt.Errorf("--threads %d: want >= 0 (0: all cores)", c.Threads)
	}
	if c.MaxRows < 1 {
		return fmt.Errorf("--max-rows %d: want >= 1", c.MaxRows)
	}
	if err := placement.CheckSyntax(c.Experts); err != nil {
		return fmt.Errorf("--experts: %w", err)
	}
	if _, err := model.ParseResidency(string(c.Weights)); err != nil {
		return err
	}
	return nil
}
