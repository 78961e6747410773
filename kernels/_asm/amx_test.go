package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// amxCases: each encoder against the bytes GNU objdump (binutils 2.40)
// decodes to the AT&T form beside it, as in the Intel SDM's AMX tables.
var amxCases = []struct {
	bytes []byte
	att   string
}{
	{vex0F38(0, 0x49, 0, 0, 0, nil, false), "tilerelease"},
	{vex0F38(0, 0x49, 0, 0, 0, &mem{base: "DI"}, false), "ldtilecfg (%rdi)"},
	{vex0F38(3, 0x49, 3, 0, 0, nil, false), "tilezero %tmm3"},
	{vex0F38(3, 0x4B, 6, 0, 0, &mem{base: "DX", index: "R11", scale: 1}, true), "tileloadd (%rdx,%r11,1),%tmm6"},
	{vex0F38(3, 0x4B, 7, 0, 0, &mem{base: "DX", index: "R11", scale: 1, disp: 64}, true), "tileloadd 0x40(%rdx,%r11,1),%tmm7"},
	{vex0F38(3, 0x4B, 5, 0, 0, &mem{base: "R12", index: "R8", scale: 1}, true), "tileloadd (%r12,%r8,1),%tmm5"},
	{vex0F38(3, 0x4B, 3, 0, 0, &mem{base: "R13", index: "R9", scale: 1, disp: 64}, true), "tileloadd 0x40(%r13,%r9,1),%tmm3"},
	{vex0F38(2, 0x4B, 1, 0, 0, &mem{base: "BX", index: "R9", scale: 1, disp: 64}, true), "tilestored %tmm1,0x40(%rbx,%r9,1)"},
	{vex0F38(2, 0x4B, 2, 0, 0, &mem{base: "R13", index: "R9", scale: 1}, true), "tilestored %tmm2,0x0(%r13,%r9,1)"},
	{vex0F38(2, 0x5C, 0, 6, 4, nil, false), "tdpbf16ps %tmm6,%tmm4,%tmm0"},
	{vex0F38(2, 0x5C, 3, 7, 5, nil, false), "tdpbf16ps %tmm7,%tmm5,%tmm3"},
	// The split kernels' third part: a 32-bit displacement.
	{vex0F38(3, 0x4B, 4, 0, 0, &mem{base: "SI", index: "R8", scale: 1, disp: 128}, true), "tileloadd 0x80(%rsi,%r8,1),%tmm4"},
	{vex0F38(3, 0x4B, 5, 0, 0, &mem{base: "R12", index: "R8", scale: 1, disp: 128}, true), "tileloadd 0x80(%r12,%r8,1),%tmm5"},
}

// TestAMXKnownBytes pins the encodings of a few forms to the bytes of the
// SDM (VEX.128.W0 0F38: C4 E2 78 49 C0 is TILERELEASE).
func TestAMXKnownBytes(t *testing.T) {
	want := map[string][]byte{
		"tilerelease":                   {0xC4, 0xE2, 0x78, 0x49, 0xC0},
		"ldtilecfg (%rdi)":              {0xC4, 0xE2, 0x78, 0x49, 0x07},
		"tilezero %tmm3":                {0xC4, 0xE2, 0x7B, 0x49, 0xD8},
		"tdpbf16ps %tmm6,%tmm4,%tmm0":   {0xC4, 0xE2, 0x4A, 0x5C, 0xC4},
		"tileloadd (%rdx,%r11,1),%tmm6": {0xC4, 0xA2, 0x7B, 0x4B, 0x34, 0x1A},
	}
	for _, c := range amxCases {
		if w, ok := want[c.att]; ok && !bytes.Equal(c.bytes, w) {
			t.Errorf("%s: % x, want % x", c.att, c.bytes, w)
		}
	}
}

// TestAMXObjdump decodes every case with objdump (skipped where objdump
// is absent or too old to know AMX).
func TestAMXObjdump(t *testing.T) {
	if _, err := exec.LookPath("objdump"); err != nil {
		t.Skip("no objdump")
	}
	var all []byte
	for _, c := range amxCases {
		all = append(all, c.bytes...)
	}
	f := filepath.Join(t.TempDir(), "amx.bin")
	if err := os.WriteFile(f, all, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("objdump", "-D", "-b", "binary", "-m", "i386:x86-64", f).Output()
	if err != nil {
		t.Skipf("objdump: %v", err)
	}
	line := regexp.MustCompile(`^\s*[0-9a-f]+:\s+((?:[0-9a-f]{2} )+)\s*(.*)$`)
	var got []string
	for _, l := range strings.Split(string(out), "\n") {
		// (A line of bytes alone continues the instruction above.)
		if m := line.FindStringSubmatch(l); m != nil && strings.TrimSpace(m[2]) != "" {
			got = append(got, strings.Join(strings.Fields(m[2]), " "))
		}
	}
	if len(got) > 0 && strings.HasPrefix(got[0], "(bad)") {
		t.Skip("objdump does not know AMX")
	}
	if len(got) != len(amxCases) {
		t.Fatalf("objdump decoded %d instructions, want %d:\n%s", len(got), len(amxCases), out)
	}
	for i, c := range amxCases {
		if got[i] != c.att {
			t.Errorf("% x: objdump %q, want %q", c.bytes, got[i], c.att)
		}
	}
}
