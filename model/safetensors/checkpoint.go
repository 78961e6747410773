package safetensors

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// IndexFile is the name of a sharded checkpoint's index.
const IndexFile = "model.safetensors.index.json"

// SingleFile is the preferred name of an unsharded checkpoint.
const SingleFile = "model.safetensors"

// Checkpoint is a model's weights: one .safetensors file, or shards tied
// together by an index. All shards are mapped (not read) at open, so opening
// costs a header parse per shard and no weight I/O. Methods are safe for
// concurrent use; Close must not race with uses of returned Tensors.
type Checkpoint struct {
	dir      string
	files    []*File          // in index order of first mention
	byName   map[string]*File // tensor name -> file holding it
	names    []string         // sorted
	metadata map[string]any   // the index's "metadata"; nil for a single file
}

// OpenCheckpoint opens the checkpoint in dir. If dir holds IndexFile, the index
// decides: every shard it names must exist, and contain every tensor the
// index assigns to it, or OpenCheckpoint fails naming the shard and tensor.
// Otherwise dir must hold model.safetensors or exactly one *.safetensors file.
// dir may also be the path of a .safetensors file itself.
func OpenCheckpoint(dir string) (*Checkpoint, error) {
	st, err := os.Stat(dir)
	if err != nil {
		return nil, notFound(dir, err)
	}
	if !st.IsDir() {
		return openSingle(filepath.Dir(dir), dir)
	}
	idx := filepath.Join(dir, IndexFile)
	switch b, err := os.ReadFile(idx); {
	case err == nil:
		return openIndexed(dir, idx, b)
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	single := filepath.Join(dir, SingleFile)
	if _, err := os.Stat(single); err == nil {
		return openSingle(dir, single)
	}
	matches, err := filepath.Glob(filepath.Join(dir, "*.safetensors"))
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	switch len(matches) {
	case 0:
		return nil, fmt.Errorf("%w: no %s and no .safetensors file in %s", ErrNotFound, IndexFile, dir)
	case 1:
		return openSingle(dir, matches[0])
	}
	for i := range matches {
		matches[i] = filepath.Base(matches[i])
	}
	return nil, fmt.Errorf("%w: %s has %d .safetensors files (%s) but no %s or %s to say which to use",
		ErrNotFound, dir, len(matches), strings.Join(matches, ", "), IndexFile, SingleFile)
}

func openSingle(dir, path string) (*Checkpoint, error) {
	f, err := OpenFile(path)
	if err != nil {
		return nil, err
	}
	c := &Checkpoint{dir: dir, files: []*File{f}, byName: make(map[string]*File, len(f.header.Tensors))}
	for _, t := range f.header.Tensors {
		c.byName[t.Name] = f
		c.names = append(c.names, t.Name)
	}
	slices.Sort(c.names)
	return c, nil
}

func openIndexed(dir, idxPath string, b []byte) (_ *Checkpoint, err error) {
	var idx struct {
		Metadata  map[string]any  `json:"metadata"`
		WeightMap json.RawMessage `json:"weight_map"`
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		return nil, fmt.Errorf("safetensors: %s: %w: %v", idxPath, ErrCorrupt, err)
	}
	if idx.WeightMap == nil {
		return nil, fmt.Errorf("safetensors: %s: %w: no weight_map", idxPath, ErrCorrupt)
	}
	entries, err := decodeObject(idx.WeightMap)
	if err != nil {
		return nil, fmt.Errorf("safetensors: %s: %w: weight_map: %v", idxPath, ErrCorrupt, err)
	}
	if len(entries) == 0 {
		return nil, fmt.Errorf("safetensors: %s: %w: weight_map is empty", idxPath, ErrCorrupt)
	}

	c := &Checkpoint{dir: dir, byName: make(map[string]*File, len(entries)), metadata: idx.Metadata}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	shards := make(map[string]*File)
	for _, e := range entries {
		var shard string
		if err := json.Unmarshal(e.value, &shard); err != nil {
			return nil, fmt.Errorf("safetensors: %s: %w: weight_map[%q] is not a file name", idxPath, ErrCorrupt, e.key)
		}
		// Shards are plain names in dir: an index must not reach elsewhere.
		if shard == "" || shard != filepath.Base(shard) || strings.ContainsAny(shard, `/\`) || shard == "." || shard == ".." {
			return nil, fmt.Errorf("safetensors: %s: %w: weight_map[%q] = %q is not a file name in %s", idxPath, ErrCorrupt, e.key, shard, dir)
		}
		f, ok := shards[shard]
		if !ok {
			f, err = OpenFile(filepath.Join(dir, shard))
			if err != nil {
				return nil, fmt.Errorf("safetensors: %s: shard %q of tensor %q: %w", idxPath, shard, e.key, err)
			}
			shards[shard] = f
			c.files = append(c.files, f)
		}
		if _, ok := f.header.Lookup(e.key); !ok {
			return nil, fmt.Errorf("safetensors: %s: %w: tensor %q not in its shard %s", idxPath, ErrNotFound, e.key, f.path)
		}
		c.byName[e.key] = f
		c.names = append(c.names, e.key)
	}
	slices.Sort(c.names)
	return c, nil
}

// Dir is the checkpoint's directory.
func (c *Checkpoint) Dir() string { return c.dir }

// Files are the open files (shards in order of first mention in the index).
func (c *Checkpoint) Files() []*File { return slices.Clone(c.files) }

// Metadata is the index's "metadata" object (e.g. "total_size"); nil for a
// single-file checkpoint, whose metadata is its File's Header().Metadata.
func (c *Checkpoint) Metadata() map[string]any { return c.metadata }

// Tensor returns a view of the named tensor; the error wraps ErrNotFound and
// names the tensor if the checkpoint has none.
func (c *Checkpoint) Tensor(name string) (*Tensor, error) {
	f, ok := c.byName[name]
	if !ok {
		return nil, fmt.Errorf("%w: tensor %q in checkpoint %s", ErrNotFound, name, c.dir)
	}
	return f.Tensor(name)
}

// Has reports whether the checkpoint has the named tensor.
func (c *Checkpoint) Has(name string) bool {
	_, ok := c.byName[name]
	return ok
}

// Names lists every tensor name, sorted. For an indexed checkpoint these are
// the index's names; tensors a shard holds but the index omits are ignored.
func (c *Checkpoint) Names() []string { return slices.Clone(c.names) }

// Info returns the header entry of the named tensor.
func (c *Checkpoint) Info(name string) (TensorInfo, bool) {
	f, ok := c.byName[name]
	if !ok {
		return TensorInfo{}, false
	}
	ti, ok := f.header.Lookup(name)
	ti.Shape = slices.Clone(ti.Shape)
	return ti, ok
}

// Prefetch asks the kernel to start reading the named tensors' pages in the
// background (madvise WILLNEED). An expert node calls it for the experts it
// owns, so their bytes, and only theirs, are read before the first request.
// Unknown names wrap ErrNotFound (the known ones are still prefetched).
func (c *Checkpoint) Prefetch(names ...string) error {
	var errs []error
	for _, name := range names {
		f, ok := c.byName[name]
		if !ok {
			errs = append(errs, fmt.Errorf("%w: tensor %q in checkpoint %s", ErrNotFound, name, c.dir))
			continue
		}
		if err := f.Prefetch(name); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Close unmaps every file. Tensors obtained from c must not be used after.
func (c *Checkpoint) Close() error {
	var errs []error
	for _, f := range c.files {
		errs = append(errs, f.Close())
	}
	return errors.Join(errs...)
}
