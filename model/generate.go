package model

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// GenerateRequest is one single-sequence generation.
type GenerateRequest struct {
	Prompt    []int
	MaxTokens int
	Sampling  SamplingParams
	// Logprobs is how many top alternatives to report per position; < 0
	// reports nothing, 0 only the chosen token's logprob.
	Logprobs int
	// Echo also reports the prompt positions' logprobs (the first has none).
	Echo bool
	// StopIDs end generation when sampled (the stop token is kept, as HF
	// does with eos_token_id).
	StopIDs []int
	// PrefillChunk bounds the rows of one prefill step (0: whole prompt).
	PrefillChunk int
	// AfterDecodeStep, if set, runs after each decode step's forward pass
	// (a measurement hook); its own time is left out of DecodeTime.
	AfterDecodeStep func()
}

// GenerateResult is what a generation produced.
type GenerateResult struct {
	Prompt         []int
	Tokens         []int
	PromptLogprobs []*TokenLogprob // with Echo; entry 0 is nil
	Logprobs       []TokenLogprob
	FinishReason   string // "stop" or "length"
	PrefillTime    time.Duration
	DecodeTime     time.Duration
	// DecodeWeightBytes is the weight bytes the decode steps streamed
	// through the engine's pool (kernels.Pool.WeightBytes over them; remote
	// experts are not counted): with DecodeTime, the rate to compare with
	// the machine's read bandwidth.
	DecodeWeightBytes uint64
}

// Generate prefills the prompt into a fresh cache sequence, then decodes
// token by token against it.
func (e *Engine) Generate(ctx context.Context, cache *LatentCache, req GenerateRequest) (*GenerateResult, error) {
	c := e.C
	if len(req.Prompt) == 0 {
		return nil, fmt.Errorf("%w: empty prompt", ErrBadInput)
	}
	if req.MaxTokens < 0 {
		return nil, fmt.Errorf("%w: max_tokens must be >= 0", ErrBadInput)
	}
	if err := req.Sampling.Validate(); err != nil {
		return nil, err
	}
	total := len(req.Prompt) + req.MaxTokens
	if total > c.MaxPositionEmbeddings {
		return nil, fmt.Errorf("%w: prompt (%d) + max_tokens (%d) exceeds max_position_embeddings %d", ErrBadInput, len(req.Prompt), req.MaxTokens, c.MaxPositionEmbeddings)
	}
	for _, id := range req.Prompt {
		if id < 0 || id >= c.VocabSize {
			return nil, fmt.Errorf("%w: prompt token id %d outside vocabulary [0,%d)", ErrBadInput, id, c.VocabSize)
		}
	}
	seq := cache.NewSequence()
	defer seq.Release()
	if err := seq.Reserve(total); err != nil {
		return nil, err
	}
	res := &GenerateResult{Prompt: slices.Clone(req.Prompt)}
	sampler := NewSampler(req.Sampling)
	logits := make([]float32, c.VocabSize)

	// Prefill in chunks; with echo every prompt position needs logits.
	start := time.Now()
	chunk := req.PrefillChunk
	if chunk <= 0 {
		chunk = len(req.Prompt)
	}
	var echoBufs [][]float32
	if req.Echo {
		res.PromptLogprobs = make([]*TokenLogprob, len(req.Prompt))
	}
	var last []float32
	for p0 := 0; p0 < len(req.Prompt); p0 += chunk {
		p1 := min(p0+chunk, len(req.Prompt))
		rows := make([]Row, 0, p1-p0)
		for p := p0; p < p1; p++ {
			rows = append(rows, Row{Seq: seq, Token: req.Prompt[p], Pos: p, Logits: req.Echo || p == len(req.Prompt)-1})
		}
		want := 0
		for _, r := range rows {
			if r.Logits {
				want++
			}
		}
		for len(echoBufs) < want {
			echoBufs = append(echoBufs, make([]float32, c.VocabSize))
		}
		if err := e.Forward(ctx, rows, echoBufs[:want]); err != nil {
			return nil, err
		}
		if req.Echo {
			// Logits at position p predict token p+1.
			for j, p := 0, p0; p < p1; j, p = j+1, p+1 {
				if p+1 < len(req.Prompt) && req.Logprobs >= 0 {
					tl := Logprobs(echoBufs[j], req.Prompt[p+1], req.Logprobs)
					res.PromptLogprobs[p+1] = &tl
				}
			}
		}
		if p1 == len(req.Prompt) {
			last = echoBufs[want-1]
		}
	}
	copy(logits, last)
	res.PrefillTime = time.Since(start)

	start = time.Now()
	streamed := e.Pool.WeightBytes()
	var hooks time.Duration
	res.FinishReason = "length"
	row := []Row{{Seq: seq}}
	out := [][]float32{logits}
	for len(res.Tokens) < req.MaxTokens {
		tok := sampler.Sample(logits)
		res.Tokens = append(res.Tokens, tok)
		if req.Logprobs >= 0 {
			res.Logprobs = append(res.Logprobs, Logprobs(logits, tok, req.Logprobs))
		}
		if slices.Contains(req.StopIDs, tok) {
			res.FinishReason = "stop"
			break
		}
		if len(res.Tokens) == req.MaxTokens {
			break
		}
		row[0] = Row{Seq: seq, Token: tok, Pos: len(req.Prompt) + len(res.Tokens) - 1, Logits: true}
		if err := e.Forward(ctx, row, out); err != nil {
			return nil, err
		}
		if req.AfterDecodeStep != nil {
			t := time.Now()
			req.AfterDecodeStep()
			hooks += time.Since(t)
		}
	}
	res.DecodeTime = time.Since(start) - hooks
	res.DecodeWeightBytes = e.Pool.WeightBytes() - streamed
	return res, nil
}
