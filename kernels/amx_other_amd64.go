//go:build amd64 && !purego && !linux

package kernels

import "errors"

// amxPermit: only Linux's arch_prctl grant is implemented.
func amxPermit() error { return errors.New("AMX tile permission is only requested on Linux") }
