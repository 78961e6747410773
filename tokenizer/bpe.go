package tokenizer

import (
	"container/heap"
	"hash/maphash"
	"sync"
)

// maxCachedWord bounds the pieces kept in the caches: long pieces (a run
// of spaces, a base64 blob) are rare and would only evict useful entries.
const maxCachedWord = 64

// wordCache maps a piece's bytes to its ids. It is bounded: when a shard is
// full it is dropped wholesale, which keeps memory fixed without LRU
// bookkeeping on the hot path (natural text re-fills the common words
// within a few KB). Sharding keeps concurrent encoders from contending on
// one lock.
type wordCache struct {
	seed   maphash.Seed
	shards [cacheShards]cacheShard
}

const cacheShards = 16

type cacheShard struct {
	mu    sync.RWMutex
	m     map[string][]int32
	limit int
	_     [40]byte // keep shards on separate cache lines
}

func (c *wordCache) init(limit int) {
	c.seed = maphash.MakeSeed()
	for i := range c.shards {
		c.shards[i].m = make(map[string][]int32)
		c.shards[i].limit = max(1, limit/cacheShards)
	}
}

func (c *wordCache) shard(w string) *cacheShard {
	return &c.shards[maphash.String(c.seed, w)%cacheShards]
}

func (c *wordCache) get(w string) ([]int32, bool) {
	sh := c.shard(w)
	sh.mu.RLock()
	ids, ok := sh.m[w]
	sh.mu.RUnlock()
	return ids, ok
}

func (c *wordCache) put(w string, ids []int32) {
	sh := c.shard(w)
	sh.mu.Lock()
	if len(sh.m) >= sh.limit {
		sh.m = make(map[string][]int32, sh.limit/4)
	}
	sh.m[w] = ids
	sh.mu.Unlock()
}

type symbol struct {
	id         int32
	prev, next int32
	gone       bool
}

// mergeCand is a candidate merge of the symbol at pos with its next one.
type mergeCand struct {
	rank, id int32
	pos      int32
}

type mergeQueue []mergeCand

func (q mergeQueue) Len() int { return len(q) }
func (q mergeQueue) Less(i, j int) bool {
	if q[i].rank != q[j].rank {
		return q[i].rank < q[j].rank
	}
	return q[i].pos < q[j].pos
}
func (q mergeQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *mergeQueue) Push(x any)   { *q = append(*q, x.(mergeCand)) }
func (q *mergeQueue) Pop() any {
	old := *q
	x := old[len(old)-1]
	*q = old[:len(old)-1]
	return x
}

// bpeScratch holds per-call buffers so that encoding does not allocate per
// piece in steady state.
type bpeScratch struct {
	syms    []symbol
	queue   mergeQueue
	levels  [][]span // per pre-tokenizer step
	matches []span
}

// maxScratch caps the buffers a pooled scratch keeps, so one huge input
// does not pin its buffers forever.
const maxScratch = 1 << 14

func (sc *bpeScratch) release() {
	if cap(sc.syms) > maxScratch || cap(sc.queue) > maxScratch || cap(sc.matches) > maxScratch {
		sc.syms, sc.queue, sc.matches = nil, nil, nil
	}
	for i, l := range sc.levels {
		if cap(l) > maxScratch {
			sc.levels[i] = nil
		}
	}
	scratchPool.Put(sc)
}

var scratchPool = sync.Pool{New: func() any { return new(bpeScratch) }}

// bpeWord appends the ids of one pre-tokenized piece (raw bytes); the
// caller caches.
func (t *Tokenizer) bpeWord(word string, out []int, sc *bpeScratch) []int {
	if len(word) == 1 {
		if id := t.byteID[word[0]]; id >= 0 {
			return append(out, int(id))
		}
	}
	if t.ignoreMerges {
		if id, ok := t.vocab[byteLevelString(word)]; ok {
			return append(out, id)
		}
	}
	for _, id := range t.merge(word, sc) {
		out = append(out, int(id))
	}
	return out
}

// merge runs HuggingFace's BPE merge loop (Word::merge_all): a priority
// queue of adjacent pairs ordered by (rank, position); stale entries are
// skipped when popped. It is O(n log n) in the word length.
func (t *Tokenizer) merge(word string, sc *bpeScratch) []int32 {
	syms := sc.syms[:0]
	for i := 0; i < len(word); i++ {
		id := t.byteID[word[i]]
		if id < 0 {
			continue // byte missing from the vocab and no unk token: HF drops it
		}
		n := int32(len(syms))
		syms = append(syms, symbol{id: id, prev: n - 1, next: n + 1})
	}
	if len(syms) > 0 {
		syms[len(syms)-1].next = -1
	}
	q := sc.queue[:0]
	for i := 0; i+1 < len(syms); i++ {
		if m, ok := t.merges[pairKey(syms[i].id, syms[i+1].id)]; ok {
			q = append(q, mergeCand{m.rank, m.id, int32(i)})
		}
	}
	heap.Init(&q)
	for q.Len() > 0 {
		top := heap.Pop(&q).(mergeCand)
		cur := &syms[top.pos]
		if cur.gone || cur.next < 0 {
			continue
		}
		right := syms[cur.next]
		if m, ok := t.merges[pairKey(cur.id, right.id)]; !ok || m.id != top.id {
			continue // stale: one side has merged since this was queued
		}
		cur.id = top.id
		syms[cur.next].gone = true
		cur.next = right.next
		if right.next >= 0 {
			syms[right.next].prev = top.pos
		}
		if cur.prev >= 0 {
			if m, ok := t.merges[pairKey(syms[cur.prev].id, cur.id)]; ok {
				heap.Push(&q, mergeCand{m.rank, m.id, cur.prev})
			}
		}
		if cur.next >= 0 {
			if m, ok := t.merges[pairKey(cur.id, syms[cur.next].id)]; ok {
				heap.Push(&q, mergeCand{m.rank, m.id, top.pos})
			}
		}
	}
	ids := make([]int32, 0, len(syms))
	for i := range syms {
		if !syms[i].gone {
			ids = append(ids, syms[i].id)
		}
	}
	sc.syms, sc.queue = syms, q
	return ids
}
