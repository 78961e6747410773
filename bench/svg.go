package bench

import (
	"fmt"
	"html"
	"math"
	"slices"
	"strconv"
	"strings"
)

// The report's plots are SVG written here, so the page needs nothing from
// the network. Each plot is an <svg class="plot"> whose frame and data are
// paths; the page's script checks them and marks the document rendered.

const (
	plotW, plotH                         = 640, 300
	marginL, marginR, marginT, marginB   = 64, 20, 30, 46
	innerW                               = plotW - marginL - marginR
	innerH                               = plotH - marginT - marginB
	maxCurvePoints                       = 1500
	colorA, colorB, colorGrid, colorText = "#1f77b4", "#ff7f0e", "#e3e3e3", "#333"
)

// seriesColors are the colours of overlaid series, in order.
var seriesColors = []string{colorA, colorB, "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"}

// num formats a coordinate compactly.
func num(v float64) string { return strconv.FormatFloat(v, 'f', 1, 64) }

// niceTicks covers [lo, hi] with about n ticks at 1, 2 or 5 times a power
// of ten.
func niceTicks(lo, hi float64, n int) (ticks []float64, tlo, thi float64) {
	if !(hi > lo) {
		hi = lo + 1
	}
	raw := (hi - lo) / float64(n)
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	step := mag * 10
	for _, m := range []float64{1, 2, 5, 10} {
		if raw <= m*mag {
			step = m * mag
			break
		}
	}
	tlo = math.Floor(lo/step) * step
	thi = math.Ceil(hi/step) * step
	for v := tlo; v <= thi+step/2; v += step {
		ticks = append(ticks, v)
	}
	return ticks, tlo, thi
}

func tickLabel(v float64) string {
	a := math.Abs(v)
	switch {
	case a == 0:
		return "0"
	case a >= 1e6 || a < 1e-3:
		return strconv.FormatFloat(v, 'g', 3, 64)
	case a >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
	return strconv.FormatFloat(v, 'g', 4, 64)
}

// curve is one line of a plot.
type curve struct {
	name   string
	xs, ys []float64
	step   bool // draw as a step function (CDFs, per-bucket series)
	points bool // draw the points alone, as small squares
}

// axes are a plot's scales.
type axes struct {
	x0, x1, y0, y1 float64
}

func (a axes) px(x float64) float64 { return marginL + (x-a.x0)/(a.x1-a.x0)*innerW }
func (a axes) py(y float64) float64 { return marginT + innerH - (y-a.y0)/(a.y1-a.y0)*innerH }

// svgOpen starts a plot's svg and writes its title.
func svgOpen(b *strings.Builder, id, title string, a axes) {
	fmt.Fprintf(b, `<svg class="plot" id="%s" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %d %d" width="%d" height="%d" role="img" aria-label="%s" data-x0="%g" data-x1="%g" data-ml="%d" data-iw="%d">`,
		html.EscapeString(id), plotW, plotH, plotW, plotH, html.EscapeString(title), a.x0, a.x1, marginL, innerW)
	fmt.Fprintf(b, `<text x="%d" y="18" font-size="14" font-weight="bold" fill="%s">%s</text>`, marginL, colorText, html.EscapeString(title))
}

// drawAxes writes grid lines, the frame (a path) and tick labels.
func drawAxes(b *strings.Builder, a axes, xt, yt []float64, xlabel, ylabel string) {
	var grid strings.Builder
	for _, v := range xt {
		fmt.Fprintf(&grid, "M%s %dV%d", num(a.px(v)), marginT, marginT+innerH)
	}
	for _, v := range yt {
		fmt.Fprintf(&grid, "M%d %sH%d", marginL, num(a.py(v)), marginL+innerW)
	}
	fmt.Fprintf(b, `<path class="grid" d="%s" stroke="%s" fill="none"/>`, grid.String(), colorGrid)
	fmt.Fprintf(b, `<path class="frame" d="M%d %dV%dH%d" stroke="%s" fill="none"/>`, marginL, marginT, marginT+innerH, marginL+innerW, colorText)
	for _, v := range xt {
		fmt.Fprintf(b, `<text x="%s" y="%d" font-size="11" text-anchor="middle" fill="%s">%s</text>`, num(a.px(v)), marginT+innerH+15, colorText, tickLabel(v))
	}
	for _, v := range yt {
		fmt.Fprintf(b, `<text x="%d" y="%s" font-size="11" text-anchor="end" fill="%s">%s</text>`, marginL-6, num(a.py(v)+4), colorText, tickLabel(v))
	}
	fmt.Fprintf(b, `<text x="%d" y="%d" font-size="12" text-anchor="middle" fill="%s">%s</text>`, marginL+innerW/2, plotH-8, colorText, html.EscapeString(xlabel))
	fmt.Fprintf(b, `<text transform="translate(14 %d) rotate(-90)" font-size="12" text-anchor="middle" fill="%s">%s</text>`, marginT+innerH/2, colorText, html.EscapeString(ylabel))
}

// legend writes the curves' names at the top right.
func legend(b *strings.Builder, names []string) {
	if len(names) < 2 {
		return
	}
	for i, n := range names {
		x := plotW - marginR - 150
		y := marginT + 14 + 16*i
		c := seriesColors[i%len(seriesColors)]
		fmt.Fprintf(b, `<path d="M%d %dH%d" stroke="%s" stroke-width="3"/><text x="%d" y="%d" font-size="12" fill="%s">%s</text>`,
			x, y-4, x+18, c, x+24, y, colorText, html.EscapeString(n))
	}
}

// linePlot draws curves on shared axes; y starts at 0, x at 0 or below.
func linePlot(id, title, xlabel, ylabel string, curves []curve, markers []marker) string {
	var xmin, xmax, ymax = math.Inf(1), math.Inf(-1), 0.0
	for _, c := range curves {
		for i := range c.xs {
			xmin, xmax = min(xmin, c.xs[i]), max(xmax, c.xs[i])
			ymax = max(ymax, c.ys[i])
		}
	}
	switch {
	case math.IsInf(xmin, 0):
		xmin, xmax = 0, 1
	case xmin > 0 && xmin < 0.3*xmax:
		// Start at 0 unless that would squeeze the data into a corner.
		xmin = 0
	}
	if ymax <= 0 {
		ymax = 1
	}
	xt, x0, x1 := niceTicks(xmin, xmax, 6)
	yt, y0, y1 := niceTicks(0, ymax, 5)
	a := axes{x0, x1, y0, y1}
	var b strings.Builder
	svgOpen(&b, id, title, a)
	drawAxes(&b, a, xt, yt, xlabel, ylabel)
	for i, m := range markers {
		x := a.px(m.x)
		fmt.Fprintf(&b, `<path class="marker" d="M%s %dV%d" stroke="#888" stroke-dasharray="4 3"/>`, num(x), marginT, marginT+innerH)
		// Labels near the right edge go to the left of their line.
		tx, anchor := x+3, "start"
		if x > marginL+innerW-80 {
			tx, anchor = x-3, "end"
		}
		fmt.Fprintf(&b, `<text x="%s" y="%d" font-size="10" text-anchor="%s" fill="#555">%s</text>`, num(tx), marginT+10+11*(i%3), anchor, html.EscapeString(m.label))
	}
	var names []string
	for i, c := range curves {
		names = append(names, c.name)
		if len(c.xs) == 0 {
			continue
		}
		var d strings.Builder
		if c.points {
			for j := range c.xs {
				fmt.Fprintf(&d, "M%s %sh6v6h-6z", num(a.px(c.xs[j])-3), num(a.py(c.ys[j])-3))
			}
			fmt.Fprintf(&b, `<path class="data" d="%s" fill="%s"><title>%s</title></path>`,
				d.String(), seriesColors[i%len(seriesColors)], html.EscapeString(c.name))
			continue
		}
		for j := range c.xs {
			x, y := a.px(c.xs[j]), a.py(c.ys[j])
			switch {
			case j == 0:
				fmt.Fprintf(&d, "M%s %s", num(x), num(y))
			case c.step:
				fmt.Fprintf(&d, "H%sV%s", num(x), num(y))
			default:
				fmt.Fprintf(&d, "L%s %s", num(x), num(y))
			}
		}
		fmt.Fprintf(&b, `<path class="data" d="%s" stroke="%s" stroke-width="2" fill="none"><title>%s</title></path>`,
			d.String(), seriesColors[i%len(seriesColors)], html.EscapeString(c.name))
	}
	legend(&b, names)
	fmt.Fprintf(&b, `<text class="readout" x="%d" y="%d" font-size="11" fill="#555"></text>`, plotW-marginR-150, marginT-8)
	b.WriteString(`</svg>`)
	return b.String()
}

// marker is a labelled vertical line.
type marker struct {
	x     float64
	label string
}

// cdfCurve is the empirical CDF of values (milliseconds), as a step curve
// of at most maxCurvePoints points.
func cdfCurve(name string, ms []float64) curve {
	s := slices.Clone(ms)
	slices.Sort(s)
	c := curve{name: name, step: true}
	n := len(s)
	if n == 0 {
		return c
	}
	c.xs, c.ys = append(c.xs, s[0]), append(c.ys, 0)
	stride := max(1, n/maxCurvePoints)
	for i := 0; i < n; i += stride {
		c.xs = append(c.xs, s[i])
		c.ys = append(c.ys, float64(i+1)/float64(n))
	}
	if c.xs[len(c.xs)-1] != s[n-1] || c.ys[len(c.ys)-1] != 1 {
		c.xs = append(c.xs, s[n-1])
		c.ys = append(c.ys, 1)
	}
	return c
}

// seriesCurve is a per-bucket series drawn as a step over each bucket's
// span.
func seriesCurve(name string, v []float64, bucket float64) curve {
	c := curve{name: name, step: true}
	for i, y := range v {
		if i == 0 {
			c.xs, c.ys = append(c.xs, 0), append(c.ys, y)
		} else {
			c.xs, c.ys = append(c.xs, float64(i)*bucket), append(c.ys, y)
		}
	}
	if len(v) > 0 {
		c.xs, c.ys = append(c.xs, float64(len(v))*bucket), append(c.ys, v[len(v)-1])
	}
	return c
}

// heatColor maps t in [0, 1] onto a white-to-dark-blue-to-red scale.
func heatColor(t float64) string {
	stops := [][3]float64{{247, 251, 255}, {107, 174, 214}, {8, 69, 148}, {165, 15, 21}}
	t = min(max(t, 0), 1) * float64(len(stops)-1)
	i := min(int(t), len(stops)-2)
	f := t - float64(i)
	var rgb [3]int
	for k := range rgb {
		rgb[k] = int(math.Round(stops[i][k] + (stops[i+1][k]-stops[i][k])*f))
	}
	return fmt.Sprintf("#%02x%02x%02x", rgb[0], rgb[1], rgb[2])
}

// heatmapSVG draws expert load: a row per layer, a column per node.
func heatmapSVG(id string, e *ExpertLoad) string {
	rows, cols := len(e.Layers), len(e.Nodes)
	const left, top, right = 70, 40, 90
	cellW := max(8, min(80, float64(600-left-right)/float64(cols)))
	cellH := max(4, min(28, 520/float64(rows)))
	w := left + right + int(math.Ceil(cellW*float64(cols)))
	h := top + 70 + int(math.Ceil(cellH*float64(rows)))
	hi := 0.0
	for _, row := range e.Tokens {
		for _, v := range row {
			hi = max(hi, v)
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="plot" id="%s" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %d %d" width="%d" height="%d" role="img" aria-label="expert load heatmap">`, id, w, h, w, h)
	fmt.Fprintf(&b, `<text x="%d" y="18" font-size="14" font-weight="bold" fill="%s">Tokens per (layer, expert node)</text>`, left, colorText)
	var frame strings.Builder
	for i := range rows {
		for j := range cols {
			v := e.Tokens[i][j]
			t := 0.0
			if hi > 0 {
				t = v / hi
			}
			x, y := float64(left)+cellW*float64(j), float64(top)+cellH*float64(i)
			fmt.Fprintf(&b, `<path class="cell" d="M%s %sh%sv%sh-%sz" fill="%s"><title>layer %d, %s: %s tokens</title></path>`,
				num(x), num(y), num(cellW), num(cellH), num(cellW), heatColor(t), e.Layers[i], html.EscapeString(e.Nodes[j]), tickLabel(v))
		}
	}
	fmt.Fprintf(&frame, "M%d %dh%sv%sh-%sz", left, top, num(cellW*float64(cols)), num(cellH*float64(rows)), num(cellW*float64(cols)))
	fmt.Fprintf(&b, `<path class="frame" d="%s" stroke="%s" fill="none"/>`, frame.String(), colorText)
	labelEvery := max(1, int(math.Ceil(12/cellH)))
	for i, l := range e.Layers {
		if i%labelEvery == 0 {
			fmt.Fprintf(&b, `<text x="%d" y="%s" font-size="10" text-anchor="end" fill="%s">layer %d</text>`, left-4, num(float64(top)+cellH*(float64(i)+0.5)+3), colorText, l)
		}
	}
	colEvery := max(1, int(math.Ceil(40/cellW)))
	gridBottom := float64(top) + cellH*float64(rows)
	for j, n := range e.Nodes {
		if j%colEvery == 0 {
			x := float64(left) + cellW*(float64(j)+0.5)
			fmt.Fprintf(&b, `<text transform="translate(%s %s) rotate(35)" font-size="10" fill="%s">%s</text>`, num(x), num(gridBottom+10), colorText, html.EscapeString(n))
		}
	}
	// The colour scale.
	sx := float64(left) + cellW*float64(cols) + 20
	for k := range 20 {
		fmt.Fprintf(&b, `<path d="M%s %sh14v%sh-14z" fill="%s"/>`, num(sx), num(float64(top)+float64(19-k)*8), num(8), heatColor(float64(k)/19))
	}
	fmt.Fprintf(&b, `<text x="%s" y="%d" font-size="10" fill="%s">%s</text>`, num(sx+18), top+8, colorText, tickLabel(hi))
	fmt.Fprintf(&b, `<text x="%s" y="%d" font-size="10" fill="%s">0</text>`, num(sx+18), top+160, colorText)
	b.WriteString(`</svg>`)
	return b.String()
}

// phaseColors are the colours of a layer's phases in the timeline.
var phaseColors = [4]string{"#4c78a8", "#f58518", "#54a24b", "#e45756"}
var phaseNames = [4]string{"attention", "dispatch (wire)", "expert compute", "slowest-node wait"}

// timelineSVG draws one step: a row per layer, each layer's phases laid
// end to end after the previous layer's.
func timelineSVG(id string, bd *Breakdown) string {
	rows := len(bd.Layers)
	total := bd.TailMs + bd.OutsideMs
	for _, l := range bd.Layers {
		total += l.Total()
	}
	extra := []struct {
		label, title string
		v            float64
	}{{"LM head", "final norm and LM head", bd.TailMs}, {"sampling etc.", "outside the micro-batches: admission, sampling, bookkeeping", bd.OutsideMs}}
	for _, e := range extra {
		if e.v > 0 {
			rows++
		}
	}
	if total <= 0 {
		total = 1
	}
	xt, x0, x1 := niceTicks(0, total, 6)
	rowH := max(4, min(22, 480/float64(rows)))
	top := marginT + 24
	h := top + int(math.Ceil(rowH*float64(rows))) + marginB
	a := axes{x0: x0, x1: x1}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="plot" id="%s" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %d %d" width="%d" height="%d" role="img" aria-label="per-layer timeline" data-x0="%g" data-x1="%g" data-ml="%d" data-iw="%d">`,
		id, plotW, h, plotW, h, x0, x1, marginL, innerW)
	fmt.Fprintf(&b, `<text x="%d" y="18" font-size="14" font-weight="bold" fill="%s">One step, layer by layer (ms)</text>`, marginL, colorText)
	for k, n := range phaseNames {
		x := marginL + 140*k
		fmt.Fprintf(&b, `<path d="M%d %dh12v10h-12z" fill="%s"/><text x="%d" y="%d" font-size="11" fill="%s">%s</text>`, x, marginT+2, phaseColors[k], x+16, marginT+11, colorText, n)
	}
	bottom := float64(top) + rowH*float64(rows)
	var grid strings.Builder
	for _, v := range xt {
		fmt.Fprintf(&grid, "M%s %dV%s", num(a.px(v)), top, num(bottom))
	}
	fmt.Fprintf(&b, `<path class="grid" d="%s" stroke="%s" fill="none"/>`, grid.String(), colorGrid)
	t := 0.0
	labelEvery := max(1, int(math.Ceil(12/rowH)))
	for i, l := range bd.Layers {
		y := float64(top) + rowH*float64(i)
		if i%labelEvery == 0 {
			fmt.Fprintf(&b, `<text x="%d" y="%s" font-size="10" text-anchor="end" fill="%s">layer %d</text>`, marginL-4, num(y+rowH/2+3), colorText, l.Layer)
		}
		for k, v := range []float64{l.AttentionMs, l.DispatchWireMs, l.ExpertComputeMs, l.SlowestWaitMs} {
			if v > 0 {
				x, w := a.px(t), a.px(t+v)-a.px(t)
				fmt.Fprintf(&b, `<path class="seg" d="M%s %sh%sv%sh-%sz" fill="%s"><title>layer %d %s: %s ms</title></path>`,
					num(x), num(y+1), num(max(w, 0.5)), num(max(rowH-2, 1)), num(max(w, 0.5)), phaseColors[k], l.Layer, phaseNames[k], tickLabel(v))
			}
			t += v
		}
	}
	// After the last layer, on the attention node: the LM head, then the
	// step's work outside its micro-batches.
	i := len(bd.Layers)
	for _, e := range extra {
		if e.v <= 0 {
			continue
		}
		y := float64(top) + rowH*float64(i)
		fmt.Fprintf(&b, `<text x="%d" y="%s" font-size="10" text-anchor="end" fill="%s">%s</text>`, marginL-4, num(y+rowH/2+3), colorText, e.label)
		x, w := a.px(t), a.px(t+e.v)-a.px(t)
		fmt.Fprintf(&b, `<path class="seg" d="M%s %sh%sv%sh-%sz" fill="%s"><title>%s: %s ms</title></path>`,
			num(x), num(y+1), num(max(w, 0.5)), num(max(rowH-2, 1)), num(max(w, 0.5)), phaseColors[0], e.title, tickLabel(e.v))
		t += e.v
		i++
	}
	fmt.Fprintf(&b, `<path class="frame" d="M%d %dV%sH%d" stroke="%s" fill="none"/>`, marginL, top, num(bottom), marginL+innerW, colorText)
	for _, v := range xt {
		fmt.Fprintf(&b, `<text x="%s" y="%s" font-size="11" text-anchor="middle" fill="%s">%s</text>`, num(a.px(v)), num(bottom+15), colorText, tickLabel(v))
	}
	fmt.Fprintf(&b, `<text x="%d" y="%s" font-size="12" text-anchor="middle" fill="%s">time into the step (ms)</text>`, marginL+innerW/2, num(bottom+34), colorText)
	fmt.Fprintf(&b, `<text class="readout" x="%d" y="%d" font-size="11" fill="#555"></text>`, plotW-marginR-150, marginT-8)
	b.WriteString(`</svg>`)
	return b.String()
}
