package model

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/expertmesh/expertmesh/internal/hugemem"
	"github.com/expertmesh/expertmesh/kernels"
)

// Residency says where the engine reads its weights from during compute.
type Residency string

const (
	// ResidencyAuto copies the weights into resident memory when they take
	// at most half of the memory the OS reports available, and reads them
	// through the mapped checkpoint otherwise.
	ResidencyAuto Residency = "auto"
	// ResidencyResident copies every bound matrix into anonymous memory
	// backed by transparent huge pages (see Weights.MakeResident).
	ResidencyResident Residency = "resident"
	// ResidencyMapped reads the weights through the mmapped checkpoint's
	// page cache, after one warming pass. It costs no memory beyond the
	// page cache but decode takes more TLB misses on 4 KiB pages.
	ResidencyMapped Residency = "mmap"
)

// ParseResidency reads a --weights value.
func ParseResidency(s string) (Residency, error) {
	switch r := Residency(s); r {
	case ResidencyAuto, ResidencyResident, ResidencyMapped:
		return r, nil
	case "":
		return ResidencyAuto, nil
	}
	return "", fmt.Errorf("--weights %q: want auto, resident or mmap", s)
}

// Resolve turns auto into resident when bytes take at most half of
// availableBytes (0: unknown, so mmap), and returns other modes unchanged.
func (r Residency) Resolve(bytes, availableBytes int64) Residency {
	if r != ResidencyAuto && r != "" {
		return r
	}
	if availableBytes > 0 && bytes <= availableBytes/2 {
		return ResidencyResident
	}
	return ResidencyMapped
}

// Bytes is the size of every bound matrix (the weights compute streams).
func (w *Weights) Bytes() int64 {
	var n int64
	for _, m := range w.matrices() {
		n += int64(len(m.Data))
	}
	return n
}

// Place puts the weights where r says and returns the residency chosen
// (auto resolves to resident or mmap). availableBytes is consulted only
// for auto; pass MemAvailable().
func (w *Weights) Place(r Residency, threads int, availableBytes int64) (Residency, error) {
	return w.PlaceContext(context.Background(), r, threads, availableBytes)
}

// PlaceContext is Place that stops copying or warming when ctx is done and
// returns its error.
func (w *Weights) PlaceContext(ctx context.Context, r Residency, threads int, availableBytes int64) (Residency, error) {
	r = r.Resolve(w.Bytes(), availableBytes)
	switch r {
	case ResidencyResident:
		if err := w.makeResident(ctx, threads); err != nil {
			return "", err
		}
	case ResidencyMapped:
		if err := w.warm(ctx, threads); err != nil {
			return "", fmt.Errorf("warming weights: %w", err)
		}
	default:
		return "", fmt.Errorf("residency %q: want auto, resident or mmap", r)
	}
	return r, nil
}

// MemAvailable is the kernel's estimate of memory available to new
// allocations without swapping (MemAvailable in /proc/meminfo), or 0
// where it cannot be read.
func MemAvailable() int64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	return parseMemAvailable(bufio.NewScanner(f))
}

func parseMemAvailable(sc *bufio.Scanner) int64 {
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name != "MemAvailable" {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil || kb < 0 {
			return 0
		}
		return kb << 10
	}
	return 0
}

// ResidentExpert is a copy of one routed expert's matrices in huge-page
// memory, for an expert node whose held set changes at run time. Swap
// exchanges the copy with the bound (mapped) bytes: once to start
// computing on the copy, once more to go back to the mapping before Free.
// Swap must not run while anything computes on the expert.
type ResidentExpert struct {
	mats    [3]*kernels.Matrix
	data    [3][]byte
	release func() error
}

// CopyExpert copies routed expert e of layer l into huge-page memory. It
// only reads the bound bytes, so compute may go on meanwhile.
func (w *Weights) CopyExpert(l, e int) (*ResidentExpert, error) {
	if l < 0 || l >= len(w.Layers) || w.Layers[l].MoE == nil || e < 0 || e >= len(w.Layers[l].MoE.Experts) || w.Layers[l].MoE.Experts[e] == nil {
		return nil, fmt.Errorf("%w: layer %d expert %d is not bound", ErrWeights, l, e)
	}
	m := w.Layers[l].MoE.Experts[e]
	r := &ResidentExpert{mats: [3]*kernels.Matrix{m.Gate, m.Up, m.Down}}
	total := 0
	for _, mat := range r.mats {
		total += (len(mat.Data) + 63) &^ 63
	}
	buf, release, err := hugemem.Alloc(total)
	if err != nil {
		return nil, fmt.Errorf("resident expert %d of layer %d: %w", e, l, err)
	}
	r.release = release
	off := 0
	for i, mat := range r.mats {
		n := len(mat.Data)
		r.data[i] = buf[off : off+n : off+n]
		copy(r.data[i], mat.Data)
		w.dropMapped(mat.Data) // not both resident: the copy serves from now on
		off += (n + 63) &^ 63
	}
	return r, nil
}

// Swap exchanges the matrices' bytes with the copy's.
func (r *ResidentExpert) Swap() {
	for i, mat := range r.mats {
		mat.Data, r.data[i] = r.data[i], mat.Data
	}
}

// Bytes is the size of the expert's matrices.
func (r *ResidentExpert) Bytes() int64 {
	var n int64
	for _, d := range r.data {
		n += int64(len(d))
	}
	return n
}

// Free releases the copy; call it only when the matrices no longer point
// at it (after the second Swap).
func (r *ResidentExpert) Free() error { return r.release() }

// ExpertBytes is the size of routed expert e of layer l's matrices, or 0
// when it is not bound.
func (w *Weights) ExpertBytes(l, e int) int64 {
	if l < 0 || l >= len(w.Layers) || w.Layers[l].MoE == nil || e < 0 || e >= len(w.Layers[l].MoE.Experts) {
		return 0
	}
	m := w.Layers[l].MoE.Experts[e]
	if m == nil {
		return 0
	}
	return int64(len(m.Gate.Data) + len(m.Up.Data) + len(m.Down.Data))
}
