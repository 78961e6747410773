package placement

import "github.com/expertmesh/expertmesh/model"

// ShapeOf is the placement view of a model config. Groups is 1 (and
// TopKGroup 0) unless routing is group-limited: only then does keeping a
// group on one node bound the nodes a token reaches.
func ShapeOf(c *model.Config) Shape {
	sh := Shape{Layers: c.NumHiddenLayers, Experts: c.NumExperts(), Groups: 1}
	if c.TopKMethod != model.TopKGreedy && c.Groups() > 1 {
		sh.Groups, sh.TopKGroup = c.Groups(), c.TopKGroups()
	}
	for l := range c.NumHiddenLayers {
		if c.IsMoELayer(l) {
			sh.MoELayers = append(sh.MoELayers, l)
		}
	}
	return sh
}
