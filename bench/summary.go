package bench

import (
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"unicode/utf8"
)

// center pads s to n runes with c on both sides, the extra one on the
// right (Python's format "{:c^n}").
func center(s string, n int, c byte) string {
	pad := n - utf8.RuneCountInString(s)
	if pad <= 0 {
		return s
	}
	l := pad / 2
	return strings.Repeat(string(c), l) + s + strings.Repeat(string(c), pad-l)
}

// metricTitles are vLLM's section headers and short names.
var metricTitles = map[string][2]string{
	"ttft": {"Time to First Token", "TTFT"},
	"tpot": {"Time per Output Token (excl. 1st token)", "TPOT"},
	"itl":  {"Inter-token Latency", "ITL"},
	"e2el": {"End-to-end Latency", "E2EL"},
}

// WriteSummary prints vLLM's "Serving Benchmark Result" block, then the
// failed requests by kind.
func WriteSummary(w io.Writer, r *Result) {
	line := func(label string, v any) {
		var s string
		switch v := v.(type) {
		case float64:
			s = fmt.Sprintf("%.2f", v)
		default:
			s = fmt.Sprint(v)
		}
		fmt.Fprintf(w, "%-40s %s\n", label, s)
	}
	fmt.Fprintln(w, center(" Serving Benchmark Result ", 50, '='))
	line("Successful requests:", r.Completed)
	line("Failed requests:", r.Failed)
	if r.MaxConcur != nil {
		line("Maximum request concurrency:", *r.MaxConcur)
	}
	if !math.IsInf(float64(r.RequestRate), 1) && r.RequestRate > 0 {
		line("Request rate configured (RPS):", float64(r.RequestRate))
	}
	line("Benchmark duration (s):", r.Duration)
	line("Total input tokens:", r.TotalInput)
	if r.TotalCached > 0 {
		line("Total cached input tokens:", r.TotalCached)
	}
	line("Total generated tokens:", r.TotalOutput)
	line("Request throughput (req/s):", r.ReqTput)
	if r.ReqGoodput != nil {
		line("Request goodput (req/s):", *r.ReqGoodput)
	}
	line("Output token throughput (tok/s):", r.OutTput)
	line("Peak output token throughput (tok/s):", r.MaxOutPerS)
	line("Peak concurrent requests:", float64(r.MaxConcReqs))
	line("Total Token throughput (tok/s):", r.TotalTput)
	for _, m := range metricOrder {
		if _, ok := r.Stats["mean_"+m+"_ms"]; !ok {
			continue
		}
		t := metricTitles[m]
		fmt.Fprintln(w, center(t[0], 50, '-'))
		line(fmt.Sprintf("Mean %s (ms):", t[1]), r.Stats["mean_"+m+"_ms"])
		line(fmt.Sprintf("Median %s (ms):", t[1]), r.Stats["median_"+m+"_ms"])
		for _, p := range r.MetricPercentiles {
			pw := percentileWord(p)
			line(fmt.Sprintf("P%s %s (ms):", pw, t[1]), r.Stats["p"+pw+"_"+m+"_ms"])
		}
	}
	if len(r.ErrorsByKind) > 0 {
		fmt.Fprintln(w, center("Failed Requests by Kind", 50, '-'))
		kinds := make([]string, 0, len(r.ErrorsByKind))
		for k := range r.ErrorsByKind {
			kinds = append(kinds, k)
		}
		sort.Strings(kinds)
		for _, k := range kinds {
			line(k+":", r.ErrorsByKind[k])
			// The first message of each kind says why.
			for i, ek := range r.ErrorKinds {
				if ek == k && i < len(r.Errors) {
					fmt.Fprintf(w, "  e.g. request %d: %s\n", i, oneLine(r.Errors[i], 120))
					break
				}
			}
		}
	}
	if r.ExpertLoad != nil || r.LayerBreakdown != nil {
		fmt.Fprintln(w, center("Cluster", 50, '-'))
		if r.ExpertLoad != nil {
			line("Expert load (layers x nodes):", fmt.Sprintf("%d x %d", len(r.ExpertLoad.Layers), len(r.ExpertLoad.Nodes)))
		}
		if r.LayerBreakdown != nil {
			line("Layer breakdown (layers):", len(r.LayerBreakdown.Layers))
		}
	}
	fmt.Fprintln(w, strings.Repeat("=", 50))
}

func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		s = s[:n] + "..."
	}
	return s
}

// FileName is vLLM's result file name:
// {label}-{rate}qps[-concurrency{N}]-{model base name}-{date}.json, where
// the label defaults to the backend.
func FileName(r *Result) string {
	label := r.Backend
	if r.Label != nil && *r.Label != "" {
		label = *r.Label
	}
	conc := ""
	if r.MaxConcur != nil {
		conc = fmt.Sprintf("-concurrency%d", *r.MaxConcur)
	}
	model := r.ModelID
	if i := strings.LastIndex(model, "/"); i >= 0 {
		model = model[i+1:]
	}
	return fmt.Sprintf("%s-%sqps%s-%s-%s.json", label, pyFloat(float64(r.RequestRate)), conc, model, r.Date)
}

// Save writes the result JSON to dir/name (name "" means FileName(r); dir
// "" the current directory) and the HTML report beside it, named as the
// JSON with .html for .json. It returns both paths.
func Save(r *Result, dir, name string) (jsonPath, htmlPath string, err error) {
	if name == "" {
		name = FileName(r)
	}
	if dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", "", err
		}
	}
	jsonPath = filepath.Join(dir, name)
	htmlPath = strings.TrimSuffix(jsonPath, ".json") + ".html"
	b, err := r.MarshalJSON()
	if err != nil {
		return "", "", err
	}
	if err := os.WriteFile(jsonPath, append(b, '\n'), 0o644); err != nil {
		return "", "", err
	}
	f, err := os.Create(htmlPath)
	if err != nil {
		return "", "", err
	}
	if err := WriteReport(f, r); err != nil {
		f.Close()
		return "", "", err
	}
	return jsonPath, htmlPath, f.Close()
}
