//go:build !amd64 || purego

package kernels

func mlaChunkUnit(a *mlaArgs, h, q0, q1 int) { mlaChunkUnitGeneric(a, h, q0, q1) }
