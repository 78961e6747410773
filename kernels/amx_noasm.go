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
