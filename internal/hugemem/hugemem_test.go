package hugemem

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"unsafe"
)

func TestAlloc(t *testing.T) {
	const n = 3<<20 + 5 // not a multiple of the page size
	b, release, err := Alloc(n)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != n {
		t.Fatalf("len %d, want %d", len(b), n)
	}
	for i := 0; i < n; i += 4093 {
		if b[i] != 0 {
			t.Fatalf("byte %d = %d, want zeroed memory", i, b[i])
		}
		b[i] = byte(i)
	}
	if b[4093] != byte(4093%256) {
		t.Fatal("write lost")
	}
	if err := release(); err != nil {
		t.Fatal(err)
	}
}

// TestAllocAligned: a buffer of at least a huge page starts on a huge-page
// boundary, so that every whole huge page of it can be one, and the
// reserve taken to align it is given back: the mapping is exactly the
// buffer rounded up to small pages, and release unmaps it.
func TestAllocAligned(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("huge-page alignment is Linux only")
	}
	page := os.Getpagesize()
	for _, n := range []int{HugePage, 17301504, 3<<20 + 5} { // 17301504: a V2-Lite routed expert
		b, release, err := Alloc(n)
		if err != nil {
			t.Fatal(err)
		}
		start := uintptr(unsafe.Pointer(&b[0]))
		if start%HugePage != 0 || len(b) != n {
			t.Errorf("%d bytes at %#x: not on a %d-byte boundary, or len %d", n, start, HugePage, len(b))
		}
		for i := 0; i < n; i += page {
			b[i] = 1
		}
		want := (uintptr(n) + uintptr(page) - 1) &^ uintptr(page-1)
		lo, hi, ok := mapping(t, start)
		if !ok || lo != start || hi-lo != want {
			t.Errorf("%d bytes: mapping %#x-%#x (found %v), want %#x-%#x", n, lo, hi, ok, start, start+want)
		}
		if err := release(); err != nil {
			t.Fatal(err)
		}
		if _, _, ok := mapping(t, start); ok {
			t.Errorf("%d bytes: still mapped after release", n)
		}
	}
}

// mapping returns the bounds of the mapping in /proc/self/maps holding
// addr (adjacent anonymous mappings with the same flags are merged by the
// kernel into one line).
func mapping(t *testing.T, addr uintptr) (lo, hi uintptr, ok bool) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		var l, h uint64
		if _, err := fmt.Sscanf(line, "%x-%x", &l, &h); err != nil {
			continue
		}
		if uintptr(l) <= addr && addr < uintptr(h) {
			return uintptr(l), uintptr(h), true
		}
	}
	return 0, 0, false
}
