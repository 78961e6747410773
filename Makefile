# expertmesh — one binary, every role. `make test` is what CI runs.
GO      ?= go
BIN     ?= bin/expertmesh
PKGS    ?= ./...

.PHONY: all build test test-short race vet fmt bench bench-kernels fuzz proto asm check-generated clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/expertmesh

# The README's test command. -count=1 so results are never cached.
test:
	$(GO) vet $(PKGS)
	$(GO) test -count=1 -timeout 20m $(PKGS)

test-short:
	$(GO) test -count=1 -short $(PKGS)

race:
	$(GO) test -count=1 -race -short $(PKGS)

fmt:
	gofmt -w $$(git ls-files '*.go' | grep -v '\.pb\.go$$')

bench:
	$(GO) test -run '^$$' -bench . -benchtime 2x $(PKGS)

bench-kernels: build
	$(BIN) bench-kernels

# Short fuzzing passes over every parser of outside input.
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParseHeader -fuzztime 30s ./model/safetensors/
	$(GO) test -run '^$$' -fuzz FuzzParseConfig -fuzztime 30s ./model/

clean:
	rm -rf bin
