package bench

import (
	"fmt"
	"io"
	"math"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// CompareRow is one metric of two runs.
type CompareRow struct {
	Metric string
	A, B   float64
	// Ratio is B/A; NaN when A is 0.
	Ratio float64
	// HigherBetter says which way is an improvement (throughputs up,
	// latencies and failures down).
	HigherBetter bool
}

// Compare lists the metrics both results have: the run totals and
// throughputs, then each latency statistic, in the summary's order.
func Compare(a, b *Result) []CompareRow {
	var rows []CompareRow
	add := func(name string, va, vb float64, higher bool) {
		ratio := math.NaN()
		if va != 0 {
			ratio = vb / va
		}
		rows = append(rows, CompareRow{name, va, vb, ratio, higher})
	}
	add("duration", a.Duration, b.Duration, false)
	add("completed", float64(a.Completed), float64(b.Completed), true)
	add("failed", float64(a.Failed), float64(b.Failed), false)
	add("total_input_tokens", float64(a.TotalInput), float64(b.TotalInput), true)
	if a.TotalCached > 0 || b.TotalCached > 0 {
		add("total_cached_tokens", float64(a.TotalCached), float64(b.TotalCached), true)
	}
	add("total_output_tokens", float64(a.TotalOutput), float64(b.TotalOutput), true)
	add("request_throughput", a.ReqTput, b.ReqTput, true)
	if a.ReqGoodput != nil && b.ReqGoodput != nil {
		add("request_goodput", *a.ReqGoodput, *b.ReqGoodput, true)
	}
	add("output_throughput", a.OutTput, b.OutTput, true)
	add("total_token_throughput", a.TotalTput, b.TotalTput, true)
	add("max_output_tokens_per_s", a.MaxOutPerS, b.MaxOutPerS, true)
	add("max_concurrent_requests", float64(a.MaxConcReqs), float64(b.MaxConcReqs), true)
	for _, m := range metricOrder {
		var keys []string
		for k := range a.Stats {
			if _, ok := b.Stats[k]; ok && strings.HasSuffix(k, "_"+m+"_ms") && statKey.MatchString(k) {
				keys = append(keys, k)
			}
		}
		sort.Slice(keys, func(i, j int) bool { return statRank(keys[i]) < statRank(keys[j]) })
		for _, k := range keys {
			add(k, a.Stats[k], b.Stats[k], false)
		}
	}
	return rows
}

// statRank orders mean, median, std, then percentiles ascending.
func statRank(k string) float64 {
	switch {
	case strings.HasPrefix(k, "mean_"):
		return -3
	case strings.HasPrefix(k, "median_"):
		return -2
	case strings.HasPrefix(k, "std_"):
		return -1
	}
	p, _ := strconv.ParseFloat(strings.TrimPrefix(k[:strings.IndexByte(k, '_')], "p"), 64)
	return p
}

// WriteCompare prints the rows as a table: metric, A, B, B/A.
func WriteCompare(w io.Writer, rows []CompareRow, nameA, nameB string) {
	fmt.Fprintf(w, "A: %s\nB: %s\n", nameA, nameB)
	fmt.Fprintf(w, "%-30s %14s %14s %8s\n", "metric", "A", "B", "B/A")
	fmt.Fprintln(w, strings.Repeat("-", 69))
	for _, r := range rows {
		ratio := "-"
		if !math.IsNaN(r.Ratio) {
			ratio = fmt.Sprintf("%.3f", r.Ratio)
		}
		fmt.Fprintf(w, "%-30s %14s %14s %8s\n", r.Metric, compareNum(r.A), compareNum(r.B), ratio)
	}
}

func compareNum(v float64) string {
	if v == math.Trunc(v) && math.Abs(v) < 1e12 {
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

// WriteCompareReport writes a self-contained HTML page comparing two runs:
// the table of differences and their distributions and time series
// overlaid.
func WriteCompareReport(w io.Writer, a, b *Result, nameA, nameB string) error {
	var sb strings.Builder
	title := fmt.Sprintf("expertmesh bench compare: %s vs %s", nameA, nameB)
	writeHead(&sb, title)
	fmt.Fprintf(&sb, `<h1>%s</h1>`, esc(title))
	fmt.Fprintf(&sb, `<p><b style="color:%s">A</b>: %s (%s, %s)<br><b style="color:%s">B</b>: %s (%s, %s)</p>`,
		colorA, esc(nameA), esc(a.ModelID), esc(a.Date), colorB, esc(nameB), esc(b.ModelID), esc(b.Date))
	sb.WriteString(`<h2>Differences</h2><table><tr><th>metric</th><th>A</th><th>B</th><th>B/A</th></tr>`)
	for _, r := range Compare(a, b) {
		ratio, class := "–", ""
		if !math.IsNaN(r.Ratio) {
			ratio = fmt.Sprintf("%.3f", r.Ratio)
			if better := (r.Ratio > 1) == r.HigherBetter; r.Ratio != 1 && math.Abs(r.Ratio-1) > 0.02 {
				class = map[bool]string{true: "better", false: "worse"}[better]
			}
		}
		fmt.Fprintf(&sb, `<tr><td>%s</td><td>%s</td><td>%s</td><td class="%s">%s</td></tr>`,
			esc(r.Metric), compareNum(r.A), compareNum(r.B), class, ratio)
	}
	sb.WriteString(`</table><p>Green: B better by more than 2%; red: worse.</p>`)
	runs, names := []*Result{a, b}, []string{"A: " + nameA, "B: " + nameB}
	latencySection(&sb, runs, names)
	timeSection(&sb, runs, names)
	clusterSections(&sb, runs, names)
	sb.WriteString(pageScript)
	_, err := io.WriteString(w, sb.String())
	return err
}

// CompareName is the name of a compare page for two result files.
func CompareName(pathA, pathB string) string {
	base := func(p string) string { return strings.TrimSuffix(filepath.Base(p), ".json") }
	return "compare-" + base(pathA) + "-vs-" + base(pathB) + ".html"
}
