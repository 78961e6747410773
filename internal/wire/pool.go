package wire

import (
	"math/bits"
	"sync"

	"google.golang.org/grpc/mem"
)

// Pool is the buffer pool of every expertmesh gRPC connection (installed
// by the rpc package) and of Codec's marshalling: power-of-two tiers from
// 2 KiB to 64 MiB, each a sync.Pool, larger buffers unpooled. The
// smallest tier is above gRPC's pooling threshold (1 KiB): gRPC never
// returns a buffer of a smaller capacity to its pool, so a small message
// marshalled into one would cost a new buffer every time. Unlike
// gRPC's default pool it does not zero a buffer it hands out: gRPC's
// tiers jump from 32 KiB to 1 MiB and zero a buffer's whole capacity on
// every Get, so each 256 KiB message (32 rows of V2-Lite) paid for
// clearing a MiB on each side. Every user of these buffers (gRPC's
// transport reading frames, the codec marshalling) writes the bytes it
// then reads, as with gRPC's own dirty pool for frames.
var Pool mem.BufferPool = newTieredPool(11, 26)

type tieredPool struct {
	min, max uint
	tiers    []sync.Pool
}

func newTieredPool(minExp, maxExp uint) *tieredPool {
	return &tieredPool{min: minExp, max: maxExp, tiers: make([]sync.Pool, maxExp-minExp+1)}
}

// tier is the exponent of the smallest tier holding size bytes.
func (p *tieredPool) tier(size int) uint {
	if size <= 1<<p.min {
		return p.min
	}
	return uint(bits.Len(uint(size - 1)))
}

func (p *tieredPool) Get(size int) *[]byte {
	t := p.tier(size)
	if t > p.max {
		b := make([]byte, size)
		return &b
	}
	if b, ok := p.tiers[t-p.min].Get().(*[]byte); ok {
		*b = (*b)[:size]
		return b
	}
	b := make([]byte, size, 1<<t)
	return &b
}

func (p *tieredPool) Put(b *[]byte) {
	c := cap(*b)
	if c < 1<<p.min || c&(c-1) != 0 {
		return // not one of ours
	}
	t := uint(bits.Len(uint(c)) - 1)
	if t > p.max {
		return
	}
	p.tiers[t-p.min].Put(b)
}
