package model

import "golang.org/x/sys/unix"

// allocHuge returns n bytes of anonymous memory advised for transparent
// huge pages, and the function that unmaps it.
func allocHuge(n int) ([]byte, func() error, error) {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return nil, nil, err
	}
	// Advice only: without THP the memory still works with small pages.
	_ = unix.Madvise(b, unix.MADV_HUGEPAGE)
	return b, func() error { return unix.Munmap(b) }, nil
}
