package controlplane

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"

	"github.com/expertmesh/expertmesh/model"
)

// ModelIdentity names the checkpoint a cluster serves. Two nodes serve the
// same model when their Hash is equal.
type ModelIdentity struct {
	// Hash is the hex SHA-256 over config.json and the tensor index.
	Hash string `json:"hash"`
	// Name is the checkpoint directory's base name, for error messages.
	Name          string `json:"name"`
	Layers        int    `json:"layers"`
	RoutedExperts int    `json:"routed_experts"`
}

func (id ModelIdentity) String() string {
	h := id.Hash
	if len(h) > 16 {
		h = h[:16]
	}
	return fmt.Sprintf("%s (hash %s, %d layers, %d routed experts)", id.Name, h, id.Layers, id.RoutedExperts)
}

// maxHeader bounds a safetensors header read for identity; real headers
// are a few MB at most.
const maxHeader = 100 << 20

// IdentifyModel computes dir's identity: SHA-256 over config.json's bytes
// and the tensor index, which is model.safetensors.index.json's bytes when
// present, else the header JSON of every *.safetensors file (the 8-byte
// length and the header only, never tensor data), files in name order.
// Each part is framed by its name and length so that no two layouts hash
// alike. Name, Layers and RoutedExperts come from config.json.
func IdentifyModel(dir string) (ModelIdentity, error) {
	cfgBytes, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return ModelIdentity{}, fmt.Errorf("%w: model identity: %v", ErrConfig, err)
	}
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		return ModelIdentity{}, fmt.Errorf("model identity: %w", err)
	}
	h := sha256.New()
	part := func(name string, b []byte) {
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], uint64(len(name)))
		h.Write(n[:])
		h.Write([]byte(name))
		binary.LittleEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	part("config.json", cfgBytes)
	idx, err := os.ReadFile(filepath.Join(dir, "model.safetensors.index.json"))
	switch {
	case err == nil:
		part("model.safetensors.index.json", idx)
	case os.IsNotExist(err):
		files, err := filepath.Glob(filepath.Join(dir, "*.safetensors"))
		if err != nil {
			return ModelIdentity{}, fmt.Errorf("%w: model identity: %v", ErrConfig, err)
		}
		slices.Sort(files)
		for _, f := range files {
			hdr, err := safetensorsHeader(f)
			if err != nil {
				return ModelIdentity{}, err
			}
			part(filepath.Base(f), hdr)
		}
	default:
		return ModelIdentity{}, fmt.Errorf("%w: model identity: %v", ErrConfig, err)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		abs = dir
	}
	return ModelIdentity{
		Hash:          hex.EncodeToString(h.Sum(nil)),
		Name:          filepath.Base(abs),
		Layers:        cfg.NumHiddenLayers,
		RoutedExperts: cfg.NumExperts(),
	}, nil
}

// safetensorsHeader reads only a safetensors file's header JSON.
func safetensorsHeader(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: model identity: %v", ErrConfig, err)
	}
	defer f.Close()
	var n [8]byte
	if _, err := io.ReadFull(f, n[:]); err != nil {
		return nil, fmt.Errorf("%w: model identity: %s: header length: %v", ErrConfig, path, err)
	}
	size := binary.LittleEndian.Uint64(n[:])
	if size == 0 || size > maxHeader {
		return nil, fmt.Errorf("%w: model identity: %s: header of %d bytes", ErrConfig, path, size)
	}
	hdr := make([]byte, size)
	if _, err := io.ReadFull(f, hdr); err != nil {
		return nil, fmt.Errorf("%w: model identity: %s: header: %v", ErrConfig, path, err)
	}
	if !json.Valid(hdr) {
		return nil, fmt.Errorf("%w: model identity: %s: header is not JSON", ErrConfig, path)
	}
	return hdr, nil
}
