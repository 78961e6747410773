package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/expertmesh/expertmesh/controlplane"
)

// runPlacement is `expertmesh placement show|drain ID|rebalance`: the
// cluster's expert placement, read and steered through etcd.
func runPlacement(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		fmt.Fprintln(stderr, "usage: expertmesh placement show|drain NODE|rebalance --etcd HOST:PORT --model DIR [--cluster NAME]")
		return errUsage
	}
	verb, args := args[0], args[1:]
	var target string
	if verb == "drain" {
		if len(args) == 0 || strings.HasPrefix(args[0], "-") {
			fmt.Fprintln(stderr, "usage: expertmesh placement drain NODE --etcd HOST:PORT")
			return errUsage
		}
		target, args = args[0], args[1:]
	}
	fs := newFlags("placement "+verb, stderr)
	cp := addControlPlaneFlags(fs)
	modelDir := fs.String("model", "", "checkpoint directory (show: to read the stored placement tables)")
	asJSON := fs.Bool("json", false, "show: print the status as JSON (what the coordinator's /v1/cluster carries)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if !cp.enabled() {
		return fmt.Errorf("--etcd is required")
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	store, err := cp.connect(ctx, nil)
	if err != nil {
		return err
	}
	defer store.Close()
	switch verb {
	case "drain":
		if err := controlplane.RequestDrain(ctx, store, target); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "drain of %s requested: its experts move to the other nodes, then it stops\n", target)
		return nil
	case "rebalance":
		if err := controlplane.RequestRebalance(ctx, store); err != nil {
			return err
		}
		fmt.Fprintln(stdout, "rebalance requested")
		return nil
	case "show":
		if *modelDir == "" {
			return fmt.Errorf("--model is required (the stored tables are read against its shape)")
		}
		shape, _, err := shapeOf(*modelDir)
		if err != nil {
			return err
		}
		st, err := controlplane.Show(ctx, store, shape)
		if err != nil {
			return err
		}
		if *asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(st)
		}
		printStatus(stdout, st)
		return nil
	}
	fmt.Fprintf(stderr, "expertmesh placement: unknown verb %q (want show, drain or rebalance)\n", verb)
	return errUsage
}

// printStatus renders a cluster status as a table, one node per line.
func printStatus(w io.Writer, st controlplane.ClusterStatus) {
	model := "(none registered)"
	if st.Model != nil {
		model = st.Model.String()
	}
	fmt.Fprintf(w, "cluster %s  model %s  coordinator epoch %d\n", st.Cluster, model, st.Epoch)
	fmt.Fprintf(w, "placement: active version %d, target %d, stored %v\n\n", st.Active, st.Target, st.Versions)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tROLE\tADDRESS\tSTATE\tEXPERTS\tSHARE\tREADY\tTARGET\tDETAIL")
	for _, n := range st.Nodes {
		addr := n.Addr
		if n.HTTPAddr != "" {
			addr = n.HTTPAddr
		}
		state := string(n.State)
		if n.DrainRequested {
			state += " (drain requested)"
		}
		detail := ""
		switch n.Role {
		case controlplane.RoleExpert:
			detail = n.ExpertSpec
			if len(detail) > 60 {
				detail = detail[:57] + "..."
			}
		case controlplane.RoleAttn:
			if n.InUse != nil {
				detail = fmt.Sprintf("versions in use %d..%d", n.InUse.Oldest, n.InUse.Newest)
			}
		case controlplane.RoleCoordinator:
			detail = fmt.Sprintf("epoch %d", n.Epoch)
		}
		experts, share, ready, target := "-", "-", "-", "-"
		if n.Role == controlplane.RoleExpert {
			experts, share = fmt.Sprint(n.Experts), fmt.Sprintf("%.1f%%", 100*n.Share)
			ready, target = fmt.Sprint(n.Ready), fmt.Sprint(n.TargetExperts)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.ID, n.Role, addr, state, experts, share, ready, target, detail)
	}
	tw.Flush()
}
