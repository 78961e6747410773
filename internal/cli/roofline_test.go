package cli

import (
	"strings"
	"testing"
	"time"

	"github.com/expertmesh/expertmesh/model"
)

func TestWriteRoofline(t *testing.T) {
	for _, tc := range []struct {
		name string
		res  model.GenerateResult
		want string
	}{
		{
			// 4 decode steps of 1 GB each in 0.2 s: 20 GB/s against a
			// 25 GB/s probe is 80%, and the roofline is 25 tok/s.
			name: "decode",
			res:  model.GenerateResult{Tokens: []int{1, 2, 3, 4, 5}, DecodeTime: 200 * time.Millisecond, DecodeWeightBytes: 4e9},
			want: "roofline: decode streamed 1.000 GB of weights per token at 20.0 GB/s; read probe 25.0 GB/s (24.0 before, 26.0 after): 80.0% of the bandwidth roofline (25.0 tok/s)\n",
		},
		{
			name: "one token: no decode step",
			res:  model.GenerateResult{Tokens: []int{1}},
			want: "roofline: no decode steps to measure\n",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b strings.Builder
			writeRoofline(&b, &tc.res, 24e9, 26e9)
			if b.String() != tc.want {
				t.Fatalf("got  %q\nwant %q", b.String(), tc.want)
			}
		})
	}
}
