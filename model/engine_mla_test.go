package model

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/expertmesh/expertmesh/kernels"
)

// mlaWideCheckpoint is tiny-v2-lite with a 64-wide latent and a 16-wide
// rope part: the smallest shape that takes MLAChunks' AVX-512 kernels
// (the tiny presets' 32+8 take its plain path).
func mlaWideCheckpoint(t testing.TB) string {
	t.Helper()
	genMu.Lock()
	defer genMu.Unlock()
	const name = "tiny-v2-lite-r64"
	if d, ok := genDirs[name]; ok {
		return d
	}
	p := Presets()["tiny-v2-lite"]
	cfg := map[string]any{}
	merge(cfg, p.Config)
	cfg["kv_lora_rank"], cfg["qk_rope_head_dim"] = 64, 16
	p.Name, p.Config = name, cfg
	dir := filepath.Join(sharedTemp(t), name)
	if err := GenerateCheckpoint(dir, p, GenOptions{Seed: 11}); err != nil {
		t.Fatal(err)
	}
	genDirs[name] = dir
	return dir
}

// TestMLAChunkPrefill: prefill whose attention takes MLAChunks (runs of
// one sequence's consecutive rows, here from 2 rows on) against the same steps with every row
// through MLADecodeMany, and both against the plain reference forward:
// one chunk from position 0, a chunk after earlier cached tokens (the
// second step), and a step mixing a decode row of one sequence with
// another's chunk. Logits agree within float32 rounding with the row
// path and within the reference test's tolerance with the reference;
// greedy tokens agree with both.
func TestMLAChunkPrefill(t *testing.T) {
	dirs := map[string]string{"tiny-v2-lite-r64": mlaWideCheckpoint(t)}
	for _, p := range tinyPresets {
		dirs[p] = tinyCheckpoint(t, p)
	}
	for name, dir := range dirs {
		t.Run(name, func(t *testing.T) {
			w, err := Load(dir, LoadOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			c := w.Config
			tokens := []int{3, 17, 250, 9, 101, 44, 5, 311, 77, 2, 480, 60, 7, 8, 190, 33, 41, 400, 12, 90, 11, 300, 2, 5, 6, 91, 13}
			other := []int{21, 22, 23, 24, 25, 26, 27, 28, 29}
			wantLogits, _ := NewReference(w).Forward(tokens)
			wantOther, _ := NewReference(w).Forward(other)
			pool := kernels.NewPool(2)
			defer pool.Close()

			// run prefills all but the last of tokens in two steps (13,
			// then the rest), then takes one step with the decode row of
			// tokens' last position beside other's first 8 tokens, and a
			// decode step of other; it returns every position's logits of
			// tokens and of other.
			run := func(chunkRows int) (got, gotOther [][]float32) {
				eng := NewEngine(w, pool, nil)
				eng.mlaChunkRows = chunkRows
				cache, err := NewLatentCache(c, 4, 64)
				if err != nil {
					t.Fatal(err)
				}
				seq, seq2 := cache.NewSequence(), cache.NewSequence()
				defer seq.Release()
				defer seq2.Release()
				if err := seq.Reserve(len(tokens)); err != nil {
					t.Fatal(err)
				}
				if err := seq2.Reserve(len(other)); err != nil {
					t.Fatal(err)
				}
				step := func(rows []Row) [][]float32 {
					bufs := make([][]float32, len(rows))
					for i := range rows {
						rows[i].Logits = true
						bufs[i] = make([]float32, c.VocabSize)
					}
					if err := eng.Forward(context.Background(), rows, bufs); err != nil {
						t.Fatal(err)
					}
					return bufs
				}
				var rows []Row
				last := len(tokens) - 1
				for p := range last {
					if p == 13 {
						got = append(got, step(rows)...)
						rows = nil
					}
					rows = append(rows, Row{Seq: seq, Token: tokens[p], Pos: p})
				}
				got = append(got, step(rows)...)
				rows = []Row{{Seq: seq, Token: tokens[last], Pos: last}}
				for p := range 8 {
					rows = append(rows, Row{Seq: seq2, Token: other[p], Pos: p})
				}
				out := step(rows)
				got = append(got, out[0])
				gotOther = append(gotOther, out[1:]...)
				gotOther = append(gotOther, step([]Row{{Seq: seq2, Token: other[8], Pos: 8}})...)
				return got, gotOther
			}
			// Chunks from 2 rows: every prefill step here takes MLAChunks.
			chunked, chunkedOther := run(2)
			rowwise, rowwiseOther := run(1 << 30)
			check := func(what string, got, rows, want [][]float32) {
				for p := range want {
					if d := maxAbsDiff(got[p], rows[p]); d > 1e-4 {
						t.Errorf("%s position %d: max |Δlogit| from the row path = %g", what, p, d)
					}
					if d := maxAbsDiff(got[p], want[p]); d > 2e-3 {
						t.Errorf("%s position %d: max |Δlogit| from the reference = %g", what, p, d)
					}
					if Argmax(got[p]) != Argmax(want[p]) || Argmax(got[p]) != Argmax(rows[p]) {
						t.Errorf("%s position %d: argmax %d, row path %d, reference %d", what, p, Argmax(got[p]), Argmax(rows[p]), Argmax(want[p]))
					}
				}
			}
			check(fmt.Sprintf("%s tokens", name), chunked, rowwise, wantLogits)
			check(fmt.Sprintf("%s other", name), chunkedOther, rowwiseOther, wantOther)
		})
	}
}
