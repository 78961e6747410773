package safetensors

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
)

// TensorSpec describes a tensor to write.
type TensorSpec struct {
	Name  string
	DType DType
	Shape []int
}

// FillFunc fills dst, exactly the tensor's byte size and zeroed, with the
// tensor's little-endian bytes. dst is reused after it returns: do not keep it.
type FillFunc func(spec TensorSpec, dst []byte) error

// WriteFile writes specs, in order, as one safetensors file at path. The file
// is written under a temporary name in the same directory and renamed into
// place only when complete and synced, so a failure never leaves a file at path
// that looks valid.
func WriteFile(path string, specs []TensorSpec, fill func(spec TensorSpec, dst []byte) error) error {
	sizes, err := validateSpecs(specs)
	if err != nil {
		return fmt.Errorf("safetensors: write %s: %w", path, err)
	}
	w := &writer{buf: make([]byte, 0, maxOf(sizes))}
	defer w.cleanup()
	if err := w.writeShard(path, specs, sizes, fill); err != nil {
		return err
	}
	return w.commit(filepath.Dir(path))
}

// WriteSharded writes specs, in order, into shards of at most maxShardBytes of
// tensor data each (a tensor bigger than that gets a shard of its own) named
// model-00001-of-0000N.safetensors, plus IndexFile mapping every tensor to its
// shard, as HuggingFace does when sharding is requested (even if one shard
// suffices). Memory use is one buffer the size of the largest tensor. Every
// file goes to a temporary name first; shards are renamed into place, then the
// index last, so a checkpoint with an index is always complete.
func WriteSharded(dir string, specs []TensorSpec, maxShardBytes int64, fill func(spec TensorSpec, dst []byte) error) error {
	if maxShardBytes <= 0 {
		return fmt.Errorf("safetensors: write %s: maxShardBytes is %d, want > 0", dir, maxShardBytes)
	}
	sizes, err := validateSpecs(specs)
	if err != nil {
		return fmt.Errorf("safetensors: write %s: %w", dir, err)
	}
	// Greedy packing in spec order keeps each layer's tensors together, as
	// HF's shard_checkpoint does.
	type span struct{ lo, hi int }
	// Zero-length tensors never open a shard, so "a tensor bigger than the
	// limit gets a shard of its own" means no other bytes share it.
	var shards []span
	var cur int64
	for i, s := range sizes {
		if len(shards) == 0 || (s > 0 && cur > 0 && cur+s > maxShardBytes) {
			shards = append(shards, span{i, i})
			cur = 0
		}
		shards[len(shards)-1].hi = i + 1
		cur += s
	}

	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	w := &writer{buf: make([]byte, 0, maxOf(sizes))}
	defer w.cleanup()
	weightMap := make(map[string]string, len(specs))
	var total int64
	for k, sh := range shards {
		name := fmt.Sprintf("model-%05d-of-%05d.safetensors", k+1, len(shards))
		if err := w.writeShard(filepath.Join(dir, name), specs[sh.lo:sh.hi], sizes[sh.lo:sh.hi], fill); err != nil {
			return err
		}
		for i := sh.lo; i < sh.hi; i++ {
			weightMap[specs[i].Name] = name
			total += sizes[i]
		}
	}
	index := struct {
		Metadata  map[string]int64  `json:"metadata"`
		WeightMap map[string]string `json:"weight_map"`
	}{map[string]int64{"total_size": total}, weightMap}
	js, err := json.MarshalIndent(index, "", "  ")
	if err != nil {
		return fmt.Errorf("safetensors: write %s: %w", dir, err)
	}
	if err := w.writeSmall(filepath.Join(dir, IndexFile), append(js, '\n')); err != nil {
		return err
	}
	// An older index must not vouch for a mix of old and new shards should a
	// rename below fail.
	if err := os.Remove(filepath.Join(dir, IndexFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("safetensors: %w", err)
	}
	return w.commit(dir)
}

func maxOf(xs []int64) int64 {
	var m int64
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}

func validateSpecs(specs []TensorSpec) ([]int64, error) {
	if len(specs) == 0 {
		return nil, errors.New("no tensors to write")
	}
	sizes := make([]int64, len(specs))
	seen := make(map[string]bool, len(specs))
	for i, s := range specs {
		switch {
		case s.Name == "" || s.Name == metadataKey:
			return nil, fmt.Errorf("tensor %d: invalid name %q", i, s.Name)
		case seen[s.Name]:
			return nil, fmt.Errorf("tensor %q: duplicate name", s.Name)
		case s.DType.Size() == 0:
			return nil, fmt.Errorf("tensor %q: unknown dtype %q", s.Name, s.DType)
		}
		seen[s.Name] = true
		n, ok := byteSize(s.DType, s.Shape)
		if !ok {
			return nil, fmt.Errorf("%w: tensor %q: shape %v of %s is negative or overflows", ErrShape, s.Name, s.Shape, s.DType)
		}
		sizes[i] = n
	}
	return sizes, nil
}

// writer tracks the temporary files of one write so that they are renamed
// together on success and removed on failure.
type writer struct {
	buf     []byte
	pending []pendingFile // in rename order
}

type pendingFile struct{ tmp, final string }

func (w *writer) create(final string) (*os.File, error) {
	f, err := os.CreateTemp(filepath.Dir(final), "."+filepath.Base(final)+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	// CreateTemp makes 0600 files; checkpoints are read by other users'
	// processes (containers, services), so publish them world-readable.
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	w.pending = append(w.pending, pendingFile{f.Name(), final})
	return f, nil
}

// finish syncs and closes f: a renamed file must be durable before the index
// that vouches for it.
func finish(f *os.File, err error) error {
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("safetensors: write %s: %w", f.Name(), err)
	}
	return nil
}

func (w *writer) writeShard(final string, specs []TensorSpec, sizes []int64, fill FillFunc) error {
	hdr, err := encodeHeader(specs, sizes)
	if err != nil {
		return fmt.Errorf("safetensors: write %s: %w", final, err)
	}
	f, err := w.create(final)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	err = func() error {
		if _, err := bw.Write(hdr); err != nil {
			return err
		}
		for i, s := range specs {
			dst := w.buf[:sizes[i]]
			clear(dst)
			if err := fill(s, dst); err != nil {
				return fmt.Errorf("fill tensor %q: %w", s.Name, err)
			}
			if _, err := bw.Write(dst); err != nil {
				return err
			}
		}
		return bw.Flush()
	}()
	if err != nil {
		f.Close()
		return fmt.Errorf("safetensors: write %s: %w", final, err)
	}
	return finish(f, nil)
}

func (w *writer) writeSmall(final string, b []byte) error {
	f, err := w.create(final)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	return finish(f, err)
}

// commit renames every pending file into place, in order, then syncs the
// directory so the renames themselves survive a crash.
func (w *writer) commit(dir string) error {
	for len(w.pending) > 0 {
		p := w.pending[0]
		if err := os.Rename(p.tmp, p.final); err != nil {
			return fmt.Errorf("safetensors: %w", err)
		}
		w.pending = w.pending[1:]
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // not supported everywhere; the data files themselves are synced
		d.Close()
	}
	return nil
}

// cleanup removes temporaries left by a failed write.
func (w *writer) cleanup() {
	for _, p := range w.pending {
		os.Remove(p.tmp)
	}
	w.pending = nil
}

// encodeHeader returns the 8-byte length and the JSON header, "__metadata__"
// first and tensors in write order, padded with spaces (as the reference
// writer does) so the data section starts 8-byte aligned in the file and
// therefore in the page-aligned mapping.
func encodeHeader(specs []TensorSpec, sizes []int64) ([]byte, error) {
	js := []byte(`{"__metadata__":{"format":"pt"}`)
	var off int64
	for i, s := range specs {
		name, err := json.Marshal(s.Name)
		if err != nil {
			return nil, err
		}
		js = append(js, ',')
		js = append(js, name...)
		js = append(js, `:{"dtype":"`...)
		js = append(js, s.DType...)
		js = append(js, `","shape":[`...)
		for j, d := range s.Shape {
			if j > 0 {
				js = append(js, ',')
			}
			js = strconv.AppendInt(js, int64(d), 10)
		}
		js = append(js, `],"data_offsets":[`...)
		js = strconv.AppendInt(js, off, 10)
		js = append(js, ',')
		off += sizes[i]
		js = strconv.AppendInt(js, off, 10)
		js = append(js, "]}"...)
	}
	js = append(js, '}')
	for len(js)%8 != 0 {
		js = append(js, ' ')
	}
	if len(js) > MaxHeaderSize {
		return nil, fmt.Errorf("header of %d bytes exceeds the %d limit: too many tensors for one file", len(js), MaxHeaderSize)
	}
	out := make([]byte, 8, 8+len(js))
	binary.LittleEndian.PutUint64(out, uint64(len(js)))
	return append(out, js...), nil
}
