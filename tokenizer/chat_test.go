package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// Expected renderings are derived by hand from the templates (SOURCE.md
// quotes them) and were checked against Python jinja2 3.1 with
// transformers' settings (trim_blocks, lstrip_blocks; testdata/oracle/chat.py).
func TestApplyChatTemplate(t *testing.T) {
	const (
		bos = "<｜begin▁of▁sentence｜>"
		eos = "<｜end▁of▁sentence｜>"
	)
	sys := Message{"system", "You are terse."}
	sys2 := Message{"system", "Answer in French."}
	u1 := Message{"user", "Hi!"}
	a1 := Message{"assistant", "Hello."}
	u2 := Message{"user", "2+2?\nThink {{ not }} {% raw %}."}
	cases := []struct {
		name    string
		msgs    []Message
		genV2   string // V2 with add_generation_prompt
		plainV3 string // V3 without it
		genV3   string
	}{
		{"empty", nil, bos + "Assistant:", bos, bos + "<｜Assistant｜>"},
		{"user", []Message{u1},
			bos + "User: Hi!\n\nAssistant:",
			bos + "<｜User｜>Hi!",
			bos + "<｜User｜>Hi!<｜Assistant｜>"},
		{"system user", []Message{sys, u1},
			bos + "You are terse.\n\nUser: Hi!\n\nAssistant:",
			bos + "You are terse.<｜User｜>Hi!",
			bos + "You are terse.<｜User｜>Hi!<｜Assistant｜>"},
		{"multi turn", []Message{sys, u1, a1, u2},
			bos + "You are terse.\n\nUser: Hi!\n\nAssistant: Hello." + eos + "User: 2+2?\nThink {{ not }} {% raw %}.\n\nAssistant:",
			bos + "You are terse.<｜User｜>Hi!<｜Assistant｜>Hello." + eos + "<｜User｜>2+2?\nThink {{ not }} {% raw %}.",
			bos + "You are terse.<｜User｜>Hi!<｜Assistant｜>Hello." + eos + "<｜User｜>2+2?\nThink {{ not }} {% raw %}.<｜Assistant｜>"},
		// V3 gathers every system message at the front, joined by a blank
		// line; V2 prints each where it stands.
		{"two systems", []Message{sys, u1, sys2},
			bos + "You are terse.\n\nUser: Hi!\n\nAnswer in French.\n\nAssistant:",
			bos + "You are terse.\n\nAnswer in French.<｜User｜>Hi!",
			bos + "You are terse.\n\nAnswer in French.<｜User｜>Hi!<｜Assistant｜>"},
		{"unknown role", []Message{{"narrator", "ignored"}, u1},
			bos + "User: Hi!\n\nAssistant:",
			bos + "<｜User｜>Hi!",
			bos + "<｜User｜>Hi!<｜Assistant｜>"},
	}
	v2, v3 := load(t, v2Dir), load(t, v3Dir)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			check := func(tok *Tokenizer, gen bool, want string) {
				t.Helper()
				got, err := tok.ApplyChatTemplate(c.msgs, gen)
				if err != nil {
					t.Fatal(err)
				}
				if got != want {
					t.Errorf("gen=%v:\n got  %q\n want %q", gen, got, want)
				}
			}
			check(v2, true, c.genV2)
			check(v2, false, strings.TrimSuffix(c.genV2, "Assistant:"))
			check(v3, false, c.plainV3)
			check(v3, true, c.genV3)
		})
	}
	// The rendered prompt tokenizes with the template's own BOS and the
	// chat markers as single added tokens.
	p, _ := v3.ApplyChatTemplate([]Message{u1}, true)
	ids := v3.Encode(p, false)
	if ids[0] != 0 || ids[1] != 128803 || ids[len(ids)-1] != 128804 {
		t.Errorf("prompt ids = %v", ids)
	}
}

func TestChatTemplateToolCalls(t *testing.T) {
	v3 := load(t, v3Dir)
	msgs := []map[string]any{
		{"role": "user", "content": "Weather?"},
		{"role": "assistant", "content": nil, "tool_calls": []map[string]any{
			{"type": "function", "function": map[string]any{"name": "get_weather", "arguments": `{"city":"Paris"}`}},
		}},
		{"role": "tool", "content": "sunny"},
	}
	got, err := v3.RenderChatTemplate(msgs, true, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := "<｜begin▁of▁sentence｜><｜User｜>Weather?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\":\"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
	if got != want {
		t.Errorf("\n got  %q\n want %q", got, want)
	}
}

func TestChatTemplateErrors(t *testing.T) {
	const tj = `{"model":{"type":"BPE","vocab":{"a":0}},"pre_tokenizer":{"type":"ByteLevel","use_regex":false},"decoder":{"type":"ByteLevel"}}`
	for _, c := range []struct {
		name, cfg string
		want      string // substring of the error; "" = ErrNoChatTemplate
	}{
		{"none", `{}`, ""},
		{"syntax", `{"chat_template": "{% for m in messages %}"}`, "chat_template"},
		{"raise", `{"chat_template": "{{ raise_exception('only user turns') }}"}`, "only user turns"},
	} {
		t.Run(c.name, func(t *testing.T) {
			tok, err := FromJSON([]byte(tj), []byte(c.cfg))
			if err != nil {
				t.Fatal(err)
			}
			_, err = tok.ApplyChatTemplate([]Message{{"user", "x"}}, false)
			if c.want == "" {
				if !errors.Is(err, ErrNoChatTemplate) {
					t.Errorf("err = %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("err = %v, want it to mention %q", err, c.want)
			}
		})
	}
}

func TestChatTemplateConcurrent(t *testing.T) {
	v3 := load(t, v3Dir)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				content := fmt.Sprintf("g%d i%d", g, i)
				got, err := v3.ApplyChatTemplate([]Message{{"user", content}}, true)
				if want := "<｜begin▁of▁sentence｜><｜User｜>" + content + "<｜Assistant｜>"; err != nil || got != want {
					errs <- fmt.Errorf("got %q, %v", got, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestChatGolden compares with Python jinja2's renderings
// (testdata/chat_golden.json, written by testdata/oracle/chat.py).
func TestChatGolden(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "chat_golden.json"))
	if err != nil {
		t.Fatal(err)
	}
	var golden []struct {
		Model               string           `json:"model"`
		Messages            []map[string]any `json:"messages"`
		AddGenerationPrompt bool             `json:"add_generation_prompt"`
		Text                *string          `json:"text"`
	}
	if err := json.Unmarshal(b, &golden); err != nil {
		t.Fatal(err)
	}
	if len(golden) < 20 {
		t.Fatalf("%d golden renders", len(golden))
	}
	for i, g := range golden {
		tok := load(t, filepath.Join("testdata", g.Model))
		got, err := tok.RenderChatTemplate(g.Messages, g.AddGenerationPrompt, nil)
		switch {
		case g.Text == nil:
			// Known gonja deviation: jinja2 raises on 'str' + None (V2's
			// template with a tool-call turn whose content is None); gonja
			// concatenates None as "". Either way the template is unusable
			// for such a turn.
			t.Logf("%d %s: jinja2 failed; gonja gives %q, %v", i, g.Model, got, err)
		case g.Text != nil && err != nil:
			t.Errorf("%d %s: %v", i, g.Model, err)
		case g.Text != nil && got != *g.Text:
			t.Errorf("%d %s gen=%v:\n got  %q\n want %q", i, g.Model, g.AddGenerationPrompt, got, *g.Text)
		}
	}
}

func TestChatTemplateJinjaFile(t *testing.T) {
	dir := t.TempDir()
	if err := WriteByteLevel(dir, 300); err != nil {
		t.Fatal(err)
	}
	// Drop the template from the config and put it in chat_template.jinja.
	cfgPath := filepath.Join(dir, "tokenizer_config.json")
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := json.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	delete(cfg, "chat_template")
	b, _ = json.Marshal(cfg)
	os.WriteFile(cfgPath, b, 0o644)
	os.WriteFile(filepath.Join(dir, "chat_template.jinja"), []byte("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"), 0o644)
	tok, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := tok.ApplyChatTemplate([]Message{{"user", "hi"}}, false)
	if want := BOSText + "[user]hi"; got != want || err != nil {
		t.Errorf("got %q, %v; want %q", got, err, want)
	}
}
