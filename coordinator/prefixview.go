package coordinator

import (
	"container/list"

	"github.com/expertmesh/expertmesh/model"
)

// prefixView is the scheduler's guess at one attention node's prefix
// cache: the keys (model.ChainKey) of the full blocks this coordinator's
// sequences have committed there, most recently used first, at most as
// many as the node has blocks. The node may have evicted some since (or
// hold others, of older coordinators); the guess only sizes prompt
// chunks: a chunk whose head the view expects cached is sent longer than
// the step budget, which is charged for the rest only. A wrong guess
// costs a longer step, never a wrong answer.
type prefixView struct {
	max   int
	order *list.List // of model.BlockKey, front: most recent
	index map[model.BlockKey]*list.Element
}

func newPrefixView(blocks int) *prefixView {
	return &prefixView{max: max(blocks, 1), order: list.New(), index: map[model.BlockKey]*list.Element{}}
}

// add records (or refreshes) a block the node holds.
func (v *prefixView) add(k model.BlockKey) {
	if e, ok := v.index[k]; ok {
		v.order.MoveToFront(e)
		return
	}
	v.index[k] = v.order.PushFront(k)
	if v.order.Len() > v.max {
		old := v.order.Back()
		v.order.Remove(old)
		delete(v.index, old.Value.(model.BlockKey))
	}
}

func (v *prefixView) has(k model.BlockKey) bool {
	_, ok := v.index[k]
	return ok
}

// keyAt is the chained key of q's block i (block size bs) of its prompt
// and generated tokens, which must be known that far. Keys are computed
// once and kept (for one block size).
func (q *sequence) keyAt(i, bs int) model.BlockKey {
	if q.keysBS != bs {
		q.keys, q.keysBS = q.keys[:0], bs
	}
	for len(q.keys) <= i {
		j := len(q.keys)
		toks := make([]int32, bs)
		for t := range bs {
			toks[t] = int32(q.tokenAt(j*bs + t))
		}
		var prev *model.BlockKey
		if j > 0 {
			prev = &q.keys[j-1]
		}
		q.keys = append(q.keys, model.ChainKey(prev, toks))
	}
	return q.keys[i]
}

// predictCached says how many of the next tokens of q's prefill (at most
// limit, whole blocks from a block boundary) node n is expected to take
// from its cache.
func (n *nodeState) predictCached(q *sequence, limit int) int {
	bs := n.blockSize
	if n.view == nil || q.echoLogprobs || q.sent%bs != 0 {
		return 0
	}
	cached := 0
	for i := q.sent / bs; cached+bs <= limit && n.view.has(q.keyAt(i, bs)); i++ {
		cached += bs
	}
	return cached
}

// committed records in n's view the full blocks q holds there now that
// positions up to q.sent are applied (from start).
func (n *nodeState) committed(q *sequence, start int) {
	if n.view == nil {
		return
	}
	bs := n.blockSize
	for i := start / bs; (i+1)*bs <= q.sent; i++ {
		n.view.add(q.keyAt(i, bs))
	}
}
