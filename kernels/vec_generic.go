package kernels

import (
	"fmt"
	"math"
)

func dotGeneric(a, b []float32) float32 {
	b = b[:len(a)]
	var s float32
	for i, v := range a {
		s += v * b[i]
	}
	return s
}

func axpyGeneric(y []float32, a float32, x []float32) {
	x = x[:len(y)]
	for i := range y {
		y[i] += a * x[i]
	}
}

func scaleGeneric(x []float32, a float32) {
	for i := range x {
		x[i] *= a
	}
}

func addGeneric(dst, a, b []float32) {
	a, b = a[:len(dst)], b[:len(dst)]
	for i := range dst {
		dst[i] = a[i] + b[i]
	}
}

// sumSqGeneric is sum(x^2) in float32.
func sumSqGeneric(x []float32) float32 {
	var s float32
	for _, v := range x {
		s += v * v
	}
	return s
}

// mulScaleGeneric: out[i] = weight[i] * (x[i] * inv) — HF's order.
func mulScaleGeneric(out, x, weight []float32, inv float32) {
	x, weight = x[:len(out)], weight[:len(out)]
	for i := range out {
		out[i] = weight[i] * (x[i] * inv)
	}
}

func expf(x float32) float32 { return float32(math.Exp(float64(x))) }

func siluMulGeneric(out, gate, up []float32) {
	gate, up = gate[:len(out)], up[:len(out)]
	for i := range out {
		g := gate[i]
		out[i] = g / (1 + expf(-g)) * up[i]
	}
}

// expSubGeneric: x[i] = exp(x[i]-m), returning the float32 sum.
func expSubGeneric(x []float32, m float32) float32 {
	var s float32
	for i, v := range x {
		e := expf(v - m)
		x[i] = e
		s += e
	}
	return s
}

func maxGeneric(x []float32) float32 {
	m := float32(math.Inf(-1))
	for _, v := range x {
		if v > m {
			m = v
		}
	}
	return m
}

func sigmoidGeneric(x []float32) {
	for i, v := range x {
		x[i] = 1 / (1 + expf(-v))
	}
}

func ropeGeneric(x, cos, sin []float32) {
	x = x[:2*len(cos)]
	sin = sin[:len(cos)]
	for i, c := range cos {
		s := sin[i]
		a, b := x[2*i], x[2*i+1]
		x[2*i] = a*c - b*s
		x[2*i+1] = a*s + b*c
	}
}

func lenPanic(op string, want, have int, what string) {
	panic(fmt.Sprintf("kernels: %s: len(%s)=%d, want %d", op, what, have, want))
}
