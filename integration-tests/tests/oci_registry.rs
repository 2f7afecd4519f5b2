//! The filters' OCI images survive a real registry round trip: pushed with skopeo to Debian's
//! `docker-registry` on loopback, pulled back, media types as Istio's fetcher expects, `plugin.wasm`
//! byte-identical, and the pulled filter loads and serves in Envoy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::envoy::EnvoyBuilder;
use meshwarden_integration_tests::mock_llm::MockLlm;
use meshwarden_integration_tests::paths;
use meshwarden_oci::{build_image_layout, extract_plugin, sha256_hex, LAYER_MEDIA_TYPE, MANIFEST_MEDIA_TYPE};
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_registry() -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry (apt-get install docker-registry; make test installs it)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry { child, port, _dir: dir }
}

fn skopeo(args: &[&str]) -> String {
    let out = Command::new("skopeo").arg("--insecure-policy").args(args).output().expect("skopeo");
    assert!(out.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_round_trips_through_a_real_registry_and_loads_in_envoy() {
    let registry = start_registry();
    let work = tempfile::tempdir().unwrap();
    let filter = "token-limiter";
    let wasm = std::fs::read(paths::wasm_path(filter).unwrap()).unwrap();
    let layout = work.path().join("layout");
    let mut ann = BTreeMap::new();
    ann.insert("org.opencontainers.image.version".to_string(), "0.0.1-test".to_string());
    let built = build_image_layout(&layout, &wasm, "0.0.1-test", &ann).unwrap();

    let reference = format!("127.0.0.1:{}/meshwarden/meshwarden-{filter}:0.0.1-test", registry.port);
    let digest_file = work.path().join("digest");
    skopeo(&[
        "copy",
        "-q",
        "--dest-tls-verify=false",
        "--digestfile",
        digest_file.to_str().unwrap(),
        &format!("oci:{}:0.0.1-test", layout.display()),
        &format!("docker://{reference}"),
    ]);
    let pushed_digest = std::fs::read_to_string(&digest_file).unwrap();
    assert_eq!(
        pushed_digest.trim(),
        built.manifest_digest,
        "the registry serves our manifest unchanged (pin by digest)"
    );

    // What the registry serves, as Istio's fetcher sees it.
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{reference}")]);
    let manifest: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(manifest["mediaType"], MANIFEST_MEDIA_TYPE);
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.last().unwrap()["mediaType"], LAYER_MEDIA_TYPE);
    assert_eq!(manifest["annotations"]["dev.meshwarden.wasm.sha256"], sha256_hex(&wasm));

    // Pull back by digest and extract plugin.wasm like Istio does.
    let pulled = work.path().join("pulled");
    let by_digest = format!("127.0.0.1:{}/meshwarden/meshwarden-{filter}@{}", registry.port, built.manifest_digest);
    skopeo(&[
        "copy",
        "-q",
        "--src-tls-verify=false",
        &format!("docker://{by_digest}"),
        &format!("oci:{}:pulled", pulled.display()),
    ]);
    let (_, plugin) = extract_plugin(&pulled).unwrap();
    assert!(plugin == wasm, "plugin.wasm pulled back is byte-identical");

    // The pulled filter loads in Envoy and serves.
    let wasm_dir = work.path().join("wasm");
    std::fs::create_dir_all(&wasm_dir).unwrap();
    std::fs::write(wasm_dir.join(format!("{filter}.wasm")), &plugin).unwrap();
    let mock = MockLlm::start().await.unwrap();
    let envoy = EnvoyBuilder::new(&format!("{filter}.yaml"))
        .upstream_port(mock.port())
        .var("WASM_DIR", wasm_dir.display().to_string())
        .start()
        .await
        .unwrap();
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(envoy.url("/v1/chat/completions"))
        .json(&serde_json::json!({"model":"m","messages":[{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
