package coordinator

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/expertmesh/expertmesh/attnnode"
	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
	"github.com/expertmesh/expertmesh/tokenizer"
)

// tinyDir is a tiny-v2 checkpoint (with gen-model's byte-level tokenizer)
// shared by every end-to-end test.
var tinyDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "coordinator-tiny-v2-")
	if err != nil {
		panic(err)
	}
	p, _ := model.IsPreset("tiny-v2")
	if err := model.GenerateCheckpoint(dir, p, model.GenOptions{Seed: 1}); err != nil {
		panic(err)
	}
	tinyDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		// Keep-alive client connections are the test client's, not leaks.
		http.DefaultClient.CloseIdleConnections()
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goroutine leak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// cluster is a coordinator in front of real in-process attention nodes.
type cluster struct {
	c     *Coordinator
	nodes []*attnnode.Node
	url   string
}

// startCluster starts n attention nodes on tinyDir and a coordinator on
// them; wrap (optional) interposes on a node's calls for fault injection
// and observation.
func startCluster(t testing.TB, n int, cfgf func(*Config), wrap func(i int, nd AttentionNode) AttentionNode) *cluster {
	t.Helper()
	cl := &cluster{}
	var as []AttentionNode
	for i := range n {
		nc := attnnode.DefaultConfig()
		nc.ModelDir, nc.NodeID, nc.Threads, nc.CacheBytes = tinyDir, fmt.Sprintf("attn-%d", i), 1, 2<<20
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
	cfg.Logger = slog.New(slog.DiscardHandler) // failures are asserted, not read
	if cfgf != nil {
		cfgf(&cfg)
	}
	c, err := Start(context.Background(), cfg, byID(as))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() }) // before the nodes close (LIFO)
	<-c.Ready()
	cl.c, cl.url = c, "http://"+c.Addr()
	return cl
}

// startClusterF is startCluster for fuzz targets.
func startClusterF(f *testing.F) *cluster { return startCluster(f, 1, nil, nil) }

// reference runs Engine.Generate in one process: the ground truth.
type reference struct {
	eng   *model.Engine
	cache *model.LatentCache
	eos   []int
	tok   *tokenizer.Tokenizer
}

var refOnce = sync.OnceValues(func() (*reference, error) {
	w, err := model.Load(tinyDir, model.LoadOptions{})
	if err != nil {
		return nil, err
	}
	cache, err := model.NewLatentCache(w.Config, 16, 64)
	if err != nil {
		return nil, err
	}
	gen, err := model.LoadGenerationConfig(tinyDir, w.Config)
	if err != nil {
		return nil, err
	}
	tok, err := tokenizer.Load(tinyDir)
	if err != nil {
		return nil, err
	}
	return &reference{eng: model.NewEngine(w, kernels.NewPool(1), nil), cache: cache, eos: gen.EOSTokenIDs, tok: tok}, nil
})

var refMu sync.Mutex

func ref(t *testing.T, req model.GenerateRequest) *model.GenerateResult {
	t.Helper()
	r, err := refOnce()
	if err != nil {
		t.Fatal(err)
	}
	refMu.Lock()
	defer refMu.Unlock()
	res, err := r.eng.Generate(context.Background(), r.cache, req)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func post(t testing.TB, ctx context.Context, url string, body any) (*http.Response, []byte) {
	t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, out
}

type completionOut struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Model   string `json:"model"`
	Choices []struct {
		Text         string  `json:"text"`
		FinishReason *string `json:"finish_reason"`
		TokenIDs     []int   `json:"token_ids"`
		Logprobs     *struct {
			Tokens        []string             `json:"tokens"`
			TokenLogprobs []*float64           `json:"token_logprobs"`
			TopLogprobs   []map[string]float64 `json:"top_logprobs"`
			TextOffset    []int                `json:"text_offset"`
		} `json:"logprobs"`
	} `json:"choices"`
	Usage *usage `json:"usage"`
	Error *struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

func complete(t testing.TB, cl *cluster, body map[string]any) (int, *completionOut) {
	t.Helper()
	resp, b := post(t, context.Background(), cl.url+"/v1/completions", body)
	var out completionOut
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("%d %s: %v", resp.StatusCode, b, err)
	}
	return resp.StatusCode, &out
}

func prompt(n, seed int) []int {
	p := make([]int, n)
	for i := range p {
		p[i] = 2 + (i*37+seed*101)%500
	}
	return p
}

// checkAgainst compares a completion with Engine.Generate's result.
// tol bounds logprob differences: 0 (exact) for a request that ran alone;
// batched and chunked steps change float32 summation order in the engine's
// kernels (model's own batching test allows 1e-4), so tokens must match
// exactly but logprobs only closely.
func checkAgainst(t *testing.T, out *completionOut, want *model.GenerateResult, echo bool, logprobs int, tol float64) {
	t.Helper()
	ch := out.Choices[0]
	ids := want.Tokens
	if echo {
		ids = append(slices.Clone(want.Prompt), want.Tokens...)
	}
	if !slices.Equal(ch.TokenIDs, ids) {
		t.Fatalf("token ids %v, want %v", ch.TokenIDs, ids)
	}
	if *ch.FinishReason != want.FinishReason {
		t.Errorf("finish %q, want %q", *ch.FinishReason, want.FinishReason)
	}
	if logprobs < 0 {
		if ch.Logprobs != nil {
			t.Errorf("logprobs reported without being asked for")
		}
		return
	}
	var wantLP []*model.TokenLogprob
	if echo {
		wantLP = append(wantLP, want.PromptLogprobs...)
	}
	for i := range want.Logprobs {
		wantLP = append(wantLP, &want.Logprobs[i])
	}
	lp := ch.Logprobs
	if lp == nil || len(lp.TokenLogprobs) != len(wantLP) {
		t.Fatalf("logprobs %+v, want %d positions", lp, len(wantLP))
	}
	for i, w := range wantLP {
		got := lp.TokenLogprobs[i]
		if w == nil {
			if got != nil {
				t.Errorf("position %d: logprob %v, want null", i, *got)
			}
			continue
		}
		if got == nil || math.Abs(*got-w.Logprob) > tol {
			t.Fatalf("position %d: logprob %v, want %v (ids %v, want %v)", i, fmtp(got), w.Logprob, ch.TokenIDs, ids)
		}
		var gotTop, wantTop []float64
		for _, v := range lp.TopLogprobs[i] {
			gotTop = append(gotTop, v)
		}
		for _, v := range w.Top {
			wantTop = append(wantTop, v.Logprob)
		}
		slices.Sort(gotTop)
		slices.Sort(wantTop)
		// Token texts can coincide (partial UTF-8 bytes), merging map keys.
		if len(gotTop) > len(wantTop) || (len(gotTop) == len(wantTop) && !closeAll(gotTop, wantTop, tol)) {
			t.Errorf("position %d: top %v, want %v", i, gotTop, wantTop)
		}
	}
}

func closeAll(a, b []float64, tol float64) bool {
	for i := range a {
		if math.Abs(a[i]-b[i]) > tol {
			return false
		}
	}
	return true
}

func fmtp(p *float64) any {
	if p == nil {
		return nil
	}
	return *p
}

// asJSON is s as it reads after a JSON round trip: invalid UTF-8 bytes
// become U+FFFD, one per byte, as encoding/json writes them.
func asJSON(s string) string {
	b, _ := json.Marshal(s)
	var out string
	json.Unmarshal(b, &out)
	return out
}

func TestCompletionsMatchGenerate(t *testing.T) {
	cl := startCluster(t, 1, nil, nil)
	tests := []struct {
		name     string
		prompt   []int
		max      int
		temp     float64
		topK     int
		topP     float64
		seed     uint64
		logprobs int
		echo     bool
		eos      bool
	}{
		{name: "greedy", prompt: prompt(7, 1), max: 12, logprobs: -1},
		{name: "greedy with eos", prompt: prompt(3, 2), max: 20, logprobs: -1, eos: true},
		{name: "logprobs 3", prompt: prompt(5, 3), max: 6, logprobs: 3},
		{name: "logprobs 0 echo", prompt: prompt(9, 4), max: 4, logprobs: 0, echo: true},
		{name: "echo top 5", prompt: prompt(4, 5), max: 3, logprobs: 5, echo: true},
		{name: "echo only prompt", prompt: prompt(6, 6), max: 0, logprobs: 2, echo: true},
		{name: "sampled with seed", prompt: prompt(5, 7), max: 10, temp: 0.9, topK: 40, topP: 0.9, seed: 42, logprobs: 1},
		{name: "one token prompt", prompt: []int{5}, max: 5, logprobs: -1},
		{name: "explicit seed 0 is a seed", prompt: prompt(4, 8), max: 8, temp: 1.3, seed: 0, logprobs: -1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := map[string]any{"prompt": tt.prompt, "max_tokens": tt.max, "temperature": tt.temp,
				"top_k": tt.topK, "top_p": tt.topP, "seed": tt.seed, "echo": tt.echo, "ignore_eos": !tt.eos}
			if tt.topP == 0 {
				body["top_p"] = 1
			}
			if tt.logprobs >= 0 {
				body["logprobs"] = tt.logprobs
			}
			code, out := complete(t, cl, body)
			if code != 200 {
				t.Fatalf("status %d: %+v", code, out.Error)
			}
			r, _ := refOnce()
			req := model.GenerateRequest{Prompt: tt.prompt, MaxTokens: tt.max, Logprobs: tt.logprobs, Echo: tt.echo,
				Sampling: model.SamplingParams{Temperature: tt.temp, TopK: tt.topK, TopP: tt.topP, Seed: tt.seed}}
			if tt.eos {
				req.StopIDs = r.eos
			}
			want := ref(t, req)
			checkAgainst(t, out, want, tt.echo, tt.logprobs, 0)
			if u := out.Usage; u == nil || u.PromptTokens != len(tt.prompt) || u.CompletionTokens != len(want.Tokens) || u.TotalTokens != len(tt.prompt)+len(want.Tokens) {
				t.Errorf("usage %+v", out.Usage)
			}
			text := r.tok.Decode(want.Tokens, true)
			if tt.echo {
				text = r.tok.Decode(tt.prompt, true) + text
			}
			if out.Choices[0].Text != asJSON(text) {
				t.Errorf("text %q, want %q", out.Choices[0].Text, text)
			}
			if out.Object != "text_completion" || !strings.HasPrefix(out.ID, "cmpl-") || out.Model != cl.c.ModelName() {
				t.Errorf("envelope %q %q %q", out.Object, out.ID, out.Model)
			}
		})
	}
}

// TestConcurrentMatchesAlone runs 16 requests of different lengths at once
// over two nodes with a small step budget, so prompts are chunked and
// decodes interleave with prefills, and checks every one against a lone
// Engine.Generate.
func TestConcurrentMatchesAlone(t *testing.T) {
	gates := make([]*gate, 2)
	cl := startCluster(t, 2, func(c *Config) { c.StepTokenBudget, c.MaxRunningPerNode = 24, 8 },
		func(i int, n AttentionNode) AttentionNode {
			gates[i] = newGate(n)
			close(gates[i].open)
			return gates[i]
		})
	type job struct {
		prompt []int
		max    int
	}
	var jobs []job
	for i := range 16 {
		jobs = append(jobs, job{prompt(3+i*5%41, i), 4 + i%7})
	}
	outs := make([]*completionOut, len(jobs))
	codes := make([]int, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Go(func() {
			resp, b := post(t, context.Background(), cl.url+"/v1/completions",
				map[string]any{"prompt": j.prompt, "max_tokens": j.max, "temperature": 0, "ignore_eos": true, "logprobs": 1})
			codes[i] = resp.StatusCode
			var out completionOut
			if err := json.Unmarshal(b, &out); err == nil {
				outs[i] = &out
			}
		})
	}
	wg.Wait()
	for i, j := range jobs {
		if codes[i] != 200 || outs[i] == nil {
			t.Fatalf("request %d: status %d %+v", i, codes[i], outs[i])
		}
		want := ref(t, model.GenerateRequest{Prompt: j.prompt, MaxTokens: j.max, Logprobs: 1})
		checkAgainst(t, outs[i], want, false, 1, 1e-4)
	}
	// The last finishers' releases travel in release-only steps; every
	// block must come back.
	for i, nd := range cl.nodes {
		waitReleased(t, gates[i], nd)
	}
}

// sseEvents reads a stream's data payloads up to and including [DONE].
func sseEvents(t *testing.T, r io.Reader) []string {
	t.Helper()
	var evs []string
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			t.Fatalf("stream line %q is not data", line)
		}
		evs = append(evs, data)
		if data == "[DONE]" {
			break
		}
	}
	return evs
}

func TestStreamingCompletion(t *testing.T) {
	cl := startCluster(t, 1, nil, nil)
	p := prompt(6, 9)
	body := map[string]any{"prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": true, "logprobs": 2, "echo": true}
	code, whole := complete(t, cl, body)
	if code != 200 {
		t.Fatal(code)
	}
	body["stream"] = true
	body["stream_options"] = map[string]any{"include_usage": true}
	b, _ := json.Marshal(body)
	resp, err := http.Post(cl.url+"/v1/completions", "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("content type %q", ct)
	}
	evs := sseEvents(t, resp.Body)
	if len(evs) < 4 || evs[len(evs)-1] != "[DONE]" {
		t.Fatalf("events %q", evs)
	}
	var text strings.Builder
	var ids []int
	var lps []*float64
	var finish string
	var u *usage
	for _, e := range evs[:len(evs)-1] {
		var out completionOut
		if err := json.Unmarshal([]byte(e), &out); err != nil {
			t.Fatalf("%s: %v", e, err)
		}
		if out.Usage != nil {
			u = out.Usage
			continue
		}
		ch := out.Choices[0]
		text.WriteString(ch.Text)
		ids = append(ids, ch.TokenIDs...)
		if ch.Logprobs != nil {
			lps = append(lps, ch.Logprobs.TokenLogprobs...)
		}
		if ch.FinishReason != nil {
			finish = *ch.FinishReason
		}
	}
	w := whole.Choices[0]
	if text.String() != w.Text || !slices.Equal(ids, w.TokenIDs) || finish != *w.FinishReason {
		t.Fatalf("stream %q %v %q, whole %q %v %q", text.String(), ids, finish, w.Text, w.TokenIDs, *w.FinishReason)
	}
	if len(lps) != len(w.Logprobs.TokenLogprobs) || lps[0] != nil {
		t.Fatalf("stream logprobs %d, want %d with a null first", len(lps), len(w.Logprobs.TokenLogprobs))
	}
	for i := 1; i < len(lps); i++ {
		if *lps[i] != *w.Logprobs.TokenLogprobs[i] {
			t.Fatalf("logprob %d: %v vs %v", i, *lps[i], *w.Logprobs.TokenLogprobs[i])
		}
	}
	if u == nil || !reflect.DeepEqual(u, whole.Usage) {
		t.Errorf("usage %+v, want %+v", u, whole.Usage)
	}
}

func TestBadRequests(t *testing.T) {
	cl := startCluster(t, 1, nil, nil)
	tests := []struct {
		name   string
		body   string
		status int
		param  string
	}{
		{"not json", `{"prompt": [1,2`, 400, ""},
		{"no prompt", `{"max_tokens": 3}`, 400, "prompt"},
		{"empty prompt", `{"prompt": []}`, 400, "prompt"},
		{"prompt wrong type", `{"prompt": {"a": 1}}`, 400, "prompt"},
		{"token out of vocab", `{"prompt": [1, 512]}`, 400, "prompt"},
		{"negative token", `{"prompt": [-1]}`, 400, "prompt"},
		{"prompts nested too deep", `{"prompt": [[[1]]]}`, 400, "prompt"},
		{"empty prompt list", `{"prompt": [[]]}`, 400, "prompt"},
		{"one empty prompt of two", `{"prompt": [[1], []]}`, 400, "prompt"},
		{"n=0", `{"prompt": [1], "n": 0}`, 400, "n"},
		{"n too big", `{"prompt": [1], "n": 129}`, 400, "n"},
		{"n beyond the int range", `{"prompt": [1], "n": 1e30}`, 400, "n"},
		{"choices beyond the cap", `{"prompt": [[1],[1],[1],[1],[1],[1],[1],[1],[1]], "n": 128}`, 400, "n"},
		{"best_of not n", `{"prompt": [1], "n": 2, "best_of": 3}`, 400, "best_of"},
		{"negative max_tokens", `{"prompt": [1], "max_tokens": -1}`, 400, "max_tokens"},
		{"max_tokens at the int64 limit", `{"prompt": [1, 2, 3], "max_tokens": 9223372036854775807}`, 400, "max_tokens"},
		{"max_tokens past the int64 limit", `{"prompt": [1], "max_tokens": 9223372036854775808}`, 400, "max_tokens"},
		{"max_tokens fractional", `{"prompt": [1], "max_tokens": 2.5}`, 400, "max_tokens"},
		{"min_tokens above max_tokens", `{"prompt": [1], "max_tokens": 3, "min_tokens": 4}`, 400, "min_tokens"},
		{"negative min_tokens", `{"prompt": [1], "min_tokens": -1}`, 400, "min_tokens"},
		{"json_object", `{"prompt": [1], "response_format": {"type": "json_object"}}`, 400, "response_format"},
		{"json_schema", `{"prompt": [1], "response_format": {"type": "json_schema", "json_schema": {}}}`, 400, "response_format"},
		{"stream_options without stream", `{"prompt": [1], "stream_options": {"include_usage": true}}`, 400, "stream_options"},
		{"presence_penalty", `{"prompt": [1], "presence_penalty": 0.5}`, 400, "presence_penalty"},
		{"logit_bias", `{"prompt": [1], "logit_bias": {"5": 10}}`, 400, "logit_bias"},
		{"timeout beyond a duration", `{"prompt": [1], "timeout": 1e300}`, 400, "timeout"},
		{"seed beyond the int range", `{"prompt": [1], "seed": 1e30}`, 400, "seed"},
		{"top_k beyond int", `{"prompt": [1], "top_k": 99999999999999999999}`, 400, "top_k"},
		{"stop id beyond int", `{"prompt": [1], "stop_token_ids": [99999999999999999999]}`, 400, "stop_token_ids"},
		{"max_tokens type", `{"prompt": [1], "max_tokens": "many"}`, 400, "max_tokens"},
		{"beyond context", `{"prompt": [1], "max_tokens": 200000}`, 400, "max_tokens"},
		{"beyond cache", `{"prompt": [1], "max_tokens": 100000}`, 400, "max_tokens"},
		{"temperature", `{"prompt": [1], "temperature": -0.5}`, 400, "temperature"},
		{"top_p", `{"prompt": [1], "top_p": 1.5}`, 400, "top_p"},
		{"top_k", `{"prompt": [1], "top_k": -3}`, 400, "top_k"},
		{"logprobs", `{"prompt": [1], "logprobs": 21}`, 400, "logprobs"},
		{"stop ids", `{"prompt": [1], "stop": [9999]}`, 400, "stop"},
		{"stop type", `{"prompt": [1], "stop": {"x": 1}}`, 400, "stop"},
		{"timeout", `{"prompt": [1], "timeout": 0}`, 400, "timeout"},
		{"model", `{"prompt": [1], "model": "gpt-4"}`, 404, "model"},
		{"chat without messages", `{"messages": []}`, 400, "messages"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := "/v1/completions"
			if strings.HasPrefix(tt.name, "chat") {
				path = "/v1/chat/completions"
			}
			resp, err := http.Post(cl.url+path, "application/json", strings.NewReader(tt.body))
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var out completionOut
			if err := json.Unmarshal(b, &out); err != nil || out.Error == nil {
				t.Fatalf("body %s is no OpenAI error", b)
			}
			if resp.StatusCode != tt.status || out.Error.Message == "" {
				t.Fatalf("status %d (%s), want %d", resp.StatusCode, b, tt.status)
			}
			if tt.param != "" && (out.Error.Param == nil || *out.Error.Param != tt.param) {
				t.Errorf("param %v, want %q (%s)", out.Error.Param, tt.param, out.Error.Message)
			}
			if tt.status == 400 && out.Error.Type != "invalid_request_error" {
				t.Errorf("type %q", out.Error.Type)
			}
		})
	}
}

// gate holds every Step of the node it wraps until opened, and reports
// each step's start and end.
type gate struct {
	AttentionNode
	entered chan *meshpb.StepRequest
	done    chan struct{} // capacity 1: a step ended since the last receive
	open    chan struct{}
	fail    error // every step fails with it once set before opening
}

func newGate(n AttentionNode) *gate {
	return &gate{AttentionNode: n, entered: make(chan *meshpb.StepRequest, 100), done: make(chan struct{}, 1), open: make(chan struct{})}
}

func (g *gate) Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error) {
	select {
	case g.entered <- req:
	default:
	}
	select {
	case <-g.open:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if g.fail != nil {
		return nil, g.fail
	}
	resp, err := g.AttentionNode.Step(ctx, req)
	select {
	case g.done <- struct{}{}:
	default:
	}
	return resp, err
}

func TestAdmissionControl(t *testing.T) {
	var g *gate
	cl := startCluster(t, 1, func(c *Config) { c.MaxRunningPerNode, c.MaxWaiting = 1, 1 },
		func(_ int, n AttentionNode) AttentionNode { g = newGate(n); return g })
	enq := make(chan uint64, 10)
	hook := func(id uint64) { enq <- id }
	cl.c.hooks.enqueued.Store(&hook)
	body := map[string]any{"prompt": []int{3, 4, 5}, "max_tokens": 3, "temperature": 0, "ignore_eos": true}
	type result struct {
		code int
		out  []byte
	}
	res := make(chan result, 2)
	for range 2 {
		go func() {
			resp, b := post(t, context.Background(), cl.url+"/v1/completions", body)
			res <- result{resp.StatusCode, b}
		}()
		<-enq // first: running (its step held by the gate); second: waiting
	}
	<-g.entered
	resp, b := post(t, context.Background(), cl.url+"/v1/completions", body)
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "1" {
		t.Fatalf("third request: %d %q %s, want 429 with Retry-After 1", resp.StatusCode, resp.Header.Get("Retry-After"), b)
	}
	if !strings.Contains(string(b), `"rate_limit_error"`) {
		t.Errorf("429 body %s", b)
	}
	close(g.open)
	for range 2 {
		if r := <-res; r.code != 200 {
			t.Errorf("queued request: %d %s", r.code, r.out)
		}
	}
}

// waitReleased waits (on step completions, not time) until the node has
// every block free again.
func waitReleased(t *testing.T, g *gate, nd *attnnode.Node) {
	t.Helper()
	for {
		in, _ := nd.Info(context.Background(), 0)
		if in.FreeBlocks == in.TotalBlocks && in.ActiveSequences == 0 {
			return
		}
		select {
		case <-g.done:
		case <-time.After(20 * time.Second): // a leak, not a slow step
			in, _ := nd.Info(context.Background(), 0)
			t.Fatalf("blocks never came back: %d/%d free, %d active", in.FreeBlocks, in.TotalBlocks, in.ActiveSequences)
		}
	}
}

func TestClientDisconnectReleasesCache(t *testing.T) {
	var g *gate
	cl := startCluster(t, 1, nil, func(_ int, n AttentionNode) AttentionNode { g = newGate(n); close(g.open); return g })
	ctx, cancel := context.WithCancel(context.Background())
	b, _ := json.Marshal(map[string]any{"prompt": prompt(20, 1), "max_tokens": 500, "ignore_eos": true, "stream": true, "temperature": 0})
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, cl.url+"/v1/completions", bytes.NewReader(b))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(line, "data: ") {
		t.Fatalf("first line %q %v", line, err)
	}
	in, _ := cl.nodes[0].Info(context.Background(), 0)
	if in.ActiveSequences != 1 || in.FreeBlocks == in.TotalBlocks {
		t.Fatalf("while streaming: %d active, %d/%d free", in.ActiveSequences, in.FreeBlocks, in.TotalBlocks)
	}
	cancel()
	resp.Body.Close()
	waitReleased(t, g, cl.nodes[0])
}

func TestRequestTimeout(t *testing.T) {
	var g *gate
	cl := startCluster(t, 1, nil, func(_ int, n AttentionNode) AttentionNode { g = newGate(n); return g })
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Held steps keep the request from finishing, so only the timeout ends it.
		code, out := complete(t, cl, map[string]any{"prompt": []int{1, 2}, "max_tokens": 4, "timeout": 0.05})
		if code != http.StatusGatewayTimeout || out.Error == nil || out.Error.Type != "timeout_error" {
			t.Errorf("timed out request: %d %+v", code, out.Error)
		}
	}()
	<-done
	close(g.open)
	waitReleased(t, g, cl.nodes[0])
}

func TestNodeFailure(t *testing.T) {
	var g *gate
	cl := startCluster(t, 1, func(c *Config) { c.NodeWait = 0 }, func(_ int, n AttentionNode) AttentionNode { g = newGate(n); return g })
	g.fail = errors.New("connection reset")
	close(g.open)
	// The only node fails the step: with no other node to move the
	// sequence to and no wait for one (--node-wait 0), it fails with the
	// attention node's error, not a generic one.
	resp, b := post(t, context.Background(), cl.url+"/v1/completions", map[string]any{"prompt": []int{1, 2}, "max_tokens": 4})
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(b), `"attention_node_unavailable"`) ||
		!strings.Contains(string(b), "no other can take it over") {
		t.Errorf("non-streaming: %d %s", resp.StatusCode, b)
	}
	// Now the node is down: a new request is refused before any stream
	// starts, with the same truthful type.
	resp, b = post(t, context.Background(), cl.url+"/v1/completions", map[string]any{"prompt": []int{1, 2}, "max_tokens": 4, "stream": true})
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(b), `"attention_node_unavailable"`) || resp.Header.Get("Retry-After") == "" {
		t.Errorf("streaming on a down node: %d %s", resp.StatusCode, b)
	}
}

// TestCloseFailsInFlight closes the coordinator while a request's step is
// held: the request gets a 503 body, and Close returns.
func TestCloseFailsInFlight(t *testing.T) {
	var g *gate
	cl := startCluster(t, 1, nil, func(_ int, n AttentionNode) AttentionNode { g = newGate(n); return g })
	res := make(chan string, 1)
	go func() {
		resp, b := post(t, context.Background(), cl.url+"/v1/completions", map[string]any{"prompt": []int{1, 2}, "max_tokens": 4})
		res <- fmt.Sprintf("%d %s", resp.StatusCode, b)
	}()
	<-g.entered
	if err := cl.c.Close(); err != nil {
		t.Fatal(err)
	}
	if got := <-res; !strings.HasPrefix(got, "503 ") || !strings.Contains(got, "shutting down") {
		t.Fatalf("in-flight request at Close: %s", got)
	}
	if _, err := http.Post(cl.url+"/v1/completions", "application/json", strings.NewReader(`{"prompt":[1]}`)); err == nil {
		t.Fatal("a closed coordinator still answers")
	}
}

// TestChunkedPrefillEcho prefills a prompt over several steps (budget 4)
// with echo: prompt logprobs continue across chunk boundaries.
func TestChunkedPrefillEcho(t *testing.T) {
	var steps atomic.Int64
	cl := startCluster(t, 1, func(c *Config) { c.StepTokenBudget, c.MaxRunningPerNode = 4, 2 },
		func(_ int, n AttentionNode) AttentionNode { return &countSteps{n, &steps} })
	p := prompt(13, 11)
	code, out := complete(t, cl, map[string]any{"prompt": p, "max_tokens": 3, "temperature": 0, "ignore_eos": true, "echo": true, "logprobs": 2})
	if code != 200 {
		t.Fatalf("%d %+v", code, out.Error)
	}
	checkAgainst(t, out, ref(t, model.GenerateRequest{Prompt: p, MaxTokens: 3, Logprobs: 2, Echo: true}), true, 2, 1e-4)
	// 13 prompt tokens in chunks of 4 take 4 steps, then 2 decode steps.
	if n := steps.Load(); n != 6 {
		t.Errorf("%d steps with work, want 6", n)
	}
}

type countSteps struct {
	AttentionNode
	n *atomic.Int64
}

func (c *countSteps) Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error) {
	if len(req.Work) > 0 { // a release-only step may trail the response
		c.n.Add(1)
	}
	return c.AttentionNode.Step(ctx, req)
}
