//go:build !linux

// Package schedpolicy sets the CPU scheduling policy of the whole process
// (Linux only).
package schedpolicy

import "errors"

// Batch is Linux's SCHED_BATCH; elsewhere it reports that it is missing.
func Batch() error { return errors.New("SCHED_BATCH is Linux only") }
