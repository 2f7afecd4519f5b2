#!/usr/bin/env bash
# make oci / make push: build the filters' OCI images and push them without Docker.
#   scripts/oci.sh build                      -> target/oci/<filter>/ (OCI image layouts)
#   scripts/oci.sh push REGISTRY/NS VERSION   -> REGISTRY/NS/meshwarden-<filter>:VERSION, prints digests
# Pushing uses skopeo (Debian package `skopeo`), a maintained registry client that needs no daemon; it uses
# the credentials of `skopeo login` / ~/.docker/config.json. OCI_TLS_VERIFY=false allows a plain-HTTP
# registry (local testing only).
set -euo pipefail
cd "$(dirname "$0")/.."
FILTERS=(token-limiter prompt-guard pii-redactor mcp-authz inference-router)
VERSION="${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}"
case "${1:-}" in
  build)
    revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    cargo run -q -p meshwarden-oci --bin meshwarden-oci -- build --version "$VERSION" --revision "$revision" \
      --source "${OCI_SOURCE:-https://github.com/meshwarden/meshwarden}" "${FILTERS[@]}"
    ;;
  push)
    registry="${2:?usage: scripts/oci.sh push REGISTRY/NAMESPACE [VERSION]}"
    VERSION="${3:-$VERSION}"
    command -v skopeo >/dev/null || { echo "error: skopeo is needed: sudo apt-get install -y skopeo" >&2; exit 1; }
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    for f in "${FILTERS[@]}"; do
      ref="$registry/meshwarden-$f:$VERSION"
      skopeo --insecure-policy copy -q --dest-tls-verify="${OCI_TLS_VERIFY:-true}" --digestfile "$tmp/$f.digest" \
        "oci:target/oci/$f:$VERSION" "docker://$ref"
      sha=$(sha256sum "target/meshwarden/$f.wasm" | cut -d' ' -f1)
      printf '%s\n  pinned: oci://%s@%s\n  wasm sha256 (WasmPlugin.spec.sha256): %s\n' "$f" "${ref%:*}" "$(cat "$tmp/$f.digest")" "$sha"
    done
    ;;
  *) echo "usage: scripts/oci.sh build | push REGISTRY/NAMESPACE [VERSION]" >&2; exit 2 ;;
esac
