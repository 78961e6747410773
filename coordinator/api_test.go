package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
	"github.com/expertmesh/expertmesh/tokenizer"
)

func mustRef(t *testing.T) *reference {
	t.Helper()
	r, err := refOnce()
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestTextPrompt(t *testing.T) {
	cl := startCluster(t, 1, nil, nil)
	r := mustRef(t)
	text := "Hello, how are you today? 你好"
	code, out := complete(t, cl, map[string]any{"prompt": text, "max_tokens": 8, "temperature": 0, "ignore_eos": true, "echo": true})
	if code != 200 {
		t.Fatalf("%d %+v", code, out.Error)
	}
	ids := r.tok.Encode(text, true)
	want := ref(t, model.GenerateRequest{Prompt: ids, MaxTokens: 8, Logprobs: -1})
	checkAgainst(t, out, want, true, -1, 0)
	if out.Usage.PromptTokens != len(ids) {
		t.Errorf("prompt tokens %d, want %d", out.Usage.PromptTokens, len(ids))
	}
	if got := out.Choices[0].Text; !strings.HasPrefix(got, text) || got != asJSON(text+r.tok.Decode(want.Tokens, true)) {
		t.Errorf("echoed text %q", got)
	}
}

// streamText posts a streaming request and joins its text deltas.
func streamText(t *testing.T, url string, body map[string]any, pick func(map[string]any) string) (string, string) {
	t.Helper()
	body["stream"] = true
	b, _ := json.Marshal(body)
	resp, err := http.Post(url, "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		msg, _ := io.ReadAll(resp.Body)
		t.Fatalf("stream: %d %s", resp.StatusCode, msg)
	}
	var text strings.Builder
	finish := ""
	evs := sseEvents(t, resp.Body)
	if evs[len(evs)-1] != "[DONE]" {
		t.Fatalf("stream did not end with [DONE]: %q", evs)
	}
	for _, e := range evs[:len(evs)-1] {
		var m map[string]any
		if err := json.Unmarshal([]byte(e), &m); err != nil {
			t.Fatal(err)
		}
		chs, _ := m["choices"].([]any)
		if len(chs) == 0 {
			continue
		}
		ch := chs[0].(map[string]any)
		s := pick(ch)
		if !utf8.ValidString(s) {
			t.Errorf("delta %q splits a character", s)
		}
		text.WriteString(s)
		if f, ok := ch["finish_reason"].(string); ok {
			finish = f
		}
	}
	return text.String(), finish
}

func TestStopStrings(t *testing.T) {
	cl := startCluster(t, 1, nil, nil)
	base := map[string]any{"prompt": "The quick brown fox", "max_tokens": 40, "temperature": 0, "ignore_eos": true}
	code, full := complete(t, cl, base)
	if code != 200 {
		t.Fatal(code)
	}
	text := full.Choices[0].Text
	// A stop string from the middle of the greedy text: two ASCII letters.
	cut := -1
	for i := 4; i+2 <= len(text); i++ {
		if isLetter(text[i]) && isLetter(text[i+1]) {
			cut = i
			break
		}
	}
	if cut < 0 {
		t.Skipf("no ASCII pair in %q", text)
	}
	stop := text[cut : cut+2]
	want := text[:strings.Index(text, stop)]
	body := map[string]any{"prompt": "The quick brown fox", "max_tokens": 40, "temperature": 0, "ignore_eos": true, "stop": []string{"zzzz", stop}}
	code, out := complete(t, cl, body)
	if code != 200 || out.Choices[0].Text != want || *out.Choices[0].FinishReason != "stop" {
		t.Fatalf("stop %q: %d %q %v, want %q stop", stop, code, out.Choices[0].Text, out.Choices[0].FinishReason, want)
	}
	got, finish := streamText(t, cl.url+"/v1/completions", body, func(ch map[string]any) string { s, _ := ch["text"].(string); return s })
	if got != want || finish != "stop" {
		t.Fatalf("streamed with stop %q: %q %q, want %q stop", stop, got, finish, want)
	}
}

func isLetter(b byte) bool { return b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' }

func TestStopText(t *testing.T) {
	tests := []struct {
		stops  []string
		deltas []string
		shown  []string
		hit    bool
		final  string
	}{
		{nil, []string{"ab", "cd"}, []string{"ab", "cd"}, false, "abcd"},
		{[]string{"xyz"}, []string{"ab", "cx", "y", "q"}, []string{"ab", "c", "", "xyq"}, false, "abcxyq"},
		{[]string{"xyz"}, []string{"ab", "cx", "yz!"}, []string{"ab", "c", ""}, true, "abc"},
		{[]string{"b", "abc"}, []string{"zab"}, []string{"za"}, true, "za"},
		{[]string{"END"}, []string{"E", "N", "D"}, []string{"", "", ""}, true, ""},
	}
	for _, tt := range tests {
		s := &stopText{stops: tt.stops}
		var shown []string
		for i, d := range tt.deltas {
			shown = append(shown, s.add(d, i == len(tt.deltas)-1 && !tt.hit, i+1))
		}
		if !slices.Equal(shown, tt.shown) || s.hit != tt.hit || s.text != tt.final {
			t.Errorf("stops %q deltas %q: shown %q hit %v text %q; want %q %v %q", tt.stops, tt.deltas, shown, s.hit, s.text, tt.shown, tt.hit, tt.final)
		}
	}
	// Under min_tokens no stop string counts, and text before it is
	// never searched again.
	s := &stopText{stops: []string{"ab"}, min: 2}
	var shown []string
	for i, d := range []string{"a", "b", "xab", "c"} {
		shown = append(shown, s.add(d, false, i+1))
	}
	if want := []string{"a", "b", "x", ""}; !slices.Equal(shown, want) || !s.hit || s.text != "abx" {
		t.Errorf("min_tokens 2: shown %q hit %v text %q; want %q, a hit, %q", shown, s.hit, s.text, want, "abx")
	}
}

func TestChatCompletions(t *testing.T) {
	cl := startCluster(t, 1, nil, nil)
	r := mustRef(t)
	msgs := []tokenizer.Message{{Role: "system", Content: "You are a helpful assistant."}, {Role: "user", Content: "What is the capital of France?"}}
	rendered, err := r.tok.ApplyChatTemplate(msgs, true)
	if err != nil {
		t.Fatal(err)
	}
	ids := r.tok.Encode(rendered, false)
	want := ref(t, model.GenerateRequest{Prompt: ids, MaxTokens: 12, Logprobs: 2})
	body := map[string]any{"messages": msgs, "max_tokens": 12, "temperature": 0, "ignore_eos": true, "logprobs": true, "top_logprobs": 2}
	resp, b := post(t, context.Background(), cl.url+"/v1/chat/completions", body)
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	var out struct {
		Object  string `json:"object"`
		Choices []struct {
			Message struct {
				Role    string `json:"role"`
				Content string `json:"content"`
			} `json:"message"`
			FinishReason string `json:"finish_reason"`
			TokenIDs     []int  `json:"token_ids"`
			Logprobs     struct {
				Content []struct {
					Logprob     float64 `json:"logprob"`
					TopLogprobs []any   `json:"top_logprobs"`
				} `json:"content"`
			} `json:"logprobs"`
		} `json:"choices"`
		Usage usage `json:"usage"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	ch := out.Choices[0]
	if out.Object != "chat.completion" || ch.Message.Role != "assistant" || !slices.Equal(ch.TokenIDs, want.Tokens) || ch.FinishReason != "length" {
		t.Fatalf("chat %s, want tokens %v", b, want.Tokens)
	}
	if out.Usage.PromptTokens != len(ids) || out.Usage.CompletionTokens != 12 {
		t.Errorf("usage %+v, want prompt %d", out.Usage, len(ids))
	}
	if ch.Message.Content != asJSON(r.tok.Decode(want.Tokens, true)) {
		t.Errorf("content %q", ch.Message.Content)
	}
	for i, c := range ch.Logprobs.Content {
		if c.Logprob != want.Logprobs[i].Logprob || len(c.TopLogprobs) != 2 {
			t.Fatalf("logprob %d: %v (%d top), want %v", i, c.Logprob, len(c.TopLogprobs), want.Logprobs[i].Logprob)
		}
	}
	got, finish := streamText(t, cl.url+"/v1/chat/completions", body, func(ch map[string]any) string {
		d, _ := ch["delta"].(map[string]any)
		s, _ := d["content"].(string)
		return s
	})
	if got != ch.Message.Content || finish != "length" {
		t.Fatalf("streamed %q %q, want %q", got, finish, ch.Message.Content)
	}
}

func TestTokenizeDetokenize(t *testing.T) {
	cl := startCluster(t, 1, nil, nil)
	r := mustRef(t)
	for _, tt := range []struct {
		text string
		add  bool
	}{{"Hello world", false}, {"Hello world", true}, {"数字 12345 and emoji 🙂", false}, {"", false}} {
		resp, b := post(t, context.Background(), cl.url+"/tokenize", map[string]any{"prompt": tt.text, "add_special_tokens": tt.add})
		var out struct {
			Tokens []int `json:"tokens"`
			Count  int   `json:"count"`
		}
		json.Unmarshal(b, &out)
		want := r.tok.Encode(tt.text, tt.add)
		if resp.StatusCode != 200 || !slices.Equal(out.Tokens, want) && len(want)+len(out.Tokens) > 0 || out.Count != len(want) {
			t.Fatalf("tokenize %q: %d %s, want %v", tt.text, resp.StatusCode, b, want)
		}
		resp, b = post(t, context.Background(), cl.url+"/detokenize", map[string]any{"tokens": out.Tokens})
		var dt struct {
			Prompt string `json:"prompt"`
		}
		json.Unmarshal(b, &dt)
		wantText := tt.text
		if tt.add {
			wantText = tokenizer.BOSText + tt.text
		}
		if resp.StatusCode != 200 || dt.Prompt != wantText {
			t.Fatalf("detokenize: %d %s, want %q", resp.StatusCode, b, wantText)
		}
	}
	resp, b := post(t, context.Background(), cl.url+"/detokenize", map[string]any{"tokens": []int{99999}})
	if resp.StatusCode != 400 || !strings.Contains(string(b), `"param":"tokens"`) {
		t.Fatalf("bad detokenize: %d %s", resp.StatusCode, b)
	}
}

// flakyInfo fails Info and Step on demand, to take a node out of
// /readyz.
type flakyInfo struct {
	AttentionNode
	fail atomic.Bool
}

func (f *flakyInfo) Info(ctx context.Context, epoch uint64) (*meshpb.NodeInfo, error) {
	if f.fail.Load() {
		return nil, io.ErrUnexpectedEOF
	}
	return f.AttentionNode.Info(ctx, epoch)
}

func (f *flakyInfo) Step(ctx context.Context, req *meshpb.StepRequest) (*meshpb.StepResponse, error) {
	if f.fail.Load() {
		return nil, io.ErrUnexpectedEOF
	}
	return f.AttentionNode.Step(ctx, req)
}

func TestOperationalEndpoints(t *testing.T) {
	var fl *flakyInfo
	// The node breaks for good below: its request waits 100 ms for it.
	cl := startCluster(t, 1, func(c *Config) { c.NodeWait = 100 * time.Millisecond },
		func(_ int, n AttentionNode) AttentionNode { fl = &flakyInfo{AttentionNode: n}; return fl })
	if code, _ := complete(t, cl, map[string]any{"prompt": []int{1, 2}, "max_tokens": 2}); code != 200 {
		t.Fatal(code)
	}
	get := func(path string) (int, string) {
		resp, err := http.Get(cl.url + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, tt := range []struct {
		path string
		code int
		has  []string
	}{
		{"/healthz", 200, []string{"ok"}},
		{"/readyz", 200, []string{`"ready":true`}},
		{"/v1/models", 200, []string{`"object":"list"`, `"id":"` + filepath.Base(tinyDir) + `"`}},
		{"/metrics", 200, []string{`expertmesh_coordinator_requests_total{code="200",endpoint="completions",outcome="success"} 1`,
			"expertmesh_coordinator_time_to_first_token_seconds_count 1", "expertmesh_coordinator_step_duration_seconds_bucket",
			"expertmesh_coordinator_generation_tokens_total 2", "expertmesh_coordinator_queue_depth 0"}},
		{"/v1/nothing", 404, []string{`"error"`, `"not_found"`}},
		{"/v1/completions", 405, []string{`"error"`, `"method_not_allowed"`}},
	} {
		code, body := get(tt.path)
		if code != tt.code {
			t.Errorf("GET %s: %d %s", tt.path, code, body)
		}
		for _, h := range tt.has {
			if !strings.Contains(body, h) {
				t.Errorf("GET %s: no %q in %s", tt.path, h, body)
			}
		}
	}
	// The node breaks: the next request's step fails, the node is down
	// and /readyz says which and why, without asking it anything.
	fl.fail.Store(true)
	if code, out := complete(t, cl, map[string]any{"prompt": []int{1, 2}, "max_tokens": 2}); code != 503 || out.Error == nil || out.Error.Type != "attention_node_unavailable" {
		t.Fatalf("request on a broken node: %d %+v", code, out.Error)
	}
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "attention node attn-0") || !strings.Contains(body, "unexpected EOF") {
		t.Errorf("readyz with a node not answering: %d %s", code, body)
	}
}

func TestNoTokenizer(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"config.json", "generation_config.json"} {
		b, err := os.ReadFile(filepath.Join(tinyDir, f))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, f), b, 0o644)
	}
	// The coordinator reads no weights, so configs alone make a model dir
	// for it; the node serves the real checkpoint.
	cl := startCluster(t, 1, func(c *Config) { c.ModelDir = dir }, nil)
	for _, tt := range []struct{ path, body, param string }{
		{"/v1/completions", `{"prompt": "hello"}`, "prompt"},
		{"/v1/completions", `{"prompt": [1], "stop": ["x"]}`, "stop"},
		{"/v1/chat/completions", `{"messages": [{"role": "user", "content": "hi"}]}`, "messages"},
		{"/tokenize", `{"prompt": "hi"}`, "prompt"},
	} {
		resp, err := http.Post(cl.url+tt.path, "application/json", strings.NewReader(tt.body))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 400 || !strings.Contains(string(b), `"param":"`+tt.param+`"`) || !strings.Contains(string(b), "tokenizer") {
			t.Errorf("%s %s: %d %s", tt.path, tt.body, resp.StatusCode, b)
		}
	}
	code, out := complete(t, cl, map[string]any{"prompt": []int{1, 2, 3}, "max_tokens": 3, "logprobs": 1, "ignore_eos": true})
	if code != 200 || out.Choices[0].Text != "" || len(out.Choices[0].TokenIDs) != 3 || !strings.HasPrefix(out.Choices[0].Logprobs.Tokens[0], "token_id:") {
		t.Errorf("id prompt without tokenizer: %d %+v", code, out)
	}
}
