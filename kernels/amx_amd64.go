//go:build amd64 && !purego

package kernels

import (
	"errors"
	"os"
	"unsafe"

	"golang.org/x/sys/cpu"
)

// AMX-BF16 for MatMulBF16Act's large batches.
//
// TDPBF16PS multiplies a tile of up to 16 rows x 32 bf16 (A) by a tile of
// 16 rows of 16 bf16 pairs (B) into 16x16 float32 (C), about eight times
// the VDPBF16PS rate of a core. A is the activation rows already rounded
// to bf16 (xb, row stride 2*ceil(Cols/2)), B is W packed by packBF16Pairs
// (k-pair-major, 32 W rows: two B tiles side by side at stride 128 bytes),
// and C lands straight in y (row stride 4*Rows): every tile's shape comes
// from a configuration built in Go (amxConfig), so batch, row and column
// tails are tiles with fewer rows or columns, never padding or copies.
//
// Arithmetic: like VDPBF16PS, TDPBF16PS multiplies bf16 pairs exactly in
// float32 and adds them with round to nearest even, treats subnormal
// inputs as zero and flushes subnormal results (Intel SDM, TDPBF16PS); only
// the order of the float32 sums differs from the DP kernels and from the
// plain loop (which keeps subnormals).
//
// Go runtime safety: each kernel call runs LDTILECFG ... TILERELEASE
// entirely inside one assembly function, which Go never preempts
// asynchronously (assembly has no safe points), so a goroutine never moves
// threads with live tiles. Once the process holds XTILEDATA permission
// (arch_prctl below), Linux saves and restores tile state on context
// switches and around signal handlers like any other XSAVE state; Go's
// 32 KiB signal stacks hold the larger signal frame.

//go:noescape
func amxBF16x11(cfg *amxConfig, a *uint16, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)

//go:noescape
func amxBF16x12(cfg *amxConfig, a *uint16, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)

//go:noescape
func amxBF16x21(cfg *amxConfig, a *uint16, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)

//go:noescape
func amxBF16x22(cfg *amxConfig, a *uint16, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int)

//go:noescape
func amxPeak(cfg *amxConfig, iters int)

func amxCPUID(leaf, sub uint32) (a, b, c, d uint32)

func amxXCR0() (lo, hi uint32)

// amxRun calls the kernel of one or two A tiles (m2) by one or two B tiles
// (n2); direct calls, so cfg stays on the stack (a call through a func
// value would make it escape).
func amxRun(m2, n2 bool, cfg *amxConfig, a *uint16, astride uintptr, b *uint32, bstride uintptr, ksteps int, c *float32, cstride uintptr, acc int) {
	switch {
	case m2 && n2:
		amxBF16x22(cfg, a, astride, b, bstride, ksteps, c, cstride, acc)
	case m2:
		amxBF16x21(cfg, a, astride, b, bstride, ksteps, c, cstride, acc)
	case n2:
		amxBF16x12(cfg, a, astride, b, bstride, ksteps, c, cstride, acc)
	default:
		amxBF16x11(cfg, a, astride, b, bstride, ksteps, c, cstride, acc)
	}
}

// amxConfig is LDTILECFG's 64-byte operand (palette 1): bytes 16-31 the
// bytes per row of TMM0-7, bytes 48-55 their rows.
type amxConfig [64]byte

// amxCfg shapes TMM0-3 (C00 C01 C10 C11), TMM4/5 (A0, A1) and TMM6/7 (B0,
// B1) for A tiles of m0, m1 rows, B tiles of n0, n1 columns and kc bf16
// pairs per step; a tile of 0 rows or columns stays unconfigured.
func amxCfg(m0, m1, n0, n1, kc int) amxConfig {
	var c amxConfig
	c[0] = 1
	set := func(t, rows, colsb int) {
		if rows == 0 || colsb == 0 {
			return
		}
		c[16+2*t] = byte(colsb)
		c[17+2*t] = byte(colsb >> 8)
		c[48+t] = byte(rows)
	}
	set(0, m0, 4*n0)
	set(1, m0, 4*n1)
	set(2, m1, 4*n0)
	set(3, m1, 4*n1)
	set(4, m0, 4*kc)
	set(5, m1, 4*kc)
	set(6, kc, 4*n0)
	set(7, kc, 4*n1)
	return c
}

// amxNR W rows per packed panel: two B tiles of 16 columns.
const amxNR = 32

var (
	// amxOK: the CPU has AMX-TILE and AMX-BF16, the OS enables tile state
	// (XCR0 bits 17 and 18) and granted this process XTILEDATA.
	amxOK, amxWhy = amxProbe()
	// amxOn: MatMulBF16Act and the float32-activation products (split
	// parts, amxsplit_amd64.go) use AMX (amxOK, unless EXPERTMESH_AMX=0 or
	// SetAMX(false)).
	amxOn = amxOK && os.Getenv("EXPERTMESH_AMX") != "0"
)

func amxProbe() (bool, string) {
	// CPUID.(EAX=7,ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
	if max, _, _, _ := amxCPUID(0, 0); max < 7 {
		return false, "no CPUID leaf 7"
	}
	_, _, _, edx := amxCPUID(7, 0)
	if edx&(1<<22) == 0 || edx&(1<<24) == 0 || !cpu.X86.HasAVX512BF16 {
		return false, "CPU lacks AMX-BF16/AMX-TILE"
	}
	if lo, _ := amxXCR0(); lo&(3<<17) != 3<<17 {
		return false, "OS does not enable tile state (XCR0)"
	}
	if err := amxPermit(); err != nil {
		return false, err.Error()
	}
	return true, ""
}

// AMXAvailable reports whether this machine and OS allow the AMX-BF16 path,
// and if not, why.
func AMXAvailable() (bool, string) { return amxOK, amxWhy }

// AMXEnabled reports whether MatMulBF16Act, and MatMul, MatMulMany and
// ExpertFFN with BF16 weights, currently use AMX for large batches.
func AMXEnabled() bool { return amxOn }

// SetAMX turns the AMX paths on or off: MatMulBF16Act's, and the exact one
// of the float32-activation products with BF16 weights (a hook for tests
// and benchmarks that compare them with the VDPBF16PS and FMA kernels;
// also off when the environment has EXPERTMESH_AMX=0). Not safe while
// kernels run.
func SetAMX(on bool) error {
	if on && !amxOK {
		return errors.New("kernels: AMX unavailable: " + amxWhy)
	}
	amxOn = on
	return nil
}

// amxMinN: the smallest batch MatMulBF16Act gives to AMX (below it the
// dot-form VDPBF16PS kernels run, streaming W without packing it). Measured
// with BenchmarkMatMulAMX -amxsmall at 1408x2048 and 2048x1408, one
// thread, 3 alternated rounds at load 3.2-3.6: AMX/DP 0.35-1.02 at n <= 4,
// 0.86-1.17 at 6, 1.09-1.57 at 8, 1.06-3.15 at 10, 1.50-1.83 at 12,
// 1.91-2.69 at 14 (and 2-4x at 16-48, 7-8x at 512). A variable for
// benchmarks.
var amxMinN = 8

// amxUsed reports whether MatMulBF16Act of n rows on w takes AMX.
func amxUsed(w *Matrix, n int) bool {
	return amxOn && n >= amxMinN && dpAvailable(w)
}

// matMulAMXRows: W (BF16) rows [lo,hi) against xb, the n x rows rounded to
// bf16 with row stride 2*kp (zero padded), through AMX tiles: 32 W rows
// packed once, then every block of 32 x rows against them.
func matMulAMXRows(y []float32, w *Matrix, xb []uint16, n, lo, hi int, scratch []float32) {
	if lo >= hi || n == 0 {
		return
	}
	cols, rows := w.Cols, w.Rows
	kp := (cols + 1) / 2
	kmain := kp &^ 15 // whole 16-pair steps
	kt := kp - kmain  // pairs of the tail step
	packed := unsafe.Slice((*uint32)(unsafe.Pointer(&scratch[0])), amxNR*kp)
	_ = xb[n*2*kp-1]
	_ = y[(n-1)*rows+hi-1]
	astride, bstride, cstride := uintptr(4*kp), uintptr(4*amxNR), uintptr(4*rows)
	full := amxCfg(16, 16, 16, 16, 16)
	for r0 := lo; r0 < hi; r0 += amxNR {
		cnt := min(amxNR, hi-r0)
		packBF16Pairs(packed, w, r0, cnt, amxNR)
		n0 := min(16, cnt)
		n1 := cnt - n0
		for i0 := 0; i0 < n; i0 += 32 {
			m0 := min(16, n-i0)
			m1 := min(16, n-i0-m0)
			c := &y[i0*rows+r0]
			if kmain > 0 {
				cfg := &full
				var tail amxConfig
				if m1 < 16 || n1 < 16 {
					tail = amxCfg(m0, m1, n0, n1, 16)
					cfg = &tail
				}
				amxRun(m1 > 0, n1 > 0, cfg, &xb[i0*2*kp], astride, &packed[0], bstride, kmain/16, c, cstride, 0)
			}
			if kt > 0 {
				cfg := amxCfg(m0, m1, n0, n1, kt)
				amxRun(m1 > 0, n1 > 0, &cfg, &xb[i0*2*kp+2*kmain], astride, &packed[kmain*amxNR], bstride, 1, c, cstride, b2i(kmain > 0))
			}
		}
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// probeAMX runs iters iterations of 4 register-only TDPBF16PS (16x16x32,
// 16384 flops each) and returns the flops done, 0 without AMX.
func probeAMX(iters int) float64 {
	if !amxOK {
		return 0
	}
	cfg := amxCfg(16, 16, 16, 16, 16)
	amxPeak(&cfg, iters)
	return probeAMXFlops(iters)
}

func probeAMXFlops(iters int) float64 {
	if !amxOK {
		return 0
	}
	return float64(iters) * 4 * 16384
}
