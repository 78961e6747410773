package model

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/expertmesh/expertmesh/internal/hugemem"
	"github.com/expertmesh/expertmesh/kernels"
	"github.com/expertmesh/expertmesh/model/safetensors"
)

// ErrWeights marks a checkpoint whose tensors do not fit the config:
// missing, wrong dtype, wrong shape, or a quantised weight without scales.
var ErrWeights = errors.New("model weights")

// MLP is a SwiGLU feed-forward: down(silu(gate(x)) * up(x)).
type MLP struct {
	Gate, Up, Down *kernels.Matrix
}

// Attention holds one layer's MLA weights plus the per-head views the
// absorbed decode needs.
type Attention struct {
	QProj   *kernels.Matrix // q_lora_rank == null
	QA, QB  *kernels.Matrix // q_lora_rank set
	QANorm  []float32
	KVA     *kernels.Matrix // [R+rope, hidden]
	KVANorm []float32
	KVB     *kernels.Matrix // [heads*(nope+v), R]
	O       *kernels.Matrix // [hidden, heads*v]

	// UKT[h] is head h's W_UK transposed ([R, nope]): q_nope·W_UK becomes
	// a matrix-vector product streaming rows. UV[h] is head h's W_UV
	// ([v, R]), a row range of KVB.
	UKT []*kernels.Matrix
	UV  []*kernels.Matrix
}

// MoE holds one MoE layer's gate, shared experts and whichever routed
// experts this process loaded (nil entries are hosted elsewhere).
type MoE struct {
	Gate    *kernels.Matrix // [experts, hidden]
	Bias    []float32       // e_score_correction_bias, noaux_tc only
	Shared  *MLP            // nil when n_shared_experts == 0
	Experts []*MLP
}

// Layer is one decoder layer. Exactly one of Dense and MoE is set.
type Layer struct {
	InputNorm, PostNorm []float32
	Attn                Attention
	Dense               *MLP
	MoE                 *MoE
}

// Weights is a loaded checkpoint bound to its config. Matrices view the
// mmapped files, so Close only after every user is done.
type Weights struct {
	Config *Config
	Embed  *kernels.Matrix
	Layers []Layer
	Norm   []float32
	LMHead *kernels.Matrix

	ckpt    *safetensors.Checkpoint
	release []func() error // resident copies to free on Close
	// mapped records where the checkpoint's tensors are mapped (nil for
	// weights not bound from a checkpoint); arena holds what was
	// converted at load (already resident, never copied again).
	mapped  *mappedRanges
	arena   *arena
	inArena map[*kernels.Matrix]bool
}

// LoadOptions selects what a process loads. The zero value loads
// everything (single-process engine).
type LoadOptions struct {
	// Expert reports whether routed expert e of layer l is hosted here;
	// nil means all of them.
	Expert func(layer, expert int) bool
	// ExpertsOnly skips embeddings, attention, dense layers, gates, shared
	// experts and lm_head (an expert node).
	ExpertsOnly bool
	// Quantize, if set, converts every linear weight except the router gate
	// and kv_b_proj to this format at load (kernels.Q8_0 or kernels.Q4_0).
	Quantize *kernels.DType
	// ExpertQuantize, if set, converts the routed experts to this format
	// instead (see ParseQuantize).
	ExpertQuantize *kernels.DType
	// Threads bounds the goroutines that quantise at load (0: all cores).
	Threads int
}

// Load opens dir's config and checkpoint and binds every tensor the options
// ask for, validating name, dtype and shape against the config.
func Load(dir string, opts LoadOptions) (*Weights, error) {
	return LoadContext(context.Background(), dir, opts)
}

// LoadContext is Load that stops when ctx is done: the conversions at load
// (quantisation) run piece by piece and a cancelled load releases what it
// took and returns ctx's error, so a process told to stop while it reads a
// large checkpoint does not first finish converting it.
func LoadContext(ctx context.Context, dir string, opts LoadOptions) (*Weights, error) {
	cfg, err := LoadConfig(dir)
	if err != nil {
		return nil, err
	}
	ck, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		return nil, err
	}
	w, err := BindContext(ctx, cfg, ck, opts)
	if err != nil {
		ck.Close()
		return nil, err
	}
	return w, nil
}

// Close unmaps the checkpoint.
func (w *Weights) Close() error {
	var errs []error
	for _, r := range w.release {
		errs = append(errs, r())
	}
	w.release = nil
	if w.arena != nil {
		for _, r := range w.arena.release {
			errs = append(errs, r())
		}
		w.arena = nil
	}
	if w.ckpt != nil {
		errs = append(errs, w.ckpt.Close())
		w.ckpt = nil
	}
	return errors.Join(errs...)
}

// Bind binds the checkpoint's tensors to c.
func Bind(c *Config, ck *safetensors.Checkpoint, opts LoadOptions) (*Weights, error) {
	return BindContext(context.Background(), c, ck, opts)
}

// BindContext is Bind that stops converting when ctx is done (see
// LoadContext).
func BindContext(ctx context.Context, c *Config, ck *safetensors.Checkpoint, opts LoadOptions) (*Weights, error) {
	w := &Weights{Config: c, ckpt: ck, Layers: make([]Layer, c.NumHiddenLayers),
		mapped: &mappedRanges{}, arena: &arena{}, inArena: map[*kernels.Matrix]bool{}}
	b := binder{c: c, ck: ck, quant: opts.Quantize, expertQuant: opts.ExpertQuantize, w: w}
	if b.expertQuant == nil {
		b.expertQuant = b.quant
	}
	h := c.HiddenSize
	if !opts.ExpertsOnly {
		w.Embed = b.matrix("model.embed_tokens.weight", c.VocabSize, h, false)
		w.Norm = b.vector("model.norm.weight", h)
		if c.TieWordEmbeddings {
			w.LMHead = w.Embed
		} else {
			w.LMHead = b.matrix("lm_head.weight", c.VocabSize, h, true)
		}
	}
	for i := range w.Layers {
		p := fmt.Sprintf("model.layers.%d.", i)
		l := &w.Layers[i]
		if !opts.ExpertsOnly {
			l.InputNorm = b.vector(p+"input_layernorm.weight", h)
			l.PostNorm = b.vector(p+"post_attention_layernorm.weight", h)
			b.attention(&l.Attn, p+"self_attn.")
		}
		if !c.IsMoELayer(i) {
			if !opts.ExpertsOnly {
				l.Dense = b.mlp(p+"mlp.", c.IntermediateSize)
			}
			continue
		}
		l.MoE = &MoE{Experts: make([]*MLP, c.NumExperts())}
		if !opts.ExpertsOnly {
			// The router stays in its stored precision: it decides routing.
			l.MoE.Gate = b.matrix(p+"mlp.gate.weight", c.NumExperts(), h, false)
			if c.TopKMethod == TopKNoAuxTC {
				l.MoE.Bias = b.vector(p+"mlp.gate.e_score_correction_bias", c.NumExperts())
			}
			if n := c.SharedExperts(); n > 0 {
				l.MoE.Shared = b.mlp(p+"mlp.shared_experts.", n*c.MoEIntermediateSize)
			}
		}
		if ck.Has(p + "mlp.experts.gate_up_proj") {
			// transformers v5 stores a layer's experts fused:
			// gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I].
			b.fusedExperts(l.MoE, p+"mlp.experts.", i, opts.Expert)
			continue
		}
		for e := range l.MoE.Experts {
			if opts.Expert == nil || opts.Expert(i, e) {
				l.MoE.Experts[e] = b.mlpAs(fmt.Sprintf("%smlp.experts.%d.", p, e), c.MoEIntermediateSize, b.expertQuant)
			}
		}
	}
	if b.err == nil {
		b.err = b.runQuant(ctx, opts.Threads)
	}
	if b.err != nil {
		w.ckpt = nil // the caller closes the checkpoint
		w.Close()
		return nil, b.err
	}
	return w, nil
}

// binder accumulates the first error so binding reads as a flat list.
type binder struct {
	c           *Config
	ck          *safetensors.Checkpoint
	quant       *kernels.DType
	expertQuant *kernels.DType
	w           *Weights
	err         error
	// pending conversions, run in parallel once everything is bound.
	jobs []quantJob
}

// quantJob converts src into dst (whose buffers are already placed).
type quantJob struct {
	name     string
	src, dst *kernels.Matrix
}

func (b *binder) fail(format string, args ...any) {
	if b.err == nil {
		b.err = fmt.Errorf("%w: %s", ErrWeights, fmt.Sprintf(format, args...))
	}
}

func (b *binder) tensor(name string) *safetensors.Tensor {
	if b.err != nil {
		return nil
	}
	t, err := b.ck.Tensor(name)
	if err != nil {
		if b.err == nil {
			b.err = fmt.Errorf("%w: tensor %s: %w", ErrWeights, name, err)
		}
		return nil
	}
	b.w.mapped.add(t.Data)
	return t
}

func shapeIs(t *safetensors.Tensor, dims ...int) bool {
	if len(t.Shape) != len(dims) {
		return false
	}
	for i, d := range dims {
		if t.Shape[i] != d {
			return false
		}
	}
	return true
}

// vector reads a 1-D norm weight or bias into float32.
func (b *binder) vector(name string, n int) []float32 {
	t := b.tensor(name)
	if t == nil {
		return nil
	}
	if !shapeIs(t, n) {
		b.fail("tensor %s: shape %v, want [%d]", name, t.Shape, n)
		return nil
	}
	m, ok := b.asMatrix(name, t, 1, n)
	if !ok {
		return nil
	}
	out := make([]float32, n)
	m.RowF32(out, 0)
	return out
}

// matrix binds a [rows, cols] linear weight; quantizable weights are
// converted when LoadOptions.Quantize asks for it.
func (b *binder) matrix(name string, rows, cols int, quantizable bool) *kernels.Matrix {
	t := b.tensor(name)
	if t == nil {
		return nil
	}
	if !shapeIs(t, rows, cols) {
		b.fail("tensor %s: shape %v, want [%d %d]", name, t.Shape, rows, cols)
		return nil
	}
	m, ok := b.asMatrix(name, t, rows, cols)
	if !ok {
		return nil
	}
	if quantizable {
		return b.quantize(name, m, b.quant)
	}
	return m
}

// quantize returns m converted to dt (nil: m itself): a matrix whose
// buffers are placed in the arena now and filled by runQuant.
func (b *binder) quantize(name string, m *kernels.Matrix, dt *kernels.DType) *kernels.Matrix {
	if dt == nil || m.DType == *dt {
		return m
	}
	if *dt != kernels.Q8_0 && *dt != kernels.Q4_0 {
		b.fail("tensor %s: cannot quantize to %s (Q8_0 or Q4_0)", name, *dt)
		return nil
	}
	if m.Cols%kernels.Q8Block != 0 {
		return m // rows that are not whole blocks stay as stored
	}
	n := m.Rows * m.Cols
	if *dt == kernels.Q4_0 {
		n /= 2
	}
	data, err := b.w.arena.bytes(n)
	if err != nil {
		b.fail("tensor %s: quantize: %v", name, err)
		return nil
	}
	scales, err := b.w.arena.floats(m.Rows * m.Cols / kernels.Q8Block)
	if err != nil {
		b.fail("tensor %s: quantize: %v", name, err)
		return nil
	}
	q := &kernels.Matrix{DType: *dt, Rows: m.Rows, Cols: m.Cols, Data: data, Scales: scales}
	b.w.inArena[q] = true
	b.jobs = append(b.jobs, quantJob{name: name, src: m, dst: q})
	return q
}

// runQuant fills every converted matrix, in parallel, dropping each
// source's mapped pages once it is read.
//
// Jobs are cut into row ranges of about residentPiece source bytes, so
// that the threads share large matrices and little of any source is
// mapped at once.
func (b *binder) runQuant(ctx context.Context, threads int) error {
	var pieces []quantJob
	for _, j := range b.jobs {
		src, dst := j.src, j.dst
		step := src.Rows
		if src.DType != kernels.F8E4M3 { // FP8's scales cover 128-row blocks: kept whole
			step = max(1, residentPiece/max(1, len(src.Data)/src.Rows))
		}
		sb, db, nb := len(src.Data)/src.Rows, len(dst.Data)/dst.Rows, dst.Cols/kernels.Q8Block
		for r0 := 0; r0 < src.Rows; r0 += step {
			r1 := min(src.Rows, r0+step)
			if r0 == 0 && r1 == src.Rows {
				pieces = append(pieces, j)
				continue
			}
			s := *src
			s.Rows, s.Data = r1-r0, src.Data[r0*sb:r1*sb]
			d := *dst
			d.Rows, d.Data, d.Scales = r1-r0, dst.Data[r0*db:r1*db], dst.Scales[r0*nb:r1*nb]
			pieces = append(pieces, quantJob{name: j.name, src: &s, dst: &d})
		}
	}
	err := parallel(ctx, threads, pieces, func(j quantJob) {
		if j.dst.DType == kernels.Q4_0 {
			kernels.QuantizeQ4Into(j.dst.Data, j.dst.Scales, j.src)
		} else {
			kernels.QuantizeQ8Into(j.dst.Data, j.dst.Scales, j.src)
		}
		b.w.dropMapped(j.src.Data)
	})
	b.jobs = nil
	if err != nil {
		return fmt.Errorf("converting weights: %w", err)
	}
	return nil
}

// residentPiece is the unit of the copies and conversions that leave the
// mapping: at most a few pieces per thread are mapped and resident beside
// their copies at any time (16 MiB: a fraction of a percent of a model).
const residentPiece = 16 << 20

// denseDType maps the unscaled safetensors dtypes the kernels read as is.
func denseDType(d safetensors.DType) (kernels.DType, bool) {
	switch d {
	case safetensors.F32:
		return kernels.F32, true
	case safetensors.BF16:
		return kernels.BF16, true
	case safetensors.F16:
		return kernels.F16, true
	}
	return 0, false
}

func (b *binder) asMatrix(name string, t *safetensors.Tensor, rows, cols int) (*kernels.Matrix, bool) {
	m := &kernels.Matrix{Rows: rows, Cols: cols, Data: t.Data}
	dt, dense := denseDType(t.DType)
	switch {
	case dense:
		m.DType = dt
	case t.DType == safetensors.F8E4M3:
		m.DType = kernels.F8E4M3
		sname := name + "_scale_inv"
		st := b.tensor(sname)
		if st == nil {
			return nil, false
		}
		br, bc := ceilDiv(rows, 128), ceilDiv(cols, 128)
		if st.DType != safetensors.F32 || !shapeIs(st, br, bc) {
			b.fail("tensor %s: %s %v, want F32 [%d %d]", sname, st.DType, st.Shape, br, bc)
			return nil, false
		}
		m.Scales = make([]float32, br*bc)
		for i := range m.Scales {
			m.Scales[i] = math.Float32frombits(binary.LittleEndian.Uint32(st.Data[4*i:]))
		}
	default:
		b.fail("tensor %s: dtype %s not supported (want BF16, F16, F32 or F8_E4M3)", name, t.DType)
		return nil, false
	}
	if err := m.Validate(); err != nil {
		b.fail("tensor %s: %v", name, err)
		return nil, false
	}
	return m, true
}

func (b *binder) mlp(prefix string, inter int) *MLP {
	return b.mlpAs(prefix, inter, b.quant)
}

// mlpAs binds an MLP converting its weights to dt (nil: as stored).
func (b *binder) mlpAs(prefix string, inter int, dt *kernels.DType) *MLP {
	h := b.c.HiddenSize
	mat := func(name string, rows, cols int) *kernels.Matrix {
		m := b.matrix(name, rows, cols, false)
		if m == nil {
			return nil
		}
		return b.quantize(name, m, dt)
	}
	return &MLP{
		Gate: mat(prefix+"gate_proj.weight", inter, h),
		Up:   mat(prefix+"up_proj.weight", inter, h),
		Down: mat(prefix+"down_proj.weight", h, inter),
	}
}

// fusedExperts binds per-expert views into fused 3-D expert tensors.
func (b *binder) fusedExperts(m *MoE, p string, layer int, want func(layer, expert int) bool) {
	c := b.c
	E, I, H := c.NumExperts(), c.MoEIntermediateSize, c.HiddenSize
	gu, down := b.tensor(p+"gate_up_proj"), b.tensor(p+"down_proj")
	if gu == nil || down == nil {
		if b.err == nil {
			b.fail("tensor %sdown_proj: missing beside gate_up_proj", p)
		}
		return
	}
	if !shapeIs(gu, E, 2*I, H) || !shapeIs(down, E, H, I) {
		b.fail("fused experts %s: shapes %v and %v, want [%d %d %d] and [%d %d %d]", p, gu.Shape, down.Shape, E, 2*I, H, E, H, I)
		return
	}
	view := func(t *safetensors.Tensor, name string, first, rows, cols int) *kernels.Matrix {
		dt, ok := denseDType(t.DType)
		if !ok {
			b.fail("tensor %s: dtype %s not supported for fused experts", name, t.DType)
			return nil
		}
		es := t.DType.Size()
		return b.quantize(name, &kernels.Matrix{DType: dt, Rows: rows, Cols: cols, Data: t.Data[first*cols*es : (first+rows)*cols*es]}, b.expertQuant)
	}
	for e := range m.Experts {
		if want != nil && !want(layer, e) {
			continue
		}
		m.Experts[e] = &MLP{
			Gate: view(gu, p+"gate_up_proj", e*2*I, I, H),
			Up:   view(gu, p+"gate_up_proj", e*2*I+I, I, H),
			Down: view(down, p+"down_proj", e*H, H, I),
		}
	}
}

func (b *binder) attention(a *Attention, p string) {
	c := b.c
	h, heads := c.HiddenSize, c.NumAttentionHeads
	if c.QLoraRank == nil {
		a.QProj = b.matrix(p+"q_proj.weight", heads*c.QHeadDim(), h, true)
	} else {
		a.QA = b.matrix(p+"q_a_proj.weight", *c.QLoraRank, h, true)
		a.QANorm = b.vector(p+"q_a_layernorm.weight", *c.QLoraRank)
		a.QB = b.matrix(p+"q_b_proj.weight", heads*c.QHeadDim(), *c.QLoraRank, true)
	}
	a.KVA = b.matrix(p+"kv_a_proj_with_mqa.weight", c.LatentDim(), h, true)
	a.KVANorm = b.vector(p+"kv_a_layernorm.weight", c.KVLoraRank)
	a.KVB = b.matrix(p+"kv_b_proj.weight", heads*(c.QKNopeHeadDim+c.VHeadDim), c.KVLoraRank, false)
	a.O = b.matrix(p+"o_proj.weight", h, heads*c.VHeadDim, true)
	if b.err == nil {
		a.UKT, a.UV = absorbViews(c, a.KVB)
	}
}

// absorbViews splits kv_b_proj per head into W_UK^T (a transposed copy,
// [R, nope]) and W_UV (a [v, R] view). BF16 and F32 keep their bits
// exactly; other formats are widened to F32 because their block scales do
// not survive the transpose.
func absorbViews(c *Config, kvb *kernels.Matrix) (ukt, uv []*kernels.Matrix) {
	heads, dn, dv, r := c.NumAttentionHeads, c.QKNopeHeadDim, c.VHeadDim, c.KVLoraRank
	src := kvb
	if kvb.DType != kernels.BF16 && kvb.DType != kernels.F32 {
		src = widenF32(kvb)
	}
	esz := 2
	if src.DType == kernels.F32 {
		esz = 4
	}
	for h := range heads {
		base := h * (dn + dv)
		t := &kernels.Matrix{DType: src.DType, Rows: r, Cols: dn, Data: make([]byte, r*dn*esz)}
		for i := range dn {
			// Copy the element bits: no rounding, so absorbed == expanded
			// up to summation order.
			for col := range r {
				off := ((base+i)*r + col) * esz
				copy(t.Data[(col*dn+i)*esz:], src.Data[off:off+esz])
			}
		}
		ukt = append(ukt, t)
		uv = append(uv, &kernels.Matrix{DType: src.DType, Rows: dv, Cols: r,
			Data: src.Data[(base+dn)*r*esz : (base+dn+dv)*r*esz]})
	}
	return ukt, uv
}

// widenF32 converts any matrix to an F32 copy.
func widenF32(m *kernels.Matrix) *kernels.Matrix {
	out := &kernels.Matrix{DType: kernels.F32, Rows: m.Rows, Cols: m.Cols, Data: make([]byte, 4*m.Rows*m.Cols)}
	row := make([]float32, m.Cols)
	for r := range m.Rows {
		m.RowF32(row, r)
		for i, v := range row {
			binary.LittleEndian.PutUint32(out.Data[4*(r*m.Cols+i):], math.Float32bits(v))
		}
	}
	return out
}

func ceilDiv(a, b int) int { return (a + b - 1) / b }

// matrices lists every bound matrix once (a tied lm_head is the
// embedding), including each head's absorbed views.
func (w *Weights) matrices() []*kernels.Matrix {
	var mats []*kernels.Matrix
	seen := map[*kernels.Matrix]bool{}
	add := func(ms ...*kernels.Matrix) {
		for _, m := range ms {
			if m != nil && !seen[m] {
				seen[m] = true
				mats = append(mats, m)
			}
		}
	}
	addMLP := func(m *MLP) {
		if m != nil {
			add(m.Gate, m.Up, m.Down)
		}
	}
	add(w.Embed, w.LMHead)
	for i := range w.Layers {
		L := &w.Layers[i]
		a := &L.Attn
		add(a.QProj, a.QA, a.QB, a.KVA, a.KVB, a.O)
		addMLP(L.Dense)
		if L.MoE != nil {
			add(L.MoE.Gate)
			addMLP(L.MoE.Shared)
			for _, e := range L.MoE.Experts {
				addMLP(e)
			}
		}
	}
	return mats
}

// parallel runs fn over items on threads goroutines. Once ctx is done no
// further item starts; it waits for those running and returns ctx's
// error (nil when every item ran).
func parallel[T any](ctx context.Context, threads int, items []T, fn func(T)) error {
	if threads <= 0 {
		threads = runtime.GOMAXPROCS(0)
	}
	work := make(chan T, len(items))
	for _, it := range items {
		work <- it
	}
	close(work)
	var wg sync.WaitGroup
	for range threads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for it := range work {
				if ctx.Err() != nil {
					return
				}
				fn(it)
			}
		}()
	}
	wg.Wait()
	if len(work) > 0 {
		return ctx.Err()
	}
	return nil
}

// Warm touches every page of every bound matrix once, in parallel, so the
// first tokens do not pay the page faults of a freshly mapped checkpoint
// (faults serialise on the address-space lock and would hide the kernels'
// bandwidth for the first pass over the weights). Only bound tensors are
// read: an expert node warms just its experts.
func (w *Weights) Warm(threads int) { _ = w.warm(context.Background(), threads) }

func (w *Weights) warm(ctx context.Context, threads int) error {
	var sink atomic.Uint32
	return parallel(ctx, threads, w.matrices(), func(m *kernels.Matrix) {
		var acc byte
		for i := 0; i < len(m.Data); i += 4096 {
			acc += m.Data[i]
		}
		sink.Add(uint32(acc)) // keep the reads
	})
}

// MakeResident copies every bound matrix out of the mapped checkpoint
// into anonymous memory backed by transparent huge pages where the OS
// offers them. Decode streams every weight once per token; with 2 MiB
// pages it takes far fewer TLB misses than through the page cache's 4 KiB
// pages. It costs the weights' size in resident memory (see Place).
// Matrices already converted at load (quantised, absorbed) move too.
func (w *Weights) MakeResident(threads int) error {
	return w.makeResident(context.Background(), threads)
}

// makeResident is MakeResident that stops copying when ctx is done: the
// weights then stay where they were (pieces already copied are read
// through the mapping again) and the copy is released.
func (w *Weights) makeResident(ctx context.Context, threads int) error {
	var mats []*kernels.Matrix
	for _, m := range w.matrices() {
		if !w.inArena[m] { // converted at load: resident already
			mats = append(mats, m)
		}
	}
	var total int
	offs := make([]int, len(mats))
	for i, m := range mats {
		offs[i] = total
		total += (len(m.Data) + 63) &^ 63
	}
	if total == 0 {
		return nil
	}
	buf, release, err := hugemem.Alloc(total)
	if err != nil {
		return fmt.Errorf("resident weights: %w", err)
	}
	// Copy in pieces across the threads. The mapped pages of a piece are
	// not read again: they are dropped as soon as it is copied, so the
	// copy and the mapping are never both resident (peak RSS stays near
	// the weights' size).
	type piece struct{ i, lo, hi int }
	var pieces []piece
	for i, m := range mats {
		for lo := 0; lo < len(m.Data); lo += residentPiece {
			pieces = append(pieces, piece{i, lo, min(len(m.Data), lo+residentPiece)})
		}
	}
	if err := parallel(ctx, threads, pieces, func(p piece) {
		src := mats[p.i].Data[p.lo:p.hi]
		copy(buf[offs[p.i]+p.lo:], src)
		w.dropMapped(src)
	}); err != nil {
		return errors.Join(fmt.Errorf("resident weights: %w", err), release())
	}
	for i, m := range mats {
		m.Data = buf[offs[i] : offs[i]+len(m.Data) : offs[i]+len(m.Data)]
	}
	w.release = append(w.release, release)
	// Nothing reads the mapping any more: drop what is left of it (the
	// pages tensors share at their edges, and the norms read at load).
	w.mapped.dropAll()
	// The absorbed per-head views point into kv_b_proj's old bytes; rebuild
	// them over the resident copy.
	for i := range w.Layers {
		a := &w.Layers[i].Attn
		if a.KVB != nil {
			a.UKT, a.UV = absorbViews(w.Config, a.KVB)
		}
	}
	return nil
}
