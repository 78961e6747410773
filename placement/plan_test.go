package placement

import (
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/plan with what Plan does now (review the diff)")

// TestPlanGolden runs the scripts under testdata/plan. A script is a
// series of directives, each
//
//	command key=value ...
//	input lines (optional)
//	----
//	expected output (up to a blank line)
//
// with '#' comment lines and blank lines between them. Commands:
//
//	shape layers=N experts=E [groups=G topk-group=K] [moe=A-B]
//	load uniform | load hot=E | load zipf s=S seed=N | load + "L: v v ..." rows ("all: ..." for every MoE layer)
//	table name=X + "node=experts" lines: a placement written by hand (ParseSpec)
//	plan nodes=a,b:slots,... [redundant=K] [current=last|X] [version=V]
//
// plan prints its result: moved replicas (and those lost with nodes that
// left), imbalance (and the current placement's), per layer imbalance,
// per node what it holds, and the planned shares of replicated experts
// whose replicas do not split their tokens equally (expert(node=thousandths
// ...)), consecutive layers that agree printed once. Run with -update to
// rewrite the expected outputs.
func TestPlanGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/plan/*.txt")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no golden files")
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".txt"), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			ds, err := parseScript(string(data))
			if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			var s script
			var out strings.Builder
			for _, d := range ds {
				got := s.run(t, d)
				if !*update && got != d.want {
					t.Errorf("%s:%d: %s\ngot:\n%s\nwant:\n%s", f, d.line, d.cmd, got, d.want)
				}
				out.WriteString(d.prefix)
				out.WriteString(d.cmd + "\n")
				for _, in := range d.input {
					out.WriteString(in + "\n")
				}
				out.WriteString("----\n" + got + "\n")
			}
			if *update {
				if err := os.WriteFile(f, []byte(out.String()), 0o644); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

type directive struct {
	prefix string // comments and blank lines before it, verbatim
	line   int
	cmd    string
	input  []string
	want   string // expected output, lines joined with "\n" and ending in one
}

func parseScript(text string) ([]directive, error) {
	lines := strings.Split(text, "\n")
	var ds []directive
	var prefix strings.Builder
	for i := 0; i < len(lines); i++ {
		ln := lines[i]
		if strings.TrimSpace(ln) == "" || strings.HasPrefix(ln, "#") {
			if i < len(lines)-1 || ln != "" {
				prefix.WriteString(ln + "\n")
			}
			continue
		}
		d := directive{prefix: prefix.String(), line: i + 1, cmd: ln}
		prefix.Reset()
		for i++; i < len(lines) && lines[i] != "----"; i++ {
			d.input = append(d.input, lines[i])
		}
		if i == len(lines) {
			return nil, fmt.Errorf("line %d: %q has no ----", d.line, d.cmd)
		}
		var want strings.Builder
		for i++; i < len(lines) && lines[i] != ""; i++ {
			want.WriteString(lines[i] + "\n")
		}
		d.want = want.String()
		ds = append(ds, d)
	}
	return ds, nil
}

// script is the state a golden file builds up.
type script struct {
	shape  Shape
	load   [][]float64
	tables map[string]*Table
	nodes  map[string][]Node // what each table was planned for
}

func (s *script) run(t *testing.T, d directive) string {
	t.Helper()
	fields := strings.Fields(d.cmd)
	args := map[string]string{}
	var bare []string
	for _, f := range fields[1:] {
		if k, v, ok := strings.Cut(f, "="); ok {
			args[k] = v
		} else {
			bare = append(bare, f)
		}
	}
	num := func(k string, def int) int {
		v, ok := args[k]
		if !ok {
			return def
		}
		n, err := strconv.Atoi(v)
		if err != nil {
			t.Fatalf("line %d: %s=%q: %v", d.line, k, v, err)
		}
		return n
	}
	if s.tables == nil {
		s.tables, s.nodes = map[string]*Table{}, map[string][]Node{}
	}
	switch fields[0] {
	case "shape":
		sh := Shape{Layers: num("layers", 1), Experts: num("experts", 0), Groups: num("groups", 1), TopKGroup: num("topk-group", 0)}
		lo, hi := 0, sh.Layers-1
		if m, ok := args["moe"]; ok {
			a, b, _ := strings.Cut(m, "-")
			lo, _ = strconv.Atoi(a)
			hi = lo
			if b != "" {
				hi, _ = strconv.Atoi(b)
			}
		}
		for l := lo; l <= hi; l++ {
			sh.MoELayers = append(sh.MoELayers, l)
		}
		s.shape, s.load = sh, nil
		return ""
	case "load":
		s.load = s.makeLoad(t, d, bare, args)
		return ""
	case "table":
		tb, err := ParseSpec(s.shape, strings.Join(d.input, ";"))
		if err != nil {
			return "error: " + err.Error() + "\n"
		}
		var nodes []Node
		for _, id := range tb.Nodes() {
			nodes = append(nodes, Node{ID: id})
		}
		s.tables[args["name"]], s.nodes[args["name"]] = tb, nodes
		return describe(tb, nil, nodes, s.load)
	case "plan":
		in := PlanInput{Shape: s.shape, Load: s.load, Redundant: num("redundant", 0), Version: uint64(num("version", 1))}
		for _, n := range strings.Split(args["nodes"], ",") {
			id, slots, _ := strings.Cut(n, ":")
			k := 0
			if slots != "" {
				var err error
				if k, err = strconv.Atoi(slots); err != nil {
					t.Fatalf("line %d: node %q: %v", d.line, n, err)
				}
			}
			in.Nodes = append(in.Nodes, Node{ID: id, Slots: k})
		}
		var cur *Table
		if c, ok := args["current"]; ok {
			if cur = s.tables[c]; cur == nil {
				t.Fatalf("line %d: no table %q", d.line, c)
			}
			in.Current = cur
		}
		tb, err := Plan(in)
		if err != nil {
			if !errors.Is(err, ErrPlacement) {
				t.Errorf("line %d: error %v does not wrap ErrPlacement", d.line, err)
			}
			return "error: " + err.Error() + "\n"
		}
		checkPlan(t, in, tb)
		s.tables["last"], s.nodes["last"] = tb, in.Nodes
		if name, ok := args["save"]; ok {
			s.tables[name], s.nodes[name] = tb, in.Nodes
		}
		return describe(tb, cur, in.Nodes, s.load)
	}
	t.Fatalf("line %d: unknown command %q", d.line, fields[0])
	return ""
}

func (s *script) makeLoad(t *testing.T, d directive, bare []string, args map[string]string) [][]float64 {
	sh := s.shape
	load := make([][]float64, sh.Layers)
	every := func(row []float64) {
		for _, l := range sh.MoELayers {
			load[l] = slices.Clone(row)
		}
	}
	switch {
	case slices.Contains(bare, "uniform"):
		return nil
	case args["hot"] != "":
		e, _ := strconv.Atoi(args["hot"])
		row := make([]float64, sh.Experts)
		row[e] = 1000
		every(row)
	case slices.Contains(bare, "zipf"):
		sv, _ := strconv.ParseFloat(args["s"], 64)
		seed, _ := strconv.ParseUint(args["seed"], 10, 64)
		every(zipfRow(sh.Experts, sv, seed))
	default:
		for _, ln := range d.input {
			l, vals, ok := strings.Cut(ln, ":")
			if !ok {
				t.Fatalf("line %d: load row %q", d.line, ln)
			}
			var row []float64
			for _, f := range strings.Fields(vals) {
				v, err := strconv.ParseFloat(f, 64)
				if err != nil {
					t.Fatalf("line %d: %v", d.line, err)
				}
				row = append(row, v)
			}
			if strings.TrimSpace(l) == "all" {
				every(row)
				continue
			}
			li, err := strconv.Atoi(strings.TrimSpace(l))
			if err != nil {
				t.Fatalf("line %d: %v", d.line, err)
			}
			load[li] = row
		}
	}
	return load
}

// zipfRow is a power-law load (rank r gets 1000/(r+1)^s tokens, rounded)
// over experts in an order shuffled by seed. It uses its own generator
// (splitmix64) so that the golden files never depend on math/rand.
func zipfRow(experts int, s float64, seed uint64) []float64 {
	next := func() uint64 {
		seed += 0x9e3779b97f4a7c15
		z := seed
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
		z = (z ^ (z >> 27)) * 0x94d049bb133111eb
		return z ^ (z >> 31)
	}
	perm := make([]int, experts)
	for i := range perm {
		perm[i] = i
	}
	for i := experts - 1; i > 0; i-- {
		j := int(next() % uint64(i+1))
		perm[i], perm[j] = perm[j], perm[i]
	}
	row := make([]float64, experts)
	for r, e := range perm {
		row[e] = math.Round(1000 / math.Pow(float64(r+1), s))
	}
	return row
}

// describe renders a table for the golden files.
func describe(tb, cur *Table, nodes []Node, load [][]float64) string {
	var b strings.Builder
	sh := tb.Shape()
	replicas := 0
	for _, l := range sh.MoELayers {
		for e := range sh.Experts {
			replicas += len(tb.Replicas(l, e))
		}
	}
	per, mean := Imbalance(tb, load)
	nodeWord := "nodes"
	if len(tb.Nodes()) == 1 {
		nodeWord = "node"
	}
	fmt.Fprintf(&b, "version %d: %d %s hold %d replicas", tb.Version, len(tb.Nodes()), nodeWord, replicas)
	if cur != nil {
		lost := 0
		for _, l := range sh.MoELayers {
			for e := range sh.Experts {
				for _, id := range cur.ReplicaIDs(l, e) {
					if !slices.ContainsFunc(nodes, func(n Node) bool { return n.ID == id && n.Slots >= 0 }) {
						lost++
					}
				}
			}
		}
		fmt.Fprintf(&b, ", moved %d (lost %d)", Moved(cur, tb), lost)
	}
	fmt.Fprintf(&b, "\nimbalance %.4f", mean)
	if cur != nil {
		_, cm := Imbalance(cur, load)
		fmt.Fprintf(&b, " (current %.4f)", cm)
	}
	b.WriteString("\n")
	runs(sh.MoELayers, func(l int) string { return fmt.Sprintf("%.4f", per[l]) }, func(ls, v string) {
		fmt.Fprintf(&b, "  layer %s: %s\n", ls, v)
	})
	var idle []string
	for _, n := range nodes {
		if !tb.Has(n.ID) {
			idle = append(idle, n.ID)
		}
	}
	for _, id := range tb.Nodes() {
		set := tb.Set(id)
		fmt.Fprintf(&b, "%s (%d):", id, set.Len())
		sep := " "
		runs(sh.MoELayers, func(l int) string { return experts(set[l]) }, func(ls, v string) {
			fmt.Fprintf(&b, "%s%s: %s", sep, ls, v)
			sep = " | "
		})
		b.WriteString("\n")
	}
	if len(idle) > 0 {
		fmt.Fprintf(&b, "idle: %s\n", strings.Join(idle, ","))
	}
	// Planned shares where they are not equal: expert, then each
	// replica's node and thousandths.
	runs(sh.MoELayers, func(l int) string {
		var parts []string
		for e := range sh.Experts {
			if !tb.Unequal(l, e) {
				continue
			}
			var rs []string
			for r, id := range tb.ReplicaIDs(l, e) {
				rs = append(rs, fmt.Sprintf("%s=%.0f", id, tb.Share(l, e, r)*ShareUnit))
			}
			parts = append(parts, fmt.Sprintf("%d(%s)", e, strings.Join(rs, " ")))
		}
		return strings.Join(parts, " ")
	}, func(ls, v string) {
		if v != "" {
			fmt.Fprintf(&b, "shares %s: %s\n", ls, v)
		}
	})
	return b.String()
}

// runs calls emit once per run of consecutive layers with the same value.
func runs(layers []int, value func(l int) string, emit func(layers, v string)) {
	for i := 0; i < len(layers); {
		v := value(layers[i])
		j := i
		for j+1 < len(layers) && layers[j+1] == layers[j]+1 && value(layers[j+1]) == v {
			j++
		}
		ls := strconv.Itoa(layers[i])
		if j > i {
			ls += "-" + strconv.Itoa(layers[j])
		}
		emit(ls, v)
		i = j + 1
	}
}

func experts(row []bool) string {
	var parts []string
	for x := 0; x < len(row); x++ {
		if !row[x] {
			continue
		}
		y := x
		for y+1 < len(row) && row[y+1] {
			y++
		}
		if x == y {
			parts = append(parts, strconv.Itoa(x))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", x, y))
		}
		x = y
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ",")
}

// checkPlan checks what every plan must satisfy.
func checkPlan(t *testing.T, in PlanInput, tb *Table) {
	t.Helper()
	if err := tb.Validate(); err != nil {
		t.Errorf("invalid plan: %v", err)
	}
	if tb.Version != in.Version {
		t.Errorf("version %d, want %d", tb.Version, in.Version)
	}
	for _, n := range in.Nodes {
		held := tb.Set(n.ID).Len()
		if n.Slots < 0 && held > 0 || n.Slots > 0 && held > n.Slots {
			t.Errorf("node %s holds %d, slots %d", n.ID, held, n.Slots)
		}
	}
	for _, id := range tb.Nodes() {
		if !slices.ContainsFunc(in.Nodes, func(n Node) bool { return n.ID == id }) {
			t.Errorf("plan names node %s, not among the input's", id)
		}
	}
	sh := in.Shape
	for _, l := range sh.MoELayers {
		total := 0
		for e := range sh.Experts {
			rs := tb.Replicas(l, e)
			total += len(rs)
			if len(slices.Compact(slices.Sorted(slices.Values(rs)))) != len(rs) {
				t.Errorf("layer %d expert %d twice on a node: %v", l, e, rs)
			}
		}
		if total > sh.Experts+in.Redundant {
			t.Errorf("layer %d: %d replicas, at most %d+%d allowed", l, total, sh.Experts, in.Redundant)
		}
	}
}
