//go:build unix

package model

import "golang.org/x/sys/unix"

// dropPages unmaps b's pages from this process (b page-aligned, part of
// a shared file mapping: the next read faults them in from the file).
func dropPages(b []byte) { _ = unix.Madvise(b, unix.MADV_DONTNEED) }
