package localcluster

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/tokenizer"
)

var (
	binary   string
	modelDir string
)

// TestMain builds the real binary once: these tests start the roles as
// separate OS processes, exactly as `expertmesh up` does.
func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "expertmesh-cluster-test-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "expertmesh")
	build := exec.Command("go", "build", "-o", binary, "github.com/expertmesh/expertmesh/cmd/expertmesh")
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build:", err)
		os.Exit(1)
	}
	p, _ := model.IsPreset("tiny-v2")
	modelDir = filepath.Join(dir, "tiny-v2")
	if err := model.GenerateCheckpoint(modelDir, p, model.GenOptions{Seed: 5}); err != nil {
		panic(err)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

type testLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func startCluster(t *testing.T, attn, experts int, tweak ...func(*Config)) *Cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("starts processes")
	}
	cfg := DefaultConfig()
	cfg.Binary, cfg.ModelDir, cfg.AttnNodes, cfg.ExpertNodes, cfg.Addr = binary, modelDir, attn, experts, freeAddr(t)
	cfg.AttnThreads, cfg.ExpertThreads = 1, 1
	cfg.DataDir = t.TempDir()
	for _, f := range tweak {
		f(&cfg)
	}
	log := &testLog{}
	cfg.Log = log
	c, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatalf("start: %v\n%s", err, log.b.String())
	}
	t.Cleanup(func() {
		c.Close()
		if t.Failed() {
			t.Logf("cluster log:\n%s", log.b.String())
		}
	})
	return c
}

type completion struct {
	Choices []struct {
		Text     string `json:"text"`
		TokenIDs []int  `json:"token_ids"`
		Logprobs *struct {
			TokenLogprobs []*float64 `json:"token_logprobs"`
		} `json:"logprobs"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
}

func complete(t *testing.T, url string, prompt []int, maxTokens int) completion {
	t.Helper()
	body, _ := json.Marshal(map[string]any{"prompt": prompt, "max_tokens": maxTokens, "temperature": 0, "logprobs": 2, "ignore_eos": true})
	resp, err := http.Post(url+"/v1/completions", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out completion
	if resp.StatusCode != 200 {
		var e bytes.Buffer
		e.ReadFrom(resp.Body)
		t.Fatalf("status %d: %s", resp.StatusCode, e.String())
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	return out
}

// engineResult is what `expertmesh generate` computes for the prompt.
func engineResult(t *testing.T, prompt []int, maxTokens int) *model.GenerateResult {
	t.Helper()
	w, err := model.Load(modelDir, model.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	pool := kernels.NewPool(1)
	defer pool.Close()
	cache, _ := model.NewLatentCache(w.Config, 16, 64)
	res, err := model.NewEngine(w, pool, nil).Generate(context.Background(), cache, model.GenerateRequest{Prompt: prompt, MaxTokens: maxTokens, Logprobs: 2})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func checkSame(t *testing.T, what string, got completion, want *model.GenerateResult) {
	t.Helper()
	ch := got.Choices[0]
	if fmt.Sprint(ch.TokenIDs) != fmt.Sprint(want.Tokens) {
		t.Fatalf("%s: tokens %v, generate %v", what, ch.TokenIDs, want.Tokens)
	}
	for i, lp := range ch.Logprobs.TokenLogprobs {
		if lp == nil || math.Abs(*lp-want.Logprobs[i].Logprob) > 1e-4 {
			t.Fatalf("%s: logprob %d = %v, generate %g", what, i, lp, want.Logprobs[i].Logprob)
		}
	}
}

var prompts = [][]int{
	{1, 2, 3, 4},
	{77},
	{10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190, 200, 210},
}

// TestUpMatchesGenerate: the cluster (1 attention node, 3 expert nodes,
// separate processes, the expert nodes as `up` runs them: 2 threads, and
// on Linux every thread under SCHED_BATCH) and `serve` return exactly what
// `generate` computes.
func TestUpMatchesGenerate(t *testing.T) {
	batch := runtime.GOOS == "linux"
	c := startCluster(t, 1, 3, func(cfg *Config) {
		cfg.ExpertThreads = 2
		if batch {
			cfg.ExpertArgs = append(cfg.ExpertArgs, "--sched-batch")
		}
	})
	if batch {
		for _, k := range c.Children() {
			if k.Role != "expert" && k.Role != "attn" {
				continue
			}
			for tid, isBatch := range batchThreads(t, k.PID) {
				if isBatch != (k.Role == "expert") {
					t.Errorf("%s (%s) thread %d: SCHED_BATCH %v; want it for expert nodes only", k.Name, k.Role, tid, isBatch)
				}
			}
		}
	}
	serve := startServe(t)
	for i, p := range prompts {
		want := engineResult(t, p, 8)
		checkSame(t, fmt.Sprintf("up prompt %d", i), complete(t, c.URL, p, 8), want)
		checkSame(t, fmt.Sprintf("serve prompt %d", i), complete(t, serve, p, 8), want)
	}
}

// startServe runs `expertmesh serve` (everything in one process).
func startServe(t *testing.T) string {
	t.Helper()
	addr := freeAddr(t)
	cmd := exec.Command(binary, "serve", "--model", modelDir, "--addr", addr, "--threads", "1")
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if line := sc.Text(); strings.Contains(line, "listening on ") {
			f := strings.Fields(line)
			go func() {
				for sc.Scan() {
				}
			}()
			return f[len(f)-1]
		}
	}
	t.Fatal("serve exited before it was ready")
	return ""
}

// TestUpConcurrent: 2 attention nodes, 16 concurrent requests of different
// lengths, each answered exactly as if it ran alone.
func TestUpConcurrent(t *testing.T) {
	c := startCluster(t, 2, 3)
	var reqs [][]int
	for i := range 16 {
		p := make([]int, 1+i*3)
		for j := range p {
			p[j] = (i*31 + j*7) % 500
		}
		reqs = append(reqs, p)
	}
	got := make([]completion, len(reqs))
	var wg sync.WaitGroup
	for i, p := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i] = complete(t, c.URL, p, 6+i%5)
		}()
	}
	wg.Wait()
	for i, p := range reqs {
		checkSame(t, fmt.Sprintf("request %d", i), got[i], engineResult(t, p, 6+i%5))
	}
}

// TestUpChat: a streamed chat against the process cluster decodes to clean
// UTF-8 that equals the non-streamed answer, and the prompt the model saw is
// exactly the tokenized chat template.
func TestUpChat(t *testing.T) {
	c := startCluster(t, 1, 3)
	msgs := []map[string]string{{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, 世界! 👋"}}
	post := func(stream bool) *http.Response {
		req := map[string]any{"messages": msgs, "max_tokens": 24, "temperature": 0, "stream": stream, "ignore_eos": true}
		if stream { // stream_options without stream is refused, as OpenAI and vLLM refuse it
			req["stream_options"] = map[string]any{"include_usage": true}
		}
		body, _ := json.Marshal(req)
		resp, err := http.Post(c.URL+"/v1/chat/completions", "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 200 {
			b, _ := io.ReadAll(resp.Body)
			t.Fatalf("status %d: %s", resp.StatusCode, b)
		}
		return resp
	}
	resp := post(false)
	var whole struct {
		Choices []struct {
			Message struct {
				Content string `json:"content"`
			} `json:"message"`
		} `json:"choices"`
		Usage struct {
			PromptTokens int `json:"prompt_tokens"`
		} `json:"usage"`
	}
	json.NewDecoder(resp.Body).Decode(&whole)
	resp.Body.Close()

	resp = post(true)
	defer resp.Body.Close()
	var streamed strings.Builder
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := strings.TrimPrefix(sc.Text(), "data: ")
		if line == sc.Text() || line == "[DONE]" {
			continue
		}
		var chunk struct {
			Choices []struct {
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(line), &chunk); err != nil {
			t.Fatalf("chunk %q: %v", line, err)
		}
		for _, ch := range chunk.Choices {
			if !utf8.ValidString(ch.Delta.Content) {
				t.Fatalf("delta %q is not valid UTF-8", ch.Delta.Content)
			}
			streamed.WriteString(ch.Delta.Content)
		}
	}
	if streamed.String() != whole.Choices[0].Message.Content {
		t.Fatalf("streamed %q, whole %q", streamed.String(), whole.Choices[0].Message.Content)
	}
	tok, err := tokenizer.Load(modelDir)
	if err != nil {
		t.Fatal(err)
	}
	var tm []tokenizer.Message
	for _, m := range msgs {
		tm = append(tm, tokenizer.Message{Role: m["role"], Content: m["content"]})
	}
	text, err := tok.ApplyChatTemplate(tm, true)
	if err != nil {
		t.Fatal(err)
	}
	if want := len(tok.Encode(text, false)); whole.Usage.PromptTokens != want {
		t.Fatalf("prompt tokens %d, tokenized template has %d", whole.Usage.PromptTokens, want)
	}
}
