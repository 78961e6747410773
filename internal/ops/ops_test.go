package ops

import (
	"errors"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestEndpoints(t *testing.T) {
	var notReady atomic.Bool
	notReady.Store(true)
	reg := prometheus.NewRegistry()
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "expertmesh_test_gauge", Help: "test"})
	reg.MustRegister(g)
	g.Set(7)
	s, err := Start("127.0.0.1:0", func() error {
		if notReady.Load() {
			return errors.New("loading")
		}
		return nil
	}, reg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + s.Addr() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Fatalf("healthz %d", code)
	}
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "loading") {
		t.Fatalf("readyz while loading: %d %q", code, body)
	}
	notReady.Store(false)
	if code, _ := get("/readyz"); code != 200 {
		t.Fatalf("readyz %d", code)
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, "expertmesh_test_gauge 7") || !strings.Contains(body, "go_goroutines") {
		t.Fatalf("metrics %d: %.200s", code, body)
	}
}
