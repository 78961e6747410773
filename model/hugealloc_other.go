//go:build !linux

package model

// allocHuge falls back to the Go heap where THP advice is not available.
func allocHuge(n int) ([]byte, func() error, error) {
	return make([]byte, n), func() error { return nil }, nil
}
