// Command expertmesh is the single binary of the expertmesh cluster: one
// subcommand per role plus the tools around them. All logic lives in
// importable packages; this file only dispatches.
package main

import (
	"os"

	"github.com/expertmesh/expertmesh/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
}
