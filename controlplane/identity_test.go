package controlplane

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/expertmesh/expertmesh/model/safetensors"
)

func writeTensors(t *testing.T, path string, fill byte, names ...string) {
	t.Helper()
	var specs []safetensors.TensorSpec
	for _, n := range names {
		specs = append(specs, safetensors.TensorSpec{Name: n, DType: safetensors.F32, Shape: []int{4}})
	}
	err := safetensors.WriteFile(path, specs, func(_ safetensors.TensorSpec, dst []byte) error {
		for i := range dst {
			dst[i] = fill
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestIdentifyModel(t *testing.T) {
	dir := tinyModel(t, "ckpt", nil)
	base, err := IdentifyModel(dir)
	if err != nil {
		t.Fatal(err)
	}
	if base.Name != "ckpt" || base.Layers != 3 || base.RoutedExperts != 64 || len(base.Hash) != 64 {
		t.Fatalf("identity %+v", base)
	}

	// Without an index: the safetensors headers count, the tensor data
	// does not.
	st := filepath.Join(dir, "model.safetensors")
	writeTensors(t, st, 1, "a", "b")
	withHeader, err := IdentifyModel(dir)
	if err != nil {
		t.Fatal(err)
	}
	if withHeader.Hash == base.Hash {
		t.Fatal("a tensor file did not change the identity")
	}
	writeTensors(t, st, 2, "a", "b")
	if id, _ := IdentifyModel(dir); id.Hash != withHeader.Hash {
		t.Fatal("tensor data changed the identity")
	}
	writeTensors(t, st, 1, "a", "c")
	if id, _ := IdentifyModel(dir); id.Hash == withHeader.Hash {
		t.Fatal("a different tensor name did not change the identity")
	}

	// With an index: its bytes count (the shards are not read).
	if err := os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), []byte(`{"weight_map":{"a":"model.safetensors"}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	withIndex, err := IdentifyModel(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(st, []byte("not a safetensors file"), 0o644); err != nil {
		t.Fatal(err)
	}
	if id, err := IdentifyModel(dir); err != nil || id.Hash != withIndex.Hash {
		t.Fatalf("with an index the shards were read: %v", err)
	}

	// Errors name what is wrong.
	if _, err := IdentifyModel(t.TempDir()); !errors.Is(err, ErrConfig) {
		t.Errorf("no config.json: %v", err)
	}
	bad := tinyModel(t, "bad", nil)
	if err := os.WriteFile(filepath.Join(bad, "x.safetensors"), []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := IdentifyModel(bad); !errors.Is(err, ErrConfig) {
		t.Errorf("absurd header length: %v", err)
	}
}
