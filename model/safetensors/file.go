package safetensors

import (
	"fmt"
	"io/fs"
	"math"
	"os"
	"slices"
	"sync"
)

// Tensor is a view of one tensor inside a mapped file. Data aliases the
// mapping: it is valid until the File (or Checkpoint) it came from is closed,
// and must not be written (the mapping is read-only; writing faults).
type Tensor struct {
	Name  string
	DType DType
	Shape []int
	Data  []byte
}

// NumElements is the product of Shape (1 for a scalar, 0 if any dimension is 0).
func (t *Tensor) NumElements() int { return numElements(t.Shape) }

// Check returns an error wrapping ErrShape unless t has dtype dt and exactly
// the given shape. Loaders use it to turn a wrong checkpoint into a message
// naming the tensor instead of an index panic deep in a kernel.
func (t *Tensor) Check(dt DType, shape ...int) error {
	if t.DType != dt || !slices.Equal(t.Shape, shape) {
		return fmt.Errorf("%w: tensor %q is %s%v, want %s%v", ErrShape, t.Name, t.DType, t.Shape, dt, shape)
	}
	return nil
}

// File is one memory-mapped .safetensors file. Its methods are safe for
// concurrent use; Close must not race with uses of the Tensors it returned.
type File struct {
	path   string
	header *Header

	mu   sync.RWMutex
	data []byte // the whole file, mapped read-only; nil once closed
}

// OpenFile maps the file at path read-only and validates its header (see
// ParseHeader). Only the pages actually touched are ever read from disk.
func OpenFile(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, notFound(path, err)
	}
	// The mapping outlives the descriptor, so a checkpoint with hundreds of
	// shards does not hold hundreds of open files.
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("safetensors: %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is not a regular file", ErrNotFound, path)
	}
	size := st.Size()
	if size < 8 {
		return nil, fmt.Errorf("safetensors: %s: %w: truncated: %d bytes, need at least 8 for the header length", path, ErrCorrupt, size)
	}
	if size > math.MaxInt {
		return nil, fmt.Errorf("safetensors: %s: %w: %d bytes is too large to map on this platform", path, ErrCorrupt, size)
	}
	data, err := mapFile(f, int(size))
	if err != nil {
		return nil, fmt.Errorf("safetensors: map %s: %w", path, err)
	}
	h, err := ParseHeader(data, size)
	if err != nil {
		unmapFile(data)
		return nil, fmt.Errorf("safetensors: %s: %w", path, err)
	}
	return &File{path: path, header: h, data: data}, nil
}

func notFound(path string, err error) error {
	if os.IsNotExist(err) {
		return fmt.Errorf("%w: %s: %w", ErrNotFound, path, err)
	}
	return fmt.Errorf("safetensors: %w", err)
}

// Path is the path the file was opened with.
func (f *File) Path() string { return f.path }

// Header is the parsed header. Callers must not modify it.
func (f *File) Header() *Header { return f.header }

// Tensor returns a view of the named tensor; the error wraps ErrNotFound if the
// file has no such tensor and fs.ErrClosed after Close.
func (f *File) Tensor(name string) (*Tensor, error) {
	ti, ok := f.header.Lookup(name)
	if !ok {
		return nil, fmt.Errorf("%w: tensor %q in %s", ErrNotFound, name, f.path)
	}
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.data == nil {
		return nil, fmt.Errorf("safetensors: tensor %q in %s: %w", name, f.path, fs.ErrClosed)
	}
	return f.view(ti), nil
}

func (f *File) view(ti TensorInfo) *Tensor {
	lo, hi := f.header.DataOffset+ti.Begin, f.header.DataOffset+ti.End
	return &Tensor{
		Name:  ti.Name,
		DType: ti.DType,
		Shape: slices.Clone(ti.Shape),
		// Cap the capacity so that an append by the caller cannot spill into
		// the next tensor's bytes.
		Data: f.data[lo:hi:hi],
	}
}

// Prefetch asks the kernel to start reading the named tensors' pages
// (madvise WILLNEED) without waiting for them. Unknown names wrap ErrNotFound;
// the advice itself is best effort.
func (f *File) Prefetch(names ...string) error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.data == nil {
		return fmt.Errorf("safetensors: prefetch %s: %w", f.path, fs.ErrClosed)
	}
	for _, name := range names {
		ti, ok := f.header.Lookup(name)
		if !ok {
			return fmt.Errorf("%w: tensor %q in %s", ErrNotFound, name, f.path)
		}
		f.prefetchLocked(ti)
	}
	return nil
}

func (f *File) prefetchLocked(ti TensorInfo) {
	if ti.End > ti.Begin {
		willNeed(f.data, int(f.header.DataOffset+ti.Begin), int(f.header.DataOffset+ti.End))
	}
}

// Close unmaps the file. Data slices of its Tensors must not be used after.
// Closing twice is a no-op.
func (f *File) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.data == nil {
		return nil
	}
	err := unmapFile(f.data)
	f.data = nil
	if err != nil {
		return fmt.Errorf("safetensors: unmap %s: %w", f.path, err)
	}
	return nil
}
