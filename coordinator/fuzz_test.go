package coordinator

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
)

// FuzzParseCompletion feeds arbitrary bodies to the /v1/completions parser:
// it must never panic, must refuse with a 4xx OpenAI error, and whatever
// it accepts must be a generation a node can run.
func FuzzParseCompletion(f *testing.F) {
	for _, s := range []string{
		`{"prompt": [1, 2, 3], "max_tokens": 4}`,
		`{"prompt": "hello", "echo": true, "logprobs": 3, "stop": ["a", "b"]}`,
		`{"prompt": [[1]], "stop": [5, 6], "temperature": 0.5, "top_p": 0.9, "top_k": -1, "seed": -7}`,
		`{"prompt": [1], "n": 2}`, `{"prompt": [1e10]}`, `{"prompt": null}`, `[]`, `{"timeout": -1}`,
		`{"prompt": [[1], "ab", [2, 3]], "n": 3, "seed": 9, "min_tokens": 2, "max_tokens": 4}`,
		`{"prompt": [1], "max_tokens": 9223372036854775807}`, `{"prompt": [1], "timeout": 1e300}`,
		`{"prompt": [[[[1]]]]}`, `{"prompt": [1], "response_format": {"type": "json_object"}}`,
	} {
		f.Add([]byte(s))
	}
	cl := startClusterF(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		r := httptest.NewRequest(http.MethodPost, "/v1/completions", bytes.NewReader(body))
		var req completionRequest
		err := cl.c.decodeBody(r, &req)
		var gs []*genRequest
		if err == nil {
			gs, err = cl.c.parseCompletion(&req)
		}
		if err != nil {
			var ae *apiError
			if !errors.As(err, &ae) || ae.status < 400 || ae.status > 499 || ae.Message == "" {
				t.Fatalf("%s: error %v is no 4xx OpenAI error", body, err)
			}
			if _, err := json.Marshal(map[string]*apiError{"error": ae}); err != nil {
				t.Fatal(err)
			}
			return
		}
		if len(gs) == 0 || len(gs) > maxChoices {
			t.Fatalf("%s: %d choices", body, len(gs))
		}
		vocab := cl.c.mcfg.VocabSize
		for i, g := range gs {
			if len(g.prompt) == 0 || g.maxTokens < 0 || len(g.prompt)+g.maxTokens > cl.c.mcfg.MaxPositionEmbeddings ||
				g.minTokens < 0 || g.minTokens > g.maxTokens || g.leader >= i || g.leader < -1 {
				t.Fatalf("%s: accepted prompt %d + max %d (min %d, leader %d)", body, len(g.prompt), g.maxTokens, g.minTokens, g.leader)
			}
			for _, id := range g.prompt {
				if id < 0 || id >= vocab {
					t.Fatalf("%s: accepted token %d", body, id)
				}
			}
			for _, id := range g.stopIDs {
				if id < 0 || id >= vocab {
					t.Fatalf("%s: accepted stop id %d", body, id)
				}
			}
			sp := g.sampling
			if sp.Temperature < 0 || sp.TopK < 0 || int(sp.TopK) > vocab || sp.TopP < 0 || sp.TopP > 1 || g.logprobs < -1 || g.logprobs > maxLogprobs {
				t.Fatalf("%s: accepted sampling %+v logprobs %d", body, sp, g.logprobs)
			}
		}
	})
}
