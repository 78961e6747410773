package attnnode

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if any test leaves a goroutine behind: every
// node, connection and proxy a test starts must be closed by it.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
