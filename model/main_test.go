package model

import (
	"os"
	"testing"
)

var tempRoot string

func sharedTemp(t testing.TB) string {
	if tempRoot == "" {
		t.Fatal("TestMain did not set up the shared temp dir")
	}
	return tempRoot
}

func TestMain(m *testing.M) {
	d, err := os.MkdirTemp("", "expertmesh-model-test-")
	if err != nil {
		panic(err)
	}
	tempRoot = d
	code := m.Run()
	os.RemoveAll(d)
	os.Exit(code)
}
