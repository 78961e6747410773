//go:build !linux

package localcluster

import "testing"

// batchThreads: scheduling policies are read on Linux only.
func batchThreads(t *testing.T, pid int) map[int]bool {
	t.Skip("SCHED_BATCH is Linux only")
	return nil
}
