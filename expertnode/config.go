package expertnode

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"

	"go.opentelemetry.io/otel/trace"

	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// DefaultMaxRows bounds the rows of one dispatch. 8192 rows cover a large
// prefill chunk at V3's hidden size (8192 × 7168 × 4 B = 235 MB, inside
// rpc.DefaultMaxMsgSize) while refusing a request that would make the node
// allocate without limit.
const DefaultMaxRows = 8192

// ErrExpertSpec marks an --experts value that does not parse or names
// experts the model does not have.
var ErrExpertSpec = errors.New("expert spec")

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
	// Experts is the initial held set (--experts), see ParseExpertSpec:
	// "all", "" (none: wait for Load), "0-53" (those experts of every MoE
	// layer) or "1:0-53,2:54-107" (per layer).
	Experts string
	// Threads is the compute threads of the node's kernel pool (--threads);
	// 0 means GOMAXPROCS.
	Threads int
	// MaxRows bounds the rows of one dispatch request (--max-rows).
	MaxRows int
	// Weights says where compute reads held experts from (--weights):
	// resident (each held expert copied into huge-page memory when it is
	// loaded, freed when dropped), mmap (the checkpoint's page cache), or
	// auto (the zero value: resident when the experts a start or Load adds
	// take at most half of the available memory).
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
// syntax is checked here, its ranges against the model at Start.
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
	if _, err := parseSpec(c.Experts); err != nil {
		return fmt.Errorf("--experts: %w", err)
	}
	if _, err := model.ParseResidency(string(c.Weights)); err != nil {
		return err
	}
	return nil
}

// specEntry is one comma-separated part of a spec: experts [first, last]
// of layers [layerLo, layerHi], or of every MoE layer when allLayers.
type specEntry struct {
	allLayers        bool
	layerLo, layerHi int
	first, last      int
	allExperts       bool
}

// parseSpec checks a spec's syntax. Grammar:
//
//	spec   = "" | "none" | "all" | entry { "," entry }
//	entry  = [ range ":" ] ( range | "all" )    // layers ":" experts
//	range  = N | N "-" M                         // inclusive, N <= M
func parseSpec(s string) ([]specEntry, error) {
	s = strings.TrimSpace(s)
	switch s {
	case "", "none":
		return nil, nil
	case "all":
		return []specEntry{{allLayers: true, allExperts: true}}, nil
	}
	var out []specEntry
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			return nil, fmt.Errorf("%w %q: empty entry", ErrExpertSpec, s)
		}
		e := specEntry{allLayers: true}
		experts := part
		if layers, rest, ok := strings.Cut(part, ":"); ok {
			lo, hi, err := parseRange(layers)
			if err != nil {
				return nil, fmt.Errorf("%w %q: layers of %q: %v", ErrExpertSpec, s, part, err)
			}
			e.allLayers, e.layerLo, e.layerHi = false, lo, hi
			experts = rest
		}
		if strings.TrimSpace(experts) == "all" {
			e.allExperts = true
		} else {
			lo, hi, err := parseRange(experts)
			if err != nil {
				return nil, fmt.Errorf("%w %q: experts of %q: %v", ErrExpertSpec, s, part, err)
			}
			e.first, e.last = lo, hi
		}
		out = append(out, e)
	}
	return out, nil
}

// maxSpecIndex keeps parsed numbers far from overflow; no model has a
// million layers or experts.
const maxSpecIndex = 1 << 20

func parseRange(s string) (lo, hi int, err error) {
	s = strings.TrimSpace(s)
	a, b, isRange := strings.Cut(s, "-")
	if lo, err = parseIndex(a); err != nil {
		return 0, 0, err
	}
	hi = lo
	if isRange {
		if hi, err = parseIndex(b); err != nil {
			return 0, 0, err
		}
	}
	if lo > hi {
		return 0, 0, fmt.Errorf("range %q is empty (%d > %d)", s, lo, hi)
	}
	return lo, hi, nil
}

func parseIndex(s string) (int, error) {
	s = strings.TrimSpace(s)
	v, err := strconv.Atoi(s)
	if err != nil || v < 0 || v > maxSpecIndex {
		return 0, fmt.Errorf("%q is not an index (0..%d)", s, maxSpecIndex)
	}
	return v, nil
}

// ParseExpertSpec resolves a spec (see Config.Experts) against a model: it
// returns a predicate over (layer, expert) and the held set as sorted,
// merged ranges, one or more per MoE layer. A spec naming a dense layer, a
// layer past the model or an expert past n_routed_experts is an error: a
// typo in a placement must not silently hold nothing.
func ParseExpertSpec(s string, cfg *model.Config) (func(layer, expert int) bool, []*meshpb.ExpertRange, error) {
	if cfg == nil {
		return nil, nil, fmt.Errorf("%w: no model config", ErrExpertSpec)
	}
	held, err := resolveSpec(s, cfg)
	if err != nil {
		return nil, nil, err
	}
	return func(layer, expert int) bool {
		return layer >= 0 && layer < len(held) && expert >= 0 && expert < len(held[layer]) && held[layer][expert]
	}, heldRanges(held), nil
}

// resolveSpec returns held[layer][expert]; dense layers have nil rows.
func resolveSpec(s string, cfg *model.Config) ([][]bool, error) {
	entries, err := parseSpec(s)
	if err != nil {
		return nil, err
	}
	held := emptyHeld(cfg)
	ne := cfg.NumExperts()
	for _, e := range entries {
		lo, hi := 0, cfg.NumHiddenLayers-1
		if !e.allLayers {
			lo, hi = e.layerLo, e.layerHi
			if hi >= cfg.NumHiddenLayers {
				return nil, fmt.Errorf("%w %q: layer %d, model has %d layers", ErrExpertSpec, s, hi, cfg.NumHiddenLayers)
			}
			for l := lo; l <= hi; l++ {
				if !cfg.IsMoELayer(l) {
					return nil, fmt.Errorf("%w %q: layer %d is dense (no routed experts)", ErrExpertSpec, s, l)
				}
			}
		}
		first, last := e.first, e.last
		if e.allExperts {
			first, last = 0, ne-1
		}
		if last >= ne {
			return nil, fmt.Errorf("%w %q: expert %d, model has %d routed experts", ErrExpertSpec, s, last, ne)
		}
		for l := lo; l <= hi; l++ {
			for x := first; x <= last && held[l] != nil; x++ {
				held[l][x] = true
			}
		}
	}
	return held, nil
}

func emptyHeld(cfg *model.Config) [][]bool {
	held := make([][]bool, cfg.NumHiddenLayers)
	for l := range held {
		if cfg.IsMoELayer(l) {
			held[l] = make([]bool, cfg.NumExperts())
		}
	}
	return held
}

// heldRanges compresses a held set into maximal runs, by layer then expert.
func heldRanges(held [][]bool) []*meshpb.ExpertRange {
	var out []*meshpb.ExpertRange
	for l, row := range held {
		for x := 0; x < len(row); {
			if !row[x] {
				x++
				continue
			}
			y := x
			for y+1 < len(row) && row[y+1] {
				y++
			}
			out = append(out, &meshpb.ExpertRange{Layer: uint32(l), First: uint32(x), Last: uint32(y)})
			x = y + 1
		}
	}
	return out
}
