//go:build amd64 && !purego

package kernels

// BestISA is the highest level this CPU and build support.
func BestISA() ISA { return ISAGeneric }

func kernelsFor(ISA) kernelSet { return genericKernels }
