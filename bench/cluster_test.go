package bench

import (
	"context"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
)

// TestFetchClusterNested: expertmesh's coordinator answers expert_load under
// control_plane; a server may answer it at the top; a top-level one wins.
func TestFetchClusterNested(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		want       []float64
	}{
		{"top", `{"expert_load":{"layers":[1],"nodes":["a","b"],"tokens":[[3,4]]}}`, []float64{3, 4}},
		{"nested", `{"epoch":1,"control_plane":{"version":2,"expert_load":{"layers":[1],"nodes":["a","b"],"tokens":[[5,6]]}}}`, []float64{5, 6}},
		{"both", `{"expert_load":{"layers":[1],"nodes":["a","b"],"tokens":[[1,2]]},"control_plane":{"expert_load":{"layers":[1],"nodes":["a","b"],"tokens":[[5,6]]}}}`, []float64{1, 2}},
		{"none", `{"control_plane":{"version":2}}`, nil},
		{"bad shape", `{"control_plane":{"expert_load":{"layers":[1],"nodes":["a"],"tokens":[[5,6]]}}}`, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte(tc.body)) }))
			defer srv.Close()
			cs, err := FetchCluster(context.Background(), srv.Client(), srv.URL, "")
			if err != nil {
				t.Fatal(err)
			}
			if tc.want == nil {
				if cs.ExpertLoad != nil {
					t.Fatalf("expert_load %+v, want none", cs.ExpertLoad)
				}
				return
			}
			if cs.ExpertLoad == nil || !slices.Equal(cs.ExpertLoad.Tokens[0], tc.want) {
				t.Fatalf("expert_load %+v, want tokens %v", cs.ExpertLoad, tc.want)
			}
		})
	}
}
