package coordinator

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/attnnode"
	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// pacer lets the test hand out steps one at a time: a step runs only
// after a send on allow (or once open is closed).
type pacer struct {
	AttentionNode
	allow chan struct{}
	open  chan struct{}
	ran   chan struct{} // a step finished (capacity large)
}

func newPacer(n AttentionNode) *pacer {
	return &pacer{AttentionNode: n, allow: make(chan struct{}), open: make(chan struct{}), ran: make(chan struct{}, 1<<16)}
}

func (p *pacer) Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error) {
	select {
	case <-p.allow:
	case <-p.open:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	resp, err := p.AttentionNode.Step(ctx, req)
	select {
	case p.ran <- struct{}{}:
	default:
	}
	return resp, err
}

// streamReader follows one streaming completion: its events arrive on
// events, and it ends with done.
type streamReader struct {
	events chan string
	done   chan struct{}
	cancel context.CancelFunc
	status int
}

func openStream(t *testing.T, url string, body map[string]any) *streamReader {
	t.Helper()
	body["stream"] = true
	b, _ := json.Marshal(body)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(b))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	sr := &streamReader{events: make(chan string, 1<<12), done: make(chan struct{}), cancel: cancel, status: resp.StatusCode}
	go func() {
		defer close(sr.done)
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			if d, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
				sr.events <- d
			}
		}
	}()
	return sr
}

// TestNoLockout is issue 13's lockout, scaled down: five streaming
// requests whose prompt + max_tokens each take a fifth of the cache and
// more (reserved up front, only four would run and the fifth, and every
// request behind it, would wait for one of them to finish). Blocks on
// demand run all five at once, and a small request behind them is
// answered while they are still generating. Steps are handed out one at
// a time, so "while" is exact.
func TestNoLockout(t *testing.T) {
	var p *pacer
	cl := startCluster(t, 1, func(c *Config) { c.StepTokenBudget, c.MaxRunningPerNode = 64, 16 },
		func(_ int, n AttentionNode) AttentionNode { p = newPacer(n); return p })
	in, _ := cl.nodes[0].Info(context.Background(), 0)
	capTokens := int(in.TotalBlocks * in.BlockSize)
	big := capTokens/5 + 64
	var streams []*streamReader
	for i := range 5 {
		sr := openStream(t, cl.url+"/v1/completions", map[string]any{"prompt": prompt(8, i), "max_tokens": big, "ignore_eos": true, "temperature": 0})
		if sr.status != 200 {
			t.Fatalf("big request %d: status %d", i, sr.status)
		}
		streams = append(streams, sr)
		t.Cleanup(func() { sr.cancel(); <-sr.done })
	}
	small := make(chan *completionOut, 1)
	go func() {
		_, out := complete(t, cl, map[string]any{"prompt": []int{5, 6, 7}, "max_tokens": 4, "ignore_eos": true, "temperature": 0})
		small <- out
	}()
	firsts := make([]bool, len(streams))
	for steps := 0; ; steps++ {
		if steps == big/2 {
			t.Fatalf("after %d steps the big requests have first tokens %v and the small one no answer: locked out", steps, firsts)
		}
		p.allow <- struct{}{}
		<-p.ran
		for i, sr := range streams {
			select {
			case e := <-sr.events:
				if strings.Contains(e, `"error"`) {
					t.Fatalf("big request %d: %s", i, e)
				}
				firsts[i] = true
			default:
			}
		}
		select {
		case out := <-small:
			if out.Error != nil || len(out.Choices[0].TokenIDs) != 4 {
				t.Fatalf("small request: %+v", out)
			}
			for range 3 { // let every big request get its first token too
				if !slices.Contains(firsts, false) {
					break
				}
				p.allow <- struct{}{}
				<-p.ran
				for i, sr := range streams {
					select {
					case <-sr.events:
						firsts[i] = true
					default:
					}
				}
			}
			if slices.Contains(firsts, false) {
				t.Fatalf("small request answered after %d steps, but not every big one started: %v", steps, firsts)
			}
			for i, sr := range streams {
				select {
				case <-sr.done:
					t.Fatalf("big request %d ended early", i)
				default:
				}
			}
			close(p.open)
			return
		default:
		}
	}
}

// TestPreemptionKeepsOutputs runs more concurrent requests than the
// cache holds at their full length: sequences are preempted and
// re-prefilled, every request succeeds, and every output (greedy, and
// seeded sampling, whose random stream continues across a preemption)
// is the single-process engine's.
func TestPreemptionKeepsOutputs(t *testing.T) {
	for _, prefix := range []bool{true, false} {
		t.Run(fmt.Sprintf("prefix caching %v", prefix), func(t *testing.T) {
			cl := startClusterWith(t, 1, 256<<10, prefix, func(c *Config) { c.StepTokenBudget, c.MaxRunningPerNode = 48, 8 }, nil)
			in, _ := cl.nodes[0].Info(context.Background(), 0)
			capTokens := int(in.TotalBlocks * in.BlockSize)
			type job struct {
				prompt []int
				max    int
				temp   float64
			}
			var jobs []job
			for i := range 6 {
				jobs = append(jobs, job{prompt(10+i*3, i), capTokens/3 - 20, float64(i%2) * 0.8})
			}
			outs := make([]*completionOut, len(jobs))
			var wg sync.WaitGroup
			for i, j := range jobs {
				wg.Go(func() {
					_, outs[i] = complete(t, cl, map[string]any{"prompt": j.prompt, "max_tokens": j.max, "temperature": j.temp,
						"top_p": 1, "seed": 100 + i, "ignore_eos": true})
				})
			}
			wg.Wait()
			for i, j := range jobs {
				if outs[i].Error != nil {
					t.Fatalf("request %d: %+v", i, outs[i].Error)
				}
				want := ref(t, model.GenerateRequest{Prompt: j.prompt, MaxTokens: j.max, Logprobs: -1,
					Sampling: model.SamplingParams{Temperature: j.temp, Seed: uint64(100 + i)}})
				checkAgainst(t, outs[i], want, false, -1, 0)
			}
			if n := metricValue(t, cl, "expertmesh_coordinator_preemptions_total"); n == 0 {
				t.Errorf("no preemption: the test proves nothing")
			}
		})
	}
}

// startClusterWith is startCluster with a cache size and prefix caching
// chosen.
func startClusterWith(t *testing.T, n int, cacheBytes int64, prefix bool, cfgf func(*Config), wrap func(int, AttentionNode) AttentionNode) *cluster {
	t.Helper()
	cl := &cluster{}
	var as []AttentionNode
	for i := range n {
		nc := attnnode.DefaultConfig()
		nc.ModelDir, nc.NodeID, nc.Threads, nc.CacheBytes, nc.PrefixCaching = tinyDir, fmt.Sprintf("attn-%d", i), 1, cacheBytes, prefix
		nc.ListenAddr = ""
		nd, err := attnnode.Start(context.Background(), nc)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nd.Close() })
		cl.nodes = append(cl.nodes, nd)
		var a AttentionNode = nd
		if wrap != nil {
			a = wrap(i, a)
		}
		as = append(as, a)
	}
	cfg := DefaultConfig()
	cfg.ModelDir, cfg.Addr = tinyDir, "127.0.0.1:0"
	cfg.Logger = slog.New(slog.DiscardHandler)
	if cfgf != nil {
		cfgf(&cfg)
	}
	c, err := Start(context.Background(), cfg, byID(as))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	<-c.Ready()
	cl.c, cl.url = c, "http://"+c.Addr()
	return cl
}

// metricValue reads an unlabelled sample from /metrics (0 if absent).
func metricValue(t *testing.T, cl *cluster, name string) float64 {
	t.Helper()
	resp, err := http.Get(cl.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			var f float64
			fmt.Sscan(v, &f)
			return f
		}
	}
	return 0
}

func metricsText(t *testing.T, cl *cluster) string {
	t.Helper()
	resp, err := http.Get(cl.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// TestPrefixCachingSameOutputs: requests sharing a long prefix give the
// same tokens with prefix caching on and off, greedy and seeded; with it
// on, later ones report the shared blocks in cached_tokens, and the
// metrics count hits.
func TestPrefixCachingSameOutputs(t *testing.T) {
	on := startClusterWith(t, 1, 2<<20, true, nil, nil)
	off := startClusterWith(t, 1, 2<<20, false, nil, nil)
	system := prompt(70, 3)
	for i, temp := range []float64{0, 0.9, 0, 0.9} {
		p := append(slices.Clone(system), prompt(5+i, 10+i)...)
		body := map[string]any{"prompt": p, "max_tokens": 12, "temperature": temp, "top_p": 1, "seed": 7, "ignore_eos": true, "logprobs": 1}
		_, a := complete(t, on, body)
		_, b := complete(t, off, body)
		if a.Error != nil || b.Error != nil {
			t.Fatalf("request %d: %+v %+v", i, a.Error, b.Error)
		}
		if !slices.Equal(a.Choices[0].TokenIDs, b.Choices[0].TokenIDs) {
			t.Fatalf("request %d (temperature %g): %v with prefix caching, %v without", i, temp, a.Choices[0].TokenIDs, b.Choices[0].TokenIDs)
		}
		want := ref(t, model.GenerateRequest{Prompt: p, MaxTokens: 12, Logprobs: 1, Sampling: model.SamplingParams{Temperature: temp, Seed: 7}})
		checkAgainst(t, a, want, false, 1, 1e-4)
		cached := a.Usage.PromptTokensDetails.CachedTokens
		if (i == 0) != (cached == 0) || cached%16 != 0 || cached >= len(p) {
			t.Errorf("request %d: %d cached tokens of %d", i, cached, len(p))
		}
		if c := b.Usage.PromptTokensDetails.CachedTokens; c != 0 {
			t.Errorf("prefix caching off reported %d cached tokens", c)
		}
	}
	if metricValue(t, on, "expertmesh_coordinator_prefix_cache_hits_total") == 0 || metricValue(t, on, "expertmesh_coordinator_prefix_cache_queries_total") == 0 {
		t.Errorf("prefix cache metrics:\n%s", metricsText(t, on))
	}
}

// TestChoicesAndPromptLists: n samples of one prompt (seeds seed, seed+1,
// ...), a list of prompts, and both together, indexed prompt-major as
// OpenAI and vLLM do; usage counts each prompt once.
func TestChoicesAndPromptLists(t *testing.T) {
	cl := startCluster(t, 1, nil, nil)
	p1, p2 := prompt(40, 1), prompt(9, 2)
	body := map[string]any{"prompt": [][]int{p1, p2}, "n": 3, "max_tokens": 6, "temperature": 1.1, "top_p": 1, "seed": 40, "ignore_eos": true}
	code, out := complete(t, cl, body)
	if code != 200 || len(out.Choices) != 6 {
		t.Fatalf("%d %+v", code, out)
	}
	for i, ch := range out.Choices {
		p := [][]int{p1, p2}[i/3]
		want := ref(t, model.GenerateRequest{Prompt: p, MaxTokens: 6, Logprobs: -1, Sampling: model.SamplingParams{Temperature: 1.1, Seed: uint64(40 + i%3)}})
		if !slices.Equal(ch.TokenIDs, want.Tokens) {
			t.Errorf("choice %d: %v, want prompt %d with seed %d: %v", i, ch.TokenIDs, i/3, 40+i%3, want.Tokens)
		}
	}
	var raw map[string]any
	resp, b := post(t, context.Background(), cl.url+"/v1/completions", body)
	if resp.StatusCode != 200 || json.Unmarshal(b, &raw) != nil {
		t.Fatal(resp.StatusCode)
	}
	for i, ch := range raw["choices"].([]any) {
		if idx := ch.(map[string]any)["index"].(float64); int(idx) != i {
			t.Errorf("choice %d has index %v", i, idx)
		}
	}
	if u := out.Usage; u.PromptTokens != len(p1)+len(p2) || u.CompletionTokens != 36 || u.TotalTokens != u.PromptTokens+36 {
		t.Errorf("usage %+v", u)
	}
	// The siblings of a prompt take its blocks: with a 40-token prompt,
	// two full blocks each.
	if c := out.Usage.PromptTokensDetails.CachedTokens; c != 0 {
		t.Errorf("cached %d: the prompts' own first computation is not cached", c)
	}
	if h := metricValue(t, cl, "expertmesh_coordinator_prefix_cache_hits_total"); h < 2*32 {
		t.Errorf("siblings took %v cached tokens, want at least 64 (2 siblings × 2 blocks of prompt 1)", h)
	}
	// Streaming: every choice's text, finish and one usage chunk.
	body["stream"], body["stream_options"] = true, map[string]any{"include_usage": true}
	sr := openStream(t, cl.url+"/v1/completions", body)
	<-sr.done
	close(sr.events)
	got := make([][]int, 6)
	finishes, usages := 0, 0
	for e := range sr.events {
		if e == "[DONE]" {
			continue
		}
		var c completionOut
		var idx struct {
			Choices []struct {
				Index int `json:"index"`
			} `json:"choices"`
		}
		json.Unmarshal([]byte(e), &c)
		json.Unmarshal([]byte(e), &idx)
		if c.Usage != nil {
			usages++
			if c.Usage.CompletionTokens != 36 {
				t.Errorf("stream usage %+v", c.Usage)
			}
		}
		for k, ch := range c.Choices {
			i := idx.Choices[k].Index
			got[i] = append(got[i], ch.TokenIDs...)
			if ch.FinishReason != nil {
				finishes++
			}
		}
	}
	for i := range got {
		if !slices.Equal(got[i], out.Choices[i].TokenIDs) {
			t.Errorf("streamed choice %d: %v, want %v", i, got[i], out.Choices[i].TokenIDs)
		}
	}
	if finishes != 6 || usages != 1 {
		t.Errorf("%d finish chunks, %d usage chunks; want 6, 1", finishes, usages)
	}
}

// TestChatChoicesAndUsage: chat with n=2, streamed with include_usage.
func TestChatChoicesAndUsage(t *testing.T) {
	cl := startCluster(t, 1, nil, nil)
	body := map[string]any{"messages": []map[string]any{{"role": "user", "content": "hello there"}}, "n": 2, "max_tokens": 5,
		"temperature": 0.7, "seed": 3, "ignore_eos": true}
	resp, b := post(t, context.Background(), cl.url+"/v1/chat/completions", body)
	var out struct {
		Choices []struct {
			Index   int `json:"index"`
			Message struct {
				Content string `json:"content"`
			} `json:"message"`
			TokenIDs []int `json:"token_ids"`
		} `json:"choices"`
		Usage *usage `json:"usage"`
	}
	if resp.StatusCode != 200 || json.Unmarshal(b, &out) != nil || len(out.Choices) != 2 || out.Choices[1].Index != 1 {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	body["stream"], body["stream_options"] = true, map[string]any{"include_usage": true}
	sr := openStream(t, cl.url+"/v1/chat/completions", body)
	<-sr.done
	close(sr.events)
	texts := make([]string, 2)
	var u *usage
	for e := range sr.events {
		var c struct {
			Choices []struct {
				Index int `json:"index"`
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
			} `json:"choices"`
			Usage *usage `json:"usage"`
		}
		json.Unmarshal([]byte(e), &c)
		for _, ch := range c.Choices {
			texts[ch.Index] += ch.Delta.Content
		}
		if c.Usage != nil {
			u = c.Usage
		}
	}
	for i := range texts {
		if texts[i] != out.Choices[i].Message.Content {
			t.Errorf("choice %d streamed %q, whole %q", i, texts[i], out.Choices[i].Message.Content)
		}
	}
	if u == nil || u.CompletionTokens != 10 || u.PromptTokens != out.Usage.PromptTokens {
		t.Errorf("stream usage %+v, whole %+v", u, out.Usage)
	}
}

// TestMinTokens: stop tokens (EOS included) cannot end a choice before
// min_tokens; after it they can.
func TestMinTokens(t *testing.T) {
	cl := startCluster(t, 1, nil, nil)
	p := prompt(6, 4)
	_, free := complete(t, cl, map[string]any{"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": true})
	toks := free.Choices[0].TokenIDs
	// Stop on the greedy third token: without min_tokens it ends there.
	stop := toks[2]
	at := slices.Index(toks, stop)
	_, a := complete(t, cl, map[string]any{"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": true, "stop_token_ids": []int{stop}})
	if len(a.Choices[0].TokenIDs) != at+1 || *a.Choices[0].FinishReason != "stop" {
		t.Fatalf("without min_tokens: %v %q", a.Choices[0].TokenIDs, *a.Choices[0].FinishReason)
	}
	_, b := complete(t, cl, map[string]any{"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": true, "stop_token_ids": []int{stop}, "min_tokens": at + 1})
	ids := b.Choices[0].TokenIDs
	if len(ids) <= at+1 || slices.Contains(ids[:at+1], stop) {
		t.Fatalf("min_tokens %d: %v (stop %d)", at+1, ids, stop)
	}
}

// TestInputLimits: hostile bodies are refused before any expensive work.
func TestInputLimits(t *testing.T) {
	cl := startCluster(t, 1, nil, nil)
	nested := strings.Repeat("[", 9999) + "1" + strings.Repeat("]", 9999)
	long := "[" + strings.Repeat("1,", 200000) + "1]"
	for _, tt := range []struct {
		name, body string
	}{
		{"9999 nested arrays", `{"prompt": ` + nested + `}`},
		{"nested arrays elsewhere", `{"prompt": [1], "stop": ` + nested + `}`},
		{"an array longer than the context", `{"prompt": ` + long + `}`},
	} {
		start := time.Now()
		resp, err := http.Post(cl.url+"/v1/completions", "application/json", strings.NewReader(tt.body))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 400 || !strings.Contains(string(b), "invalid_request_error") {
			t.Errorf("%s: %d %.200s", tt.name, resp.StatusCode, b)
		}
		// It took 4-6 s of CPU before; the bound is loose for -race.
		if d := time.Since(start); d > time.Second {
			t.Errorf("%s: refused after %v", tt.name, d)
		}
	}
	// Brackets inside strings do not count.
	code, out := complete(t, cl, map[string]any{"prompt": []int{1}, "max_tokens": 1, "stop": []string{strings.Repeat("[", 100)}})
	if code != 200 {
		t.Errorf("brackets in a string: %d %+v", code, out.Error)
	}
}

func BenchmarkScanJSON(b *testing.B) {
	body := []byte(`{"prompt": ` + strings.Repeat("[", 9999) + "1" + strings.Repeat("]", 9999) + `}`)
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		scanJSON(body, 163840)
	}
}

// TestModelRetrieve: GET /v1/models/{id}.
func TestModelRetrieve(t *testing.T) {
	cl := startCluster(t, 1, nil, nil)
	resp, err := http.Get(cl.url + "/v1/models/" + cl.c.ModelName())
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	json.NewDecoder(resp.Body).Decode(&m)
	resp.Body.Close()
	if resp.StatusCode != 200 || m["id"] != cl.c.ModelName() || m["object"] != "model" {
		t.Fatalf("%d %v", resp.StatusCode, m)
	}
	resp, err = http.Get(cl.url + "/v1/models/gpt-4/turbo")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 404 || !strings.Contains(string(b), "model_not_found") {
		t.Fatalf("unknown model: %d %s", resp.StatusCode, b)
	}
}

// expertDown answers every step as an attention node does when no
// replica of some routed expert answers: UNAVAILABLE, nothing applied.
type expertDown struct{ AttentionNode }

func (e expertDown) Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error) {
	in, err := e.Info(ctx, req.Epoch)
	if err != nil {
		return nil, err
	}
	return &meshpb.StepResponse{Step: req.Step, Code: 14, Message: "layer 1: no replica of expert 5 answered within 2s",
		FreeBlocks: in.FreeBlocks, TotalBlocks: in.TotalBlocks}, nil
}

// TestTruthfulErrors: an expert-node outage, an attention-node failure
// and overload each reach the client with their own type and message,
// plain or, once a stream has started, as its error event; metrics count
// what the client saw, and rebuilds_total only rebuilds that happened.
func TestTruthfulErrors(t *testing.T) {
	t.Run("expert nodes down", func(t *testing.T) {
		cl := startCluster(t, 1, nil, func(_ int, n AttentionNode) AttentionNode { return expertDown{n} })
		code, out := complete(t, cl, map[string]any{"prompt": []int{1, 2}, "max_tokens": 2, "timeout": 0.3})
		if code != 503 || out.Error == nil || out.Error.Type != "expert_unavailable" || !strings.Contains(out.Error.Message, "expert") ||
			strings.Contains(out.Error.Message, "attention node") {
			t.Fatalf("%d %+v", code, out.Error)
		}
		if n := metricValue(t, cl, "expertmesh_coordinator_rebuilds_total"); n != 0 {
			t.Errorf("rebuilds_total %v after an expert outage", n)
		}
	})
	t.Run("attention node fails, no other", func(t *testing.T) {
		var g *gate
		cl := startCluster(t, 1, func(c *Config) { c.NodeWait = 0 }, func(_ int, n AttentionNode) AttentionNode { g = newGate(n); return g })
		g.fail = fmt.Errorf("connection reset")
		close(g.open)
		code, out := complete(t, cl, map[string]any{"prompt": []int{1, 2}, "max_tokens": 2})
		if code != 503 || out.Error.Type != "attention_node_unavailable" {
			t.Fatalf("%d %+v", code, out.Error)
		}
		if n := metricValue(t, cl, "expertmesh_coordinator_rebuilds_total"); n != 0 {
			t.Errorf("rebuilds_total %v with no node to rebuild on", n)
		}
	})
	t.Run("stream ended by an error event", func(t *testing.T) {
		var p *pacer
		cl := startCluster(t, 1, nil, func(_ int, n AttentionNode) AttentionNode { p = newPacer(n); return p })
		sr := openStream(t, cl.url+"/v1/completions", map[string]any{"prompt": []int{1, 2}, "max_tokens": 50, "ignore_eos": true, "timeout": 0.5})
		p.allow <- struct{}{} // one step: the stream has started
		<-sr.done
		close(sr.events)
		var last string
		for e := range sr.events {
			if e != "[DONE]" {
				last = e
			}
		}
		if sr.status != 200 || !strings.Contains(last, `"timeout_error"`) {
			t.Fatalf("status %d, last event %s", sr.status, last)
		}
		m := metricsText(t, cl)
		for _, want := range []string{`expertmesh_coordinator_requests_total{code="200",endpoint="completions",outcome="error"} 1`,
			`expertmesh_coordinator_request_errors_total{endpoint="completions",type="timeout_error"} 1`} {
			if !strings.Contains(m, want) {
				t.Errorf("no %s in metrics", want)
			}
		}
		close(p.open)
	})
}

// TestStreamsRefusedBeforeSSE: a stream that cannot be admitted (the
// waiting queue is full) gets a plain 429 with Retry-After and no SSE
// byte, on every streaming path.
func TestStreamsRefusedBeforeSSE(t *testing.T) {
	var g *gate
	cl := startCluster(t, 1, func(c *Config) { c.MaxRunningPerNode, c.MaxWaiting = 1, 1 },
		func(_ int, n AttentionNode) AttentionNode { g = newGate(n); return g })
	enq := make(chan uint64, 10)
	hook := func(id uint64) { enq <- id }
	cl.c.hooks.enqueued.Store(&hook)
	body := map[string]any{"prompt": []int{3, 4, 5}, "max_tokens": 2, "ignore_eos": true}
	done := make(chan int, 2)
	for range 2 {
		go func() {
			resp, _ := post(t, context.Background(), cl.url+"/v1/completions", body)
			done <- resp.StatusCode
		}()
		<-enq
	}
	<-g.entered
	for _, tt := range []struct {
		path string
		body map[string]any
	}{
		{"/v1/completions", map[string]any{"prompt": []int{1}, "stream": true}},
		{"/v1/completions", map[string]any{"prompt": [][]int{{1}, {2}}, "n": 2, "stream": true}},
		{"/v1/chat/completions", map[string]any{"messages": []map[string]any{{"role": "user", "content": "hi"}}, "stream": true,
			"stream_options": map[string]any{"include_usage": true}}},
	} {
		resp, b := post(t, context.Background(), cl.url+tt.path, tt.body)
		if resp.StatusCode != 429 || resp.Header.Get("Retry-After") == "" || strings.Contains(string(b), "data:") ||
			!strings.Contains(string(b), `"queue_full"`) || resp.Header.Get("Content-Type") != "application/json" {
			t.Errorf("%s %v: %d %q %s", tt.path, tt.body, resp.StatusCode, resp.Header.Get("Retry-After"), b)
		}
	}
	close(g.open)
	for range 2 {
		if c := <-done; c != 200 {
			t.Errorf("queued request: %d", c)
		}
	}
	if m := metricsText(t, cl); !strings.Contains(m, `expertmesh_coordinator_request_errors_total{endpoint="completions",type="rate_limit_error"} 2`) {
		t.Errorf("429s not counted by type")
	}
}
