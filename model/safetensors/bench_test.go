package safetensors

import (
	"fmt"
	"path/filepath"
	"sync"
	"testing"
)

// manyExperts is a DeepSeek-like layer list: per layer n routed experts with
// three BF16 projections each, small enough to write quickly.
func manyExperts(layers, experts, dim, inter int) []TensorSpec {
	var specs []TensorSpec
	for l := range layers {
		for e := range experts {
			for _, p := range []struct {
				name  string
				shape []int
			}{{"gate_proj", []int{inter, dim}}, {"up_proj", []int{inter, dim}}, {"down_proj", []int{dim, inter}}} {
				specs = append(specs, TensorSpec{
					Name:  fmt.Sprintf("model.layers.%d.mlp.experts.%d.%s.weight", l, e, p.name),
					DType: BF16, Shape: p.shape,
				})
			}
		}
	}
	return specs
}

// TestConcurrentReaders: views may be taken and read from many goroutines at
// once (run under -race).
func TestConcurrentReaders(t *testing.T) {
	dir := t.TempDir()
	specs := manyExperts(2, 8, 16, 8)
	if err := WriteSharded(dir, specs, 4096, fillPattern); err != nil {
		t.Fatal(err)
	}
	c, err := OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 4 {
		wg.Go(func() {
			for i := g; i < len(specs); i += 4 {
				if err := c.Prefetch(specs[i].Name); err != nil {
					errs <- err
					return
				}
				tn, err := c.Tensor(specs[i].Name)
				if err != nil {
					errs <- err
					return
				}
				if string(tn.Data) != string(want(specs[i])) {
					errs <- fmt.Errorf("tensor %q: wrong bytes", specs[i].Name)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func BenchmarkWriteSharded(b *testing.B) {
	specs := manyExperts(2, 16, 1024, 512) // 2*16*3 tensors of 1 MiB: 96 MiB
	var total int64
	for _, s := range specs {
		n, _ := byteSize(s.DType, s.Shape)
		total += n
	}
	b.SetBytes(total)
	for b.Loop() {
		if err := WriteSharded(b.TempDir(), specs, 32<<20, func(TensorSpec, []byte) error { return nil }); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseHeader(b *testing.B) {
	// One shard of a V3-sized checkpoint holds a few hundred to a few
	// thousand tensors; 3072 zero-sized ones keep the data section empty.
	specs := manyExperts(4, 256, 0, 0)
	sizes := make([]int64, len(specs))
	hdr, err := encodeHeader(specs, sizes)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(hdr)))
	for b.Loop() {
		if _, err := ParseHeader(hdr, int64(len(hdr))); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkOpenCheckpoint(b *testing.B) {
	dir := b.TempDir()
	specs := manyExperts(4, 64, 64, 32) // 768 tensors, 32 shards
	if err := WriteSharded(dir, specs, 96<<10, func(TensorSpec, []byte) error { return nil }); err != nil {
		b.Fatal(err)
	}
	c, err := OpenCheckpoint(dir)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(len(c.Files())), "shards")
	c.Close()
	for b.Loop() {
		c, err := OpenCheckpoint(filepath.Clean(dir))
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
