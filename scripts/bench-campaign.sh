#!/usr/bin/env bash
# Repeated, interleaved runs of the 1 KB target scenarios, each followed by an A/A control of the same
# scenario (`meshwarden-bench --control`: both Envoys plain), so that a median over many runs can be read
# against the noise of the same minutes. One line per run: time, round, scenario, then p50 plain,
# p50 with the filter, added p50 and added Envoy CPU per request, for the run and for its control.
#
#   make bench-campaign [ROUNDS=8] [BENCH_SECONDS=3] [SCENARIOS="token-limiter-1kb-chat ..."]
#
# Expects `make build` and the release bench binary (the Makefile target builds both).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-8}"
SECONDS_PER_RUN="${BENCH_SECONDS:-3}"
read -r -a SCENARIOS <<< "${SCENARIOS:-token-limiter-1kb-chat mcp-authz-tools-call-1kb-50-rules pii-redactor-1kb-2pii}"
bench=target/release/meshwarden-bench
export MESHWARDEN_SIDECAR_BIN="${MESHWARDEN_SIDECAR_BIN:-target/release/meshwarden-sidecar}"

# The row of `scenario` in a bench run's table: p50 plain, p50 with the filter, added p50, added CPU/req.
row() {
  local scenario=$1; shift
  # BENCH selects by substring; only the exact scenario's row is kept.
  BENCH="$scenario" "$bench" "$@" --seconds "$SECONDS_PER_RUN" 2>&1 |
    awk -F'|' -v s=" $scenario " '$2 == s {gsub(/\*/, ""); print $3 "|" $4 "|" $5 "|" $11}'
}

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) rounds=$ROUNDS seconds=$SECONDS_PER_RUN"
for round in $(seq 1 "$ROUNDS"); do
  for s in "${SCENARIOS[@]}"; do
    run=$(row "$s")
    control=$(row "$s" --control)
    echo "$(date -u +%H:%M:%S) $round $s | $run | control | $control"
  done
done
