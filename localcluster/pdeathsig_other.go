//go:build !linux

package localcluster

import "os/exec"

func setParentDeathSignal(*exec.Cmd) {}
