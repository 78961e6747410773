// Package schedpolicy sets the CPU scheduling policy of the whole process.
//
// Batch puts every thread under SCHED_BATCH: the kernel's fair scheduler
// still shares the cores by weight, but a batch thread that wakes up does
// not preempt the thread running on its core; it runs at the next tick or
// when that thread blocks. `up` runs its expert nodes so, because there
// every role shares the same few cores: a request the attention node sends
// wakes an expert node, which would otherwise take the attention node's
// core before it has sent the requests for the other expert nodes (the
// last of them went out ~2.7 ms after the first, per MoE layer, on two
// cores; ~1 ms with the expert nodes under SCHED_BATCH). On a machine of
// its own an expert node gains nothing from it.
package schedpolicy

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Batch moves every thread of the process to SCHED_BATCH (nice unchanged).
// Threads the Go runtime starts later inherit it from the thread that
// creates them, which is one of these.
func Batch() error { return setPolicy(unix.SCHED_BATCH) }

// setPolicy moves every thread of the process to policy (nice unchanged).
func setPolicy(policy uint32) error {
	// Twice: a thread created while the first pass ran may have been
	// cloned from one not yet moved.
	for range 2 {
		ents, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return fmt.Errorf("scheduling policy %d: %w", policy, err)
		}
		for _, e := range ents {
			tid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			attr, err := unix.SchedGetAttr(tid, 0)
			if err == nil {
				attr.Policy = policy
				err = unix.SchedSetAttr(tid, attr, 0)
			}
			if err != nil && err != unix.ESRCH { // ESRCH: the thread exited
				return fmt.Errorf("scheduling policy %d for thread %d: %w", policy, tid, err)
			}
		}
	}
	return nil
}
