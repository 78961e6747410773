package controlplane

import "errors"

// Sentinel errors. Every error the package returns wraps one of these (or
// passes a context error through unchanged); callers match with errors.Is.
var (
	// ErrConfig marks an invalid Config, EtcdConfig, ControllerConfig or
	// Member; the message names the flag or field.
	ErrConfig = errors.New("controlplane: invalid configuration")
	// ErrUnavailable means etcd did not answer in time.
	ErrUnavailable = errors.New("controlplane: etcd unavailable")
	// ErrModelMismatch refuses a node whose model identity differs from the
	// one the cluster was started with.
	ErrModelMismatch = errors.New("controlplane: model identity differs from the cluster's")
	// ErrFenced means a newer coordinator has bumped the epoch: the writer
	// is superseded and may no longer change the placement.
	ErrFenced = errors.New("controlplane: fenced by a newer coordinator epoch")
	// ErrVersionExists refuses to overwrite a stored placement version.
	ErrVersionExists = errors.New("controlplane: placement version already stored")
	// ErrStale refuses a placement write that would move a version
	// backwards.
	ErrStale = errors.New("controlplane: placement version is not newer")
	// ErrUnknownNode names a node id that is not a member.
	ErrUnknownNode = errors.New("controlplane: no such member")
	// ErrNotOwned is returned by Registration.Update for a key the
	// registration does not own.
	ErrNotOwned = errors.New("controlplane: key not owned by this registration")
	// ErrClosed is returned by calls on a closed Store, Registration,
	// AttnView, ExpertAgent or Controller.
	ErrClosed = errors.New("controlplane: closed")
	// ErrCorrupt marks a stored value that does not decode.
	ErrCorrupt = errors.New("controlplane: stored value does not decode")
	// ErrEtcdStopped reports an embedded etcd server that stopped by itself.
	ErrEtcdStopped = errors.New("controlplane: embedded etcd stopped")
)
