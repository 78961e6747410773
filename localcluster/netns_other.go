//go:build !linux

package localcluster

import (
	"context"
	"errors"
	"io"
)

// NetnsConfig configures NewNetns (Linux only).
type NetnsConfig struct {
	Link      LinkSpec
	Emulation string
	Log       io.Writer
}

// Netns is Linux-only: network namespaces.
type Netns struct{}

// ErrNeedRoot: network namespaces need CAP_NET_ADMIN.
var ErrNeedRoot = errors.New("network namespaces need root (CAP_NET_ADMIN)")

var errNoNetns = errors.New("network namespaces are Linux-only")

// NewNetns fails: network namespaces are Linux-only.
func NewNetns(context.Context, NetnsConfig) (*Netns, error) { return nil, errNoNetns }

func (n *Netns) Mode() string                                            { return "" }
func (n *Netns) Host() string                                            { return "" }
func (n *Netns) IP(string) string                                        { return "" }
func (n *Netns) Close() error                                            { return nil }
func (n *Netns) Command(string, string, []string) ([]string, error)      { return nil, errNoNetns }
func (n *Netns) Exec(context.Context, string, ...string) ([]byte, error) { return nil, errNoNetns }

// CleanStaleNetns does nothing off Linux.
func CleanStaleNetns(context.Context, io.Writer) {}
