//go:build amd64 && !purego

package kernels

// qVariant is one setting of the integer instructions the kernels may
// use: the machine's own, or with AVX512_VNNI and/or AVX-VNNI turned off.
type qVariant struct {
	name string
	set  func() (restore func())
}

func qVariants() []qVariant {
	hw512, hwY := qVNNI512, qAVXVNNI
	var out []qVariant
	for _, v512 := range []bool{hw512, false} {
		for _, vy := range []bool{hwY, false} {
			name := ""
			if v512 != hw512 {
				name += "-novnni512"
			}
			if vy != hwY {
				name += "-noavxvnni"
			}
			if name == "" && len(out) > 0 {
				continue
			}
			if (!hw512 && v512 != hw512) || (!hwY && vy != hwY) {
				continue
			}
			v512, vy := v512, vy
			out = append(out, qVariant{name: name, set: func() func() {
				qVNNI512, qAVXVNNI = v512, vy
				return func() {
					qVNNI512, qAVXVNNI = hw512, hwY
					SetISA(BestISA())
				}
			}})
		}
	}
	// Dedupe: without the hardware feature the "off" variant is the same.
	seen := map[string]bool{}
	var uniq []qVariant
	for _, v := range out {
		if !seen[v.name] {
			seen[v.name] = true
			uniq = append(uniq, v)
		}
	}
	return uniq
}
