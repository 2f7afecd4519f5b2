#!/usr/bin/env bash
# A/B of the time each filter spends inside Envoy's VM per request, by callback: the filters built with
# `bench-timers` (as `make bench-breakdown`) at BASE (a commit) and from the working tree, run alternately.
#
#   BASE=8fd38c1 [ROUNDS=2] [BENCH_SECONDS=2] [SCENARIOS="..."] scripts/bench-vm-ab.sh
#
# Why beside scripts/bench-ab.sh: on this shared VM the added p50 of one build moves by ±30 µs between
# runs minutes apart, so a change of 3-5 µs of work in the VM (worth ~10-20 µs of latency, see
# docs/benchmarks.md) is invisible to a latency A/B, and many such changes add up unseen (2026-12-07: ~45
# µs over 323 commits, each session's latency A/B finding "nothing measurable"). The in-VM totals of one
# build agree within ~1-3 µs between runs (5 µs seen in a busy minute): compare rounds, not one pair.
# One line per scenario, build and round: the callbacks' mean µs per request and their total.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BASE:?set BASE to the commit to compare against}"
ROUNDS="${ROUNDS:-2}"
SECONDS_PER_RUN="${BENCH_SECONDS:-2}"
read -r -a SCENARIOS <<< "${SCENARIOS:-token-limiter-1kb-chat mcp-authz-tools-call-1kb-50-rules pii-redactor-1kb-2pii}"
export MESHWARDEN_SIDECAR_BIN="${MESHWARDEN_SIDECAR_BIN:-target/release/meshwarden-sidecar}"
FILTERS_BUILT="token-limiter mcp-authz pii-redactor prompt-guard inference-router"
tree=$(mktemp -d)
base_wasm=$(mktemp -d)
head_wasm=$(mktemp -d)
trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || true; rm -rf "$tree" "$base_wasm" "$head_wasm"' EXIT
git worktree add -q --detach "$tree" "$BASE"
(cd "$tree" && FEATURES=meshwarden-shared/bench-timers MESHWARDEN_WASM_DIR="$base_wasm" \
  FILTERS="$FILTERS_BUILT" bash scripts/build-wasm.sh >/dev/null)
FEATURES=meshwarden-shared/bench-timers MESHWARDEN_WASM_DIR="$head_wasm" FILTERS="$FILTERS_BUILT" \
  scripts/build-wasm.sh >/dev/null
FILTERS=wasm-floor MESHWARDEN_WASM_DIR="$head_wasm" scripts/build-wasm.sh >/dev/null
cp -n "$head_wasm/wasm-floor.wasm" "$base_wasm/"
cargo build -q --release -p meshwarden-sidecar -p meshwarden-integration-tests --bin meshwarden-bench --bin meshwarden-sidecar

row() {
  BENCH="$1" MESHWARDEN_WASM_DIR="$2" target/release/meshwarden-bench --seconds "$SECONDS_PER_RUN" 2>&1 |
    sed -n 's/.*in the VM, µs per request: //p' | head -1
}
echo "# $(date -u +%FT%TZ) in-VM A/B: base $(git rev-parse --short "$BASE") vs working tree at $(git rev-parse --short HEAD)"
for round in $(seq 1 "$ROUNDS"); do
  for s in "${SCENARIOS[@]}"; do
    if (( round % 2 )); then
      b=$(row "$s" "$base_wasm"); h=$(row "$s" "$head_wasm")
    else
      h=$(row "$s" "$head_wasm"); b=$(row "$s" "$base_wasm")
    fi
    echo "$(date -u +%T) $round $s"
    echo "    base: $b"
    echo "    head: $h"
  done
done
