//go:build unix

package safetensors

import (
	"os"

	"golang.org/x/sys/unix"
)

// mapFile maps the first size bytes of f read-only and shared: pages come from
// the page cache on first touch and are shared by every process mapping the
// same checkpoint, so nothing is copied.
func mapFile(f *os.File, size int) ([]byte, error) {
	return unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
}

func unmapFile(b []byte) error { return unix.Munmap(b) }

// willNeed advises the kernel that b[lo:hi] will be read soon. madvise needs a
// page-aligned start; the mapping itself starts on a page boundary, so aligning
// the offset aligns the address.
func willNeed(b []byte, lo, hi int) {
	page := os.Getpagesize()
	lo -= lo % page
	_ = unix.Madvise(b[lo:hi], unix.MADV_WILLNEED) // advice only: failure changes nothing but speed
}
