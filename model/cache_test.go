package model

import (
	"errors"
	"testing"
)

func TestLatentCache(t *testing.T) {
	c, err := ParseConfig(presetJSON(t, "tiny-v2", nil))
	if err != nil {
		t.Fatal(err)
	}
	lc, err := NewLatentCache(c, 4, 5)
	if err != nil {
		t.Fatal(err)
	}
	if lc.BytesPerToken() != c.NumHiddenLayers*(c.KVLoraRank+c.QKRopeHeadDim)*4 {
		t.Fatalf("bytes per token %d", lc.BytesPerToken())
	}
	a, b := lc.NewSequence(), lc.NewSequence()
	if err := a.Reserve(9); err != nil { // 3 blocks
		t.Fatal(err)
	}
	if lc.FreeBlocks() != 2 || len(a.Blocks()) != 3 {
		t.Fatalf("free %d, a holds %d", lc.FreeBlocks(), len(a.Blocks()))
	}
	// Too big: nothing is taken.
	if err := b.Reserve(12); !errors.Is(err, ErrCacheFull) {
		t.Fatalf("err = %v, want ErrCacheFull", err)
	}
	if lc.FreeBlocks() != 2 || len(b.Blocks()) != 0 {
		t.Fatal("failed reserve took blocks")
	}
	if err := b.Reserve(8); err != nil {
		t.Fatal(err)
	}
	// Slots of different sequences and layers never alias.
	a.Slot(1, 8)[0] = 1
	b.Slot(1, 7)[0] = 2
	a.Slot(2, 8)[0] = 3
	if a.Slot(1, 8)[0] != 1 || b.Slot(1, 7)[0] != 2 || a.Slot(2, 8)[0] != 3 {
		t.Fatal("slots alias")
	}
	// Growing within a block takes nothing.
	if err := a.Reserve(12); err != nil || lc.FreeBlocks() != 0 {
		t.Fatalf("reserve within block: %v, free %d", err, lc.FreeBlocks())
	}
	a.Release()
	b.Release()
	if lc.FreeBlocks() != lc.Capacity() {
		t.Fatalf("free %d of %d after release", lc.FreeBlocks(), lc.Capacity())
	}
	if _, err := NewLatentCache(c, 0, 1); err == nil {
		t.Fatal("block size 0 accepted")
	}
}
