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

func newTestCache(t *testing.T, bs, blocks int) *LatentCache {
	t.Helper()
	c, err := ParseConfig(presetJSON(t, "tiny-v2", nil))
	if err != nil {
		t.Fatal(err)
	}
	lc, err := NewLatentCache(c, bs, blocks)
	if err != nil {
		t.Fatal(err)
	}
	lc.SetPrefixCaching(true)
	return lc
}

func toks(n, from int) []int32 {
	out := make([]int32, n)
	for i := range out {
		out[i] = int32(from + i)
	}
	return out
}

// write fills a sequence the way a step does: reserve, write a marker
// into every new position, commit.
func write(t *testing.T, s *Sequence, tokens []int32) {
	t.Helper()
	if err := s.Reserve(s.Len + len(tokens)); err != nil {
		t.Fatal(err)
	}
	for i, tok := range tokens {
		s.Slot(0, s.Len+i)[0] = float32(tok)
	}
	s.Len += len(tokens)
	s.Commit(tokens)
}

func TestPrefixCacheShares(t *testing.T) {
	lc := newTestCache(t, 4, 8)
	a := lc.NewSequence()
	p := toks(10, 100) // two full blocks and a partial one
	write(t, a, p)
	if lc.FreeBlocks() != 5 || lc.CachedBlocks() != 0 {
		t.Fatalf("free %d cached %d", lc.FreeBlocks(), lc.CachedBlocks())
	}
	// b shares a's two full blocks while a runs; the limit caps it.
	b := lc.NewSequence()
	if got := b.Match(p, 7); got != 4 {
		t.Fatalf("match with limit 7: %d tokens, want 4", got)
	}
	if got := b.Match(p[4:], 6); got != 4 || b.Len != 8 {
		t.Fatalf("second match: %d tokens, Len %d; want 4, 8", got, b.Len)
	}
	if b.Blocks()[0] != a.Blocks()[0] || b.Blocks()[1] != a.Blocks()[1] {
		t.Fatalf("blocks %v, a holds %v", b.Blocks(), a.Blocks())
	}
	if b.Slot(0, 5)[0] != 105 {
		t.Fatalf("shared slot holds %v", b.Slot(0, 5)[0])
	}
	// Shared blocks are counted once.
	if lc.FreeBlocks() != 5 {
		t.Fatalf("free %d after sharing, want 5", lc.FreeBlocks())
	}
	// b goes its own way after the prefix.
	write(t, b, toks(3, 900))
	a.Release()
	// a's partial block is free; the full ones are still b's.
	if lc.FreeBlocks() != 5 || lc.CachedBlocks() != 0 {
		t.Fatalf("after a's release: free %d cached %d, want 5 0", lc.FreeBlocks(), lc.CachedBlocks())
	}
	b.Release()
	if lc.FreeBlocks() != 8 || lc.CachedBlocks() != 2 {
		t.Fatalf("all released: free %d cached %d, want 8 2", lc.FreeBlocks(), lc.CachedBlocks())
	}
	// A new sequence with the prefix finds it cached.
	c := lc.NewSequence()
	if got := c.Match(p, len(p)); got != 8 || c.Slot(0, 0)[0] != 100 {
		t.Fatalf("match after release: %d", got)
	}
	if lc.CachedBlocks() != 0 || lc.FreeBlocks() != 6 {
		t.Fatalf("held again: free %d cached %d", lc.FreeBlocks(), lc.CachedBlocks())
	}
	c.Release()
}

func TestPrefixCacheChained(t *testing.T) {
	lc := newTestCache(t, 4, 8)
	a := lc.NewSequence()
	write(t, a, append(toks(4, 1), toks(4, 50)...))
	a.Release()
	// Same second block after a different first one: no match at all.
	b := lc.NewSequence()
	if got := b.Match(append(toks(4, 2), toks(4, 50)...), 8); got != 0 {
		t.Fatalf("matched %d tokens of a different prefix", got)
	}
	// Only at a block boundary with everything committed.
	write(t, b, toks(2, 1))
	if got := b.Match(toks(4, 3), 4); got != 0 {
		t.Fatalf("matched mid-block: %d", got)
	}
	b.Release()
}

func TestPrefixCacheEvictsLRU(t *testing.T) {
	lc := newTestCache(t, 2, 4)
	a, b := lc.NewSequence(), lc.NewSequence()
	write(t, a, toks(4, 10)) // blocks A0 A1
	write(t, b, toks(4, 20)) // blocks B0 B1
	a.Release()              // evicted first: A1, then A0
	b.Release()
	if lc.FreeBlocks() != 4 || lc.CachedBlocks() != 4 {
		t.Fatalf("free %d cached %d", lc.FreeBlocks(), lc.CachedBlocks())
	}
	c := lc.NewSequence()
	if err := c.Reserve(2); err != nil { // one block: A1 goes
		t.Fatal(err)
	}
	d := lc.NewSequence()
	if got := d.Match(toks(4, 10), 4); got != 2 {
		t.Fatalf("a's head: matched %d, want 2 (its tail was evicted first)", got)
	}
	e := lc.NewSequence()
	if got := e.Match(toks(4, 20), 4); got != 4 {
		t.Fatalf("b's blocks: matched %d, want 4", got)
	}
	// Nothing left to take: the matched blocks are held.
	f := lc.NewSequence()
	if err := f.Reserve(1); !errors.Is(err, ErrCacheFull) {
		t.Fatalf("reserve with every block held: %v", err)
	}
	for _, s := range []*Sequence{c, d, e} {
		s.Release()
	}
	if lc.FreeBlocks() != 4 {
		t.Fatalf("free %d", lc.FreeBlocks())
	}
}

func TestPrefixCacheTruncate(t *testing.T) {
	lc := newTestCache(t, 4, 8)
	a := lc.NewSequence()
	write(t, a, toks(8, 1))
	a.Release()
	// A step matches a block and grows past it, then is not applied:
	// Truncate gives both back, the cached block stays cached.
	b := lc.NewSequence()
	if got := b.Match(toks(8, 1), 4); got != 4 {
		t.Fatal(got)
	}
	if err := b.Reserve(10); err != nil {
		t.Fatal(err)
	}
	b.Truncate(0)
	if b.Len != 0 || len(b.Blocks()) != 0 || lc.FreeBlocks() != 8 || lc.CachedBlocks() != 2 {
		t.Fatalf("after truncate: Len %d blocks %d free %d cached %d", b.Len, len(b.Blocks()), lc.FreeBlocks(), lc.CachedBlocks())
	}
	// A written, uncommitted step past committed positions is undone
	// and registers nothing.
	write(t, b, toks(2, 70))
	if err := b.Reserve(6); err != nil {
		t.Fatal(err)
	}
	b.Len = 6 // the engine wrote positions 2..5, the step then failed
	b.Truncate(2)
	if b.Len != 2 || len(b.Blocks()) != 1 {
		t.Fatalf("Len %d blocks %d", b.Len, len(b.Blocks()))
	}
	write(t, b, toks(2, 72))
	b.Release()
	if lc.CachedBlocks() != 3 {
		t.Fatalf("cached %d, want 3 (b's committed block)", lc.CachedBlocks())
	}
	c := lc.NewSequence()
	write(t, c, toks(4, 1))
	func() {
		defer func() {
			if recover() == nil {
				t.Error("truncating into a committed block did not panic")
			}
		}()
		c.Truncate(2)
	}()
}

func TestPrefixCacheDuplicatesAndOff(t *testing.T) {
	lc := newTestCache(t, 4, 8)
	a, b := lc.NewSequence(), lc.NewSequence()
	// Both compute the same block in one step: b's stays private.
	write(t, a, toks(4, 1))
	write(t, b, toks(4, 1))
	b.Release()
	if lc.CachedBlocks() != 0 {
		t.Fatalf("a duplicate was cached: %d", lc.CachedBlocks())
	}
	a.Release()
	if lc.CachedBlocks() != 1 {
		t.Fatalf("cached %d, want 1", lc.CachedBlocks())
	}
	// A block reserved ahead and unwritten is replaced by the match.
	c := lc.NewSequence()
	if err := c.Reserve(8); err != nil {
		t.Fatal(err)
	}
	if got := c.Match(toks(4, 1), 4); got != 4 || len(c.Blocks()) != 2 || lc.FreeBlocks() != 6 {
		t.Fatalf("match over a reserved block: %d tokens, %d blocks, %d free", got, len(c.Blocks()), lc.FreeBlocks())
	}
	c.Release()
	lc.SetPrefixCaching(false)
	if lc.CachedBlocks() != 0 || lc.FreeBlocks() != 8 {
		t.Fatalf("off: cached %d free %d", lc.CachedBlocks(), lc.FreeBlocks())
	}
	d := lc.NewSequence()
	write(t, d, toks(4, 1))
	d.Release()
	e := lc.NewSequence()
	if got := e.Match(toks(4, 1), 4); got != 0 || lc.CachedBlocks() != 0 {
		t.Fatalf("prefix caching off matched %d", got)
	}
}
