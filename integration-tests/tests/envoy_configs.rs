//! Every Envoy config we ship passes `envoy --mode validate` (rendered with representative values), so
//! the configs users copy cannot rot: the integration tests run them, and this checks all of them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::envoy::{json_string, render};
use meshwarden_integration_tests::paths::{envoy_bin, repo_root, wasm_dir};
use std::collections::BTreeMap;
use std::process::Command;

fn placeholders(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        let end = after.find("}}").unwrap();
        out.push(after[..end].trim().to_string());
        rest = &after[end + 2..];
    }
    out
}

/// A self-signed certificate as CA, server certificate and key, for templates with TLS listeners.
fn tls_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let ok = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=meshwarden-test"])
            .arg("-keyout")
            .arg(d.path().join("srv.key"))
            .arg("-out")
            .arg(d.path().join("srv.crt"))
            .output()
            .expect("openssl (make test installs it)");
        assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
        std::fs::copy(d.path().join("srv.crt"), d.path().join("ca.crt")).unwrap();
        d
    })
    .path()
}

const JWKS: &str = r#"{"keys":[{"kty":"oct","alg":"HS256","kid":"k1","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}]}"#;

fn value_for(name: &str) -> String {
    match name {
        "TLS_DIR" => tls_dir().display().to_string(),
        "BENCH_ANSWER" => json_string(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#),
        "WASM_DIR" => wasm_dir().display().to_string(),
        "LB_POLICY" => "LEAST_REQUEST".to_string(),
        "POOL_LB_ENDPOINTS" => {
            "[{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18000}}}}]".to_string()
        }
        // An HS256 key, as the mcp-authz jwt_authn template expects a JWKS document in a string.
        "JWKS" => json_string(JWKS),
        n if n.ends_with("_CONFIG") => json_string("{}"),
        n if n.ends_with("_PORT") => "18001".to_string(),
        other => panic!("envoy-configs use a placeholder this test does not know: {other}; teach value_for()"),
    }
}

#[test]
fn every_envoy_config_validates() {
    let dir = repo_root().join("envoy-configs");
    let mut checked = 0;
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let template = std::fs::read_to_string(&path).unwrap();
        let mut vars: BTreeMap<String, String> =
            placeholders(&template).into_iter().map(|n| (n.clone(), value_for(&n))).collect();
        if template.contains("'{{JWKS}}'") {
            // This template quotes the JWKS itself: it wants the raw JSON document.
            vars.insert("JWKS".to_string(), JWKS.to_string());
        }
        let rendered = render(&template, &vars).unwrap();
        let out_path = tmp.path().join(path.file_name().unwrap());
        std::fs::write(&out_path, rendered).unwrap();
        let out = Command::new(envoy_bin().unwrap())
            .args(["--mode", "validate", "--use-dynamic-base-id", "-l", "error", "-c"])
            .arg(&out_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} does not validate:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} configs found");
}
