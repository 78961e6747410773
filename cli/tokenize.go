package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/expertmesh/expertmesh/tokenizer"
)

// runTokenize is `expertmesh tokenize`: the model's tokenizer on a text,
// ids printed as a JSON array.
func runTokenize(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("tokenize", stderr)
	dir := fs.String("model", "", "model directory with tokenizer.json and tokenizer_config.json (required)")
	text := fs.String("text", "", "text to tokenize")
	file := fs.String("file", "", "read the text from this file instead (- for stdin)")
	special := fs.Bool("add-special-tokens", true, "add BOS as the tokenizer's post-processor says (HF's default)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *dir == "" {
		return fmt.Errorf("--model is required")
	}
	s := *text
	if *file != "" {
		var b []byte
		var err error
		if *file == "-" {
			b, err = io.ReadAll(os.Stdin)
		} else {
			b, err = os.ReadFile(*file)
		}
		if err != nil {
			return fmt.Errorf("--file: %w", err)
		}
		s = string(b)
	}
	tok, err := tokenizer.Load(*dir)
	if err != nil {
		return err
	}
	ids := tok.Encode(s, *special)
	if ids == nil {
		ids = []int{}
	}
	return json.NewEncoder(stdout).Encode(ids)
}

// runDetokenize is `expertmesh detokenize`: ids back to text.
func runDetokenize(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("detokenize", stderr)
	dir := fs.String("model", "", "model directory with tokenizer.json (required)")
	idsFlag := fs.String("ids", "", "token ids, comma separated")
	skip := fs.Bool("skip-special-tokens", false, "drop special tokens from the text")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *dir == "" {
		return fmt.Errorf("--model is required")
	}
	ids, err := parseIDs(*idsFlag)
	if err != nil {
		return fmt.Errorf("--ids: %v", err)
	}
	tok, err := tokenizer.Load(*dir)
	if err != nil {
		return err
	}
	for _, id := range ids {
		// Ids above the tokenizer's vocabulary are legal model outputs
		// (the embedding table is padded) and decode to nothing.
		if id < 0 {
			return fmt.Errorf("--ids: token id %d is negative", id)
		}
	}
	_, err = fmt.Fprintln(stdout, tok.Decode(ids, *skip))
	return err
}
