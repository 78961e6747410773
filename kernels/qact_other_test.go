//go:build !amd64 || purego

package kernels

type qVariant struct {
	name string
	set  func() (restore func())
}

func qVariants() []qVariant {
	return []qVariant{{name: "", set: func() func() { return func() {} }}}
}
