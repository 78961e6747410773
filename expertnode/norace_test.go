//go:build !race

package expertnode

const raceEnabled = false
