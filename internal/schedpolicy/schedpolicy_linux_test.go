package schedpolicy

import (
	"os"
	"runtime"
	"strconv"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// policies returns the policy of every thread of the process.
func policies(t *testing.T) map[int]uint32 {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]uint32{}
	for _, e := range ents {
		tid, _ := strconv.Atoi(e.Name())
		if a, err := unix.SchedGetAttr(tid, 0); err == nil {
			out[tid] = a.Policy
		}
	}
	return out
}

// TestBatch: every thread is SCHED_BATCH afterwards, threads started
// later too, and nice is kept.
func TestBatch(t *testing.T) {
	nice0, err := unix.SchedGetAttr(0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if nice0.Policy == unix.SCHED_BATCH {
		t.Fatal("the test process already runs SCHED_BATCH: the test would prove nothing")
	}
	// Back to the usual policy afterwards (a later test, or -count=2).
	t.Cleanup(func() {
		if err := setPolicy(unix.SCHED_NORMAL); err != nil {
			t.Error(err)
		}
	})
	if err := Batch(); err != nil {
		t.Fatal(err)
	}
	// Start new OS threads: goroutines locked to threads while others block.
	var wg sync.WaitGroup
	hold := make(chan struct{})
	for range 4 {
		wg.Add(1)
		go func() {
			runtime.LockOSThread()
			wg.Done()
			<-hold
		}()
	}
	wg.Wait()
	ps := policies(t)
	close(hold)
	if len(ps) < 5 {
		t.Fatalf("saw %d threads, want at least 5", len(ps))
	}
	for tid, p := range ps {
		if p != unix.SCHED_BATCH {
			t.Errorf("thread %d: policy %d, want SCHED_BATCH (%d)", tid, p, unix.SCHED_BATCH)
		}
	}
	if a, err := unix.SchedGetAttr(0, 0); err != nil || a.Nice != nice0.Nice {
		t.Errorf("nice %v after Batch, was %d (%v)", a, nice0.Nice, err)
	}
}
