#!/usr/bin/env bash
# A/B of the 1 KB target scenarios: the filters built at BASE (a commit) against the working tree's build,
# run alternately in the same minutes, so that a code change can be told from a slow machine.
#
#   BASE=9ad29a1 [ROUNDS=4] [BENCH_SECONDS=3] [SCENARIOS="..."] scripts/bench-ab.sh
#
# Expects `make build` and the release bench binary (as `make bench-campaign`). BASE is checked out in a
# temporary worktree and built with scripts/build-wasm.sh; filters the scenarios do not load are copied
# from the current build. One line per scenario and round: p50 plain, with the filter, added, added CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BASE:?set BASE to the commit to compare against}"
ROUNDS="${ROUNDS:-4}"
SECONDS_PER_RUN="${BENCH_SECONDS:-3}"
read -r -a SCENARIOS <<< "${SCENARIOS:-token-limiter-1kb-chat mcp-authz-tools-call-1kb-50-rules pii-redactor-1kb-2pii}"
export MESHWARDEN_SIDECAR_BIN="${MESHWARDEN_SIDECAR_BIN:-target/release/meshwarden-sidecar}"
tree=$(mktemp -d)
base_wasm=$(mktemp -d)
trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || true; rm -rf "$tree" "$base_wasm"' EXIT
git worktree add -q --detach "$tree" "$BASE"
(cd "$tree" && MESHWARDEN_WASM_DIR="$base_wasm" \
  FILTERS="token-limiter mcp-authz pii-redactor" bash scripts/build-wasm.sh >/dev/null)
for f in target/meshwarden/*.wasm; do cp -n "$f" "$base_wasm/"; done

row() {
  BENCH="$1" target/release/meshwarden-bench --seconds "$SECONDS_PER_RUN" 2>&1 |
    awk -F'|' -v s=" $1 " '$2 == s {gsub(/\*/, ""); print $3 "|" $4 "|" $5 "|" $11}'
}
echo "# $(date -u +%FT%TZ) A/B base $(git rev-parse --short "$BASE") vs working tree at $(git rev-parse --short HEAD)"
for round in $(seq 1 "$ROUNDS"); do
  for s in "${SCENARIOS[@]}"; do
    # Alternate which build runs first, so that a machine slowing down over a round favours neither.
    if (( round % 2 )); then
      b=$(MESHWARDEN_WASM_DIR="$base_wasm" row "$s")
      c=$(row "$s")
    else
      c=$(row "$s")
      b=$(MESHWARDEN_WASM_DIR="$base_wasm" row "$s")
    fi
    echo "$(date -u +%T) $round $s | base $b | head $c"
  done
done
