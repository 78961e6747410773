package localcluster

import (
	"os/exec"
	"syscall"
)

// setParentDeathSignal makes the kernel SIGTERM the child if the launcher
// dies without cleaning up, so no orphaned node keeps a port. The child
// gets its own process group: a Ctrl-C at the terminal reaches only the
// launcher, which then stops the children in order (coordinator first),
// rather than every process at once.
func setParentDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM, Setpgid: true}
}
