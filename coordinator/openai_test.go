package coordinator

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/openai/openai-go/v3/packages/param"

	"github.com/expertmesh/expertmesh/model"
)

// TestOpenAIClient drives a real in-process cluster with the official
// OpenAI Go client: models list and retrieve, completions and chat,
// streaming with usage, logprobs, n=2, stop, seed, and errors as typed
// *openai.Error with the right status.
func TestOpenAIClient(t *testing.T) {
	cl := startCluster(t, 1, nil, nil)
	client := openai.NewClient(option.WithBaseURL(cl.url+"/v1/"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
	ctx := context.Background()
	name := cl.c.ModelName()
	r := mustRef(t)

	t.Run("models", func(t *testing.T) {
		page, err := client.Models.List(ctx)
		if err != nil || len(page.Data) != 1 || page.Data[0].ID != name {
			t.Fatalf("list: %v %+v", err, page)
		}
		m, err := client.Models.Get(ctx, name)
		if err != nil || m.ID != name || m.Object != "model" {
			t.Fatalf("get: %v %+v", err, m)
		}
		_, err = client.Models.Get(ctx, "gpt-4o")
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusNotFound || apiErr.Code != "model_not_found" {
			t.Fatalf("unknown model: %v", err)
		}
	})

	p := prompt(12, 21)
	p64 := make([]int64, len(p))
	for i, id := range p {
		p64[i] = int64(id)
	}
	greedy := []option.RequestOption{option.WithJSONSet("ignore_eos", true)}

	t.Run("completions with logprobs and n=2", func(t *testing.T) {
		res, err := client.Completions.New(ctx, openai.CompletionNewParams{
			Model: openai.CompletionNewParamsModel(name), Prompt: openai.CompletionNewParamsPromptUnion{OfArrayOfTokens: p64},
			MaxTokens: openai.Int(6), Temperature: openai.Float(0), Logprobs: openai.Int(2), N: openai.Int(2),
		}, greedy...)
		if err != nil {
			t.Fatal(err)
		}
		want := ref(t, model.GenerateRequest{Prompt: p, MaxTokens: 6, Logprobs: 2})
		text := r.tok.Decode(want.Tokens, true)
		if len(res.Choices) != 2 {
			t.Fatalf("%d choices", len(res.Choices))
		}
		for i, ch := range res.Choices {
			if ch.Index != int64(i) || ch.Text != asJSON(text) || ch.FinishReason != "length" || len(ch.Logprobs.TokenLogprobs) != 6 {
				t.Errorf("choice %d: %+v, want text %q", i, ch, text)
			}
			for j, lp := range ch.Logprobs.TokenLogprobs {
				if d := lp - want.Logprobs[j].Logprob; d > 1e-4 || d < -1e-4 {
					t.Errorf("choice %d position %d: logprob %v, want %v", i, j, lp, want.Logprobs[j].Logprob)
				}
			}
		}
		if u := res.Usage; u.PromptTokens != int64(len(p)) || u.CompletionTokens != 12 || u.TotalTokens != int64(len(p))+12 {
			t.Errorf("usage %+v", u)
		}
	})

	t.Run("completions seed and stop", func(t *testing.T) {
		params := openai.CompletionNewParams{
			Model: openai.CompletionNewParamsModel(name), Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("Once upon a time")},
			MaxTokens: openai.Int(16), Temperature: openai.Float(1), TopP: openai.Float(1), Seed: openai.Int(1234),
		}
		a, err := client.Completions.New(ctx, params, greedy...)
		if err != nil {
			t.Fatal(err)
		}
		b, err := client.Completions.New(ctx, params, greedy...)
		if err != nil || a.Choices[0].Text != b.Choices[0].Text {
			t.Fatalf("same seed, different text: %q %q (%v)", a.Choices[0].Text, b.Choices[0].Text, err)
		}
		// Stop at the first ASCII letter after the text's start (the
		// random model's text is mostly bytes that are no characters).
		full := a.Choices[0].Text
		at := strings.IndexFunc(full[1:], func(r rune) bool { return r < 128 && (r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') })
		if at < 0 {
			t.Fatalf("no letter in %q to stop at", full)
		}
		stop := full[1+at : 2+at]
		params.Stop = openai.CompletionNewParamsStopUnion{OfString: openai.String(stop)}
		c, err := client.Completions.New(ctx, params, greedy...)
		if err != nil {
			t.Fatal(err)
		}
		if got := c.Choices[0].Text; got != full[:strings.Index(full, stop)] || c.Choices[0].FinishReason != "stop" {
			t.Errorf("stop %q: %q (%s), full %q", stop, got, c.Choices[0].FinishReason, full)
		}
	})

	t.Run("completions streaming with usage", func(t *testing.T) {
		params := openai.CompletionNewParams{
			Model: openai.CompletionNewParamsModel(name), Prompt: openai.CompletionNewParamsPromptUnion{OfArrayOfTokens: p64},
			MaxTokens: openai.Int(8), Temperature: openai.Float(0), N: openai.Int(2),
		}
		whole, err := client.Completions.New(ctx, params, greedy...)
		if err != nil {
			t.Fatal(err)
		}
		params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
		stream := client.Completions.NewStreaming(ctx, params, greedy...)
		texts := make([]string, 2)
		var usage *openai.CompletionUsage
		for stream.Next() {
			ch := stream.Current()
			for _, c := range ch.Choices {
				texts[c.Index] += c.Text
			}
			if ch.JSON.Usage.Valid() && ch.Usage.TotalTokens > 0 {
				u := ch.Usage
				usage = &u
			}
		}
		if err := stream.Err(); err != nil {
			t.Fatal(err)
		}
		for i := range texts {
			if texts[i] != whole.Choices[i].Text {
				t.Errorf("choice %d streamed %q, whole %q", i, texts[i], whole.Choices[i].Text)
			}
		}
		if usage == nil || usage.CompletionTokens != whole.Usage.CompletionTokens || usage.PromptTokens != whole.Usage.PromptTokens {
			t.Errorf("stream usage %+v, whole %+v", usage, whole.Usage)
		}
	})

	chat := openai.ChatCompletionNewParams{
		Model:     openai.ChatModel(name),
		Messages:  []openai.ChatCompletionMessageParamUnion{openai.SystemMessage("You are terse."), openai.UserMessage("Say hello.")},
		MaxTokens: openai.Int(10), Temperature: openai.Float(0.8), TopP: openai.Float(1), Seed: openai.Int(99),
		N: openai.Int(2), Logprobs: openai.Bool(true), TopLogprobs: openai.Int(3),
	}
	t.Run("chat with logprobs, n=2 and seed", func(t *testing.T) {
		res, err := client.Chat.Completions.New(ctx, chat, greedy...)
		if err != nil {
			t.Fatal(err)
		}
		again, err := client.Chat.Completions.New(ctx, chat, greedy...)
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Choices) != 2 || res.Object != "chat.completion" {
			t.Fatalf("%+v", res)
		}
		for i, ch := range res.Choices {
			if ch.Message.Role != "assistant" || ch.FinishReason != "length" || len(ch.Logprobs.Content) != 10 || len(ch.Logprobs.Content[0].TopLogprobs) != 3 {
				t.Errorf("choice %d: %+v", i, ch)
			}
			if ch.Message.Content != again.Choices[i].Message.Content {
				t.Errorf("choice %d: same seed, %q then %q", i, ch.Message.Content, again.Choices[i].Message.Content)
			}
		}
		if res.Usage.CompletionTokens != 20 || res.Usage.PromptTokens == 0 {
			t.Errorf("usage %+v", res.Usage)
		}
	})

	t.Run("chat streaming with usage", func(t *testing.T) {
		params := chat
		params.N, params.Logprobs = openai.Int(1), openai.Bool(false)
		params.TopLogprobs = param.Opt[int64]{}
		whole, err := client.Chat.Completions.New(ctx, params, greedy...)
		if err != nil {
			t.Fatal(err)
		}
		params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
		stream := client.Chat.Completions.NewStreaming(ctx, params, greedy...)
		acc := openai.ChatCompletionAccumulator{}
		for stream.Next() {
			acc.AddChunk(stream.Current())
		}
		if err := stream.Err(); err != nil {
			t.Fatal(err)
		}
		if len(acc.Choices) != 1 || acc.Choices[0].Message.Content != whole.Choices[0].Message.Content || acc.Choices[0].FinishReason != "length" {
			t.Errorf("streamed %+v, whole %q", acc.Choices, whole.Choices[0].Message.Content)
		}
		if acc.Usage.CompletionTokens != 10 || acc.Usage.PromptTokens != whole.Usage.PromptTokens {
			t.Errorf("stream usage %+v, whole %+v", acc.Usage, whole.Usage)
		}
	})

	t.Run("errors", func(t *testing.T) {
		for _, tt := range []struct {
			name   string
			call   func() error
			status int
			param  string
		}{
			{"max_tokens past the context", func() error {
				_, err := client.Completions.New(ctx, openai.CompletionNewParams{Model: openai.CompletionNewParamsModel(name),
					Prompt: openai.CompletionNewParamsPromptUnion{OfArrayOfTokens: p64}, MaxTokens: openai.Int(1 << 62)})
				return err
			}, 400, "max_tokens"},
			{"unknown model", func() error {
				_, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "gpt-4o",
					Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}})
				return err
			}, 404, "model"},
			{"json_object", func() error {
				_, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: openai.ChatModel(name),
					Messages:       []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
					ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONObject: &openai.ResponseFormatJSONObjectParam{}}})
				return err
			}, 400, "response_format"},
			{"streaming, refused before any event", func() error {
				stream := client.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{Model: openai.ChatModel(name),
					Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}, N: openai.Int(0)})
				for stream.Next() {
				}
				return stream.Err()
			}, 400, "n"},
		} {
			err := tt.call()
			var apiErr *openai.Error
			if !errors.As(err, &apiErr) || apiErr.StatusCode != tt.status || apiErr.Param != tt.param || apiErr.Message == "" {
				t.Errorf("%s: %v (%T), want *openai.Error %d on %s", tt.name, err, err, tt.status, tt.param)
			}
		}
	})
}
