package model

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/kernels"
)

// afterN is a context whose Err turns to Canceled after n calls: it
// cancels a load deterministically part-way through its pieces.
type afterN struct {
	context.Context
	n atomic.Int64
}

func (c *afterN) Err() error {
	if c.n.Add(-1) < 0 {
		return context.Canceled
	}
	return nil
}

func TestParallelStopsWhenCancelled(t *testing.T) {
	ctx := &afterN{Context: context.Background()}
	ctx.n.Store(3)
	var ran atomic.Int64
	err := parallel(ctx, 1, make([]int, 100), func(int) { ran.Add(1) })
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if ran.Load() != 3 {
		t.Fatalf("%d items ran after cancellation at the 4th, want 3", ran.Load())
	}
	ran.Store(0)
	if err := parallel(context.Background(), 4, make([]int, 100), func(int) { ran.Add(1) }); err != nil || ran.Load() != 100 {
		t.Fatalf("uncancelled: err %v, %d of 100 ran", err, ran.Load())
	}
}

// TestLoadCancelled: a load told to stop while it converts or copies
// returns the context's error promptly, and a placement cut short leaves
// the weights where they were and still exact.
func TestLoadCancelled(t *testing.T) {
	dir := tinyCheckpoint(t, "tiny-v2")
	q8 := kernels.Q8_0
	for _, n := range []int64{0, 2} {
		ctx := &afterN{Context: context.Background()}
		ctx.n.Store(n)
		if w, err := LoadContext(ctx, dir, LoadOptions{Quantize: &q8, Threads: 1}); !errors.Is(err, context.Canceled) {
			if w != nil {
				w.Close()
			}
			t.Fatalf("quantising load cancelled after %d pieces: err = %v, want context.Canceled", n, err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	if _, err := LoadContext(ctx, dir, LoadOptions{Quantize: &q8}); !errors.Is(err, context.Canceled) {
		t.Fatalf("load with a done context: err = %v", err)
	}
	t.Logf("cancelled load returned in %v", time.Since(start))

	ref, err := Load(dir, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	pool := kernels.NewPool(2)
	defer pool.Close()
	want := generateSix(t, pool, ref)
	for _, mode := range []Residency{ResidencyResident, ResidencyMapped} {
		w, err := Load(dir, LoadOptions{})
		if err != nil {
			t.Fatal(err)
		}
		mapped := &w.LMHead.Data[0]
		ctx := &afterN{Context: context.Background()}
		ctx.n.Store(2) // a few pieces copied (and their mapped pages dropped), then stop
		if _, err := w.PlaceContext(ctx, mode, 1, 0); !errors.Is(err, context.Canceled) {
			w.Close()
			t.Fatalf("%s: cancelled placement: err = %v, want context.Canceled", mode, err)
		}
		if &w.LMHead.Data[0] != mapped {
			w.Close()
			t.Fatalf("%s: a cancelled placement moved the weights", mode)
		}
		got := generateSix(t, pool, w)
		w.Close()
		for i := range want.Tokens {
			if got.Tokens[i] != want.Tokens[i] || got.Logprobs[i].Logprob != want.Logprobs[i].Logprob {
				t.Fatalf("%s: after a cancelled placement token %d: %d/%g, want %d/%g", mode, i, got.Tokens[i], got.Logprobs[i].Logprob, want.Tokens[i], want.Logprobs[i].Logprob)
			}
		}
	}
}
