package cli

import (
	"net"
	"testing"
)

func TestAdvertised(t *testing.T) {
	for _, c := range []struct{ flag, listen, want string }{
		{"", "127.0.0.1:7000", "127.0.0.1:7000"},
		{"10.1.2.3:7000", "0.0.0.0:7000", "10.1.2.3:7000"},
		{"expert-0.expert:7000", "[::]:7000", "expert-0.expert:7000"},
	} {
		got, err := advertised(c.flag, c.listen)
		if err != nil || got != c.want {
			t.Errorf("advertised(%q, %q) = %q, %v; want %q", c.flag, c.listen, got, err, c.want)
		}
	}
	// An unspecified host is replaced by a dialable one on the same port.
	for _, listen := range []string{"0.0.0.0:7001", "[::]:7001", ":7001"} {
		got, err := advertised("", listen)
		if err != nil {
			t.Fatal(err)
		}
		host, port, _ := net.SplitHostPort(got)
		if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() || port != "7001" {
			t.Errorf("advertised(%q) = %q: not dialable", listen, got)
		}
	}
	if _, err := advertised("nope", "127.0.0.1:1"); err == nil {
		t.Error("a bad --advertise-addr was accepted")
	}
}
