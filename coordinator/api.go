package coordinator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	mrand "math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"

	"github.com/expertmesh/expertmesh/model"
	meshpb "github.com/expertmesh/expertmesh/proto"
	"github.com/expertmesh/expertmesh/tokenizer"
)

// maxBody bounds a request body; prompts are token ids or text, so 16 MiB
// is far beyond any context the models take.
const maxBody = 16 << 20

// maxLogprobs is the most alternatives a request may ask for (vLLM's cap).
const maxLogprobs = 20

// Handler is the coordinator's HTTP API. Start serves it on Config.Addr;
// it is exported so it can also be mounted elsewhere.
func (c *Coordinator) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("POST /v1/completions", c.instrument("completions", c.handleCompletions))
	mux.Handle("POST /v1/chat/completions", c.instrument("chat_completions", c.handleChat))
	mux.Handle("GET /v1/models", c.instrument("models", c.handleModels))
	mux.Handle("GET /v1/models/{id...}", c.instrument("models", c.handleModel))
	mux.Handle("GET /v1/cluster", c.instrument("cluster", c.handleCluster))
	mux.Handle("POST /tokenize", c.instrument("tokenize", c.handleTokenize))
	mux.Handle("POST /detokenize", c.instrument("detokenize", c.handleDetokenize))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc("GET /readyz", c.handleReady)
	mux.Handle("GET /metrics", promhttp.HandlerFor(c.metrics.reg, promhttp.HandlerOpts{}))
	// Wrong methods get an OpenAI-shaped 405 rather than the mux's text.
	for path, allow := range map[string]string{"/v1/completions": "POST", "/v1/chat/completions": "POST",
		"/v1/models": "GET", "/tokenize": "POST", "/detokenize": "POST"} {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allow)
			writeJSON(w, http.StatusMethodNotAllowed, map[string]*apiError{"error": {Type: "invalid_request_error",
				Code: strp("method_not_allowed"), Message: fmt.Sprintf("%s %s: use %s", r.Method, r.URL.Path, allow)}})
		})
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, map[string]*apiError{"error": {Type: "invalid_request_error",
			Code: strp("not_found"), Message: fmt.Sprintf("no route for %s %s", r.Method, r.URL.Path)}})
	})
	return mux
}

// statusWriter records the status for metrics and spans, and the type
// of an error the client got (plain or as a stream's error event); it
// forwards Flush so SSE works through it.
type statusWriter struct {
	http.ResponseWriter
	status  int
	errType string
}

// noteError records on w (if it is the instrumenting writer) that the
// client got an error of type typ.
func noteError(w http.ResponseWriter, typ string) {
	if sw, ok := w.(*statusWriter); ok {
		sw.errType = typ
	}
}

func (w *statusWriter) WriteHeader(s int) {
	if w.status == 0 {
		w.status = s
	}
	w.ResponseWriter.WriteHeader(s)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// instrument wraps an API handler in an "http.request" span (the parent of
// the request's work; steps link to it) and counts it by status.
func (c *Coordinator) instrument(endpoint string, h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A caller's traceparent (if a propagator is installed) makes this
		// span part of the caller's trace.
		ctx := otel.GetTextMapPropagator().Extract(r.Context(), propagation.HeaderCarrier(r.Header))
		ctx, span := tracer.Start(ctx, "http.request", trace.WithSpanKind(trace.SpanKindServer),
			trace.WithAttributes(attribute.String("http.route", r.Pattern), attribute.String("endpoint", endpoint)))
		defer span.End()
		sw := &statusWriter{ResponseWriter: w}
		r.Body = http.MaxBytesReader(w, r.Body, maxBody)
		h(sw, r.WithContext(ctx))
		if sw.status == 0 {
			sw.status = http.StatusOK
		}
		span.SetAttributes(attribute.Int("http.status_code", sw.status))
		if sw.status >= 500 {
			span.SetStatus(codes.Error, http.StatusText(sw.status))
		}
		outcome := "success"
		switch {
		case sw.errType != "":
			outcome = "error"
			c.metrics.requestErrors.WithLabelValues(endpoint, sw.errType).Inc()
		case r.Context().Err() != nil:
			outcome = "cancelled" // the client went away
		case sw.status >= 400:
			outcome = "error"
		}
		span.SetAttributes(attribute.String("outcome", outcome))
		c.metrics.requests.WithLabelValues(endpoint, strconv.Itoa(sw.status), outcome).Inc()
	})
}

// handleReady answers 200 when the coordinator admits requests and some
// attention node is up and takes new sequences; 503 with the reasons
// otherwise. It does no I/O: node state comes from the node loops.
func (c *Coordinator) handleReady(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	var problems []string
	usable := 0
	stopping := c.mu.closing || c.mu.draining
	switch {
	case c.mu.closing:
		problems = append(problems, "shutting down")
	case c.mu.draining:
		problems = append(problems, "draining: finishing running requests, admitting none")
	}
	for i, h := range c.mu.nodes {
		n := c.mu.sched.nodes[i]
		switch {
		case n.gone:
		case n.usable():
			usable++
		case n.draining:
			problems = append(problems, fmt.Sprintf("attention node %s: draining", h.id))
		case h.err != nil:
			problems = append(problems, fmt.Sprintf("attention node %s: %v", h.id, h.err))
		}
	}
	c.mu.Unlock()
	if usable == 0 {
		problems = append(problems, "no attention node takes new sequences")
	}
	if stopping || usable == 0 {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"ready": false, "errors": problems})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"ready": true, "nodes": usable, "warnings": problems})
}

// attnNodeStatus is one attention node in GET /v1/cluster.
type attnNodeStatus struct {
	ID          string `json:"id"`
	State       string `json:"state"` // up, down, draining, gone
	Error       string `json:"error,omitempty"`
	TotalBlocks int    `json:"total_blocks"`
	// FreeBlocks is the node's own count (cached blocks included);
	// CachedBlocks are free blocks holding prefix-cache content.
	FreeBlocks    int  `json:"free_blocks"`
	CachedBlocks  int  `json:"cached_blocks"`
	PrefixCaching bool `json:"prefix_caching"`
	Running       int  `json:"running"`
}

// handleCluster reports the cluster: the coordinator's epoch and its
// attention nodes, plus the control plane's view (expert placement and
// members) when there is one.
func (c *Coordinator) handleCluster(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	var nodes []attnNodeStatus
	for i, h := range c.mu.nodes {
		n := c.mu.sched.nodes[i]
		st := attnNodeStatus{ID: h.id, TotalBlocks: n.totalBlocks, FreeBlocks: n.reportedFree, CachedBlocks: n.cachedBlocks,
			PrefixCaching: n.prefixCaching, Running: len(n.running)}
		switch {
		case n.gone:
			continue
		case !n.up:
			st.State = "down"
		case n.draining:
			st.State = "draining"
		default:
			st.State = "up"
		}
		if h.err != nil {
			st.Error = h.err.Error()
		}
		nodes = append(nodes, st)
	}
	waiting := len(c.mu.sched.waiting)
	c.mu.Unlock()
	out := map[string]any{"epoch": c.cfg.Epoch, "model": c.name, "attention_nodes": nodes, "waiting": waiting}
	if c.cfg.Cluster != nil {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		v, err := c.cfg.Cluster(ctx)
		if err != nil {
			out["control_plane_error"] = err.Error()
		} else {
			out["control_plane"] = v
		}
	}
	writeJSON(w, http.StatusOK, out)
}

func (c *Coordinator) modelObject() map[string]any {
	return map[string]any{"id": c.name, "object": "model", "created": 0, "owned_by": "expertmesh",
		"root": c.name, "max_model_len": c.mcfg.MaxPositionEmbeddings}
}

func (c *Coordinator) handleModels(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": []map[string]any{c.modelObject()}})
}

// handleModel is GET /v1/models/{id}: the served model, or OpenAI's 404.
// Ids may contain slashes ("org/model"), hence the wildcard.
func (c *Coordinator) handleModel(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if id != c.name {
		c.writeError(w, &apiError{status: http.StatusNotFound, Type: "invalid_request_error", Param: strp("model"),
			Code: strp("model_not_found"), Message: fmt.Sprintf("the model %q does not exist; this server serves %q", id, c.name)})
		return
	}
	writeJSON(w, http.StatusOK, c.modelObject())
}

// maxDepth bounds the nesting of a request body's JSON: every valid
// request nests a handful of levels (chat content parts are the deepest,
// at 4), and a body of deep nesting is refused before it is decoded.
const maxDepth = 64

// scanJSON checks a body's shape before it is decoded, in one pass
// without allocating: nesting at most maxDepth deep and no array longer
// than maxElems. It costs microseconds where decoding a 20 KB body of
// 9999 nested arrays, and then interpreting it, took seconds; it does
// not validate the JSON otherwise (the decoder does).
func scanJSON(b []byte, maxElems int) error {
	// Per open bracket: whether it is an array, and its element count.
	var stack [maxDepth]struct {
		array bool
		elems int
		empty bool
	}
	depth := 0
	inString, escaped := false, false
	for i, ch := range b {
		if inString {
			switch {
			case escaped:
				escaped = false
			case ch == '\\':
				escaped = true
			case ch == '"':
				inString = false
			}
			continue
		}
		if depth > 0 && stack[depth-1].empty && ch != ' ' && ch != '\t' && ch != '\n' && ch != '\r' && ch != ']' && ch != '}' {
			stack[depth-1].empty = false
			stack[depth-1].elems = 1
		}
		switch ch {
		case '"':
			inString = true
		case '[', '{':
			if depth == maxDepth {
				return badRequest("", "the body nests JSON deeper than %d levels (at byte %d)", maxDepth, i)
			}
			stack[depth].array, stack[depth].elems, stack[depth].empty = ch == '[', 0, true
			depth++
		case ']', '}':
			if depth > 0 {
				depth--
			}
		case ',':
			if depth > 0 && stack[depth-1].array {
				if stack[depth-1].elems++; stack[depth-1].elems > maxElems {
					return badRequest("", "the body holds an array of more than %d elements (at byte %d): no prompt may be longer than the model's context", maxElems, i)
				}
			}
		}
	}
	return nil
}

// decodeBody reads a JSON body, turning decode failures into 400s that
// name the field. The body's shape is checked first (scanJSON), so a
// hostile body costs one cheap pass.
func (c *Coordinator) decodeBody(r *http.Request, v any) error {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return &apiError{status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error",
				Message: fmt.Sprintf("request body exceeds %d bytes", mbe.Limit)}
		}
		return badRequest("", "reading body: %v", err)
	}
	if err := scanJSON(b, max(c.mcfg.MaxPositionEmbeddings, 4096)); err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		var te *json.UnmarshalTypeError
		var se *json.SyntaxError
		switch {
		case errors.As(err, &te):
			// Fields of the embedded commonFields carry its name as a prefix.
			f := strings.TrimPrefix(te.Field, "commonFields.")
			if te.Value == "number" || strings.HasPrefix(te.Value, "number ") {
				return badRequest(f, "%s: expected %s, got JSON %s (out of range or not a whole number)", f, te.Type, te.Value)
			}
			return badRequest(f, "%s: expected %s, got JSON %s", f, te.Type, te.Value)
		case errors.As(err, &se):
			return badRequest("", "body is not valid JSON: %v (at byte %d)", se, se.Offset)
		}
		return badRequest("", "body: %v", err)
	}
	return nil
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type responseFormat struct {
	Type string `json:"type"`
}

// commonFields are the generation parameters completions and chat share.
type commonFields struct {
	Model         string          `json:"model"`
	MaxTokens     *int            `json:"max_tokens"`
	Temperature   *float64        `json:"temperature"`
	TopP          *float64        `json:"top_p"`
	TopK          *int            `json:"top_k"`
	Seed          *int64          `json:"seed"`
	Stop          json.RawMessage `json:"stop"`
	StopTokenIDs  []int           `json:"stop_token_ids"`
	N             *int            `json:"n"`
	BestOf        *int            `json:"best_of"`
	IgnoreEOS     bool            `json:"ignore_eos"`
	MinTokens     *int            `json:"min_tokens"`
	Timeout       *float64        `json:"timeout"`
	Stream        bool            `json:"stream"`
	StreamOptions *streamOptions  `json:"stream_options"`
	// Refused unless they ask for nothing (see unsupported).
	ResponseFormat    *responseFormat    `json:"response_format"`
	PresencePenalty   *float64           `json:"presence_penalty"`
	FrequencyPenalty  *float64           `json:"frequency_penalty"`
	RepetitionPenalty *float64           `json:"repetition_penalty"`
	LogitBias         map[string]float64 `json:"logit_bias"`
	Tools             json.RawMessage    `json:"tools"`
}

// maxN bounds n (OpenAI's limit) and maxChoices a request's choices
// (prompts × n).
const (
	maxN       = 128
	maxChoices = 1024
)

// unsupported refuses, by name, parameters that would change the output
// and that this server does not implement, rather than ignore them.
func (f *commonFields) unsupported() error {
	switch {
	case f.ResponseFormat != nil && f.ResponseFormat.Type != "" && f.ResponseFormat.Type != "text":
		return badRequest("response_format", "response_format %q is not supported: this server has no guided decoding; ask for JSON in the prompt, or leave response_format out", f.ResponseFormat.Type)
	case f.PresencePenalty != nil && *f.PresencePenalty != 0:
		return badRequest("presence_penalty", "presence_penalty is not supported (only 0)")
	case f.FrequencyPenalty != nil && *f.FrequencyPenalty != 0:
		return badRequest("frequency_penalty", "frequency_penalty is not supported (only 0)")
	case f.RepetitionPenalty != nil && *f.RepetitionPenalty != 1:
		return badRequest("repetition_penalty", "repetition_penalty is not supported (only 1)")
	case len(f.LogitBias) > 0:
		return badRequest("logit_bias", "logit_bias is not supported")
	case len(f.Tools) > 0 && string(f.Tools) != "null" && string(f.Tools) != "[]":
		return badRequest("tools", "tools are not supported: this server has no tool calling")
	case f.StreamOptions != nil && !f.Stream:
		return badRequest("stream_options", "stream_options needs stream: true")
	}
	return nil
}

// choices is n, checked.
func (f *commonFields) choices() (int, error) {
	n := 1
	if f.N != nil {
		if *f.N < 1 || *f.N > maxN {
			return 0, badRequest("n", "n must be in [1, %d], got %d", maxN, *f.N)
		}
		n = *f.N
	}
	if f.BestOf != nil && *f.BestOf != n {
		return 0, badRequest("best_of", "best_of=%d: only best_of equal to n (%d) is supported", *f.BestOf, n)
	}
	return n, nil
}

// checkModel accepts the served model's name (or none).
func (c *Coordinator) checkModel(name string) error {
	if name != "" && name != c.name {
		return &apiError{status: http.StatusNotFound, Type: "invalid_request_error", Param: strp("model"),
			Code: strp("model_not_found"), Message: fmt.Sprintf("model %q does not exist; this server serves %q", name, c.name)}
	}
	return nil
}

// params validates the shared fields for a prompt of prompt tokens.
// Omitted sampling parameters take generation_config.json's defaults, as
// vLLM does; with do_sample false there the default is greedy.
func (c *Coordinator) params(f *commonFields, prompt []int) (*genRequest, error) {
	if err := c.checkModel(f.Model); err != nil {
		return nil, err
	}
	if err := f.unsupported(); err != nil {
		return nil, err
	}
	if len(prompt) == 0 {
		return nil, badRequest("prompt", "the prompt is empty")
	}
	for i, id := range prompt {
		if id < 0 || id >= c.mcfg.VocabSize {
			return nil, badRequest("prompt", "prompt token %d is id %d, outside the vocabulary [0, %d)", i, id, c.mcfg.VocabSize)
		}
	}
	g := &genRequest{prompt: prompt, maxTokens: c.cfg.DefaultMaxTokens, logprobs: -1, leader: -1}
	ctxLen := c.mcfg.MaxPositionEmbeddings
	if len(prompt) > ctxLen {
		ae := badRequest("prompt", "the prompt (%d tokens) exceeds the model's context of %d tokens", len(prompt), ctxLen)
		ae.Code = strp("context_length_exceeded")
		return nil, ae
	}
	if f.MaxTokens != nil {
		if *f.MaxTokens < 0 {
			return nil, badRequest("max_tokens", "max_tokens must be >= 0, got %d", *f.MaxTokens)
		}
		// Compared without adding: a max_tokens near the int range must
		// not overflow the sum.
		if *f.MaxTokens > ctxLen-len(prompt) {
			ae := badRequest("max_tokens", "prompt (%d tokens) + max_tokens (%d) exceeds the model's context of %d tokens: max_tokens may be at most %d",
				len(prompt), *f.MaxTokens, ctxLen, ctxLen-len(prompt))
			ae.Code = strp("context_length_exceeded")
			return nil, ae
		}
		g.maxTokens = *f.MaxTokens
	}
	g.maxTokens = min(g.maxTokens, ctxLen-len(prompt)) // the default too
	if f.MinTokens != nil {
		if *f.MinTokens < 0 || *f.MinTokens > g.maxTokens {
			return nil, badRequest("min_tokens", "min_tokens must be in [0, max_tokens=%d], got %d", g.maxTokens, *f.MinTokens)
		}
		g.minTokens = *f.MinTokens
	}
	p := model.SamplingParams{Temperature: 1, TopP: 1}
	if c.gen.DoSample != nil && !*c.gen.DoSample {
		p.Temperature = 0
	} else {
		if c.gen.Temperature != nil {
			p.Temperature = *c.gen.Temperature
		}
		if c.gen.TopP != nil {
			p.TopP = *c.gen.TopP
		}
		if c.gen.TopK != nil {
			p.TopK = *c.gen.TopK
		}
	}
	if f.Temperature != nil {
		p.Temperature = *f.Temperature
	}
	if f.TopP != nil {
		p.TopP = *f.TopP
	}
	if f.TopK != nil {
		p.TopK = *f.TopK
		if p.TopK == -1 { // vLLM's spelling of "off"
			p.TopK = 0
		}
		p.TopK = min(p.TopK, c.mcfg.VocabSize) // all of them is off too
	}
	if f.Seed != nil {
		p.Seed = uint64(*f.Seed)
	} else if p.Temperature > 0 {
		// No seed asked for: draws differ between requests, as OpenAI's do.
		p.Seed = mrand.Uint64()
	}
	if err := p.Validate(); err != nil {
		param := "temperature"
		switch {
		case p.TopK < 0:
			param = "top_k"
		case math.IsNaN(p.TopP) || p.TopP < 0 || p.TopP > 1:
			param = "top_p"
		}
		return nil, badRequest(param, "%v", err)
	}
	g.sampling = &meshpb.SamplingParams{Temperature: p.Temperature, TopK: int32(p.TopK), TopP: p.TopP, Seed: p.Seed}
	if !f.IgnoreEOS {
		g.stopIDs = slices.Clone(c.eos)
	}
	for _, id := range f.StopTokenIDs {
		if id < 0 || id >= c.mcfg.VocabSize {
			return nil, badRequest("stop_token_ids", "stop token id %d is outside the vocabulary [0, %d)", id, c.mcfg.VocabSize)
		}
		g.stopIDs = append(g.stopIDs, id)
	}
	if err := c.parseStop(f.Stop, g); err != nil {
		return nil, err
	}
	if f.Timeout != nil && !(*f.Timeout > 0 && *f.Timeout <= maxTimeout.Seconds()) {
		return nil, badRequest("timeout", "timeout must be a positive number of seconds up to %g, got %g", maxTimeout.Seconds(), *f.Timeout)
	}
	return g, nil
}

// maxTimeout bounds a request's own timeout so that it converts to a
// time.Duration without overflow.
const maxTimeout = 100 * 365 * 24 * time.Hour

// expand makes the n choices of one prompt from its validated base: the
// first leads (the others share its prompt), seeds count up from the
// request's (seed, seed+1, ...) or are drawn at random.
func expand(g *genRequest, n int, seeded bool) []*genRequest {
	out := []*genRequest{g}
	for j := 1; j < n; j++ {
		cp := *g
		sp := proto.Clone(g.sampling).(*meshpb.SamplingParams)
		if seeded {
			sp.Seed = g.sampling.Seed + uint64(j)
		} else if sp.Temperature > 0 {
			sp.Seed = mrand.Uint64()
		}
		cp.sampling, cp.leader = sp, -2 // set by the caller: index of g
		out = append(out, &cp)
	}
	return out
}

// parseStop reads "stop": a string, a list of strings (matched in the
// generated text, which needs a tokenizer) or a list of token ids.
func (c *Coordinator) parseStop(raw json.RawMessage, g *genRequest) error {
	if len(raw) == 0 || string(raw) == "null" {
		return nil
	}
	var one string
	var strs []string
	var ids []int
	switch {
	case json.Unmarshal(raw, &one) == nil:
		strs = []string{one}
	case json.Unmarshal(raw, &strs) == nil:
	case json.Unmarshal(raw, &ids) == nil:
		for _, id := range ids {
			if id < 0 || id >= c.mcfg.VocabSize {
				return badRequest("stop", "stop token id %d is outside the vocabulary [0, %d)", id, c.mcfg.VocabSize)
			}
		}
		g.stopIDs = append(g.stopIDs, ids...)
		return nil
	default:
		return badRequest("stop", "stop must be a string, a list of strings or a list of token ids")
	}
	if len(strs) > 4 {
		return badRequest("stop", "at most 4 stop strings, got %d", len(strs))
	}
	for _, s := range strs {
		if s == "" {
			return badRequest("stop", "stop strings must not be empty")
		}
	}
	if c.tok == nil && len(strs) > 0 {
		return badRequest("stop", "stop strings need a tokenizer and the model directory has no tokenizer.json; pass stop token ids instead")
	}
	g.stopStrs = strs
	return nil
}

// requestContext applies the coordinator's and the request's timeouts.
func (c *Coordinator) requestContext(ctx context.Context, f *commonFields) (context.Context, context.CancelFunc) {
	d := c.cfg.RequestTimeout
	if f.Timeout != nil {
		rd := time.Duration(*f.Timeout * float64(time.Second))
		if d == 0 || rd < d {
			d = rd
		}
	}
	if d > 0 {
		return context.WithTimeout(ctx, d)
	}
	return context.WithCancel(ctx)
}

func newID(prefix string) string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// ---------------------------------------------------------------------------
// /v1/completions

type completionRequest struct {
	commonFields
	Prompt   json.RawMessage `json:"prompt"`
	Logprobs *int            `json:"logprobs"`
	Echo     bool            `json:"echo"`
}

type completionLogprobs struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []*float64           `json:"token_logprobs"`
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
}

type completionChoice struct {
	Index        int                 `json:"index"`
	Text         string              `json:"text"`
	Logprobs     *completionLogprobs `json:"logprobs"`
	FinishReason *string             `json:"finish_reason"`
	// TokenIDs is not OpenAI's: the ids behind Text (prompt ids first with
	// echo), so clients without the tokenizer can check tokens exactly.
	TokenIDs []int `json:"token_ids"`
}

type usage struct {
	PromptTokens        int                  `json:"prompt_tokens"`
	CompletionTokens    int                  `json:"completion_tokens"`
	TotalTokens         int                  `json:"total_tokens"`
	PromptTokensDetails *promptTokensDetails `json:"prompt_tokens_details,omitempty"`
}

type promptTokensDetails struct {
	// CachedTokens are prompt tokens the attention nodes took from their
	// prefix caches instead of computing them.
	CachedTokens int `json:"cached_tokens"`
}

// usageOf counts a request's tokens: each prompt once (the n choices of
// one prompt share it), every choice's completion.
func usageOf(gs []*genRequest, res []*genResult) *usage {
	u := &usage{PromptTokensDetails: &promptTokensDetails{}}
	for i, g := range gs {
		if g.leader < 0 {
			u.PromptTokens += len(g.prompt)
			u.PromptTokensDetails.CachedTokens += res[i].cached
		}
		u.CompletionTokens += len(res[i].tokens)
	}
	u.TotalTokens = u.PromptTokens + u.CompletionTokens
	return u
}

type completionResponse struct {
	ID      string             `json:"id"`
	Object  string             `json:"object"`
	Created int64              `json:"created"`
	Model   string             `json:"model"`
	Choices []completionChoice `json:"choices"`
	Usage   *usage             `json:"usage,omitempty"`
}

// onePrompt is one prompt of a completions request.
type onePrompt struct {
	ids    []int
	text   string
	isText bool
}

// parsePrompts reads "prompt": text (encoded with the BOS, as HF and vLLM
// do, when the model has a tokenizer), a list of token ids, or a list of
// those (several prompts; choices are indexed prompt-major). Nothing
// else: a list of token lists nests two levels, never deeper.
func (c *Coordinator) parsePrompts(raw json.RawMessage) ([]onePrompt, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, badRequest("prompt", "prompt is required")
	}
	text := func(s string) (onePrompt, error) {
		if c.tok == nil {
			return onePrompt{}, badRequest("prompt", "text prompts need a tokenizer and the model directory has no tokenizer.json; send the prompt as a list of token ids")
		}
		return onePrompt{ids: c.tok.Encode(s, true), text: s, isText: true}, nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		p, err := text(s)
		return []onePrompt{p}, err
	}
	var ids []int
	if json.Unmarshal(raw, &ids) == nil {
		return []onePrompt{{ids: ids}}, nil
	}
	var many []json.RawMessage
	if err := json.Unmarshal(raw, &many); err != nil {
		return nil, badRequest("prompt", "prompt must be a string, a list of token ids, or a list of either")
	}
	if len(many) == 0 {
		return nil, badRequest("prompt", "the prompt list is empty")
	}
	if len(many) > maxChoices {
		return nil, badRequest("prompt", "at most %d prompts per request, got %d", maxChoices, len(many))
	}
	out := make([]onePrompt, len(many))
	for i, m := range many {
		var p onePrompt
		var err error
		switch {
		case json.Unmarshal(m, &s) == nil:
			p, err = text(s)
		case json.Unmarshal(m, &p.ids) == nil:
		default:
			err = badRequest("prompt", "prompt[%d] must be a string or a list of token ids", i)
		}
		if err != nil {
			return nil, err
		}
		out[i] = p
	}
	return out, nil
}

// parseCompletion validates a /v1/completions body into its choices,
// prompt-major (choice p*n+j is sample j of prompt p). Every failure is
// an *apiError with a 4xx status.
func (c *Coordinator) parseCompletion(req *completionRequest) ([]*genRequest, error) {
	if err := c.checkModel(req.Model); err != nil {
		return nil, err
	}
	n, err := req.choices()
	if err != nil {
		return nil, err
	}
	prompts, err := c.parsePrompts(req.Prompt)
	if err != nil {
		return nil, err
	}
	if len(prompts)*n > maxChoices {
		return nil, badRequest("n", "%d prompts × n=%d = %d choices; at most %d per request", len(prompts), n, len(prompts)*n, maxChoices)
	}
	var gs []*genRequest
	for pi, pr := range prompts {
		g, err := c.params(&req.commonFields, pr.ids)
		if err != nil {
			var ae *apiError
			if len(prompts) > 1 && errors.As(err, &ae) && (ae.Param == nil || *ae.Param == "prompt") {
				ae.Message = fmt.Sprintf("prompt[%d]: %s", pi, ae.Message)
			}
			return nil, err
		}
		if req.Logprobs != nil {
			if *req.Logprobs < 0 || *req.Logprobs > maxLogprobs {
				return nil, badRequest("logprobs", "logprobs must be in [0, %d], got %d", maxLogprobs, *req.Logprobs)
			}
			g.logprobs = *req.Logprobs
		}
		g.echo = req.Echo
		if g.echo {
			if pr.isText {
				g.promptText = pr.text
			} else if c.tok != nil {
				g.promptText = c.tok.Decode(pr.ids, true)
			}
		}
		lead := len(gs)
		for j, cg := range expand(g, n, req.Seed != nil) {
			if j > 0 {
				cg.leader = lead
			}
			gs = append(gs, cg)
		}
	}
	return gs, nil
}

func (c *Coordinator) handleCompletions(w http.ResponseWriter, r *http.Request) {
	var req completionRequest
	if err := c.decodeBody(r, &req); err != nil {
		c.writeError(w, err)
		return
	}
	gs, err := c.parseCompletion(&req)
	if err != nil {
		c.writeError(w, err)
		return
	}
	ctx, cancel := c.requestContext(r.Context(), &req.commonFields)
	defer cancel()
	id, created := newID("cmpl-"), time.Now().Unix()
	if req.Stream {
		c.streamCompletion(ctx, w, r, &req, gs, id, created)
		return
	}
	res, err := c.generate(ctx, gs, nil, nil)
	if err != nil {
		if r.Context().Err() == nil {
			c.writeError(w, err)
		}
		return
	}
	out := completionResponse{ID: id, Object: "text_completion", Created: created, Model: c.name, Usage: usageOf(gs, res)}
	for i, g := range gs {
		out.Choices = append(out.Choices, c.completionChoiceOf(i, g, res[i]))
	}
	writeJSON(w, http.StatusOK, out)
}

// completionChoiceOf lays out one finished choice.
func (c *Coordinator) completionChoiceOf(i int, g *genRequest, res *genResult) completionChoice {
	ch := completionChoice{Index: i, Text: res.text, FinishReason: &res.finish}
	entries := res.tokens
	if g.echo {
		ch.Text = g.promptText + res.text
		entries = append(slices.Clone(res.prompt), res.tokens...)
	}
	for _, e := range entries {
		ch.TokenIDs = append(ch.TokenIDs, e.id)
	}
	if g.logprobs >= 0 {
		off := 0
		if !g.echo {
			off = len(g.promptText)
		}
		ch.Logprobs = c.completionLogprobs(entries, off)
	}
	return ch
}

// completionLogprobs lays entries out in OpenAI's legacy shape; offsets
// count bytes of the token texts from off.
func (c *Coordinator) completionLogprobs(entries []tokenEntry, off int) *completionLogprobs {
	lp := &completionLogprobs{Tokens: []string{}, TokenLogprobs: []*float64{}, TopLogprobs: []map[string]float64{}, TextOffset: []int{}}
	for _, e := range entries {
		lp.Tokens = append(lp.Tokens, e.text)
		lp.TokenLogprobs = append(lp.TokenLogprobs, e.lp)
		var top map[string]float64
		if e.lp != nil {
			top = map[string]float64{}
			for _, t := range e.top {
				top[c.tokenText(int(t.Token))] = t.Logprob
			}
		}
		lp.TopLogprobs = append(lp.TopLogprobs, top)
		lp.TextOffset = append(lp.TextOffset, off)
		off += len(e.text)
	}
	return lp
}

// sse writes Server-Sent Events and flushes each one. Its headers go out
// only once the request is admitted (start): a request refused before
// that gets a plain HTTP error (429 with Retry-After, 503), which is what
// clients' retry logic looks at.
type sse struct {
	w       http.ResponseWriter
	f       http.Flusher
	started bool
}

func newSSE(w http.ResponseWriter) *sse {
	f, _ := w.(http.Flusher)
	return &sse{w: w, f: f}
}

// start sends the 200 and the event-stream headers (once).
func (s *sse) start() {
	if s.started {
		return
	}
	s.started = true
	h := s.w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("Connection", "keep-alive")
	s.w.WriteHeader(http.StatusOK)
	if s.f != nil {
		s.f.Flush()
	}
}

func (s *sse) send(v any) error {
	s.start()
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if _, err := fmt.Fprintf(s.w, "data: %s\n\n", b); err != nil {
		return err
	}
	if s.f != nil {
		s.f.Flush()
	}
	return nil
}

func (s *sse) done() {
	io.WriteString(s.w, "data: [DONE]\n\n")
	if s.f != nil {
		s.f.Flush()
	}
}

// streamError ends a stream: before its headers went out (the request
// was never admitted) with a plain HTTP error; after, with vLLM's
// convention of an error event followed by [DONE].
func (c *Coordinator) streamError(s *sse, r *http.Request, err error) {
	if r.Context().Err() != nil {
		return // the client is gone; nobody reads
	}
	if !s.started {
		c.writeError(s.w, err)
		return
	}
	ae := c.toAPIError(err)
	noteError(s.w, ae.Type)
	s.send(map[string]*apiError{"error": ae})
	s.done()
}

func (c *Coordinator) streamCompletion(ctx context.Context, w http.ResponseWriter, r *http.Request, req *completionRequest, gs []*genRequest, id string, created int64) {
	s := newSSE(w)
	offs := make([]int, len(gs))
	for i, g := range gs {
		if !g.echo {
			offs[i] = len(g.promptText)
		}
	}
	chunk := func(ch completionChoice) error {
		return s.send(completionResponse{ID: id, Object: "text_completion", Created: created, Model: c.name, Choices: []completionChoice{ch}})
	}
	res, err := c.generate(ctx, gs, s.start, func(i int, d genDelta) error {
		entries := append(d.prompt, d.tokens...)
		if d.text != "" || len(entries) > 0 {
			ch := completionChoice{Index: i, Text: d.text}
			for _, e := range entries {
				ch.TokenIDs = append(ch.TokenIDs, e.id)
			}
			if gs[i].logprobs >= 0 {
				ch.Logprobs = c.completionLogprobs(entries, offs[i])
				for _, e := range entries {
					offs[i] += len(e.text)
				}
			}
			if err := chunk(ch); err != nil {
				return err
			}
		}
		if d.finish != "" {
			return chunk(completionChoice{Index: i, FinishReason: &d.finish, TokenIDs: []int{}})
		}
		return nil
	})
	if err != nil {
		c.streamError(s, r, err)
		return
	}
	if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
		s.send(completionResponse{ID: id, Object: "text_completion", Created: created, Model: c.name,
			Choices: []completionChoice{}, Usage: usageOf(gs, res)})
	}
	s.done()
}

// ---------------------------------------------------------------------------
// /v1/chat/completions

type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

type chatRequest struct {
	commonFields
	Messages            []chatMessage `json:"messages"`
	MaxCompletionTokens *int          `json:"max_completion_tokens"`
	Logprobs            bool          `json:"logprobs"`
	TopLogprobs         *int          `json:"top_logprobs"`
}

// content reads a message's content: a string or a list of text parts.
func (m chatMessage) content(i int) (string, error) {
	if len(m.Content) == 0 || string(m.Content) == "null" {
		return "", nil
	}
	var s string
	if json.Unmarshal(m.Content, &s) == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(m.Content, &parts); err != nil {
		return "", badRequest(fmt.Sprintf("messages[%d].content", i), "content must be a string or a list of text parts")
	}
	for j, p := range parts {
		if p.Type != "text" {
			return "", badRequest(fmt.Sprintf("messages[%d].content[%d].type", i, j), "only text content parts are supported, got %q", p.Type)
		}
		s += p.Text
	}
	return s, nil
}

type chatLogprobEntry struct {
	Token       string             `json:"token"`
	Logprob     float64            `json:"logprob"`
	Bytes       []int              `json:"bytes"`
	TopLogprobs []chatLogprobEntry `json:"top_logprobs,omitempty"`
}

type chatLogprobs struct {
	Content []chatLogprobEntry `json:"content"`
}

type chatMsgOut struct {
	Role    string  `json:"role,omitempty"`
	Content *string `json:"content,omitempty"`
}

type chatChoice struct {
	Index        int           `json:"index"`
	Message      *chatMsgOut   `json:"message,omitempty"`
	Delta        *chatMsgOut   `json:"delta,omitempty"`
	Logprobs     *chatLogprobs `json:"logprobs"`
	FinishReason *string       `json:"finish_reason"`
	TokenIDs     []int         `json:"token_ids,omitempty"`
}

type chatResponse struct {
	ID      string       `json:"id"`
	Object  string       `json:"object"`
	Created int64        `json:"created"`
	Model   string       `json:"model"`
	Choices []chatChoice `json:"choices"`
	Usage   *usage       `json:"usage,omitempty"`
}

func byteList(s string) []int {
	out := make([]int, len(s))
	for i := range len(s) {
		out[i] = int(s[i])
	}
	return out
}

func (c *Coordinator) chatLogprobs(entries []tokenEntry, top int) *chatLogprobs {
	lp := &chatLogprobs{Content: []chatLogprobEntry{}}
	for _, e := range entries {
		ce := chatLogprobEntry{Token: e.text, Bytes: byteList(e.text)}
		if e.lp != nil {
			ce.Logprob = *e.lp
		}
		for _, t := range e.top[:min(len(e.top), top)] {
			s := c.tokenText(int(t.Token))
			ce.TopLogprobs = append(ce.TopLogprobs, chatLogprobEntry{Token: s, Logprob: t.Logprob, Bytes: byteList(s)})
		}
		lp.Content = append(lp.Content, ce)
	}
	return lp
}

func (c *Coordinator) handleChat(w http.ResponseWriter, r *http.Request) {
	if c.tok == nil {
		c.writeError(w, badRequest("messages", "chat needs a tokenizer with a chat template and the model directory has no tokenizer.json; use /v1/completions with token ids"))
		return
	}
	var req chatRequest
	if err := c.decodeBody(r, &req); err != nil {
		c.writeError(w, err)
		return
	}
	if len(req.Messages) == 0 {
		c.writeError(w, badRequest("messages", "messages must hold at least one message"))
		return
	}
	msgs := make([]tokenizer.Message, len(req.Messages))
	for i, m := range req.Messages {
		switch m.Role {
		case "system", "user", "assistant", "developer":
		default:
			c.writeError(w, badRequest(fmt.Sprintf("messages[%d].role", i), "role %q: want system, user or assistant", m.Role))
			return
		}
		s, err := m.content(i)
		if err != nil {
			c.writeError(w, err)
			return
		}
		role := m.Role
		if role == "developer" {
			role = "system"
		}
		msgs[i] = tokenizer.Message{Role: role, Content: s}
	}
	text, err := c.tok.ApplyChatTemplate(msgs, true)
	if err != nil {
		if errors.Is(err, tokenizer.ErrNoChatTemplate) {
			c.writeError(w, badRequest("messages", "%v", err))
			return
		}
		c.writeError(w, badRequest("messages", "rendering the chat template: %v", err))
		return
	}
	ids := c.tok.Encode(text, false) // the template writes the BOS itself
	if req.MaxTokens == nil {
		req.MaxTokens = req.MaxCompletionTokens
	}
	n, err := req.choices()
	if err != nil {
		c.writeError(w, err)
		return
	}
	g, err := c.params(&req.commonFields, ids)
	if err != nil {
		c.writeError(w, err)
		return
	}
	top := 0
	if req.TopLogprobs != nil {
		if *req.TopLogprobs < 0 || *req.TopLogprobs > maxLogprobs {
			c.writeError(w, badRequest("top_logprobs", "top_logprobs must be in [0, %d], got %d", maxLogprobs, *req.TopLogprobs))
			return
		}
		if !req.Logprobs {
			c.writeError(w, badRequest("top_logprobs", "top_logprobs needs logprobs: true"))
			return
		}
		top = *req.TopLogprobs
	}
	if req.Logprobs {
		g.logprobs = top
	}
	gs := expand(g, n, req.Seed != nil)
	for _, cg := range gs[1:] {
		cg.leader = 0
	}
	ctx, cancel := c.requestContext(r.Context(), &req.commonFields)
	defer cancel()
	id, created := newID("chatcmpl-"), time.Now().Unix()
	if req.Stream {
		s := newSSE(w)
		chunk := func(ch chatChoice) error {
			return s.send(chatResponse{ID: id, Object: "chat.completion.chunk", Created: created, Model: c.name, Choices: []chatChoice{ch}})
		}
		onAdmit := func() {
			role, empty := "assistant", ""
			for i := range gs {
				chunk(chatChoice{Index: i, Delta: &chatMsgOut{Role: role, Content: &empty}})
			}
		}
		res, err := c.generate(ctx, gs, onAdmit, func(i int, d genDelta) error {
			// A token that ends inside a character adds no text yet; send
			// nothing for it unless its logprobs were asked for.
			if d.text != "" || (len(d.tokens) > 0 && req.Logprobs) {
				text := d.text
				ch := chatChoice{Index: i, Delta: &chatMsgOut{Content: &text}}
				if req.Logprobs {
					ch.Logprobs = c.chatLogprobs(d.tokens, top)
				}
				if err := chunk(ch); err != nil {
					return err
				}
			}
			if d.finish != "" {
				return chunk(chatChoice{Index: i, Delta: &chatMsgOut{}, FinishReason: &d.finish})
			}
			return nil
		})
		if err != nil {
			c.streamError(s, r, err)
			return
		}
		if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
			s.send(chatResponse{ID: id, Object: "chat.completion.chunk", Created: created, Model: c.name,
				Choices: []chatChoice{}, Usage: usageOf(gs, res)})
		}
		s.done()
		return
	}
	res, err := c.generate(ctx, gs, nil, nil)
	if err != nil {
		if r.Context().Err() == nil {
			c.writeError(w, err)
		}
		return
	}
	out := chatResponse{ID: id, Object: "chat.completion", Created: created, Model: c.name, Usage: usageOf(gs, res)}
	for i, res := range res {
		ch := chatChoice{Index: i, Message: &chatMsgOut{Role: "assistant", Content: &res.text}, FinishReason: &res.finish}
		for _, e := range res.tokens {
			ch.TokenIDs = append(ch.TokenIDs, e.id)
		}
		if req.Logprobs {
			ch.Logprobs = c.chatLogprobs(res.tokens, top)
		}
		out.Choices = append(out.Choices, ch)
	}
	writeJSON(w, http.StatusOK, out)
}

// ---------------------------------------------------------------------------
// /tokenize, /detokenize (vLLM's shapes)

type tokenizeRequest struct {
	Model               string        `json:"model"`
	Prompt              *string       `json:"prompt"`
	Messages            []chatMessage `json:"messages"`
	AddSpecialTokens    *bool         `json:"add_special_tokens"`
	AddGenerationPrompt *bool         `json:"add_generation_prompt"`
}

func (c *Coordinator) needTokenizer(param string) error {
	if c.tok == nil {
		return badRequest(param, "the model directory has no tokenizer.json")
	}
	return nil
}

func (c *Coordinator) handleTokenize(w http.ResponseWriter, r *http.Request) {
	var req tokenizeRequest
	if err := c.decodeBody(r, &req); err != nil {
		c.writeError(w, err)
		return
	}
	if err := c.needTokenizer("prompt"); err != nil {
		c.writeError(w, err)
		return
	}
	if err := c.checkModel(req.Model); err != nil {
		c.writeError(w, err)
		return
	}
	var ids []int
	switch {
	case req.Prompt != nil && req.Messages != nil:
		c.writeError(w, badRequest("prompt", "give either prompt or messages, not both"))
		return
	case req.Prompt != nil:
		add := req.AddSpecialTokens == nil || *req.AddSpecialTokens
		ids = c.tok.Encode(*req.Prompt, add)
	case req.Messages != nil:
		msgs := make([]tokenizer.Message, len(req.Messages))
		for i, m := range req.Messages {
			s, err := m.content(i)
			if err != nil {
				c.writeError(w, err)
				return
			}
			msgs[i] = tokenizer.Message{Role: m.Role, Content: s}
		}
		text, err := c.tok.ApplyChatTemplate(msgs, req.AddGenerationPrompt == nil || *req.AddGenerationPrompt)
		if err != nil {
			c.writeError(w, badRequest("messages", "%v", err))
			return
		}
		add := req.AddSpecialTokens != nil && *req.AddSpecialTokens
		ids = c.tok.Encode(text, add)
	default:
		c.writeError(w, badRequest("prompt", "prompt (or messages) is required"))
		return
	}
	if ids == nil {
		ids = []int{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"tokens": ids, "count": len(ids), "max_model_len": c.mcfg.MaxPositionEmbeddings})
}

func (c *Coordinator) handleDetokenize(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Model  string `json:"model"`
		Tokens []int  `json:"tokens"`
	}
	if err := c.decodeBody(r, &req); err != nil {
		c.writeError(w, err)
		return
	}
	if err := c.needTokenizer("tokens"); err != nil {
		c.writeError(w, err)
		return
	}
	if err := c.checkModel(req.Model); err != nil {
		c.writeError(w, err)
		return
	}
	for i, id := range req.Tokens {
		if id < 0 || id >= c.mcfg.VocabSize {
			c.writeError(w, badRequest("tokens", "token %d is id %d, outside the vocabulary [0, %d)", i, id, c.mcfg.VocabSize))
			return
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"prompt": c.tok.Decode(req.Tokens, false)})
}
