#!/usr/bin/env bash
# Build every filter to wasm32-wasip1 and copy them to target/meshwarden/<filter>.wasm.
#
# Two routes, chosen automatically:
#  1. rustup has the wasm32-wasip1 target (a laptop after `rustup target add wasm32-wasip1`):
#     plain `cargo build --release --target wasm32-wasip1`.
#  2. it does not (and cannot download it): Debian's rustc-web toolchain with a rebuilt std
#     (`-Zbuild-std`), installing the Debian packages when missing (as root) or printing the command.
# Set MESHWARDEN_WASM_ROUTE=rustup|debian to force one.
set -euo pipefail
cd "$(dirname "$0")/.."

# FILTERS="a b" builds a subset; MESHWARDEN_WASM_DIR moves the output (the tests read the same variable).
read -r -a FILTERS <<< "${FILTERS:-token-limiter prompt-guard pii-redactor mcp-authz inference-router}"
OUT="${MESHWARDEN_WASM_DIR:-target/meshwarden}"
DEBIAN_PACKAGES=(rustc-web cargo-web rust-web-src lld-22 wasi-libc)

pkgs=()
for f in "${FILTERS[@]}"; do pkgs+=(-p "meshwarden-$f"); done
# FEATURES="meshwarden-shared/bench-timers" builds the instrumented filters of `make bench-breakdown`.
if [ -n "${FEATURES:-}" ]; then pkgs+=(--features "$FEATURES"); fi

# Wasm SIMD (fixed-width 128-bit, in V8 since 2021, wasmtime, WasmEdge, WAMR's AOT/JIT): memchr and the
# byte scans use it; pii-redactor's 128 KB request takes ~25% less time in Envoy's V8 with it
# (docs/benchmarks.md). MESHWARDEN_WASM_SIMD=0 builds for a runtime without SIMD.
target_rustflags=""
if [ "${MESHWARDEN_WASM_SIMD:-1}" != 0 ]; then target_rustflags="-C target-feature=+simd128"; fi

route="${MESHWARDEN_WASM_ROUTE:-}"
if [ -z "$route" ]; then
  if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    route=rustup
  else
    route=debian
  fi
fi

if [ "$route" = rustup ]; then
  if [ "${1:-}" = --toolchain-only ]; then exit 0; fi
  echo "==> building filters with rustup's wasm32-wasip1 target"
  CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS="${CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS:-} $target_rustflags" \
    cargo build --release --target wasm32-wasip1 "${pkgs[@]}"
  built=target/wasm32-wasip1/release
else
  missing=()
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "==> rustup has no wasm32-wasip1 target; installing Debian's wasm toolchain: ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "error: no wasm32-wasip1 target. Either run:  rustup target add wasm32-wasip1" >&2
      echo "       or install Debian's toolchain:      sudo apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
  fi
  if [ "${1:-}" = --toolchain-only ]; then exit 0; fi
  echo "==> building filters with Debian's rustc-web and -Zbuild-std (no rustup wasm32-wasip1 target here)"
  # A separate target dir: the two toolchains must not overwrite each other's host artefacts.
  CARGO_TARGET_DIR=target/wasm-debian \
  RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
  CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS="-L /usr/lib/wasm32-wasi $target_rustflags" \
    /usr/bin/cargo build --release -Zbuild-std=std,panic_abort --target wasm32-wasip1 "${pkgs[@]}"
  built=target/wasm-debian/wasm32-wasip1/release
fi

mkdir -p "$OUT"
printf '\n%-20s %10s\n' filter bytes
for f in "${FILTERS[@]}"; do
  src="$built/${f//-/_}.wasm"
  cp "$src" "$OUT/$f.wasm"
  printf '%-20s %10d\n' "$f" "$(stat -c %s "$OUT/$f.wasm")"
done
echo "wasm files in $OUT/"
