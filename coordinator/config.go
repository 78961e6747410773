package coordinator

import (
	"context"

	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Config configures a coordinator. Field comments name the flag of
// `expertmesh serve` / `expertmesh coordinator` that sets them.
type Config struct {
	// ModelDir is the checkpoint directory (--model): config.json,
	// generation_config.json and, optionally, tokenizer.json. The
	// coordinator reads no weights.
	ModelDir string
	// ModelName is the id /v1/models reports and requests may name
	// (--model-name); empty means the base name of ModelDir.
	ModelName string
	// Addr is the HTTP listen address (--addr); ":0" picks a free port.
	Addr string
	// StepTokenBudget bounds the tokens one step sends to one attention
	// node (--step-tokens). Every running decode contributes one token;
	// the rest of the budget goes to prompt chunks, so a long prompt is
	// prefilled over several steps and the decodes sharing its node keep
	// a bounded step time.
	StepTokenBudget int
	// MaxRunningPerNode bounds the sequences one node runs at once
	// (--max-running). It must be below StepTokenBudget so that a step
	// always has room for a prompt chunk and prefill cannot starve.
	MaxRunningPerNode int
	// MaxWaiting bounds requests admitted but not yet placed on a node
	// (--max-waiting); beyond it requests get 429 with Retry-After.
	MaxWaiting int
	// RetryAfter is the Retry-After a 429 carries (--retry-after).
	RetryAfter time.Duration
	// RequestTimeout bounds one request end to end (--request-timeout);
	// a request's own "timeout" field (seconds) may shorten it. 0 means
	// no coordinator-wide limit.
	RequestTimeout time.Duration
	// StepTimeout bounds one node step (--step-timeout); a node that does
	// not answer in time is treated as failed and its requests get 503.
	StepTimeout time.Duration
	// NodeWait is how long requests wait for an attention node while none
	// is usable (--node-wait): after the last one left (its lease lapsed
	// and it re-registers, or it restarts) and after the coordinator
	// starts. Sequences of a node that left are rebuilt on the one that
	// comes; after NodeWait with none, waiting requests fail with 503 and
	// new ones get 503 at once. 0: at once.
	NodeWait time.Duration
	// DefaultMaxTokens is max_tokens when a request omits it.
	DefaultMaxTokens int
	// Logger receives node up/down transitions (nil: slog.Default()).
	Logger *slog.Logger
	// Epoch is the coordinator's epoch from the control plane (0 without
	// one). Every step and Info carries it so attention nodes drop what
	// older coordinators left; sequence ids carry it in their high 32 bits
	// so they are unique across coordinator lifetimes.
	Epoch uint64
	// Cluster, if set, supplies the control plane's view (expert
	// placement, members) for GET /v1/cluster.
	Cluster func(ctx context.Context) (any, error)
	// Collectors are registered beside the coordinator's own metrics on
	// its /metrics (the placement controller's, for one).
	Collectors []prometheus.Collector
}

// DefaultConfig returns a configuration for one machine.
func DefaultConfig() Config {
	return Config{
		Addr:              "127.0.0.1:8000",
		StepTokenBudget:   512,
		MaxRunningPerNode: 256,
		MaxWaiting:        1024,
		RetryAfter:        time.Second,
		RequestTimeout:    10 * time.Minute,
		StepTimeout:       2 * time.Minute,
		NodeWait:          30 * time.Second,
		DefaultMaxTokens:  16,
	}
}

// Validate names the flag of the first bad field.
func (c Config) Validate() error {
	switch {
	case c.ModelDir == "":
		return fmt.Errorf("--model is required")
	case c.Addr == "":
		return fmt.Errorf("--addr is required")
	case c.StepTokenBudget < 2:
		return fmt.Errorf("--step-tokens must be >= 2, got %d", c.StepTokenBudget)
	case c.MaxRunningPerNode < 1:
		return fmt.Errorf("--max-running must be >= 1, got %d", c.MaxRunningPerNode)
	case c.MaxRunningPerNode >= c.StepTokenBudget:
		return fmt.Errorf("--max-running (%d) must be below --step-tokens (%d) so prompts always get part of a step", c.MaxRunningPerNode, c.StepTokenBudget)
	case c.MaxWaiting < 0:
		return fmt.Errorf("--max-waiting must be >= 0, got %d", c.MaxWaiting)
	case c.RetryAfter < 0:
		return fmt.Errorf("--retry-after must be >= 0, got %v", c.RetryAfter)
	case c.RequestTimeout < 0:
		return fmt.Errorf("--request-timeout must be >= 0, got %v", c.RequestTimeout)
	case c.NodeWait < 0:
		return fmt.Errorf("--node-wait must be >= 0, got %v", c.NodeWait)
	case c.StepTimeout <= 0:
		return fmt.Errorf("--step-timeout must be > 0, got %v", c.StepTimeout)
	case c.DefaultMaxTokens < 0:
		return fmt.Errorf("default max_tokens must be >= 0, got %d", c.DefaultMaxTokens)
	case c.Epoch >= 1<<31:
		return fmt.Errorf("epoch %d is too large to prefix sequence ids", c.Epoch)
	}
	return nil
}
