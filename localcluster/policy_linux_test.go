package localcluster

import (
	"fmt"
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// batchThreads reports, for each thread of process pid, whether it runs
// under SCHED_BATCH.
func batchThreads(t *testing.T, pid int) map[int]bool {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]bool{}
	for _, e := range ents {
		tid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if a, err := unix.SchedGetAttr(tid, 0); err == nil {
			out[tid] = a.Policy == unix.SCHED_BATCH
		}
	}
	if len(out) == 0 {
		t.Fatalf("no threads of process %d", pid)
	}
	return out
}
