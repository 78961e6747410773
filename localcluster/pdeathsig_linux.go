package localcluster

import (
	"os/exec"
	"syscall"
)

// setParentDeathSignal makes the kernel SIGTERM the child if the launcher
// dies without cleaning up, so no orphaned node keeps a port.
func setParentDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
