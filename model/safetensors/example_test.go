package safetensors_test

import (
	"encoding/binary"
	"fmt"
	"log"
	"math"
	"os"

	"github.com/expertmesh/expertmesh/model/safetensors"
)

func Example() {
	dir, err := os.MkdirTemp("", "safetensors-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	// Write two tensors, at most 16 bytes of data per shard.
	specs := []safetensors.TensorSpec{
		{Name: "model.norm.weight", DType: safetensors.F32, Shape: []int{4}},
		{Name: "lm_head.weight", DType: safetensors.F32, Shape: []int{2, 2}},
	}
	err = safetensors.WriteSharded(dir, specs, 16, func(s safetensors.TensorSpec, dst []byte) error {
		for i := 0; i < len(dst); i += 4 {
			binary.LittleEndian.PutUint32(dst[i:], math.Float32bits(float32(i/4)+0.5))
		}
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}

	ckpt, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		log.Fatal(err)
	}
	defer ckpt.Close()
	fmt.Println(ckpt.Names(), len(ckpt.Files()), "shards")
	t, err := ckpt.Tensor("lm_head.weight")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(t.DType, t.Shape, t.NumElements(), math.Float32frombits(binary.LittleEndian.Uint32(t.Data[12:])))
	_, err = ckpt.Tensor("missing")
	fmt.Println(err != nil)
	// Output:
	// [lm_head.weight model.norm.weight] 2 shards
	// F32 [2 2] 4 3.5
	// true
}
