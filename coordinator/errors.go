package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"time"

	"google.golang.org/grpc/codes"
)

// apiError is an OpenAI-shaped error: {"error": {message, type, param, code}}
// with the HTTP status it travels under.
type apiError struct {
	status     int
	Message    string  `json:"message"`
	Type       string  `json:"type"`
	Param      *string `json:"param"`
	Code       *string `json:"code"`
	retryAfter time.Duration
}

func (e *apiError) Error() string { return e.Message }

func strp(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// badRequest is a 400 naming the offending parameter.
func badRequest(param, format string, args ...any) *apiError {
	return &apiError{status: http.StatusBadRequest, Type: "invalid_request_error", Param: strp(param),
		Message: fmt.Sprintf(format, args...)}
}

// errTimeout marks a request that ran past its timeout.
var errTimeout = errors.New("request timed out")

// toAPIError is the one table from internal errors to HTTP answers.
func (c *Coordinator) toAPIError(err error) *apiError {
	var ae *apiError
	var nse *NodeSeqError
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.Is(err, ErrOverloaded):
		return &apiError{status: http.StatusTooManyRequests, Type: "rate_limit_error", Code: strp("queue_full"),
			Message:    fmt.Sprintf("%v: the coordinator's waiting queue (%d) is full; retry later", err, c.cfg.MaxWaiting),
			retryAfter: c.cfg.RetryAfter}
	case errors.Is(err, ErrTooLong):
		return &apiError{status: http.StatusBadRequest, Type: "invalid_request_error", Param: strp("max_tokens"),
			Code: strp("context_length_exceeded"), Message: err.Error()}
	case errors.Is(err, ErrExpertsUnavailable):
		return &apiError{status: http.StatusServiceUnavailable, Type: "expert_unavailable", Code: strp("expert_unavailable"),
			Message: err.Error(), retryAfter: c.cfg.RetryAfter}
	case errors.Is(err, errTimeout), errors.Is(err, context.DeadlineExceeded):
		return &apiError{status: http.StatusGatewayTimeout, Type: "timeout_error", Code: strp("timeout"), Message: err.Error()}
	case errors.As(err, &nse):
		// The node's message names its sequence and internal state: it
		// goes to the log, and the client gets what it can act on. Every
		// client error is caught before a request reaches a node, so a
		// refusal there is the server's fault.
		c.log.Warn("attention node refused a sequence", "code", nse.Code, "message", nse.Message)
		if nse.Code == codes.Unavailable {
			return &apiError{status: http.StatusServiceUnavailable, Type: "attention_node_unavailable", Code: strp("attention_node_failed"),
				Message: "the attention node serving this request could not continue it; retry", retryAfter: c.cfg.RetryAfter}
		}
		return &apiError{status: http.StatusInternalServerError, Type: "internal_error",
			Message: fmt.Sprintf("the attention node refused this request's work (%s); the coordinator's log has the details", nse.Code)}
	case errors.Is(err, ErrNodeFailed):
		return &apiError{status: http.StatusServiceUnavailable, Type: "attention_node_unavailable", Code: strp("attention_node_failed"),
			Message: err.Error(), retryAfter: c.cfg.RetryAfter}
	case errors.Is(err, ErrNoNodes):
		return &apiError{status: http.StatusServiceUnavailable, Type: "attention_node_unavailable", Code: strp("no_attention_node"),
			Message: err.Error(), retryAfter: c.cfg.RetryAfter}
	case errors.Is(err, ErrShuttingDown):
		return &apiError{status: http.StatusServiceUnavailable, Type: "service_unavailable", Code: strp("shutting_down"),
			Message: err.Error(), retryAfter: c.cfg.RetryAfter}
	}
	return &apiError{status: http.StatusInternalServerError, Type: "internal_error", Message: err.Error()}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
}

func (c *Coordinator) writeError(w http.ResponseWriter, err error) int {
	ae := c.toAPIError(err)
	noteError(w, ae.Type)
	if ae.retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(ae.retryAfter.Seconds()))))
	}
	writeJSON(w, ae.status, map[string]*apiError{"error": ae})
	return ae.status
}
