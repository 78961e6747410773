package safetensors

import "errors"

// Sentinel errors. Every error of this package wraps one of them (and names the
// file and tensor concerned), so callers match with errors.Is, never on text.
var (
	// ErrNotFound: a tensor, shard or checkpoint file that should exist does not.
	ErrNotFound = errors.New("safetensors: not found")
	// ErrCorrupt: a file or index is malformed or inconsistent.
	ErrCorrupt = errors.New("safetensors: corrupt")
	// ErrShape: a shape is invalid (negative or overflowing dimensions), does not
	// match its byte size, or is not the shape a caller asked for.
	ErrShape = errors.New("safetensors: bad shape")
)
