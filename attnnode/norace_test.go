//go:build !race

package attnnode

const raceEnabled = false
