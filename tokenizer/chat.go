package tokenizer

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/nikolalohinski/gonja/v2"
	"github.com/nikolalohinski/gonja/v2/config"
	"github.com/nikolalohinski/gonja/v2/exec"
	"github.com/nikolalohinski/gonja/v2/loaders"
)

// ErrNoChatTemplate is returned by ApplyChatTemplate when
// tokenizer_config.json has no chat_template.
var ErrNoChatTemplate = errors.New("tokenizer: no chat_template in tokenizer_config.json")

// Message is one chat turn.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type chatTmpl struct{ t *exec.Template }

// compileChatTemplate parses a Jinja template with the environment options
// transformers uses for chat templates (trim_blocks, lstrip_blocks).
func compileChatTemplate(src string) (ct *chatTmpl, err error) {
	defer func() {
		if r := recover(); r != nil { // gonja must not take the server down
			ct, err = nil, fmt.Errorf("tokenizer: parsing chat_template: %v", r)
		}
	}()
	cfg := config.New()
	cfg.TrimBlocks = true
	cfg.LeftStripBlocks = true
	// The file-system loader is only needed for {% include %}, which chat
	// templates do not use; rooting it at "" keeps it from reading files.
	fs, err := loaders.NewFileSystemLoader("")
	if err != nil {
		return nil, err
	}
	l, err := loaders.NewShiftedLoader("chat_template", bytes.NewReader([]byte(src)), fs)
	if err != nil {
		return nil, err
	}
	t, err := exec.NewTemplate("chat_template", cfg, l, gonja.DefaultEnvironment)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: parsing chat_template: %w", err)
	}
	return &chatTmpl{t}, nil
}

// ChatTemplate returns tokenizer_config.json's chat_template source.
func (t *Tokenizer) ChatTemplate() string { return t.chatTemplate }

// ApplyChatTemplate renders msgs with the model's chat template, as
// transformers' apply_chat_template(msgs, tokenize=False,
// add_generation_prompt=addGenerationPrompt): the template sees messages,
// add_generation_prompt, bos_token/eos_token/pad_token/unk_token and
// raise_exception. The result is meant for Encode(text, false): the
// template already writes the BOS.
func (t *Tokenizer) ApplyChatTemplate(msgs []Message, addGenerationPrompt bool) (string, error) {
	list := make([]map[string]any, len(msgs))
	for i, m := range msgs {
		list[i] = map[string]any{"role": m.Role, "content": m.Content}
	}
	return t.RenderChatTemplate(list, addGenerationPrompt, nil)
}

// RenderChatTemplate is ApplyChatTemplate for messages with more fields
// than Role and Content (tool_calls, ...) and extra template variables
// (tools, ...).
func (t *Tokenizer) RenderChatTemplate(messages []map[string]any, addGenerationPrompt bool, extra map[string]any) (out string, err error) {
	if t.chatTemplate == "" {
		return "", ErrNoChatTemplate
	}
	t.tmpl.once.Do(func() { t.tmpl.t, t.tmpl.err = compileChatTemplate(t.chatTemplate) })
	if t.tmpl.err != nil {
		return "", t.tmpl.err
	}
	vars := map[string]any{
		"messages":              messages,
		"add_generation_prompt": addGenerationPrompt,
		"raise_exception": func(msg string) (string, error) {
			return "", fmt.Errorf("tokenizer: chat template: %s", msg)
		},
	}
	for k, v := range t.tmplVars {
		vars[k] = v
	}
	for k, v := range extra {
		vars[k] = v
	}
	defer func() {
		if r := recover(); r != nil {
			out, err = "", fmt.Errorf("tokenizer: rendering chat_template: %v", r)
		}
	}()
	out, err = t.tmpl.t.t.ExecuteToString(exec.NewContext(vars))
	if err != nil {
		return "", fmt.Errorf("tokenizer: rendering chat_template: %w", err)
	}
	return out, nil
}
