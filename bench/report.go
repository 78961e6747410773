package bench

import (
	"encoding/json"
	"fmt"
	"html"
	"io"
	"math"
	"sort"
	"strings"
)

// pageHead is the report's <head>: inline style only, nothing fetched.
const pageHead = `<!DOCTYPE html>
<html lang="en" data-rendered="pending">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1340px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f5f5f5}
td:first-child,th:first-child{text-align:left}
.grid2{display:flex;flex-wrap:wrap;gap:12px}
.grid2 figure{flex:1 1 560px;max-width:660px}
figure{margin:0}svg.plot{max-width:100%;height:auto}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px;white-space:pre-wrap;word-break:break-all}
.nodata{color:#888;font-style:italic;border:1px dashed #ccc;padding:16px;max-width:600px}
.better{color:#1a7f37}.worse{color:#cf222e}
</style>
</head>
<body>
`

// pageScript runs after the plots: it checks every plot has drawn paths,
// adds a value readout under the pointer, and marks the document with
// data-rendered="ok" (or what went wrong), which the tests look for.
const pageScript = `<script>
window.addEventListener('error', function (e) {
  document.documentElement.setAttribute('data-rendered', 'error: ' + e.message);
});
(function () {
  var plots = document.querySelectorAll('svg.plot');
  var missing = [];
  for (var i = 0; i < plots.length; i++) {
    var svg = plots[i], ok = false, paths = svg.querySelectorAll('path');
    for (var j = 0; j < paths.length; j++) {
      var d = paths[j].getAttribute('d');
      if (d && d.length > 1) { ok = true; break; }
    }
    if (!ok) missing.push(svg.id);
    var x0 = parseFloat(svg.getAttribute('data-x0')), x1 = parseFloat(svg.getAttribute('data-x1'));
    var ml = parseFloat(svg.getAttribute('data-ml')), iw = parseFloat(svg.getAttribute('data-iw'));
    var out = svg.querySelector('text.readout');
    if (out && isFinite(x0) && isFinite(x1) && iw > 0) {
      (function (svg, out, x0, x1, ml, iw) {
        svg.addEventListener('mousemove', function (ev) {
          var r = svg.getBoundingClientRect();
          var vx = (ev.clientX - r.left) * svg.viewBox.baseVal.width / r.width;
          var v = x0 + (vx - ml) / iw * (x1 - x0);
          out.textContent = (vx >= ml && vx <= ml + iw) ? 'x = ' + v.toPrecision(4) : '';
        });
      })(svg, out, x0, x1, ml, iw);
    }
  }
  document.documentElement.setAttribute('data-plots', String(plots.length));
  if (document.documentElement.getAttribute('data-rendered') === 'pending') {
    document.documentElement.setAttribute('data-rendered', missing.length ? 'missing: ' + missing.join(',') : 'ok');
  }
})();
</script>
</body>
</html>
`

func esc(s string) string { return html.EscapeString(s) }

// writeHead starts a page titled title.
func writeHead(b *strings.Builder, title string) {
	b.WriteString(strings.Replace(pageHead, "@TITLE@", esc(title), 1))
}

func fmtNum(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	return fmt.Sprintf("%.2f", v)
}

func noData(b *strings.Builder, why string) {
	fmt.Fprintf(b, `<p class="nodata">no data%s</p>`, why)
}

// msValues is a metric's values in milliseconds.
func msValues(r *Result, metric string) []float64 {
	v := r.Values(metric)
	for i := range v {
		v[i] *= 1000
	}
	return v
}

// latencySection draws the four latency distributions as CDFs, overlaying
// the runs given.
func latencySection(b *strings.Builder, runs []*Result, names []string) {
	b.WriteString(`<h2>Latency distributions</h2><div class="grid2">`)
	for _, m := range metricOrder {
		t := metricTitles[m]
		var curves []curve
		var markers []marker
		n := 0
		for i, r := range runs {
			v := msValues(r, m)
			n += len(v)
			curves = append(curves, cdfCurve(names[i], v))
			if len(runs) == 1 && len(v) > 0 {
				for _, p := range []float64{50, 90, 99} {
					markers = append(markers, marker{Percentile(v, p), fmt.Sprintf("p%s %s", percentileWord(p), fmtNum(Percentile(v, p)))})
				}
			}
		}
		b.WriteString(`<figure>`)
		if n == 0 {
			fmt.Fprintf(b, `<h3>%s</h3>`, esc(t[0]))
			noData(b, ": no per-request values (every request failed, or the file was saved without them)")
		} else {
			b.WriteString(linePlot("plot-"+m, t[0]+" ("+t[1]+"), CDF", t[1]+" (ms)", "fraction of "+map[bool]string{true: "gaps", false: "requests"}[m == "itl"], curves, markers))
		}
		b.WriteString(`</figure>`)
	}
	b.WriteString(`</div>`)
}

// timeSection draws output throughput and concurrency over time.
func timeSection(b *strings.Builder, runs []*Result, names []string) {
	b.WriteString(`<h2>Over time (1 s buckets)</h2><div class="grid2">`)
	for _, s := range []struct{ id, title, y string }{
		{"plot-throughput", "Output throughput", "output tokens / s"},
		{"plot-concurrency", "Requests in flight (mean over the bucket)", "requests"},
	} {
		var curves []curve
		n := 0
		for i, r := range runs {
			v := r.TimeSeries.OutputTokensPerS
			if s.id == "plot-concurrency" {
				v = r.TimeSeries.Concurrency
			}
			n += len(v)
			bucket := r.TimeSeries.BucketS
			if bucket <= 0 {
				bucket = 1
			}
			curves = append(curves, seriesCurve(names[i], v, bucket))
		}
		b.WriteString(`<figure>`)
		if n == 0 {
			fmt.Fprintf(b, `<h3>%s</h3>`, esc(s.title))
			noData(b, ": the result has no time series")
		} else {
			b.WriteString(linePlot(s.id, s.title, "time since start (s)", s.y, curves, nil))
		}
		b.WriteString(`</figure>`)
	}
	b.WriteString(`</div>`)
}

// clusterSections draws the layer timeline and the expert-load heatmap of
// each run that has them, or says "no data".
func clusterSections(b *strings.Builder, runs []*Result, names []string) {
	b.WriteString(`<h2>Per-layer timeline of a step</h2>`)
	for i, r := range runs {
		if len(runs) > 1 {
			fmt.Fprintf(b, `<h3>%s</h3>`, esc(names[i]))
		}
		bd := r.LayerBreakdown
		switch {
		case bd == nil:
			noData(b, ": the result has no layer_breakdown (attention, dispatch, expert compute and wait per layer; filled from traces or GET /v1/cluster when the server has them)")
		case bd.Validate() != nil:
			noData(b, ": "+esc(bd.Validate().Error()))
		default:
			if bd.Source != "" {
				fmt.Fprintf(b, `<p>Source: %s</p>`, esc(bd.Source))
			}
			if bd.StepMs > 0 {
				fmt.Fprintf(b, `<p>Layers %s ms + LM head %s ms + outside the micro-batches %s ms = %s ms; measured step: %s ms (%d micro-batch(es) per step; the critical one lasts %s ms). The first MoE layer's attention also holds the embedding and the dense layers before it; with ping-pong, attention includes waiting for the other micro-batch.</p>`,
					fmtNum(bd.LayersMs()), fmtNum(bd.TailMs), fmtNum(bd.OutsideMs), fmtNum(bd.LayersMs()+bd.TailMs+bd.OutsideMs),
					fmtNum(bd.StepMs), bd.MicroBatches, fmtNum(bd.MicroBatchMs))
			}
			b.WriteString(timelineSVG(fmt.Sprintf("plot-layers-%d", i), bd))
		}
	}
	b.WriteString(`<h2>Expert-load heatmap (layer × expert node)</h2>`)
	for i, r := range runs {
		if len(runs) > 1 {
			fmt.Fprintf(b, `<h3>%s</h3>`, esc(names[i]))
		}
		el := r.ExpertLoad
		switch {
		case el == nil:
			noData(b, ": the result has no expert_load (tokens per layer and expert node; from GET /v1/cluster when the server has it)")
		case el.Validate() != nil:
			noData(b, ": "+esc(el.Validate().Error()))
		default:
			b.WriteString(heatmapSVG(fmt.Sprintf("plot-expert-load-%d", i), el))
		}
	}
}

// WriteReport writes the self-contained HTML report of one run.
func WriteReport(w io.Writer, r *Result) error {
	var b strings.Builder
	title := fmt.Sprintf("expertmesh bench: %s, %s", r.ModelID, r.Date)
	writeHead(&b, title)
	fmt.Fprintf(&b, `<h1>%s</h1>`, esc(title))

	b.WriteString(`<h2>Run</h2><table>`)
	kv := func(k, v string) { fmt.Fprintf(&b, `<tr><td>%s</td><td>%s</td></tr>`, esc(k), esc(v)) }
	kv("server", r.BaseURL+r.Endpoint)
	kv("backend", r.Backend)
	kv("model", r.ModelID)
	kv("dataset", r.DatasetName)
	kv("requests", fmt.Sprint(r.NumPrompts))
	kv("request rate (req/s)", pyFloat(float64(r.RequestRate)))
	kv("burstiness", pyFloat(r.Burstiness))
	if r.MaxConcur != nil {
		kv("max concurrency", fmt.Sprint(*r.MaxConcur))
	} else {
		kv("max concurrency", "none")
	}
	if r.DurationLimit > 0 {
		kv("duration limit (s)", fmtNum(r.DurationLimit))
	}
	kv("ignore_eos", fmt.Sprint(r.IgnoreEOS))
	kv("warmup requests", fmt.Sprint(r.Warmup))
	b.WriteString(`</table>`)
	if len(r.CommandLine) > 0 {
		fmt.Fprintf(&b, `<p>Command line:</p><pre>%s</pre>`, esc(strings.Join(r.CommandLine, " ")))
	}

	b.WriteString(`<h2>Summary</h2><table>`)
	row := func(k string, v string) { fmt.Fprintf(&b, `<tr><td>%s</td><td>%s</td></tr>`, esc(k), v) }
	row("Successful requests", fmt.Sprint(r.Completed))
	row("Failed requests", fmt.Sprint(r.Failed))
	row("Benchmark duration (s)", fmtNum(r.Duration))
	row("Total input tokens", fmt.Sprint(r.TotalInput))
	if r.TotalCached > 0 {
		row("Total cached input tokens", fmt.Sprint(r.TotalCached))
	}
	row("Total generated tokens", fmt.Sprint(r.TotalOutput))
	row("Request throughput (req/s)", fmtNum(r.ReqTput))
	if r.ReqGoodput != nil {
		row("Request goodput (req/s)", fmtNum(*r.ReqGoodput))
	}
	row("Output token throughput (tok/s)", fmtNum(r.OutTput))
	row("Peak output token throughput (tok/s)", fmtNum(r.MaxOutPerS))
	row("Peak concurrent requests", fmt.Sprint(r.MaxConcReqs))
	row("Total token throughput (tok/s)", fmtNum(r.TotalTput))
	b.WriteString(`</table>`)
	statsTable(&b, r)

	b.WriteString(`<h2>Failed requests</h2>`)
	if len(r.ErrorsByKind) == 0 {
		b.WriteString(`<p>None.</p>`)
	} else {
		b.WriteString(`<table><tr><th>kind</th><th>requests</th><th>first message</th></tr>`)
		kinds := make([]string, 0, len(r.ErrorsByKind))
		for k := range r.ErrorsByKind {
			kinds = append(kinds, k)
		}
		sort.Strings(kinds)
		for _, k := range kinds {
			first := ""
			for i, ek := range r.ErrorKinds {
				if ek == k && i < len(r.Errors) {
					first = oneLine(r.Errors[i], 160)
					break
				}
			}
			fmt.Fprintf(&b, `<tr><td>%s</td><td>%d</td><td style="text-align:left">%s</td></tr>`, esc(k), r.ErrorsByKind[k], esc(first))
		}
		b.WriteString(`</table>`)
	}

	runs, names := []*Result{r}, []string{r.ModelID}
	latencySection(&b, runs, names)
	timeSection(&b, runs, names)
	clusterSections(&b, runs, names)

	b.WriteString(`<h2>Server</h2>`)
	if len(r.ServerModels) > 0 && string(r.ServerModels) != "null" {
		var pretty strings.Builder
		var v any
		if json.Unmarshal(r.ServerModels, &v) == nil {
			pb, _ := json.MarshalIndent(v, "", "  ")
			pretty.Write(pb)
		} else {
			pretty.Write(r.ServerModels)
		}
		fmt.Fprintf(&b, `<p>GET /v1/models answered:</p><pre>%s</pre>`, esc(pretty.String()))
	} else {
		noData(&b, ": GET /v1/models did not answer")
	}
	b.WriteString(pageScript)
	_, err := io.WriteString(w, b.String())
	return err
}

// statsTable is the metrics × statistics table.
func statsTable(b *strings.Builder, r *Result) {
	var cols []string
	cols = append(cols, "mean", "median", "std")
	for _, p := range r.MetricPercentiles {
		cols = append(cols, "p"+percentileWord(p))
	}
	b.WriteString(`<table><tr><th>metric (ms)</th>`)
	for _, c := range cols {
		fmt.Fprintf(b, `<th>%s</th>`, esc(c))
	}
	b.WriteString(`</tr>`)
	for _, m := range metricOrder {
		if _, ok := r.Stats["mean_"+m+"_ms"]; !ok {
			continue
		}
		fmt.Fprintf(b, `<tr><td>%s</td>`, esc(metricTitles[m][1]))
		for _, c := range cols {
			fmt.Fprintf(b, `<td>%s</td>`, fmtNum(r.Stats[c+"_"+m+"_ms"]))
		}
		b.WriteString(`</tr>`)
	}
	b.WriteString(`</table>`)
}
