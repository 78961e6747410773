package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/expertmesh/expertmesh/internal/telemetry"
)

// Run benchmarks the server cfg names and returns the result. It returns
// when every request it started has ended; cancelling ctx stops it early
// with ctx's error. Every goroutine it starts has ended when it returns.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	logw := cfg.Log
	if logw == nil {
		logw = io.Discard
	}
	if cfg.DatasetName == "random" {
		// vLLM's rule: random prompts run to their requested length.
		cfg.IgnoreEOS = true
	}
	root := cfg.Root()
	hc := newHTTPClient(cfg.MaxConcurrency)
	defer hc.CloseIdleConnections()

	models, firstModel, err := fetchModels(ctx, hc, root, cfg.APIKey)
	switch {
	case err != nil && cfg.Model == "":
		return nil, fmt.Errorf("no --model given and GET %s/v1/models failed: %w", root, err)
	case err != nil:
		fmt.Fprintf(logw, "warning: GET /v1/models: %v\n", err)
	case cfg.Model == "":
		cfg.Model = firstModel
	}

	var reqs []Request
	if cfg.DatasetName == "random" {
		reqs = RandomRequests(&cfg)
	} else {
		f, err := os.Open(cfg.DatasetPath)
		if err != nil {
			return nil, fmt.Errorf("--dataset-path: %w", err)
		}
		entries, err := ReadDataset(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("--dataset-path %s: %w", cfg.DatasetPath, err)
		}
		if reqs, err = FromEntries(&cfg, entries, logw); err != nil {
			return nil, fmt.Errorf("--dataset-path %s: %w", cfg.DatasetPath, err)
		}
	}

	var before *ClusterStats
	if cfg.ClusterStats {
		before, _ = FetchCluster(ctx, hc, root, cfg.APIKey)
	}

	rcv := cfg.Traces
	if rcv == nil && cfg.OTLPListen != "" {
		rcv = telemetry.NewReceiver()
		if err := rcv.Listen(cfg.OTLPListen); err != nil {
			return nil, fmt.Errorf("--otlp-listen: %w", err)
		}
		defer rcv.Close()
		fmt.Fprintf(logw, "OTLP receiver on %s: export the cluster's traces there (OTEL_EXPORTER_OTLP_ENDPOINT=%s)\n", rcv.Addr(), rcv.Endpoint())
	}

	c := &client{http: hc, url: root + cfg.Endpoint, model: cfg.Model, cfg: &cfg}
	if cfg.Warmup > 0 {
		fmt.Fprintf(logw, "Warming up with %d requests...\n", cfg.Warmup)
		failed := warmup(ctx, c, reqs, cfg.Warmup, cfg.MaxConcurrency)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if failed > 0 {
			fmt.Fprintf(logw, "warning: %d of %d warmup requests failed\n", failed, cfg.Warmup)
		}
		fmt.Fprintln(logw, "Warmup run completed.")
	}

	dist := "Poisson process"
	if cfg.Burstiness != 1 {
		dist = "Gamma distribution"
	}
	fmt.Fprintf(logw, "Traffic request rate: %s\n", pyFloat(cfg.RequestRate))
	fmt.Fprintf(logw, "Burstiness factor: %s (%s)\n", pyFloat(cfg.Burstiness), dist)
	if cfg.MaxConcurrency > 0 {
		fmt.Fprintf(logw, "Maximum request concurrency: %d\n", cfg.MaxConcurrency)
	} else {
		fmt.Fprintln(logw, "Maximum request concurrency: None")
	}
	if cfg.Duration > 0 {
		fmt.Fprintf(logw, "Duration: %v\n", cfg.Duration)
	}

	traceStart := time.Now()
	outs, dur, err := dispatch(ctx, c, &cfg, reqs)
	if err != nil {
		return nil, err
	}

	r := &Result{
		Date:              time.Now().Format("20060102-150405"),
		Backend:           cfg.Backend(),
		EndpointType:      cfg.Backend(),
		ModelID:           cfg.Model,
		NumPrompts:        cfg.NumPrompts,
		RequestRate:       Rate(cfg.RequestRate),
		Burstiness:        cfg.Burstiness,
		Endpoint:          cfg.Endpoint,
		BaseURL:           root,
		DatasetName:       cfg.DatasetName,
		RandomPrefixLen:   cfg.RandomPrefixLen,
		IgnoreEOS:         cfg.IgnoreEOS,
		Seed:              cfg.Seed,
		DurationLimit:     cfg.Duration.Seconds(),
		Warmup:            cfg.Warmup,
		GoodputSLOs:       cfg.Goodput,
		PercentileMetrics: cfg.PercentileMetrics,
		MetricPercentiles: cfg.MetricPercentiles,
		CommandLine:       cfg.CommandLine,
		ServerModels:      models,
	}
	if cfg.Label != "" {
		r.Label = &cfg.Label
	}
	if cfg.TokenizerID != "" {
		r.TokenizerID = &cfg.TokenizerID
	}
	if cfg.MaxConcurrency > 0 {
		mc := cfg.MaxConcurrency
		r.MaxConcur = &mc
	}
	if cfg.Duration > 0 {
		// The pool cycled; what was sent is what counts.
		r.NumPrompts = len(outs)
	}
	compute(r, outs, dur, cfg.Goodput, cfg.PercentileMetrics, cfg.MetricPercentiles)

	if cfg.ClusterStats {
		if after, _ := FetchCluster(ctx, hc, root, cfg.APIKey); after != nil {
			r.ServerCluster = after.Raw
			if after.ExpertLoad != nil {
				var prev *ExpertLoad
				if before != nil {
					prev = before.ExpertLoad
				}
				r.ExpertLoad = after.ExpertLoad.sub(prev)
			}
			r.LayerBreakdown = after.LayerBreakdown
			if r.LayerBreakdown != nil && r.LayerBreakdown.Source == "" {
				r.LayerBreakdown.Source = "GET /v1/cluster"
			}
		}
	}
	if rcv != nil {
		settle := cfg.TraceSettle
		if settle <= 0 {
			settle = 3 * time.Second
		}
		spans := rcv.Settle(ctx, settle)
		bd, el, err := BreakdownFromSpans(spans, traceStart)
		if err != nil {
			fmt.Fprintf(logw, "warning: no per-layer breakdown from traces: %v\n", err)
		} else {
			// Traces of the measured requests beat the server's summary.
			r.LayerBreakdown = bd
			if r.ExpertLoad == nil {
				r.ExpertLoad = el
			}
		}
		if n := rcv.Dropped(); n > 0 {
			fmt.Fprintf(logw, "warning: the OTLP receiver dropped %d spans (more than it keeps)\n", n)
		}
	}
	return r, nil
}

func newHTTPClient(concurrency int) *http.Client {
	idle := 1000
	if concurrency > 0 {
		idle = concurrency
	}
	return &http.Client{Transport: &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          idle,
		MaxIdleConnsPerHost:   idle,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		// Compression would buffer the stream and blur token timings.
		DisableCompression: true,
	}}
}

// fetchModels reads GET /v1/models: the raw answer, and the first model's id.
func fetchModels(ctx context.Context, hc *http.Client, root, apiKey string) (json.RawMessage, string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, root+"/v1/models", nil)
	if err != nil {
		return nil, "", err
	}
	setAuth(req, apiKey)
	resp, err := hc.Do(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, "", err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, "", fmt.Errorf("%s: %s", resp.Status, apiMessage(b))
	}
	var m struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, "", fmt.Errorf("answer is not JSON: %v", err)
	}
	if len(m.Data) == 0 || m.Data[0].ID == "" {
		return json.RawMessage(b), "", errors.New("the server lists no models")
	}
	return json.RawMessage(b), m.Data[0].ID, nil
}

// warmup sends n requests (cycling reqs) at most concurrency at a time (all
// at once for 0) and waits for them; it returns how many failed.
func warmup(ctx context.Context, c *client, reqs []Request, n, concurrency int) int {
	c.runStart = time.Now()
	if concurrency <= 0 {
		concurrency = n
	}
	sem := make(chan struct{}, concurrency)
	var wg sync.WaitGroup
	var failed atomic.Int64
	for i := range n {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if o := c.do(ctx, &reqs[i%len(reqs)]); o.kind != "" {
				failed.Add(1)
			}
		}()
	}
	wg.Wait()
	return int(failed.Load())
}

// dispatch is the measured run: requests start at their arrival times, at
// most cfg.MaxConcurrency at a time (a request whose time has come waits
// for a slot, as vLLM's semaphore makes it), until NumPrompts have started
// or, with Duration, until it has passed. It returns the outcomes in
// start order and the time from the start to the last answer.
func dispatch(ctx context.Context, c *client, cfg *Config, reqs []Request) ([]outcome, float64, error) {
	arr := NewArrivals(cfg.RequestRate, cfg.Burstiness, cfg.Seed)
	var schedule []time.Duration
	if cfg.Duration == 0 {
		schedule = arr.Schedule(cfg.NumPrompts)
	}
	var sem chan struct{}
	if cfg.MaxConcurrency > 0 {
		sem = make(chan struct{}, cfg.MaxConcurrency)
	}
	var (
		wg    sync.WaitGroup
		slots []*outcome
		prog  progress
	)
	if cfg.Duration == 0 {
		prog.total = int64(cfg.NumPrompts)
	}
	start := time.Now()
	c.runStart = start
	if cfg.Duration > 0 {
		c.door = start.Add(cfg.Duration)
		defer func() { c.door = time.Time{} }()
	}
	stopProgress := prog.start(cfg.Progress, start, cfg.Duration)

	var deadline <-chan time.Time // closes the door in duration mode
	if cfg.Duration > 0 {
		t := time.NewTimer(cfg.Duration)
		defer t.Stop()
		deadline = t.C
	}
	timer := time.NewTimer(0)
	<-timer.C
	defer timer.Stop()
	var next time.Duration
loop:
	for i := 0; ; i++ {
		if cfg.Duration == 0 {
			if i == len(schedule) {
				break
			}
			next = schedule[i]
		} else {
			next += time.Duration(arr.Next() * float64(time.Second))
			if next >= cfg.Duration {
				break
			}
		}
		if wait := time.Until(start.Add(next)); wait > 0 {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-deadline:
				break loop
			case <-ctx.Done():
				break loop
			}
		}
		if sem != nil {
			select {
			case sem <- struct{}{}:
			case <-deadline:
				break loop
			case <-ctx.Done():
				break loop
			}
		}
		if ctx.Err() != nil || (cfg.Duration > 0 && time.Since(start) >= cfg.Duration) {
			break
		}
		slot := &outcome{}
		slots = append(slots, slot)
		req := &reqs[i%len(reqs)]
		prog.inflight.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			*slot = c.do(ctx, req)
			if sem != nil {
				<-sem
			}
			prog.inflight.Add(-1)
			if slot.late {
				return
			}
			prog.done.Add(1)
			if slot.kind != "" {
				prog.failed.Add(1)
			}
		}()
	}
	wg.Wait()
	dur := time.Since(start).Seconds()
	stopProgress()
	if err := ctx.Err(); err != nil {
		return nil, 0, err
	}
	outs := make([]outcome, 0, len(slots))
	for _, s := range slots {
		if !s.canceled && !s.late {
			outs = append(outs, *s)
		}
	}
	return outs, dur, nil
}

// progress is the live progress line.
type progress struct {
	total                  int64 // 0 in duration mode
	done, failed, inflight atomic.Int64
}

// start draws the line on w every 200 ms until the returned stop is
// called; stop draws it a last time and ends the line. A nil w draws
// nothing.
func (p *progress) start(w io.Writer, start time.Time, limit time.Duration) (stop func()) {
	if w == nil {
		return func() {}
	}
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				p.draw(w, start, limit)
			case <-quit:
				p.draw(w, start, limit)
				fmt.Fprintln(w)
				return
			}
		}
	}()
	return func() { close(quit); wg.Wait() }
}

func (p *progress) draw(w io.Writer, start time.Time, limit time.Duration) {
	const width = 30
	el := time.Since(start)
	done := p.done.Load()
	frac := 0.0
	switch {
	case p.total > 0:
		frac = float64(done) / float64(p.total)
	case limit > 0:
		frac = math.Min(1, el.Seconds()/limit.Seconds())
	}
	bar := make([]byte, width)
	for i := range bar {
		bar[i] = ' '
		if float64(i) < frac*width {
			bar[i] = '='
		}
	}
	count := fmt.Sprintf("%d", done)
	if p.total > 0 {
		count = fmt.Sprintf("%d/%d", done, p.total)
	}
	rate := 0.0
	if s := el.Seconds(); s > 0 {
		rate = float64(done) / s
	}
	fmt.Fprintf(w, "\r[%s] %3.0f%% %s done, %d failed, %d in flight, %.1fs, %.2f req/s ",
		bar, frac*100, count, p.failed.Load(), p.inflight.Load(), el.Seconds(), rate)
}
