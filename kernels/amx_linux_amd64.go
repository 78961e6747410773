//go:build amd64 && !purego && linux

package kernels

import (
	"fmt"
	"syscall"
	"unsafe"
)

// amxPermit asks Linux for XTILEDATA (state component 18) once for the
// whole process (arch_prctl ARCH_REQ_XCOMP_PERM; kernels from 5.16) and
// checks the grant with ARCH_GET_XCOMP_PERM.
func amxPermit() error {
	const (
		archGetXcompPerm = 0x1022
		archReqXcompPerm = 0x1023
		xfeatureTileData = 18
	)
	if _, _, e := syscall.RawSyscall(syscall.SYS_ARCH_PRCTL, archReqXcompPerm, xfeatureTileData, 0); e != 0 {
		return fmt.Errorf("arch_prctl(ARCH_REQ_XCOMP_PERM): %v", e)
	}
	var perm uint64
	if _, _, e := syscall.RawSyscall(syscall.SYS_ARCH_PRCTL, archGetXcompPerm, uintptr(unsafe.Pointer(&perm)), 0); e != 0 {
		return fmt.Errorf("arch_prctl(ARCH_GET_XCOMP_PERM): %v", e)
	}
	if perm&(1<<xfeatureTileData) == 0 {
		return fmt.Errorf("XTILEDATA not granted (permitted features %#x)", perm)
	}
	return nil
}
