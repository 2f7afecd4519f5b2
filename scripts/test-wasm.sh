#!/usr/bin/env bash
# Run the shared crate's unit tests compiled to wasm32 (32-bit usize, the filters' real target) under
# wasm-bindgen-test on Node. Installs wasm-bindgen-cli (matching Cargo.lock) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
CRATES=(meshwarden-shared)
version=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
if ! command -v wasm-bindgen-test-runner >/dev/null 2>&1 || \
   [ "$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $2}')" != "$version" ]; then
  echo "==> installing wasm-bindgen-cli $version (once; about 4 minutes)"
  cargo install -q wasm-bindgen-cli --version "$version"
fi
command -v node >/dev/null || { echo "error: node is needed to run wasm tests (apt-get install -y nodejs)" >&2; exit 1; }
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
pkgs=(); for c in "${CRATES[@]}"; do pkgs+=(-p "$c"); done
if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  cargo test --target wasm32-unknown-unknown --lib "${pkgs[@]}"
else
  scripts/build-wasm.sh --toolchain-only
  CARGO_TARGET_DIR=target/wasm-test RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
    /usr/bin/cargo test -Zbuild-std=std,panic_abort,test --target wasm32-unknown-unknown --lib "${pkgs[@]}"
fi
