package model

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
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
	if r == ResidencyAuto || r == "" {
		r = ResidencyMapped
		if availableBytes > 0 && w.Bytes() <= availableBytes/2 {
			r = ResidencyResident
		}
	}
	switch r {
	case ResidencyResident:
		if err := w.MakeResident(threads); err != nil {
			return "", err
		}
	case ResidencyMapped:
		w.Warm(threads)
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
