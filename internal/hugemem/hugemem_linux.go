// Package hugemem allocates large buffers backed by transparent huge pages
// where the OS offers them: weights streamed once per token, and the
// bandwidth probes that are compared with them, take far fewer TLB misses
// on 2 MiB pages than on 4 KiB ones.
package hugemem

import (
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// HugePage is the transparent huge page size on x86-64 and on arm64 with
// 4 KiB base pages.
const HugePage = 2 << 20

// Alloc returns n bytes of zeroed anonymous memory advised for
// transparent huge pages, and the function that unmaps it.
//
// A buffer of at least HugePage bytes starts on a HugePage boundary. The
// kernel aligns only anonymous mappings whose length is a multiple of
// HugePage; any other starts at a random small-page offset, and the
// partial huge pages at both ends stay small pages. For a V2-Lite routed
// expert (16.5 MiB, one allocation per expert on an expert node) that
// left 9% of the weights on small pages (AnonHugePages in
// /proc/PID/smaps_rollup: 960 of the 1056 MiB of 64 experts; now 1024).
// Aligned, only the tail past the last whole huge page is small pages
// (0.5 MiB of 16.5); the length is not rounded up, which would make THP
// back the tail with a whole huge page and cost up to 2 MiB of memory per
// buffer.
func Alloc(n int) ([]byte, func() error, error) {
	if n < HugePage {
		b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
		if err != nil {
			return nil, nil, err
		}
		_ = unix.Madvise(b, unix.MADV_HUGEPAGE)
		return b, func() error { return unix.Munmap(b) }, nil
	}
	// Reserve HugePage more than needed, then unmap the slack before the
	// first boundary and past the buffer's last small page.
	page := uintptr(os.Getpagesize())
	length := (uintptr(n) + page - 1) &^ (page - 1)
	p, err := unix.MmapPtr(-1, 0, nil, length+HugePage, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return nil, nil, err
	}
	head := -uintptr(p) & (HugePage - 1) // bytes before the first boundary
	start := unsafe.Add(p, head)
	if head > 0 {
		if err := unix.MunmapPtr(p, head); err != nil {
			_ = unix.MunmapPtr(p, length+HugePage)
			return nil, nil, err
		}
	}
	if tail := HugePage - head; tail > 0 {
		if err := unix.MunmapPtr(unsafe.Add(start, length), tail); err != nil {
			_ = unix.MunmapPtr(start, length+tail)
			return nil, nil, err
		}
	}
	b := unsafe.Slice((*byte)(start), n)
	// Advice only: without THP the memory still works with small pages.
	_ = unix.Madvise(b, unix.MADV_HUGEPAGE)
	return b, func() error { return unix.MunmapPtr(start, length) }, nil
}
