package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// Error kinds of failed requests, counted in the result's errors_by_kind.
// A non-200 answer counts as "http_<status>", e.g. "http_429".
const (
	// KindTimeout: the request ran past --request-timeout.
	KindTimeout = "timeout"
	// KindConnection: no answer at all (refused, reset or closed before
	// the response headers).
	KindConnection = "connection"
	// KindStreamCut: the stream ended or broke before [DONE] and before a
	// finish_reason.
	KindStreamCut = "stream_cut"
	// KindStreamError: the server sent an error event inside the stream.
	KindStreamError = "stream_error"
	// KindBadResponse: a stream event that is not the JSON the API
	// promises, or a 200 answer that is not a stream.
	KindBadResponse = "bad_response"
	// KindNoTokens: the stream finished without a single token, so no
	// TTFT exists (vLLM counts these as failed too).
	KindNoTokens = "no_tokens"
)

// errRequestTimeout is the cause of a request context that ran out of
// --request-timeout, telling it apart from the run being cancelled.
var errRequestTimeout = errors.New("request timeout")

// maxEvent bounds one SSE event; a larger one is a broken server.
const maxEvent = 8 << 20

// outcome is one request as measured. Times are seconds; start, end and
// chunk times count from the run's start.
type outcome struct {
	start, end float64
	ttft       float64
	latency    float64
	itl        []float64
	// chunkTimes and chunkTokens are when each token-carrying event came
	// and how many tokens it carried (len(token_ids) when the server sends
	// them, else 1), for the time series.
	chunkTimes  []float64
	chunkTokens []int
	promptLen   int
	outputLen   int
	cachedLen   int // usage.prompt_tokens_details.cached_tokens
	err         string
	kind        string // "" when the request succeeded
	canceled    bool   // the run was cancelled under it; not counted
	late        bool   // the --duration door closed before it was sent; not counted
}

// client sends benchmark requests.
type client struct {
	http     *http.Client
	url      string
	model    string
	cfg      *Config
	runStart time.Time
	// door, when set (--duration), is when requests stop being sent: a
	// request admitted just before it whose send would fall after it is
	// not sent, so every counted request started within the duration.
	door time.Time
}

type streamChoice struct {
	Text  *string `json:"text"`
	Delta *struct {
		Content          *string `json:"content"`
		ReasoningContent *string `json:"reasoning_content"`
		Reasoning        *string `json:"reasoning"`
	} `json:"delta"`
	TokenIDs     []int   `json:"token_ids"`
	FinishReason *string `json:"finish_reason"`
}

type streamEvent struct {
	Choices []streamChoice `json:"choices"`
	Usage   *struct {
		PromptTokens        *int `json:"prompt_tokens"`
		CompletionTokens    *int `json:"completion_tokens"`
		PromptTokensDetails *struct {
			CachedTokens *int `json:"cached_tokens"`
		} `json:"prompt_tokens_details"`
	} `json:"usage"`
	Error json.RawMessage `json:"error"`
}

// body builds the JSON request for r.
func (c *client) body(r *Request) ([]byte, error) {
	m := map[string]any{
		"model":          c.model,
		"stream":         true,
		"stream_options": map[string]any{"include_usage": true},
	}
	if c.cfg.Chat() {
		msgs := []map[string]string{{"role": "user", "content": r.Text}}
		if r.System != "" {
			msgs = append([]map[string]string{{"role": "system", "content": r.System}}, msgs...)
		}
		m["messages"] = msgs
		// vLLM sends max_completion_tokens; servers that predate it read
		// max_tokens.
		m["max_completion_tokens"] = r.OutputLen
		m["max_tokens"] = r.OutputLen
	} else {
		if r.PromptIDs != nil {
			m["prompt"] = r.PromptIDs
		} else {
			m["prompt"] = r.Text
		}
		m["max_tokens"] = r.OutputLen
	}
	if c.cfg.IgnoreEOS {
		m["ignore_eos"] = true
	}
	if c.cfg.Temperature != nil {
		m["temperature"] = *c.cfg.Temperature
	}
	if c.cfg.TopP != nil {
		m["top_p"] = *c.cfg.TopP
	}
	if c.cfg.TopK != nil {
		m["top_k"] = *c.cfg.TopK
	}
	return json.Marshal(m)
}

func (c *client) since() float64 { return time.Since(c.runStart).Seconds() }

// do sends r and measures it as vLLM does: TTFT is the time to the first
// event carrying a token, ITLs the gaps between successive such events,
// E2EL the time to the end of the stream. Output tokens come from the
// server's usage when it reports it, else from counting with the
// tokenizer, else from the events' token_ids or the number of events.
func (c *client) do(ctx context.Context, r *Request) (o outcome) {
	o.promptLen = r.PromptLen
	body, err := c.body(r)
	if err != nil {
		o.kind, o.err = KindBadResponse, err.Error()
		return o
	}
	if c.cfg.RequestTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, c.cfg.RequestTimeout, errRequestTimeout)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(body))
	if err != nil {
		o.kind, o.err = KindBadResponse, err.Error()
		return o
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	setAuth(req, c.cfg.APIKey)

	st := time.Now()
	if !c.door.IsZero() && !st.Before(c.door) {
		o.late = true
		return o
	}
	o.start = st.Sub(c.runStart).Seconds()
	defer func() {
		o.end = c.since()
		if o.kind != "" {
			o.latency = o.end - o.start
		}
	}()
	fail := func(kind string, err error) outcome {
		switch {
		case context.Cause(ctx) == errRequestTimeout:
			o.kind, o.err = KindTimeout, fmt.Sprintf("no complete answer within %v", c.cfg.RequestTimeout)
		case ctx.Err() != nil:
			o.canceled, o.kind, o.err = true, "canceled", ctx.Err().Error()
		default:
			o.kind, o.err = kind, err.Error()
		}
		return o
	}

	resp, err := c.http.Do(req)
	if err != nil {
		return fail(KindConnection, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 2048))
		o.kind = fmt.Sprintf("http_%d", resp.StatusCode)
		o.err = strings.TrimSpace(resp.Status + ": " + apiMessage(msg))
		return o
	}

	var (
		text       strings.Builder
		last       = st
		gotToken   bool
		finished   bool // a finish_reason came
		done       bool // [DONE] came
		usageOut   = -1
		tokenCount int
		data       []byte
	)
	handle := func(ev []byte, at time.Time) error {
		if bytes.Equal(bytes.TrimSpace(ev), []byte("[DONE]")) {
			done = true
			return nil
		}
		var e streamEvent
		if err := json.Unmarshal(ev, &e); err != nil {
			return fmt.Errorf("%w: event is not JSON: %v (%s)", errBadEvent, err, snippet(ev))
		}
		if len(e.Error) > 0 && string(e.Error) != "null" {
			return fmt.Errorf("%w: %s", errStreamError, apiMessage(ev))
		}
		if e.Usage != nil {
			if e.Usage.CompletionTokens != nil {
				usageOut = *e.Usage.CompletionTokens
			}
			if e.Usage.PromptTokens != nil {
				o.promptLen = *e.Usage.PromptTokens
			}
			if d := e.Usage.PromptTokensDetails; d != nil && d.CachedTokens != nil {
				o.cachedLen = *d.CachedTokens
			}
		}
		if len(e.Choices) == 0 {
			return nil
		}
		ch := e.Choices[0]
		if ch.FinishReason != nil && *ch.FinishReason != "" {
			finished = true
		}
		var s string
		switch {
		case ch.Text != nil:
			s = *ch.Text
		case ch.Delta != nil && ch.Delta.Content != nil:
			s = *ch.Delta.Content
		case ch.Delta != nil && ch.Delta.ReasoningContent != nil:
			s = *ch.Delta.ReasoningContent
		case ch.Delta != nil && ch.Delta.Reasoning != nil:
			s = *ch.Delta.Reasoning
		}
		// Events with neither text nor token ids (the chat API's opening
		// role event, the closing finish_reason event) carry no token.
		if s == "" && len(ch.TokenIDs) == 0 {
			return nil
		}
		t := at.Sub(st).Seconds()
		if !gotToken {
			gotToken = true
			o.ttft = t
		} else {
			o.itl = append(o.itl, at.Sub(last).Seconds())
		}
		last = at
		n := max(1, len(ch.TokenIDs))
		tokenCount += n
		o.chunkTimes = append(o.chunkTimes, at.Sub(c.runStart).Seconds())
		o.chunkTokens = append(o.chunkTokens, n)
		text.WriteString(s)
		return nil
	}

	br := bufio.NewReaderSize(resp.Body, 64<<10)
	var line []byte
	for !done {
		frag, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			if len(line)+len(frag) > maxEvent {
				return fail(KindBadResponse, fmt.Errorf("a stream line exceeds %d bytes", maxEvent))
			}
			line = append(line, frag...)
			continue
		}
		if len(line) > 0 {
			line = append(line, frag...)
			frag, line = line, line[:0]
		}
		at := time.Now()
		trimmed := bytes.TrimRight(frag, "\r\n")
		switch {
		case len(trimmed) == 0:
			// A blank line ends an event.
			if data != nil {
				if herr := handle(data, at); herr != nil {
					return failEvent(fail, herr)
				}
				data = nil
			}
		case trimmed[0] == ':':
			// An SSE comment (a keep-alive ping).
		case bytes.HasPrefix(trimmed, []byte("data:")):
			d := bytes.TrimPrefix(bytes.TrimPrefix(trimmed, []byte("data:")), []byte(" "))
			if data != nil {
				data = append(data, '\n')
			}
			if len(data)+len(d) > maxEvent {
				return fail(KindBadResponse, fmt.Errorf("a stream event exceeds %d bytes", maxEvent))
			}
			data = append(data, d...)
			// Servers write an event's data line and its blank line
			// together, so handling [DONE] here changes no timing.
			if bytes.Equal(bytes.TrimSpace(data), []byte("[DONE]")) {
				done = true
			}
		default:
			// event:, id:, retry: fields carry nothing we measure.
		}
		if err != nil {
			if err == io.EOF {
				if data != nil && !done {
					if herr := handle(data, at); herr != nil {
						return failEvent(fail, herr)
					}
				}
				break
			}
			return fail(KindStreamCut, fmt.Errorf("stream broke after %d tokens: %w", tokenCount, err))
		}
	}
	if !done && !finished {
		if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") && !gotToken {
			return fail(KindBadResponse, fmt.Errorf("the answer is %q, not an event stream", ct))
		}
		return fail(KindStreamCut, fmt.Errorf("stream ended without [DONE] or a finish_reason after %d tokens", tokenCount))
	}
	o.latency = time.Since(st).Seconds()
	// Read the body to its end so the connection is reused (as vLLM's
	// client does); the answer is complete, so a failure here is not the
	// request's.
	io.Copy(io.Discard, br)
	if !gotToken {
		o.kind, o.err = KindNoTokens, "the stream finished without a token"
		return o
	}
	switch {
	case usageOut >= 0:
		o.outputLen = usageOut
	case c.cfg.Tokenizer != nil:
		o.outputLen = len(c.cfg.Tokenizer.Encode(text.String(), false))
	default:
		o.outputLen = tokenCount
	}
	return o
}

var (
	errBadEvent    = errors.New("bad event")
	errStreamError = errors.New("error event")
)

func failEvent(fail func(string, error) outcome, err error) outcome {
	if errors.Is(err, errStreamError) {
		return fail(KindStreamError, err)
	}
	return fail(KindBadResponse, err)
}

// apiMessage is error.message of an OpenAI-shaped error body, else the
// body itself, shortened.
func apiMessage(b []byte) string {
	var e struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	if json.Unmarshal(b, &e) == nil && e.Error.Message != "" {
		return e.Error.Message
	}
	s := strings.TrimSpace(string(b))
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}
