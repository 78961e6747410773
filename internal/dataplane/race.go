//go:build race

package dataplane

// raceEnabled: the race detector learns that bytes written to a socket
// happen before their reading only from syscall.Write and syscall.Read,
// not from the writev that a vectored frame takes (net.Buffers), so
// under it every frame is copied into the connection's buffer and
// written with Write, and tests that pass data through a connection
// see the order they rely on.
const raceEnabled = true
