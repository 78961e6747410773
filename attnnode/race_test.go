//go:build race

package attnnode

// raceEnabled: the race detector changes allocation counts.
const raceEnabled = true
