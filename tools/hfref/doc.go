// Package hfref checks expertmesh's Go engine against an independent
// reference: hfref.py, a numpy transliteration of HuggingFace's DeepSeek-V2
// and V3 modeling code (DeepSeek's remote modeling_deepseek.py, with the
// points where transformers' versions differ listed at its top).
//
// The package has no Go API; it is its test. hfref_test.go writes random
// checkpoints for every tiny preset and for hand-made shapes that the
// presets do not cover (no YaRN, v_head_dim != qk_nope_head_dim with q LoRA,
// moe_layer_freq 2, other group counts, tied embeddings, a non-unit YaRN
// mscale ratio), runs the Go engine in-process and the script as a
// subprocess, and requires identical greedy tokens, the same finish reason,
// and logprobs within 0.01 for the chosen token and for every top-k entry the
// two sides share.
//
// Environment: HFREF_PYTHON names the interpreter to try first;
// HFREF_ARGS adds flags to every script run (e.g. --norm-rule=v2 or
// --noaux-mask-fill=-inf, to see which HF variant the engine follows: the
// test must then fail where the variants differ); HFREF_STRICT=1 also runs
// shapes marked as known disagreements.
//
// The script needs python3 with numpy (Debian: apt-get install -y
// python3-numpy). Without them the test skips, except when CI=true, where it
// fails.
//
// By hand:
//
//	go run ./cmd/expertmesh gen-model --preset tiny-v3 --out /tmp/m
//	python3 tools/hfref/hfref.py --model /tmp/m --prompt-ids 1,2,3 --max-tokens 8 --logprobs 5 --echo
//	go run ./cmd/expertmesh generate --model /tmp/m --prompt-ids 1,2,3 --max-tokens 8 --logprobs 5 --echo --json
package hfref
