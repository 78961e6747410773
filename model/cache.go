package model

import (
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
		free []int32
	}
}

// NewLatentCache allocates numBlocks blocks of blockSize tokens for every
// layer of c.
func NewLatentCache(c *Config, blockSize, numBlocks int) (*LatentCache, error) {
	if blockSize <= 0 || numBlocks <= 0 {
		return nil, fmt.Errorf("latent cache: block size %d and block count %d must be > 0", blockSize, numBlocks)
	}
	lc := &LatentCache{layers: c.NumHiddenLayers, blockSize: blockSize, width: c.LatentDim(), numBlocks: numBlocks}
	lc.store = make([][]float32, lc.layers)
	for l := range lc.store {
		lc.store[l] = make([]float32, numBlocks*blockSize*lc.width)
	}
	lc.mu.free = make([]int32, numBlocks)
	for i := range lc.mu.free {
		// Pop from the end: hand out low block ids first.
		lc.mu.free[i] = int32(numBlocks - 1 - i)
	}
	return lc, nil
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

// FreeBlocks is the number of unallocated blocks.
func (lc *LatentCache) FreeBlocks() int {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	return len(lc.mu.free)
}

// Sequence is one sequence's view of the cache: its block table and, per
// layer, the block slices the attention kernel walks.
type Sequence struct {
	cache  *LatentCache
	blocks []int32
	views  [][][]float32 // [layer][block] -> block storage
	// Len is the number of tokens whose latents are written.
	Len int
}

// NewSequence returns an empty sequence holding no blocks.
func (lc *LatentCache) NewSequence() *Sequence {
	return &Sequence{cache: lc, views: make([][][]float32, lc.layers)}
}

// Reserve makes room for n tokens in total, taking blocks from the free
// list. On ErrCacheFull nothing is taken.
func (s *Sequence) Reserve(n int) error {
	lc := s.cache
	need := (n+lc.blockSize-1)/lc.blockSize - len(s.blocks)
	if need <= 0 {
		return nil
	}
	lc.mu.Lock()
	if need > len(lc.mu.free) {
		free := len(lc.mu.free)
		lc.mu.Unlock()
		return fmt.Errorf("%w: need %d more blocks of %d tokens, %d free", ErrCacheFull, need, lc.blockSize, free)
	}
	got := lc.mu.free[len(lc.mu.free)-need:]
	taken := append([]int32(nil), got...)
	lc.mu.free = lc.mu.free[:len(lc.mu.free)-need]
	lc.mu.Unlock()
	for i := len(taken) - 1; i >= 0; i-- {
		b := taken[i]
		s.blocks = append(s.blocks, b)
		span := lc.blockSize * lc.width
		for l := range s.views {
			s.views[l] = append(s.views[l], lc.store[l][int(b)*span:(int(b)+1)*span])
		}
	}
	return nil
}

// Release returns every block to the free list and empties the sequence.
func (s *Sequence) Release() {
	lc := s.cache
	lc.mu.Lock()
	lc.mu.free = append(lc.mu.free, s.blocks...)
	lc.mu.Unlock()
	s.blocks = s.blocks[:0]
	for l := range s.views {
		s.views[l] = s.views[l][:0]
	}
	s.Len = 0
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
