package model

import (
	"fmt"
	"os"
	"sync"
	"unsafe"

	"github.com/expertmesh/expertmesh/internal/hugemem"
	"github.com/expertmesh/expertmesh/kernels"
)

// Quantization names, as --quantize takes them.
const (
	// QuantQ8: every linear weight except the router gate and kv_b_proj
	// to Q8_0.
	QuantQ8 = "q8"
	// QuantQ4: routed experts to Q4_0 (which always take integer
	// activations), every other linear weight q8 converts to Q8_0.
	QuantQ4 = "q4"
)

// ParseQuantize sets opts' Quantize and ExpertQuantize from a --quantize
// value ("", "q8" or "q4").
func ParseQuantize(s string, opts *LoadOptions) error {
	q8, q4 := kernels.Q8_0, kernels.Q4_0
	switch s {
	case "":
		opts.Quantize, opts.ExpertQuantize = nil, nil
	case QuantQ8:
		opts.Quantize, opts.ExpertQuantize = &q8, nil
	case QuantQ4:
		opts.Quantize, opts.ExpertQuantize = &q8, &q4
	default:
		return fmt.Errorf("--quantize %q: want q8, q4 or nothing", s)
	}
	return nil
}

// SetIntActivations selects integer activations (x rounded to Q8_0
// blocks, integer dot products) for every Q8_0 matrix when on, float32
// activations when off (the default). Q4_0 matrices always take integer
// activations; other formats are unaffected. It reports how many matrices
// it set. Call it before compute starts, not while it runs.
func (w *Weights) SetIntActivations(on bool) int {
	n := 0
	for _, m := range w.matrices() {
		if m.DType == kernels.Q8_0 {
			m.ActQ8 = on
			n++
		}
	}
	return n
}

// arena hands out 64-byte-aligned pieces of large anonymous blocks backed
// by transparent huge pages: quantised weights are written there once,
// already resident, so MakeResident need not copy them again (a copy
// would hold both for a while). Untouched space costs no memory.
type arena struct {
	mu      sync.Mutex
	cur     []byte
	off     int
	release []func() error
}

const arenaBlock = 256 << 20

func (a *arena) bytes(n int) ([]byte, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	n64 := (n + 63) &^ 63
	if a.off+n64 > len(a.cur) {
		b, release, err := hugemem.Alloc(max(arenaBlock, n64))
		if err != nil {
			return nil, err
		}
		a.cur, a.off = b, 0
		a.release = append(a.release, release)
	}
	b := a.cur[a.off : a.off+n : a.off+n]
	a.off += n64
	return b, nil
}

func (a *arena) floats(n int) ([]float32, error) {
	b, err := a.bytes(4 * n)
	if err != nil || n == 0 {
		return nil, err
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), n), nil
}

// mappedRanges are the address ranges of the checkpoint's tensors, so
// that pages are only ever dropped from the file mapping (dropping pages
// of anonymous memory would zero them).
type mappedRanges struct {
	mu sync.Mutex
	r  [][]byte // tensor views
}

func (m *mappedRanges) add(b []byte) {
	if len(b) == 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.r = append(m.r, b)
}

func (m *mappedRanges) contains(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	lo := uintptr(unsafe.Pointer(&b[0]))
	hi := lo + uintptr(len(b))
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, r := range m.r {
		rlo := uintptr(unsafe.Pointer(&r[0]))
		if lo >= rlo && hi <= rlo+uintptr(len(r)) {
			return true
		}
	}
	return false
}

// dropAll drops every page holding part of a recorded tensor (call it
// only when nothing reads the mapping any more: reading again is correct
// but faults the pages back in).
func (m *mappedRanges) dropAll() {
	m.mu.Lock()
	defer m.mu.Unlock()
	page := uintptr(os.Getpagesize())
	for _, r := range m.r {
		addr := uintptr(unsafe.Pointer(&r[0]))
		head := addr & (page - 1)
		n := (head + uintptr(len(r)) + page - 1) &^ (page - 1)
		// The mapping covers whole pages, so rounding out stays inside it.
		dropPages(unsafe.Slice((*byte)(unsafe.Add(unsafe.Pointer(&r[0]), -int(head))), n))
	}
}

// dropMapped drops this process's pages of b when b is part of the
// mapped checkpoint (the whole pages inside it): once a tensor has been
// copied or quantised its file pages are not read again, and they would
// otherwise count in the resident set beside the copy. The page cache
// keeps them until the OS needs the memory; a later read faults them in
// again, so this is only ever a matter of memory, not of correctness.
func (w *Weights) dropMapped(b []byte) {
	if w.mapped == nil || !w.mapped.contains(b) {
		return
	}
	page := uintptr(os.Getpagesize())
	lo := uintptr(unsafe.Pointer(&b[0]))
	start := (lo + page - 1) &^ (page - 1)
	end := (lo + uintptr(len(b))) &^ (page - 1)
	if end <= start {
		return
	}
	dropPages(b[start-lo : end-lo])
}

// HeldBytes is the memory the weights take in this process once placed:
// every bound matrix's data and block scales, and the absorbed per-head
// copies (the figure peak RSS is compared with).
func (w *Weights) HeldBytes() int64 {
	var n int64
	for _, m := range w.matrices() {
		n += m.Bytes()
	}
	for i := range w.Layers {
		for _, m := range w.Layers[i].Attn.UKT {
			n += m.Bytes()
		}
	}
	return n
}
