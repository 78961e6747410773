//go:build !amd64 || purego

package kernels

import "errors"

// AMXAvailable reports whether this machine and OS allow the AMX-BF16 path,
// and if not, why (never in this build).
func AMXAvailable() (bool, string) { return false, "not an amd64 assembly build" }

// AMXEnabled reports whether MatMulBF16Act currently uses AMX for large batches.
func AMXEnabled() bool { return false }

// SetAMX turns the AMX path of MatMulBF16Act on or off; on fails in this build.
func SetAMX(on bool) error {
	if on {
		return errors.New("kernels: AMX unavailable: not an amd64 assembly build")
	}
	return nil
}

func probeAMX(iters int) float64 { return 0 }

func probeAMXFlops(iters int) float64 { return 0 }

// splitX: no split AMX path in this build.
type splitX struct {
	a       []uint16
	n, cols int
}

func splitUsed(*Matrix, int) bool { return false }

func splitRowLen(int) int { return 0 }

func amxSplitRows([]uint16, []float32, int, int, int, []uint32) {
	panic("kernels: no AMX path in this build")
}

func finishSplit(*splitX, []float32, []uint32, []float32) bool {
	panic("kernels: no AMX path in this build")
}

func matMulSplitRows([]float32, *Matrix, *splitX, int, int, []float32) {
	panic("kernels: no AMX path in this build")
}
func splitScratch(int) int { return 0 }
