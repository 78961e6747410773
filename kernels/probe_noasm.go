//go:build !amd64 || purego

package kernels

func probeRead(buf []byte, twoStreams bool) float32 { return probeReadGeneric(buf) }

func probeFMA(iters int) float64 { return 0 }

func probeDPBF16(iters int) float64 { return 0 }

func probeFMAFlops(iters int) float64 { return 0 }

func probeDPBF16Flops(iters int) float64 { return 0 }
