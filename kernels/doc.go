// Package kernels holds expertmesh's CPU compute kernels: matrix-vector and
// matrix-matrix products over weights in their stored format (BF16, F16, F32,
// FP8 E4M3 with block scales, Q8_0), the vector kernels of a transformer
// layer, and the absorbed MLA decode attention over a paged latent cache.
//
// Every kernel has a plain Go version (x_generic.go) that defines its
// semantics; on amd64 SIMD versions (AVX2+FMA, AVX-512, AVX512_BF16) are
// chosen at start-up from CPU features and tested against the plain one.
// Build with -tags purego to use only the plain versions.
//
// Multi-core work goes through a Pool of persistent workers; nothing in the
// steady state allocates or starts goroutines.
package kernels
