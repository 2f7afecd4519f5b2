//! `meshwarden-oci build [--out DIR] [--version V] [--revision R] [--source URL] FILTER...`
//! Writes `DIR/<filter>/` OCI image layouts from `target/meshwarden/<filter>.wasm` and prints, per filter,
//! the manifest digest and the wasm sha256 (for `WasmPlugin.spec.sha256`).

use anyhow::{bail, Context, Result};
use meshwarden_oci::build_image_layout;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_default();
    if cmd != "build" {
        bail!("usage: meshwarden-oci build [--wasm-dir DIR] [--out DIR] [--version V] [--revision R] [--source URL] FILTER...");
    }
    let mut out = PathBuf::from("target/oci");
    let mut wasm_dir = PathBuf::from("target/meshwarden");
    let mut version = env!("CARGO_PKG_VERSION").to_string();
    let mut revision = String::new();
    let mut source = "https://example.invalid/meshwarden".to_string();
    let mut filters = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(args.next().context("--out DIR")?),
            "--wasm-dir" => wasm_dir = PathBuf::from(args.next().context("--wasm-dir DIR")?),
            "--version" => version = args.next().context("--version V")?,
            "--revision" => revision = args.next().context("--revision R")?,
            "--source" => source = args.next().context("--source URL")?,
            f => filters.push(f.to_string()),
        }
    }
    if filters.is_empty() {
        bail!("name at least one filter");
    }
    for f in filters {
        let wasm_path = wasm_dir.join(format!("{f}.wasm"));
        let wasm = std::fs::read(&wasm_path).with_context(|| format!("{} (run make build)", wasm_path.display()))?;
        let mut ann = BTreeMap::new();
        ann.insert("org.opencontainers.image.title".to_string(), format!("meshwarden-{f}"));
        ann.insert("org.opencontainers.image.version".to_string(), version.clone());
        ann.insert("org.opencontainers.image.source".to_string(), source.clone());
        if !revision.is_empty() {
            ann.insert("org.opencontainers.image.revision".to_string(), revision.clone());
        }
        let built = build_image_layout(&out.join(&f), &wasm, &version, &ann)?;
        println!(
            "{f}\tmanifest {}\twasm sha256 {}\tlayer {} bytes\t{}",
            built.manifest_digest,
            built.wasm_sha256,
            built.layer_size,
            out.join(&f).display()
        );
    }
    Ok(())
}
