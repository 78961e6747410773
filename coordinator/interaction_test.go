package coordinator

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	meshpb "github.com/expertmesh/expertmesh/proto"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/scheduler golden files")

// TestSchedulerInteractions replays the scripts in testdata/scheduler
// against the scheduler and compares the whole transcript with the file.
// Lines starting with "> " are commands; the lines after one are its
// output. Commands:
//
//	nodes T/F/B ...          node i has T blocks, F free, block size B
//	budget B S               step token budget B, S seats per node
//	prefix I                 node I does prefix caching (steps of at most
//	                         64 tokens)
//	up I T/F/B               node I answered Info again (F is ignored: the
//	                         fake node reports what it really has free)
//	add ID prompt=N max=M [min=K] [stop=a,b] [echo] [leader=ID] [p=S]
//	                         a request arrives (checked, queued); p=S makes
//	                         its prompt tokens start at S (equal S, equal
//	                         prompts)
//	admit                    place waiting requests: "ID->node"
//	step I                   plan node I's step (see fmtStep)
//	answer I [tok=T] [ID=T ...] [code:ID=C ...] [drop:ID ...] [cached:ID=N ...]
//	                         the node answers
//	run I N                  N rounds of "step I", "answer I" (every
//	                         sample tok=1) and "admit", as the driver
//	                         does, one line per step: "step | updates |
//	                         placed"
//	fail I                   node I's step failed as a whole
//	cancel ID                the client went away
//	state                    waiting ids, then per node free blocks and
//	                         running ids (with positions held/blocks
//	                         claimed), then the preemption and rebuild
//	                         counts
//
// Run with -update to rewrite the files after a deliberate change, and
// review the diff.
func TestSchedulerInteractions(t *testing.T) {
	files, _ := filepath.Glob("testdata/scheduler/*.txt")
	if len(files) == 0 {
		t.Fatal("no scripts in testdata/scheduler")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			got := runScript(t, string(b))
			if *updateGolden {
				if err := os.WriteFile(f, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			if got != string(b) {
				t.Errorf("transcript differs (run with -update and review the diff):\n--- got\n%s\n--- want\n%s", got, b)
			}
		})
	}
}

func runScript(t *testing.T, script string) string {
	var out strings.Builder
	var s *scheduler
	var fn []*fakeNode
	seqs := map[uint64]*sequence{}
	pending := map[int]*meshpb.StepRequest{}
	emit := func(format string, args ...any) { fmt.Fprintf(&out, format+"\n", args...) }
	report := func(ups []update) {
		for _, u := range ups {
			var parts []string
			if len(u.promptLogprobs) > 0 {
				parts = append(parts, fmt.Sprintf("prompt=%d", len(u.promptLogprobs)))
			}
			if u.sampled {
				parts = append(parts, fmt.Sprintf("tok=%d", u.token))
			}
			if u.finish != "" {
				parts = append(parts, "finish="+u.finish)
			}
			if u.err != nil {
				parts = append(parts, "err="+errName(u.err))
			}
			emit("%d %s", u.seq.id, strings.Join(parts, " "))
		}
	}
	for line := range strings.SplitSeq(script, "\n") {
		cmd, ok := strings.CutPrefix(line, "> ")
		if !ok {
			if strings.HasPrefix(line, "#") {
				emit("%s", line)
			}
			continue
		}
		emit("> %s", cmd)
		f := strings.Fields(cmd)
		arg := func(i int) int {
			v, err := strconv.Atoi(f[i])
			if err != nil {
				t.Fatalf("%q: %v", cmd, err)
			}
			return v
		}
		switch f[0] {
		case "nodes":
			var infos []*meshpb.NodeInfo
			for _, spec := range f[1:] {
				infos = append(infos, parseInfo(t, spec))
			}
			s, fn = testScheduler(schedConfig{budget: 8, maxSeqs: 4}, infos...)
		case "budget":
			s.cfg.budget, s.cfg.maxSeqs = arg(1), arg(2)
		case "prefix":
			// As nodeUp does for a node reporting prefix caching and a
			// step limit of 64 tokens.
			n := s.nodes[arg(1)]
			n.prefixCaching, n.maxStepTokens, n.view = true, 64, newPrefixView(n.totalBlocks)
		case "up":
			// The node answers Info with what it really has free.
			in := parseInfo(t, f[2])
			in.FreeBlocks = uint32(fn[arg(1)].free())
			s.nodeUp(arg(1), in)
		case "add":
			q := &sequence{id: uint64(arg(1)), logprobs: -1, sampling: &meshpb.SamplingParams{}}
			from := 100
			for _, kv := range f[2:] {
				if k, v, _ := strings.Cut(kv, "="); k == "p" {
					from, _ = strconv.Atoi(v)
				}
			}
			for _, kv := range f[2:] {
				k, v, _ := strings.Cut(kv, "=")
				switch k {
				case "prompt":
					n, _ := strconv.Atoi(v)
					for i := range n {
						q.prompt = append(q.prompt, from+i)
					}
				case "max":
					q.maxTokens, _ = strconv.Atoi(v)
				case "min":
					q.minTokens, _ = strconv.Atoi(v)
				case "leader":
					id, _ := strconv.Atoi(v)
					q.leader = seqs[uint64(id)]
				case "stop":
					for _, x := range strings.Split(v, ",") {
						id, _ := strconv.Atoi(x)
						q.stopIDs = append(q.stopIDs, id)
					}
				case "echo":
					q.echoLogprobs, q.logprobs = true, 0
				}
			}
			if err := s.check(q); err != nil {
				emit("refused: %s", errName(err))
				break
			}
			seqs[q.id] = q
			s.enqueue(q)
		case "admit":
			before := slices.Clone(s.waiting)
			_, failed := s.admit()
			var placed []string
			for _, q := range before {
				if q.node >= 0 {
					placed = append(placed, fmt.Sprintf("%d->%d", q.id, q.node))
				}
			}
			slices.Sort(placed)
			if len(placed) == 0 {
				placed = []string{"(none placed)"}
			}
			emit("%s", strings.Join(placed, " "))
			report(failed)
		case "step":
			req := s.plan(arg(1))
			pending[arg(1)] = req
			emit("%s", fmtStep(req))
		case "answer":
			i := arg(1)
			req := pending[i]
			if req == nil {
				t.Fatalf("%q: no step in flight", cmd)
			}
			delete(pending, i)
			def := 1
			tok := map[uint64]int{}
			code := map[uint64]int{}
			cached := map[uint64]int{}
			drop := map[uint64]bool{}
			for _, kv := range f[2:] {
				k, v, _ := strings.Cut(kv, "=")
				n, _ := strconv.Atoi(v)
				switch {
				case k == "tok":
					def = n
				case strings.HasPrefix(k, "code:"):
					id, _ := strconv.Atoi(k[5:])
					code[uint64(id)] = n
				case strings.HasPrefix(k, "cached:"):
					id, _ := strconv.Atoi(k[7:])
					cached[uint64(id)] = n
				case strings.HasPrefix(k, "drop:"):
					id, _ := strconv.Atoi(k[5:])
					drop[uint64(id)] = true
				default:
					id, _ := strconv.Atoi(k)
					tok[uint64(id)] = n
				}
			}
			resp := fn[i].answerRefusing(req, func(id uint64) int {
				if v, ok := tok[id]; ok {
					return v
				}
				return def
			}, func(id uint64) int32 {
				if c := code[id]; c == int(codes.ResourceExhausted) {
					return int32(c) // not applied, as a real node does
				}
				return 0
			})
			var kept []*meshpb.SeqResult
			for j, r := range resp.Results {
				w := req.Work[j]
				if w.EchoLogprobs {
					for range w.Tokens {
						r.PromptLogprobs = append(r.PromptLogprobs, &meshpb.TokenLogprob{})
					}
				}
				if c, ok := code[r.SeqId]; ok {
					r.Code, r.Sampled = int32(c), false
				}
				r.CachedTokens = uint32(cached[r.SeqId])
				if !drop[r.SeqId] {
					kept = append(kept, r)
				}
			}
			resp.Results = kept
			report(s.apply(i, resp))
		case "run":
			i := arg(1)
			for range arg(2) {
				req := s.plan(i)
				if req == nil {
					emit("-")
					break
				}
				var ups []string
				for _, u := range s.apply(i, fn[i].answer(req, func(uint64) int { return 1 })) {
					switch {
					case u.err != nil:
						ups = append(ups, fmt.Sprintf("%d:err=%s", u.seq.id, errName(u.err)))
					case u.finish != "":
						ups = append(ups, fmt.Sprintf("%d:%s", u.seq.id, u.finish))
					}
				}
				line := fmtStep(req)
				if len(ups) > 0 {
					line += " | " + strings.Join(ups, " ")
				}
				before := slices.Clone(s.waiting)
				if _, failed := s.admit(); len(failed) > 0 {
					t.Fatalf("%q: admit failed %d", cmd, len(failed))
				}
				var placed []string
				for _, q := range before {
					if q.node >= 0 {
						placed = append(placed, fmt.Sprintf("%d->%d", q.id, q.node))
					}
				}
				if len(placed) > 0 {
					line += " | placed " + strings.Join(placed, " ")
				}
				emit("%s", line)
			}
		case "fail":
			delete(pending, arg(1))
			report(s.fail(arg(1), ErrNodeFailed))
		case "cancel":
			q := seqs[uint64(arg(1))]
			emit("release via node %d", s.cancel(q))
		case "state":
			var w []string
			for _, q := range s.waiting {
				w = append(w, fmt.Sprint(q.id))
			}
			emit("waiting [%s]", strings.Join(w, " "))
			for i, n := range s.nodes {
				var r []string
				for _, q := range n.running {
					r = append(r, fmt.Sprintf("%d(%d/%d)", q.id, q.sent, q.claim))
				}
				emit("node %d up=%v free=%d running [%s]", i, n.up, n.freeBlocks, strings.Join(r, " "))
			}
			emit("preempted=%d rebuilt=%d", s.preempted, s.rebuilt)
		default:
			t.Fatalf("unknown command %q", cmd)
		}
	}
	return strings.TrimRight(out.String(), "\n") + "\n"
}

func parseInfo(t *testing.T, spec string) *meshpb.NodeInfo {
	var total, free, bs int
	if _, err := fmt.Sscanf(spec, "%d/%d/%d", &total, &free, &bs); err != nil {
		t.Fatalf("node spec %q: %v", spec, err)
	}
	return info(total, free, bs)
}

func errName(err error) string {
	var nse *NodeSeqError
	switch {
	case errors.As(err, &nse):
		return nse.Code.String()
	case errors.Is(err, ErrNodeFailed):
		return "node-failed"
	case errors.Is(err, ErrNoNodes):
		return "no-nodes"
	case errors.Is(err, ErrTooLong):
		return "too-long"
	}
	return err.Error()
}
