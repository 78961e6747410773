package hugemem

import "testing"

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
