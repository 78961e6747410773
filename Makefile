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

# Generated protobuf code. Versions pinned: bump them here and regenerate.
PROTOC_GEN_GO_VERSION      := v1.36.10
PROTOC_GEN_GO_GRPC_VERSION := v1.5.1
GOBIN_DIR := $(CURDIR)/bin/tools

proto:
	GOBIN=$(GOBIN_DIR) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	GOBIN=$(GOBIN_DIR) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
	PATH=$(GOBIN_DIR):$$PATH protoc --proto_path=proto \
		--go_out=proto --go_opt=paths=source_relative \
		--go-grpc_out=proto --go-grpc_opt=paths=source_relative \
		proto/expertmesh.proto

# Fails when regenerating would change committed generated code.
check-generated: proto
	git diff --exit-code -- proto/
