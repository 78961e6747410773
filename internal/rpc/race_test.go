//go:build race

package rpc

// raceEnabled: the race detector drops sync.Pool items at random, which
// changes allocation counts.
const raceEnabled = true
