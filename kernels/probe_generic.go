package kernels

import "encoding/binary"

// probeReadGeneric touches every 8 bytes of buf (plain-Go fallback of the
// read-bandwidth probe).
func probeReadGeneric(buf []byte) float32 {
	var s uint64
	for i := 0; i+8 <= len(buf); i += 8 {
		s += binary.LittleEndian.Uint64(buf[i:])
	}
	return float32(s)
}
