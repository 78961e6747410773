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

// genRequest is one validated generation (one choice), whichever
// endpoint it came from.
type genRequest struct {
	prompt     []int
	promptText string // echoed text of the prompt
	maxTokens  int
	// minTokens: no stop token or stop string ends the choice before it
	// has this many tokens (vLLM's min_tokens).
	minTokens int
	sampling  *meshpb.SamplingParams
	logprobs  int // -1: none
	echo      bool
	stopIDs   []int
	stopStrs  []string
	// leader is the index of the choice whose prompt this one shares (the
	// 2nd..nth choice of n > 1), or -1.
	leader int
}

// tokenEntry is one position of the output: its id, text and (when asked)
// logprob report. lp is nil for the very first prompt token.
type tokenEntry struct {
	id   int
	text string
	lp   *float64
	top  []*meshpb.TopLogprob
}

// genDelta is what one step added to a choice: prompt positions (echo,
// first delta only), generated positions, the text that may be shown
// now, and its finish reason once it is complete.
type genDelta struct {
	prompt []tokenEntry
	tokens []tokenEntry
	text   string
	finish string
}

type genResult struct {
	prompt []tokenEntry // echo only
	tokens []tokenEntry
	text   string
	finish string
	// cached is how many prompt tokens the node took from its prefix
	// cache (usage.prompt_tokens_details.cached_tokens).
	cached int
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
	stops []string
	// min: stop strings count only once this many tokens were generated
	// (min_tokens); checked: bytes of text before that point.
	min, checked int
	text         string // generated text so far
	emitted      int    // bytes of text already shown
	hit          bool
}

// add appends text (the choice now has tokens tokens) and returns what
// may be shown now.
func (s *stopText) add(delta string, final bool, tokens int) string {
	if s.hit {
		return ""
	}
	if len(s.stops) == 0 {
		s.text += delta
		return s.flush(len(s.text))
	}
	if tokens <= s.min {
		// Under min_tokens no stop string counts, as in vLLM: the text
		// so far is shown and never searched.
		s.text += delta
		s.checked = len(s.text)
		return s.flush(len(s.text))
	}
	from := max(s.checked, len(s.text)-maxLen(s.stops)+1)
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

// choiceState follows one choice of a request while it generates.
type choiceState struct {
	g      *genRequest
	q      *sequence
	res    *genResult
	stream *tokenizer.Stream
	st     *stopText
	first  bool // its first delta carries the echoed prompt text
	done   bool
	last   time.Time // when its latest token arrived
	firstT time.Time // when its first token arrived
}

// generate runs a request's choices (gs, in the order of the answer's
// choices) to completion, calling onAdmit (if not nil) once they are all
// admitted — a stream sends its headers then, not before, so a refusal is
// a plain HTTP error — and onDelta (if not nil) with every step's
// progress of choice i. It returns when every choice finished, one
// failed (the request fails whole), or ctx ended; in every case every
// sequence is withdrawn so its cache is released in its node's next step.
func (c *Coordinator) generate(ctx context.Context, gs []*genRequest, onAdmit func(), onDelta func(i int, d genDelta) error) ([]*genResult, error) {
	arrived := time.Now()
	span := trace.SpanFromContext(ctx)
	_, admission := tracer.Start(ctx, "coordinator.admission")
	defer admission.End()
	qs := make([]*sequence, len(gs))
	choices := make([]*choiceState, len(gs))
	index := make(map[*sequence]int, len(gs))
	promptTokens, maxTokens := 0, 0
	for i, g := range gs {
		q := &sequence{
			id: c.nextID.Add(1), prompt: g.prompt, maxTokens: g.maxTokens, minTokens: g.minTokens, stopIDs: g.stopIDs,
			sampling: g.sampling, logprobs: int32(g.logprobs), echoLogprobs: g.echo && g.logprobs >= 0,
			span: trace.SpanContextFromContext(ctx), admission: admission,
		}
		if g.leader >= 0 {
			q.leader = qs[g.leader]
		} else {
			promptTokens += len(g.prompt)
		}
		maxTokens = max(maxTokens, g.maxTokens)
		qs[i], index[q] = q, i
		cs := &choiceState{g: g, q: q, res: &genResult{}, st: &stopText{stops: g.stopStrs, min: g.minTokens}, first: true}
		if c.tok != nil {
			cs.stream = c.tok.NewStream(true)
		}
		choices[i] = cs
	}
	span.SetAttributes(attribute.Int64("seq_id", int64(qs[0].id)), attribute.Int("choices", len(gs)),
		attribute.Int("prompt_tokens", promptTokens), attribute.Int("max_tokens", maxTokens))
	box, err := c.submit(qs)
	if err != nil {
		return nil, err
	}
	if onAdmit != nil {
		onAdmit()
	}
	defer func() {
		for _, q := range qs {
			c.withdraw(q)
		}
	}()
	c.metrics.running.Inc()
	defer c.metrics.running.Dec()
	c.metrics.promptTokens.Add(float64(promptTokens))

	left := len(gs)
	gotFirst := false
	for {
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				generated := 0
				for _, cs := range choices {
					generated += len(cs.res.tokens)
				}
				for _, cs := range choices {
					if trouble := c.troubleFor(cs.q); !cs.done && trouble != nil {
						// Its steps kept coming back unapplied: say why.
						return nil, fmt.Errorf("%w after %d tokens: %w", errTimeout, generated, trouble)
					}
				}
				return nil, errTimeout
			}
			return nil, ctx.Err()
		case <-box.notify:
		}
		for _, u := range box.take() {
			i, ok := index[u.seq]
			if !ok || choices[i].done {
				continue
			}
			cs := choices[i]
			if u.err != nil {
				return nil, u.err
			}
			d := c.advance(cs, u)
			if u.sampled {
				now := time.Now()
				if !gotFirst {
					gotFirst = true
					c.metrics.ttft.Observe(now.Sub(arrived).Seconds())
					span.AddEvent("first token")
				}
				if len(cs.res.tokens) == 1 {
					cs.firstT = now
				} else {
					c.metrics.itl.Observe(now.Sub(cs.last).Seconds())
				}
				cs.last = now
			}
			if onDelta != nil {
				if err := onDelta(i, d); err != nil {
					return nil, err
				}
			}
			if cs.res.finish == "" {
				continue
			}
			cs.done = true
			left--
			if n := len(cs.res.tokens); n > 1 {
				c.metrics.tpot.Observe(cs.last.Sub(cs.firstT).Seconds() / float64(n-1))
			}
			if u.finish == "" { // a stop string ended it: the node may stop
				c.withdraw(cs.q)
			}
			if left == 0 {
				out := make([]*genResult, len(choices))
				completion := 0
				for j, cs := range choices {
					out[j] = cs.res
					completion += len(cs.res.tokens)
				}
				span.SetAttributes(attribute.Int("completion_tokens", completion), attribute.String("finish_reason", choices[0].res.finish))
				c.metrics.requestSeconds.Observe(time.Since(arrived).Seconds())
				return out, nil
			}
		}
	}
}

// advance applies one update to a choice and says what it added.
func (c *Coordinator) advance(cs *choiceState, u update) genDelta {
	g, res := cs.g, cs.res
	var d genDelta
	if cs.first && g.echo {
		d.text = g.promptText
	}
	for _, tl := range u.promptLogprobs {
		d.prompt = append(d.prompt, c.entry(tl, int(tl.Token), len(res.prompt)+len(d.prompt) == 0))
	}
	if g.echo && g.logprobs < 0 && cs.first {
		// No logprobs were asked for, so the node sent no prompt
		// entries; the prompt still belongs to the output.
		for _, id := range g.prompt {
			d.prompt = append(d.prompt, tokenEntry{id: id, text: c.tokenText(id)})
		}
	}
	res.prompt = append(res.prompt, d.prompt...)
	res.cached = u.cached
	cs.first = false
	var text string
	if u.sampled {
		c.metrics.generationTokens.Inc()
		e := c.entry(u.logprob, u.token, false)
		if u.logprob == nil {
			e.lp, e.top = nil, nil
		}
		d.tokens = append(d.tokens, e)
		res.tokens = append(res.tokens, e)
		if cs.stream != nil {
			text = cs.stream.Add(u.token)
		}
	}
	if u.finish != "" && cs.stream != nil {
		text += cs.stream.Flush()
	}
	d.text += cs.st.add(text, u.finish != "", len(res.tokens))
	res.finish = u.finish
	if cs.st.hit {
		res.finish = "stop"
	}
	if res.finish != "" {
		res.text = cs.st.text
		d.finish = res.finish
	}
	return d
}
