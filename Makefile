# hot — zero-downtime live operations. Run targets as root.
GO       ?= go
BIN      ?= bin/hot
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X github.com/hotctl/hot/internal/buildinfo.Version=$(VERSION)
# End-to-end tests mount, create namespaces and run CRIU; packages run one at a time so that
# they do not fight over the host bridge and nftables tables.
TESTFLAGS ?= -count=1 -p 1 -timeout 80m

export PATH := /usr/local/go/bin:$(PATH)

.PHONY: all deps build test unit demo man lint clean

all: build

deps:
	scripts/deps.sh

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/hot

# The test command named in README.md and run by CI.
# staticcheck is pinned; `go run` fetches it through the module proxy on first use.
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2

test: build lint
	HOT_TEST_BINARY=$(CURDIR)/$(BIN) $(GO) test $(TESTFLAGS) ./...

lint:
	$(GO) vet ./...
	test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) run $(STATICCHECK) ./...

# Unit tests only: no root, no kernel features.
unit:
	$(GO) test -short -count=1 ./...

demo: deps build
	scripts/demo.sh $(BIN)

man: build
	$(BIN) man docs/man

clean:
	rm -rf bin
