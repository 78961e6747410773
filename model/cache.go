package model

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
)

// ErrCacheFull is returned when the latent cache has no free block left.
var ErrCacheFull = errors.New("latent cache full")

// LatentCache is the paged MLA cache of one attention process. Per token
// and layer it stores only kv_lora_rank + qk_rope_head_dim floats (the
// normalised latent and the rotated shared rope key), never expanded K/V.
// Memory is carved into fixed-size blocks; a block id addresses the same
// slot in every layer, so one block table per sequence serves all layers
// (vLLM's layout). Capacity is fixed at construction and never grows.
// Sequences take blocks as they grow (Reserve) and give them back when
// released.
//
// # Prefix caching
//
// With prefix caching on (SetPrefixCaching), every full block a sequence
// has committed (written by a step that was applied, see Commit) is
// registered in a prefix index under a key that chains the block's tokens
// to everything before it: key(i) = SHA-256(key(i-1) ‖ tokens of block
// i), key(-1) empty. Another sequence whose tokens produce the same key
// takes the block instead of computing it (Match): a block is
// reference-counted, shared read-only by every sequence holding it, and
// never written again (a sequence only writes positions past its
// committed ones, and registered blocks lie wholly below them). A
// registered block that no sequence holds stays in the index and counts
// as free: it is evicted, least recently released first, when a sequence
// needs a block and none is empty. SHA-256 rather than a 64-bit hash: a
// collision would hand one request another's latents.
//
// The allocator is safe for concurrent use; a Sequence is owned by one
// goroutine at a time.
type LatentCache struct {
	layers    int
	blockSize int // tokens per block
	width     int // floats per token per layer
	numBlocks int
	store     [][]float32 // [layer] numBlocks*blockSize*width

	mu struct {
		sync.Mutex
		prefix bool
		// free holds blocks with no content worth keeping.
		free []int32
		// ref counts the sequences holding each block.
		ref []int32
		// registered blocks are in index under key[b].
		registered []bool
		key        []BlockKey
		index      map[BlockKey]int32
		// Registered blocks no sequence holds, least recently released
		// first: a doubly linked list through prev/next (-1 ends it).
		prev, next []int32
		head, tail int32
		evictable  int
	}
}

// BlockKey is a full block's chained prefix hash (see LatentCache):
// equal keys mean equal tokens at equal positions.
type BlockKey [sha256.Size]byte

// NewLatentCache allocates numBlocks blocks of blockSize tokens for every
// layer of c. Prefix caching is off until SetPrefixCaching.
func NewLatentCache(c *Config, blockSize, numBlocks int) (*LatentCache, error) {
	if blockSize <= 0 || numBlocks <= 0 {
		return nil, fmt.Errorf("latent cache: block size %d and block count %d must be > 0", blockSize, numBlocks)
	}
	lc := &LatentCache{layers: c.NumHiddenLayers, blockSize: blockSize, width: c.LatentDim(), numBlocks: numBlocks}
	lc.store = make([][]float32, lc.layers)
	for l := range lc.store {
		lc.store[l] = make([]float32, numBlocks*blockSize*lc.width)
	}
	m := &lc.mu
	m.free = make([]int32, numBlocks)
	for i := range m.free {
		// Pop from the end: hand out low block ids first.
		m.free[i] = int32(numBlocks - 1 - i)
	}
	m.ref = make([]int32, numBlocks)
	m.registered = make([]bool, numBlocks)
	m.key = make([]BlockKey, numBlocks)
	m.prev, m.next = make([]int32, numBlocks), make([]int32, numBlocks)
	m.head, m.tail = -1, -1
	m.index = map[BlockKey]int32{}
	return lc, nil
}

// SetPrefixCaching turns prefix caching on or off. Turning it off drops
// the index (unheld cached blocks become plain free blocks); sequences
// keep the blocks they hold.
func (lc *LatentCache) SetPrefixCaching(on bool) {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	lc.mu.prefix = on
	if on {
		return
	}
	for b := range lc.mu.registered {
		if lc.mu.registered[b] {
			lc.unregisterLocked(int32(b))
		}
	}
}

// PrefixCaching reports whether prefix caching is on.
func (lc *LatentCache) PrefixCaching() bool {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	return lc.mu.prefix
}

// BlocksForBytes returns how many blocks fit in budget bytes for c.
func BlocksForBytes(c *Config, blockSize int, budget int64) int {
	per := int64(c.NumHiddenLayers) * int64(blockSize) * int64(c.LatentDim()) * 4
	return int(budget / per)
}

// BytesPerToken is the cache footprint of one token across all layers.
func (lc *LatentCache) BytesPerToken() int { return lc.layers * lc.width * 4 }

// BlockSize is the number of tokens per block.
func (lc *LatentCache) BlockSize() int { return lc.blockSize }

// Capacity is the total number of blocks.
func (lc *LatentCache) Capacity() int { return lc.numBlocks }

// FreeBlocks is the number of blocks a sequence may take: empty ones and
// cached ones no sequence holds (evicted on demand).
func (lc *LatentCache) FreeBlocks() int {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	return len(lc.mu.free) + lc.mu.evictable
}

// CachedBlocks is the number of free blocks that hold prefix-cache
// content no sequence holds.
func (lc *LatentCache) CachedBlocks() int {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	return lc.mu.evictable
}

// unregisterLocked takes b out of the index (and off the eviction list
// if no sequence holds it, onto the free list).
func (lc *LatentCache) unregisterLocked(b int32) {
	m := &lc.mu
	delete(m.index, m.key[b])
	m.registered[b] = false
	if m.ref[b] == 0 {
		lc.unlinkLocked(b)
		m.free = append(m.free, b)
	}
}

func (lc *LatentCache) unlinkLocked(b int32) {
	m := &lc.mu
	p, n := m.prev[b], m.next[b]
	if p >= 0 {
		m.next[p] = n
	} else {
		m.head = n
	}
	if n >= 0 {
		m.prev[n] = p
	} else {
		m.tail = p
	}
	m.evictable--
}

func (lc *LatentCache) pushLocked(b int32) {
	m := &lc.mu
	m.prev[b], m.next[b] = m.tail, -1
	if m.tail >= 0 {
		m.next[m.tail] = b
	} else {
		m.head = b
	}
	m.tail = b
	m.evictable++
}

// takeLocked hands out one block: an empty one, else the least recently
// released cached one (evicted from the index).
func (lc *LatentCache) takeLocked() int32 {
	m := &lc.mu
	var b int32
	if n := len(m.free); n > 0 {
		b = m.free[n-1]
		m.free = m.free[:n-1]
	} else {
		b = m.head
		lc.unlinkLocked(b)
		delete(m.index, m.key[b])
		m.registered[b] = false
	}
	m.ref[b] = 1
	return b
}

// dropLocked gives up one holder's reference to b.
func (lc *LatentCache) dropLocked(b int32) {
	m := &lc.mu
	m.ref[b]--
	switch {
	case m.ref[b] > 0:
	case m.registered[b]:
		lc.pushLocked(b)
	default:
		m.free = append(m.free, b)
	}
}

// Sequence is one sequence's view of the cache: its block table and, per
// layer, the block slices the attention kernel walks.
type Sequence struct {
	cache  *LatentCache
	blocks []int32
	views  [][][]float32 // [layer][block] -> block storage
	// Len is the number of tokens whose latents are written.
	Len int
	// Committed positions (see Commit): keys of the full blocks, and the
	// tokens of the partial block after them.
	keys []BlockKey
	tail []int32
}

// NewSequence returns an empty sequence holding no blocks.
func (lc *LatentCache) NewSequence() *Sequence {
	return &Sequence{cache: lc, views: make([][][]float32, lc.layers)}
}

func (s *Sequence) setBlock(i int, b int32) {
	lc := s.cache
	span := lc.blockSize * lc.width
	if i == len(s.blocks) {
		s.blocks = append(s.blocks, b)
		for l := range s.views {
			s.views[l] = append(s.views[l], lc.store[l][int(b)*span:(int(b)+1)*span])
		}
		return
	}
	s.blocks[i] = b
	for l := range s.views {
		s.views[l][i] = lc.store[l][int(b)*span : (int(b)+1)*span]
	}
}

// Reserve makes room for n tokens in total, taking empty blocks first and
// evicting cached blocks no sequence holds when none is left. On
// ErrCacheFull nothing is taken.
func (s *Sequence) Reserve(n int) error {
	lc := s.cache
	need := (n+lc.blockSize-1)/lc.blockSize - len(s.blocks)
	if need <= 0 {
		return nil
	}
	lc.mu.Lock()
	defer lc.mu.Unlock()
	if avail := len(lc.mu.free) + lc.mu.evictable; need > avail {
		return fmt.Errorf("%w: need %d more blocks of %d tokens, %d free", ErrCacheFull, need, lc.blockSize, avail)
	}
	for range need {
		s.setBlock(len(s.blocks), lc.takeLocked())
	}
	return nil
}

// committed is the number of positions whose tokens are committed.
func (s *Sequence) committed() int { return len(s.keys)*s.cache.blockSize + len(s.tail) }

// ChainKey computes the key of the block of tokens that follows the
// block keyed prev (nil for a sequence's first block). Coordinators use it
// to predict what a node has cached.
func ChainKey(prev *BlockKey, tokens []int32) BlockKey {
	h := sha256.New()
	if prev != nil {
		h.Write(prev[:])
	}
	var b [4]byte
	for _, t := range tokens {
		binary.LittleEndian.PutUint32(b[:], uint32(t))
		h.Write(b[:])
	}
	var k BlockKey
	h.Sum(k[:0])
	return k
}

func (s *Sequence) lastKey() *BlockKey {
	if len(s.keys) == 0 {
		return nil
	}
	return &s.keys[len(s.keys)-1]
}

// Match takes, from the prefix index, cached blocks for tokens, which
// continue the sequence at position Len: the longest run of whole blocks
// found there, at most limit tokens. It only matches when every position
// is committed and Len is a block boundary; it returns the number of
// tokens taken, by which Len and the committed positions advance (a
// block the sequence held there unwritten is given back). With prefix
// caching off it takes nothing.
func (s *Sequence) Match(tokens []int32, limit int) int {
	lc := s.cache
	bs := lc.blockSize
	if s.Len%bs != 0 || s.committed() != s.Len {
		return 0
	}
	lc.mu.Lock()
	defer lc.mu.Unlock()
	if !lc.mu.prefix {
		return 0
	}
	taken := 0
	for taken+bs <= min(limit, len(tokens)) {
		k := ChainKey(s.lastKey(), tokens[taken:taken+bs])
		b, ok := lc.mu.index[k]
		if !ok {
			break
		}
		if lc.mu.ref[b] == 0 {
			lc.unlinkLocked(b)
		}
		lc.mu.ref[b]++
		i := s.Len / bs
		if i < len(s.blocks) {
			lc.dropLocked(s.blocks[i])
		}
		s.setBlock(i, b)
		s.keys = append(s.keys, k)
		s.Len += bs
		taken += bs
	}
	return taken
}

// Commit records tokens as the content of the positions after the
// committed ones, once a step that wrote them has been applied; every
// block it fills is registered in the prefix index (unless a block with
// the same key already is: this one then stays private). Positions must
// have been written (Len covers them).
func (s *Sequence) Commit(tokens []int32) {
	lc := s.cache
	bs := lc.blockSize
	if s.committed()+len(tokens) > s.Len {
		panic(fmt.Sprintf("latent cache: committing %d tokens after %d, only %d written", len(tokens), s.committed(), s.Len))
	}
	for len(tokens) > 0 {
		k := min(bs-len(s.tail), len(tokens))
		s.tail = append(s.tail, tokens[:k]...)
		tokens = tokens[k:]
		if len(s.tail) < bs {
			break
		}
		key := ChainKey(s.lastKey(), s.tail)
		b := s.blocks[len(s.keys)]
		s.keys = append(s.keys, key)
		s.tail = s.tail[:0]
		lc.mu.Lock()
		if _, dup := lc.mu.index[key]; lc.mu.prefix && !dup && !lc.mu.registered[b] {
			lc.mu.index[key] = b
			lc.mu.key[b] = key
			lc.mu.registered[b] = true
		}
		lc.mu.Unlock()
	}
}

// Truncate shrinks the sequence to n positions (undoing a step that was
// not applied) and gives back the blocks past them. Committed positions
// are kept unless n is a block boundary: a block that is registered or
// shared is never cut into, as the sequence would then write into it.
func (s *Sequence) Truncate(n int) {
	lc := s.cache
	bs := lc.blockSize
	if c := s.committed(); n < c {
		if n%bs != 0 {
			panic(fmt.Sprintf("latent cache: truncating to %d inside committed block (committed %d)", n, c))
		}
		s.keys, s.tail = s.keys[:n/bs], s.tail[:0]
	}
	s.Len = n
	keep := (n + bs - 1) / bs
	if keep >= len(s.blocks) {
		return
	}
	lc.mu.Lock()
	for i := len(s.blocks) - 1; i >= keep; i-- {
		lc.dropLocked(s.blocks[i])
	}
	lc.mu.Unlock()
	s.blocks = s.blocks[:keep]
	for l := range s.views {
		s.views[l] = s.views[l][:keep]
	}
}

// Release gives back every block and empties the sequence. Registered
// blocks no other sequence holds stay cached, the last ones first in line
// for eviction (a prefix's head is the part others most likely share).
func (s *Sequence) Release() {
	lc := s.cache
	lc.mu.Lock()
	for i := len(s.blocks) - 1; i >= 0; i-- {
		lc.dropLocked(s.blocks[i])
	}
	lc.mu.Unlock()
	s.blocks = s.blocks[:0]
	for l := range s.views {
		s.views[l] = s.views[l][:0]
	}
	s.Len = 0
	s.keys, s.tail = s.keys[:0], s.tail[:0]
}

// Blocks returns the block table (read-only).
func (s *Sequence) Blocks() []int32 { return s.blocks }

// Slot returns the storage of token pos in layer l: [latent | rope key].
// The token's block must be reserved.
func (s *Sequence) Slot(l, pos int) []float32 {
	lc := s.cache
	blk := s.views[l][pos/lc.blockSize]
	off := (pos % lc.blockSize) * lc.width
	return blk[off : off+lc.width]
}

// LayerBlocks returns layer l's block slices for the attention kernel.
func (s *Sequence) LayerBlocks(l int) [][]float32 { return s.views[l] }
