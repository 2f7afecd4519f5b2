//! OCI images for Wasm filters, in the layout Istio's and Envoy Gateway's fetchers accept.
//!
//! We build the "compat" image: an OCI image manifest whose last (and only) layer is
//! `application/vnd.oci.image.layer.v1.tar+gzip` holding `plugin.wasm`. Istio reads that layout since 1.12,
//! Envoy Gateway too; the CNCF `application/wasm` layout is not accepted by either today. The image is
//! written as an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`), built
//! deterministically (tar mtime 0, uid 0, gzip without timestamp), so the same `.wasm` always gives the same
//! digest. Pushing is done by `skopeo copy` (see `scripts/oci.sh`), a maintained registry client that needs
//! no Docker daemon.

use anyhow::{Context, Result};
use flate2::{Compression, GzBuilder};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Our annotation with the sha256 of `plugin.wasm` (what Istio's `WasmPlugin.spec.sha256` pins).
pub const WASM_SHA256_ANNOTATION: &str = "dev.meshwarden.wasm.sha256";

pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A tar holding one regular file `plugin.wasm`, deterministic.
pub fn plugin_tar(wasm: &[u8]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_path("plugin.wasm")?;
    header.set_size(wasm.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    builder.append(&header, wasm)?;
    Ok(builder.into_inner()?)
}

pub fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut enc = GzBuilder::new().mtime(0).write(Vec::new(), Compression::best());
    enc.write_all(bytes)?;
    Ok(enc.finish()?)
}

/// What was built, for printing and pinning.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub manifest_digest: String,
    pub wasm_sha256: String,
    pub layer_size: usize,
}

fn write_blob(dir: &Path, bytes: &[u8]) -> Result<String> {
    let hex = sha256_hex(bytes);
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs)?;
    std::fs::write(blobs.join(&hex), bytes)?;
    Ok(format!("sha256:{hex}"))
}

/// Write an OCI image layout for `wasm` to `dir` (replaced), tagged `tag`.
pub fn build_image_layout(
    dir: &Path,
    wasm: &[u8],
    tag: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<BuiltImage> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let wasm_sha256 = sha256_hex(wasm);
    let tar = plugin_tar(wasm)?;
    let layer = gzip(&tar)?;
    let layer_digest = write_blob(dir, &layer)?;
    let config = json!({
        "architecture": "wasm",
        "os": "wasip1",
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&tar))]},
        "config": {}
    });
    let config_bytes = serde_json::to_vec(&config)?;
    let config_digest = write_blob(dir, &config_bytes)?;
    let mut ann: BTreeMap<String, String> = annotations.clone();
    ann.insert(WASM_SHA256_ANNOTATION.to_string(), wasm_sha256.clone());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config_bytes.len()},
        "layers": [{
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": layer_digest,
            "size": layer.len(),
            "annotations": {"org.opencontainers.image.title": "plugin.wasm"}
        }],
        "annotations": ann,
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = write_blob(dir, &manifest_bytes)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}
        }]
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec_pretty(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(BuiltImage { manifest_digest, wasm_sha256, layer_size: layer.len() })
}

/// Read `plugin.wasm` back out of an OCI image layout (as Istio's fetcher does: the last layer), checking
/// media types. Used by the registry round-trip test on what was pulled back.
pub fn extract_plugin(dir: &Path) -> Result<(Value, Vec<u8>)> {
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let manifest_digest =
        index.pointer("/manifests/0/digest").and_then(Value::as_str).context("index.json has no manifest")?;
    let manifest: Value = serde_json::from_slice(&read_blob(dir, manifest_digest)?)?;
    let layers = manifest.get("layers").and_then(Value::as_array).context("manifest has no layers")?;
    let last = layers.last().context("manifest has no layers")?;
    let media_type = last.get("mediaType").and_then(Value::as_str).unwrap_or("");
    anyhow::ensure!(
        media_type == LAYER_MEDIA_TYPE || media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "last layer has media type {media_type}, which Istio's compat path does not read"
    );
    let digest = last.get("digest").and_then(Value::as_str).context("layer without digest")?;
    let gz = read_blob(dir, digest)?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz.as_slice()));
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.path()?.as_os_str() == "plugin.wasm" {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut out)?;
            return Ok((manifest, out));
        }
    }
    anyhow::bail!("no plugin.wasm in the last layer")
}

fn read_blob(dir: &Path, digest: &str) -> Result<Vec<u8>> {
    let hex = digest.strip_prefix("sha256:").context("digest is not sha256")?;
    let bytes = std::fs::read(dir.join("blobs").join("sha256").join(hex))?;
    anyhow::ensure!(sha256_hex(&bytes) == hex, "blob {digest} does not match its digest");
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips_and_is_deterministic() {
        let wasm = b"\0asm\x01\0\0\0 pretend filter".to_vec();
        let d1 = tempfile_dir("a");
        let d2 = tempfile_dir("b");
        let mut ann = BTreeMap::new();
        ann.insert("org.opencontainers.image.version".to_string(), "1.2.3".to_string());
        let a = build_image_layout(&d1, &wasm, "1.2.3", &ann).unwrap();
        let b = build_image_layout(&d2, &wasm, "1.2.3", &ann).unwrap();
        assert_eq!(a.manifest_digest, b.manifest_digest, "deterministic");
        let (manifest, back) = extract_plugin(&d1).unwrap();
        assert_eq!(back, wasm);
        assert_eq!(manifest["annotations"][WASM_SHA256_ANNOTATION], sha256_hex(&wasm));
        assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(d1);
        let _ = std::fs::remove_dir_all(d2);
    }

    fn tempfile_dir(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("meshwarden-oci-test-{}-{tag}", std::process::id()))
    }
}
