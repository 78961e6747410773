// Package cli implements expertmesh's subcommands. Each subcommand parses
// its own flags into a config struct and calls into the role packages.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
)

type command struct {
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() map[string]command {
	return map[string]command{
		"gen-model":     {"write a random-weight checkpoint of a preset in HF layout", runGenModel},
		"generate":      {"generate tokens from a checkpoint in one process", runGenerate},
		"serve":         {"coordinator, attention node and all experts in one process (no gRPC)", runServe},
		"coordinator":   {"run the OpenAI-compatible coordinator over attention nodes (--attn)", runCoordinator},
		"expert":        {"run an expert node serving a shard of the routed experts over gRPC", runExpert},
		"attn":          {"run an attention node (latent cache, layer loop) serving gRPC", runAttn},
		"up":            {"start a local cluster: embedded etcd, coordinator, attention and expert nodes as supervised processes on loopback", runUp},
		"etcd":          {"run an embedded etcd member for clusters that have none (single member or a static cluster)", runEtcd},
		"placement":     {"show the expert placement, drain an expert node, or rebalance (through etcd)", runPlacement},
		"bench-kernels": {"measure read bandwidth, FMA peak and each kernel's fraction of them", runBenchKernels},
		"bench":         {"load an OpenAI-compatible server (vLLM bench serve's flags and JSON); compare saved runs", runBenchServe},
		"plan":          {"predict step time, tokens/s, the micro-batches that hide the hop and memory per node of a model on a cluster", runPlan},
		"tokenize":      {"print the model tokenizer's ids for a text as JSON", runTokenize},
		"detokenize":    {"print the text of token ids", runDetokenize},
	}
}

// errUsage means the flags were wrong; the FlagSet already said why.
var errUsage = errors.New("usage")

// Main runs the subcommand named by args[0] and returns the exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	cmds := commands()
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr, cmds)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	c, ok := cmds[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "expertmesh: unknown command %q\n", args[0])
		usage(stderr, cmds)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := c.run(ctx, args[1:], stdout, stderr); err != nil {
		if errors.Is(err, errUsage) || errors.Is(err, flag.ErrHelp) {
			return 2
		}
		fmt.Fprintf(stderr, "expertmesh %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

func usage(w io.Writer, cmds map[string]command) {
	fmt.Fprintln(w, "usage: expertmesh <command> [flags]\n\ncommands:")
	var names []string
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-14s %s\n", n, cmds[n].summary)
	}
}

// newFlags returns a FlagSet that reports errors instead of exiting.
func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("expertmesh "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "%s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return errUsage
	}
	return nil
}

// parseIDs reads "1,2,3" into token ids.
func parseIDs(s string) ([]int, error) {
	var ids []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		var v int
		if _, err := fmt.Sscan(f, &v); err != nil {
			return nil, fmt.Errorf("token id %q is not an integer", f)
		}
		ids = append(ids, v)
	}
	return ids, nil
}
