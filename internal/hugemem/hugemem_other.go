//go:build !linux

// Package hugemem allocates large buffers backed by transparent huge pages
// where the OS offers them.
package hugemem

// Alloc falls back to the Go heap where THP advice is not available.
func Alloc(n int) ([]byte, func() error, error) {
	return make([]byte, n), func() error { return nil }, nil
}
