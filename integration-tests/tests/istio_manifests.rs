//! The Istio manifests users apply: every kustomization renders (`kubectl kustomize`), every WasmPlugin is
//! valid against Istio's CRD schema with no field the API server would silently drop, and every
//! `pluginConfig` is accepted by the filter it configures (the real `.wasm` loads it in Envoy and serves).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::envoy::EnvoyBuilder;
use meshwarden_integration_tests::k8s_schema::{crd_schema, validate};
use meshwarden_integration_tests::mock_llm::MockLlm;
use meshwarden_integration_tests::paths::{repo_root, FILTERS};
use serde::Deserialize;
use serde_json::{json, Value};
use std::process::Command;

const OVERLAYS: [&str; 3] = ["base", "overlays/ambient-waypoint", "overlays/redis"];

fn render(dir: &str) -> Vec<Value> {
    let path = repo_root().join("istio").join(dir);
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(&path)
        .output()
        .expect("kubectl (apt-get install kubectl; make test installs it)");
    assert!(out.status.success(), "kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap()).collect()
}

/// Istio's WasmPlugin CRD. A copy lives in the repository (so a clone anywhere can run this test); when the
/// team's reference shelf (`../shared/schemas/`) is beside the checkout, the copy must match it.
fn schema() -> Value {
    let vendored = repo_root().join("integration-tests/schemas/istio-wasmplugin-crd.yaml");
    let text = std::fs::read_to_string(&vendored).unwrap_or_else(|e| panic!("{}: {e}", vendored.display()));
    if let Some(shelf) = repo_root().parent().map(|p| p.join("shared/schemas/istio-wasmplugin-crd.yaml")) {
        if let Ok(reference) = std::fs::read_to_string(&shelf) {
            assert_eq!(text, reference, "{} differs from {}: update the copy", vendored.display(), shelf.display());
        }
    }
    let crd: Value = serde_yaml::from_str(&text).unwrap();
    crd_schema(&crd, "v1alpha1").unwrap()
}

fn wasm_plugins(docs: &[Value]) -> Vec<&Value> {
    docs.iter().filter(|d| d["kind"] == "WasmPlugin").collect()
}

#[test]
fn every_wasmplugin_is_valid_against_the_crd() {
    let schema = schema();
    for overlay in OVERLAYS {
        let docs = render(overlay);
        let plugins = wasm_plugins(&docs);
        assert_eq!(plugins.len(), FILTERS.len(), "{overlay}: one WasmPlugin per filter");
        for p in plugins {
            let name = p["metadata"]["name"].as_str().unwrap();
            assert_eq!(p["apiVersion"], "extensions.istio.io/v1alpha1", "{overlay}/{name}");
            let errors = validate(&schema, &json!({"spec": p["spec"]}));
            assert!(errors.is_empty(), "{overlay}/{name}:\n{}", errors.join("\n"));
            let url = p["spec"]["url"].as_str().unwrap();
            assert!(
                url.starts_with("oci://")
                    && url.contains(&format!("meshwarden-{}", name.trim_start_matches("meshwarden-"))),
                "{url}"
            );
            if overlay.contains("ambient") {
                assert!(p["spec"].get("selector").is_none() && p["spec"]["targetRefs"].is_array(), "{name}");
            }
        }
        // The release ConfigMap is local-config: used by kustomize, never applied.
        assert!(!docs.iter().any(|d| d["metadata"]["name"] == "meshwarden-release"), "{overlay}");
    }
}

#[test]
fn a_typo_in_a_manifest_is_caught() {
    let schema = schema();
    let mut p = wasm_plugins(&render("base"))[0].clone();
    let config = p["spec"]["pluginConfig"].take();
    p["spec"]["pluginconfig"] = config;
    let errors = validate(&schema, &json!({"spec": p["spec"]}));
    assert!(errors.iter().any(|e| e.contains("$.spec.pluginconfig: unknown field")), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_plugin_config_is_accepted_by_its_filter() {
    let mock = MockLlm::start().await.unwrap();
    for overlay in OVERLAYS {
        for p in wasm_plugins(&render(overlay)) {
            let filter = p["spec"]["pluginName"].as_str().unwrap().replace('_', "-");
            assert!(FILTERS.contains(&filter.as_str()), "{filter}");
            let config = p["spec"].get("pluginConfig").cloned().unwrap_or(json!({}));
            // A configuration that reads its sidecar token from the VM's environment (the redis overlay)
            // gets the variable as the gateway's Secret would give it (`vmConfig.env` valueFrom HOST).
            let builder = if let Some(name) = config.get("sidecar_token_env") {
                let passed = p["spec"]["vmConfig"]["env"]
                    .as_array()
                    .is_some_and(|env| env.iter().any(|v| v["name"] == *name && v["valueFrom"] == "HOST"));
                assert!(passed, "{overlay}: {filter} reads {name} but vmConfig.env does not pass it from the host");
                let sidecar_gets_it = render(overlay).iter().any(|d| {
                    d["kind"] == "Deployment"
                        && d["spec"]["template"]["spec"]["containers"][0]["env"]
                            .as_array()
                            .is_some_and(|env| env.iter().any(|v| v["name"] == "MESHWARDEN_SIDECAR_API_TOKEN"))
                });
                assert!(sidecar_gets_it, "{overlay}: the sidecar does not get --api-token");
                EnvoyBuilder::new("token-limiter-sidecar.yaml")
                    .var("SIDECAR_PORT", "9")
                    .env(config["sidecar_token_env"].as_str().unwrap(), "a-test-token")
            } else if let Some(name) = config.get("event_id_key_env") {
                // mcp-authz keying its event id tags with a secret shared by the replicas (the redis overlay).
                let passed = p["spec"]["vmConfig"]["env"]
                    .as_array()
                    .is_some_and(|env| env.iter().any(|v| v["name"] == *name && v["valueFrom"] == "HOST"));
                assert!(passed, "{overlay}: {filter} reads {name} but vmConfig.env does not pass it from the host");
                EnvoyBuilder::new(&format!("{filter}.yaml")).env(name.as_str().unwrap(), "a-test-secret-0123456789")
            } else {
                EnvoyBuilder::new(&format!("{filter}.yaml"))
            };
            let envoy = builder
                .upstream_port(mock.port())
                .filter_config(&filter, &config)
                .start()
                .await
                .unwrap_or_else(|e| panic!("{overlay}: {filter} rejects its pluginConfig: {e:#}"));
            let resp =
                reqwest::Client::builder().no_proxy().build().unwrap().get(envoy.url("/healthz")).send().await.unwrap();
            assert!(resp.status().as_u16() < 500 || resp.status() == 503, "{filter}: {}", resp.status());
        }
    }
}

#[test]
fn the_sidecar_pools_config_in_the_configmap_is_valid_json() {
    let docs = render("base");
    let cm =
        docs.iter().find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "meshwarden-sidecar-pools").unwrap();
    let pools: Value = serde_json::from_str(cm["data"]["pools.json"].as_str().unwrap()).unwrap();
    assert_eq!(pools["pools"][0]["name"], "vllm-llama");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envoy_gateway_policy_configs_are_accepted() {
    let path = repo_root().join("envoy-configs/envoy-gateway/meshwarden-extension-policy.yaml");
    let policy: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(policy["kind"], "EnvoyExtensionPolicy");
    let mock = MockLlm::start().await.unwrap();
    let wasm = policy["spec"]["wasm"].as_array().unwrap();
    assert!(wasm.len() >= 4);
    for w in wasm {
        let filter = w["rootID"].as_str().unwrap().replace('_', "-");
        assert!(FILTERS.contains(&filter.as_str()), "{filter}");
        EnvoyBuilder::new(&format!("{filter}.yaml"))
            .upstream_port(mock.port())
            .filter_config(&filter, &w["config"])
            .start()
            .await
            .unwrap_or_else(|e| panic!("{filter} rejects its Envoy Gateway config: {e:#}"));
    }
}
