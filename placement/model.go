package placement

import "github.com/expertmesh/expertmesh/model"

// ShapeOf is the placement view of a model config.
func ShapeOf(c *model.Config) Shape {
	sh := Shape{Layers: c.NumHiddenLayers, Experts: c.NumExperts(), Groups: c.Groups()}
	for l := range c.NumHiddenLayers {
		if c.IsMoELayer(l) {
			sh.MoELayers = append(sh.MoELayers, l)
		}
	}
	return sh
}
