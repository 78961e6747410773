package bench

import (
	"fmt"
	"strings"
)

// Series is one named curve of PlotSVG: a line through its points, or
// the points alone.
type Series struct {
	Name   string
	X, Y   []float64
	Points bool
}

// PlotSVG draws series on shared axes (y from 0) as an inline SVG in the
// reports' style, for pages built elsewhere (sweeps).
func PlotSVG(id, title, xlabel, ylabel string, series []Series) string {
	var curves []curve
	for _, s := range series {
		curves = append(curves, curve{name: s.Name, xs: s.X, ys: s.Y, points: s.Points})
	}
	return linePlot(id, title, xlabel, ylabel, curves, nil)
}

// Page wraps body (HTML) in the reports' page: styles, and the script
// that checks every plot drew and marks the page rendered.
func Page(title, body string) string {
	var b strings.Builder
	writeHead(&b, title)
	fmt.Fprintf(&b, "<h1>%s</h1>\n", esc(title))
	b.WriteString(body)
	b.WriteString(pageScript)
	return b.String()
}
