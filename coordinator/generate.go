package coordinator

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	meshpb "github.com/expertmesh/expertmesh/proto"
	"github.com/expertmesh/expertmesh/tokenizer"
)

// genRequest is a validated generation, whichever endpoint it came from.
type genRequest struct {
	prompt     []int
	promptText string // echoed text of the prompt
	maxTokens  int
	sampling   *meshpb.SamplingParams
	logprobs   int // -1: none
	echo       bool
	stopIDs    []int
	stopStrs   []string
	// onAdmit, if set, runs once the request is admitted (a stream sends
	// its headers then, not before: a refusal is a plain HTTP error).
	onAdmit func()
}

// tokenEntry is one position of the output: its id, text and (when asked)
// logprob report. lp is nil for the very first prompt token.
type tokenEntry struct {
	id   int
	text string
	lp   *float64
	top  []*meshpb.TopLogprob
}

// genDelta is what one step added: prompt positions (echo, first delta
// only), generated positions, and the text that may be shown now.
type genDelta struct {
	prompt []tokenEntry
	tokens []tokenEntry
	text   string
}

type genResult struct {
	prompt []tokenEntry // echo only
	tokens []tokenEntry
	text   string
	finish string
}

// tokenText is a token's text for logprobs: its decoded bytes with a
// tokenizer, vLLM's "token_id:N" spelling without one.
func (c *Coordinator) tokenText(id int) string {
	if c.tok == nil {
		return "token_id:" + itoa(id)
	}
	return c.tok.Decode([]int{id}, false)
}

func itoa(i int) string {
	var b [20]byte
	n := len(b)
	neg := i < 0
	u := uint64(i)
	if neg {
		u = uint64(-i)
	}
	for {
		n--
		b[n] = byte('0' + u%10)
		u /= 10
		if u == 0 {
			break
		}
	}
	if neg {
		n--
		b[n] = '-'
	}
	return string(b[n:])
}

func (c *Coordinator) entry(tl *meshpb.TokenLogprob, id int, first bool) tokenEntry {
	e := tokenEntry{id: id, text: c.tokenText(id)}
	if tl != nil && !first {
		v := tl.Logprob
		e.lp = &v
		e.top = tl.Top
	}
	return e
}

// stopText finds stop strings in generated text. It holds back the tail
// that could still become a stop string so a streamed delta never shows
// text that is then cut.
type stopText struct {
	stops   []string
	text    string // generated text so far
	emitted int    // bytes of text already shown
	hit     bool
}

// add appends text and returns what may be shown now.
func (s *stopText) add(delta string, final bool) string {
	if s.hit {
		return ""
	}
	if len(s.stops) == 0 {
		s.text += delta
		return s.flush(len(s.text))
	}
	from := max(0, len(s.text)-maxLen(s.stops)+1)
	s.text += delta
	cut := -1
	for _, st := range s.stops {
		if i := strings.Index(s.text[from:], st); i >= 0 && (cut < 0 || from+i < cut) {
			cut = from + i
		}
	}
	if cut >= 0 {
		s.hit = true
		s.text = s.text[:cut]
		return s.flush(len(s.text))
	}
	safe := len(s.text)
	if !final {
		for _, st := range s.stops {
			for k := min(len(st)-1, len(s.text)); k > 0; k-- {
				if strings.HasSuffix(s.text, st[:k]) {
					safe = min(safe, len(s.text)-k)
					break
				}
			}
		}
	}
	return s.flush(safe)
}

func (s *stopText) flush(upto int) string {
	if upto <= s.emitted {
		return ""
	}
	out := s.text[s.emitted:upto]
	s.emitted = upto
	return out
}

func maxLen(ss []string) int {
	m := 0
	for _, s := range ss {
		m = max(m, len(s))
	}
	return m
}

// generate runs g to completion, calling onDelta (if not nil) with every
// step's progress. It returns when the sequence finished, failed, or ctx
// ended; in every case the sequence is withdrawn so its cache is released
// in its node's next step.
func (c *Coordinator) generate(ctx context.Context, g *genRequest, onDelta func(genDelta) error) (*genResult, error) {
	q := &sequence{
		id: c.nextID.Add(1), prompt: g.prompt, maxTokens: g.maxTokens, stopIDs: g.stopIDs,
		sampling: g.sampling, logprobs: int32(g.logprobs), echoLogprobs: g.echo && g.logprobs >= 0,
		span: trace.SpanContextFromContext(ctx),
	}
	span := trace.SpanFromContext(ctx)
	span.SetAttributes(attribute.Int64("seq_id", int64(q.id)), attribute.Int("prompt_tokens", len(g.prompt)),
		attribute.Int("max_tokens", g.maxTokens))
	_, q.admission = tracer.Start(ctx, "coordinator.admission")
	defer q.admission.End()
	box, err := c.submit(q)
	if err != nil {
		return nil, err
	}
	if g.onAdmit != nil {
		g.onAdmit()
	}
	defer c.withdraw(q)
	c.metrics.running.Inc()
	defer c.metrics.running.Dec()
	c.metrics.promptTokens.Add(float64(len(g.prompt)))
	start := time.Now()

	res := &genResult{}
	var stream *tokenizer.Stream
	if c.tok != nil {
		stream = c.tok.NewStream(true)
	}
	st := &stopText{stops: g.stopStrs}
	first := true // first delta carries the echoed prompt text
	for {
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				if trouble := c.troubleFor(q); trouble != nil {
					// Its steps kept coming back unapplied: say why.
					return nil, fmt.Errorf("%w after %d tokens: %w", errTimeout, len(res.tokens), trouble)
				}
				return nil, errTimeout
			}
			return nil, ctx.Err()
		case <-box.notify:
		}
		for _, u := range box.take() {
			if u.err != nil {
				return nil, u.err
			}
			var d genDelta
			if first && g.echo {
				d.text = g.promptText
			}
			for _, tl := range u.promptLogprobs {
				d.prompt = append(d.prompt, c.entry(tl, int(tl.Token), len(res.prompt)+len(d.prompt) == 0))
			}
			if g.echo && g.logprobs < 0 && first {
				// No logprobs were asked for, so the node sent no prompt
				// entries; the prompt still belongs to the output.
				for _, id := range g.prompt {
					d.prompt = append(d.prompt, tokenEntry{id: id, text: c.tokenText(id)})
				}
			}
			res.prompt = append(res.prompt, d.prompt...)
			first = false
			var text string
			if u.sampled {
				if len(res.tokens) == 0 {
					c.metrics.ttft.Observe(time.Since(start).Seconds())
					span.AddEvent("first token")
				}
				c.metrics.generationTokens.Inc()
				e := c.entry(u.logprob, u.token, false)
				if u.logprob == nil {
					e.lp, e.top = nil, nil
				}
				d.tokens = append(d.tokens, e)
				res.tokens = append(res.tokens, e)
				if stream != nil {
					text = stream.Add(u.token)
				}
			}
			if u.finish != "" && stream != nil {
				text += stream.Flush()
			}
			d.text += st.add(text, u.finish != "")
			res.finish = u.finish
			if st.hit {
				res.finish = "stop"
			}
			if onDelta != nil {
				if err := onDelta(d); err != nil {
					return nil, err
				}
			}
			if res.finish != "" {
				span.SetAttributes(attribute.Int("completion_tokens", len(res.tokens)), attribute.String("finish_reason", res.finish))
				res.text = st.text
				c.metrics.requestSeconds.Observe(time.Since(start).Seconds())
				return res, nil
			}
		}
	}
}
