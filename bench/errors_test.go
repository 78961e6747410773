package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// fakeServer answers /v1/models and streams completions whose behaviour
// the prompt text names. It is a stand-in for the failure modes only; the
// end-to-end tests run against the real server.
func fakeServer(t *testing.T) *httptest.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/models", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"object":"list","data":[{"id":"fake","object":"model"}]}`)
	})
	mux.HandleFunc("POST /v1/completions", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Prompt    string `json:"prompt"`
			MaxTokens int    `json:"max_tokens"`
			Stream    bool   `json:"stream"`
			Opts      struct {
				IncludeUsage bool `json:"include_usage"`
			} `json:"stream_options"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || !req.Stream || !req.Opts.IncludeUsage {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		event := func(w io.Writer, s string) { fmt.Fprintf(w, "data: %s\n\n", s) }
		tok := func(i int) string {
			return fmt.Sprintf(`{"choices":[{"index":0,"text":"t%d","finish_reason":null}]}`, i)
		}
		switch req.Prompt {
		case "ok", "nodone", "errevent", "garbage":
			w.Header().Set("Content-Type", "text/event-stream")
			f := w.(http.Flusher)
			n := req.MaxTokens
			if req.Prompt != "ok" {
				n = 2
			}
			for i := range n {
				event(w, tok(i))
				f.Flush()
			}
			switch req.Prompt {
			case "ok":
				event(w, `{"choices":[{"index":0,"text":"","finish_reason":"length"}]}`)
				event(w, fmt.Sprintf(`{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":%d}}`, n))
				event(w, "[DONE]")
			case "errevent":
				event(w, `{"error":{"message":"node 0 failed","type":"internal_error"}}`)
				event(w, "[DONE]")
			case "garbage":
				event(w, `{"choices":[{"text": tru`)
			}
		case "429":
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusTooManyRequests)
			io.WriteString(w, `{"error":{"message":"waiting queue is full","type":"rate_limit_error"}}`)
		case "500":
			http.Error(w, "boom", http.StatusInternalServerError)
		case "hang":
			<-r.Context().Done()
		case "cut", "drop":
			conn, buf, err := w.(http.Hijacker).Hijack()
			if err != nil {
				t.Error(err)
				return
			}
			defer conn.Close()
			if req.Prompt == "cut" {
				buf.WriteString("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
				for i := range 2 {
					ev := fmt.Sprintf("data: %s\n\n", tok(i))
					fmt.Fprintf(buf, "%x\r\n%s\r\n", len(ev), ev)
				}
				buf.Flush()
			}
		default:
			http.Error(w, "unknown prompt", http.StatusBadRequest)
		}
	})
	srv := httptest.NewUnstartedServer(mux)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			fakeConns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// fakeConns counts the connections fake servers accepted.
var fakeConns atomic.Int64

// TestConnectionReuse: requests one after another share one connection,
// so no TTFT pays for a TCP handshake.
func TestConnectionReuse(t *testing.T) {
	srv := fakeServer(t)
	cfg := DefaultConfig()
	cfg.BaseURL = srv.URL
	cfg.DatasetName, cfg.DatasetPath = "file", writeDataset(t, "ok")
	cfg.NumPrompts, cfg.MaxConcurrency = 10, 1
	before := fakeConns.Load()
	res, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if res.Completed != 10 {
		t.Fatalf("completed %d", res.Completed)
	}
	// One for GET /v1/models and the requests, at most one more for
	// GET /v1/cluster racing the first request's connection back.
	if n := fakeConns.Load() - before; n > 2 {
		t.Errorf("%d connections for 10 sequential requests", n)
	}
}

func writeDataset(t *testing.T, prompts ...string) string {
	var b strings.Builder
	for _, p := range prompts {
		fmt.Fprintf(&b, `{"prompt": %q, "output_len": 4}`+"\n", p)
	}
	path := filepath.Join(t.TempDir(), "d.jsonl")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestErrorKinds: every failure mode is counted under its kind and the run
// still finishes.
func TestErrorKinds(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	srv := fakeServer(t)
	prompts := []string{"ok", "429", "500", "hang", "cut", "drop", "nodone", "errevent", "garbage"}
	cfg := DefaultConfig()
	cfg.BaseURL = srv.URL
	cfg.DatasetName, cfg.DatasetPath = "file", writeDataset(t, prompts...)
	cfg.NumPrompts = 2 * len(prompts) // each prompt twice
	cfg.MaxConcurrency = 4
	cfg.RequestTimeout = 300 * time.Millisecond
	cfg.ClusterStats = true // the fake has no /v1/cluster: silently skipped
	res, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{
		"http_429": 2, "http_500": 2, KindTimeout: 2, KindStreamCut: 4, KindConnection: 2,
		KindStreamError: 2, KindBadResponse: 2,
	}
	if fmt.Sprint(res.ErrorsByKind) != fmt.Sprint(want) {
		t.Errorf("errors_by_kind %v, want %v", res.ErrorsByKind, want)
	}
	if res.Completed != 2 || res.Failed != 16 || len(res.Errors) != 18 {
		t.Errorf("completed %d failed %d (%d errors)", res.Completed, res.Failed, len(res.Errors))
	}
	if res.TotalOutput != 8 || res.ModelID != "fake" || res.ExpertLoad != nil {
		t.Errorf("output %d, model %q", res.TotalOutput, res.ModelID)
	}
	for i, k := range res.ErrorKinds {
		if (k == "") != (res.Errors[i] == "") {
			t.Errorf("request %d: kind %q, error %q", i, k, res.Errors[i])
		}
	}
	var summary strings.Builder
	WriteSummary(&summary, res)
	for _, s := range []string{"Failed requests:                         16", "http_429:", "waiting queue is full"} {
		if !strings.Contains(summary.String(), s) {
			t.Errorf("summary lacks %q:\n%s", s, summary.String())
		}
	}
	srv.Close()
}

// TestStreamParsing: opening role events and closing finish events carry
// no token; SSE comments and multi-line data are handled; without usage
// the output tokens are counted from the events; with token_ids from them.
func TestStreamParsing(t *testing.T) {
	var withIDs atomic.Bool
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/chat/completions", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		bw := bufio.NewWriter(w)
		bw.WriteString(": ping\n\n")
		bw.WriteString(`data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}` + "\n\n")
		for i := range 3 {
			ids := ""
			if withIDs.Load() {
				ids = `,"token_ids":[1,2]`
			}
			fmt.Fprintf(bw, "data: {\"choices\":[{\"index\":0,\n")
			fmt.Fprintf(bw, "data: \"delta\":{\"content\":\"w%d \"}%s}]}\n\n", i, ids)
		}
		bw.WriteString(`data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}` + "\n\n")
		bw.WriteString("data: [DONE]\n\n")
		bw.Flush()
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	cfg := DefaultConfig()
	cfg.BaseURL, cfg.Endpoint, cfg.RequestTimeout = srv.URL+"/v1", "/v1/chat/completions", 10*time.Second
	c := &client{http: srv.Client(), url: cfg.Root() + cfg.Endpoint, model: "m", cfg: &cfg, runStart: time.Now()}
	o := c.do(context.Background(), &Request{Text: "hi", OutputLen: 8})
	if o.kind != "" {
		t.Fatalf("failed: %s %s", o.kind, o.err)
	}
	if o.outputLen != 3 || len(o.itl) != 2 || len(o.chunkTimes) != 3 || !(o.ttft > 0) || o.latency < o.ttft {
		t.Errorf("output %d, %d ITLs, %d events, ttft %v, e2el %v", o.outputLen, len(o.itl), len(o.chunkTimes), o.ttft, o.latency)
	}
	withIDs.Store(true)
	o = c.do(context.Background(), &Request{Text: "hi", OutputLen: 8})
	if o.kind != "" || o.outputLen != 6 {
		t.Errorf("with token_ids: output %d (%s %s), want 6", o.outputLen, o.kind, o.err)
	}
}

// TestDoorClosedNotSent: in --duration mode a request admitted before the
// door closed but reaching the send after it is not sent and not counted,
// so no counted request starts after the duration (the race that let one
// start at 1.000016 s of a 1 s run).
func TestDoorClosedNotSent(t *testing.T) {
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		http.Error(w, "unexpected", http.StatusInternalServerError)
	}))
	defer srv.Close()
	cfg := DefaultConfig()
	cfg.BaseURL, cfg.Endpoint = srv.URL+"/v1", "/v1/completions"
	now := time.Now()
	c := &client{http: srv.Client(), url: cfg.Root() + cfg.Endpoint, model: "m", cfg: &cfg, runStart: now.Add(-time.Second), door: now}
	o := c.do(context.Background(), &Request{Text: "hi", OutputLen: 2})
	if !o.late || o.kind != "" || hits.Load() != 0 {
		t.Errorf("past the door: late %v, kind %q, %d requests reached the server", o.late, o.kind, hits.Load())
	}
	c.door = time.Now().Add(time.Hour)
	if o = c.do(context.Background(), &Request{Text: "hi", OutputLen: 2}); o.late || hits.Load() != 1 {
		t.Errorf("before the door: late %v, %d requests reached the server", o.late, hits.Load())
	}
}
