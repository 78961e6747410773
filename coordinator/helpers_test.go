package coordinator

import "fmt"

// byID names nodes attn-0, attn-1, … for Start.
func byID(nodes []AttentionNode) map[string]AttentionNode {
	m := map[string]AttentionNode{}
	for i, n := range nodes {
		m[fmt.Sprintf("attn-%d", i)] = n
	}
	return m
}
