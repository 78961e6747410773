//go:build !amd64 || purego

package kernels

// quantSIMDBlocks is never called without assembly (impl.quantSIMD is
// false there).
func quantSIMDBlocks(q []int8, d []float32, sum []int32, x []float32) {
	quantGeneric(q, d, sum, x)
}
