#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

//! inference-router with real Envoy (ORIGINAL_DST cluster), the real sidecar scraping simulated vLLM
//! servers, and the real `.wasm`: picks per signal, priority shedding, header spoofing, fallbacks.

use meshwarden_integration_tests::envoy::{Envoy, EnvoyBuilder};
use meshwarden_integration_tests::model_sim::{
    lb_endpoints_yaml, pools_config_file, MetricsMode, MetricsOverride, SimConfig, SimServer,
};
use meshwarden_integration_tests::sidecar::Sidecar;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const POOL: &str = "test";

struct Setup {
    sims: Vec<SimServer>,
    sidecar: Option<Sidecar>,
    envoy: Envoy,
    _pools: tempfile::NamedTempFile,
    http: reqwest::Client,
}

fn filter_config(extra: Value) -> Value {
    let mut c = json!({"pool": POOL, "refresh_interval_ms": 50, "max_snapshot_age_ms": 500});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

async fn setup(n: usize, sim: SimConfig, cfg: Value, with_sidecar: bool) -> Setup {
    let mut sims = Vec::new();
    for id in 0..n {
        sims.push(SimServer::start(SimConfig { id, ..sim.clone() }).await.unwrap());
    }
    let addrs: Vec<_> = sims.iter().map(|s| s.addr).collect();
    let eps: Vec<String> = sims.iter().map(|s| s.endpoint()).collect();
    let pools = pools_config_file(POOL, &eps, json!({})).unwrap();
    let pools_path = pools.path().display().to_string();
    let (sidecar, port) = if with_sidecar {
        let s = Sidecar::start(&["--pools-config", &pools_path]).unwrap();
        let p = s.port();
        (Some(s), p)
    } else {
        // Nothing listens there: the sidecar is down from the start.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        drop(l);
        (None, p)
    };
    let envoy = EnvoyBuilder::new("inference-router-pool.yaml")
        .filter_config("inference-router", &filter_config(cfg))
        .var("POOL_LB_ENDPOINTS", lb_endpoints_yaml(&addrs))
        .var("SIDECAR_PORT", port.to_string())
        .start()
        .await
        .unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let s = Setup { sims, sidecar, envoy, _pools: pools, http };
    if with_sidecar {
        s.wait_for_snapshot().await;
    }
    s
}

impl Setup {
    /// Until the sidecar has every endpoint fresh and the filter has adopted a snapshot.
    async fn wait_for_snapshot(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let sc = self.sidecar.as_ref().unwrap();
            let v: Value = match self.http.get(sc.url(&format!("/v1/pools/{POOL}/endpoints"))).send().await {
                Ok(r) if r.status() == 200 => r.json().await.unwrap_or(Value::Null),
                _ => Value::Null,
            };
            let fresh = v["eps"].as_array().map(|a| a.iter().filter(|e| e["f"] == true).count()).unwrap_or(0);
            let updates = self.envoy.stat("meshwarden.inference_router.snapshot.updates").await.unwrap_or(0);
            if fresh == self.sims.len() && updates > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "no fresh snapshot: {v} updates={updates}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Let a metrics change reach the filter: scrape (50 ms) + publish (50 ms) + refresh tick (50 ms).
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    async fn send(&self, model: &str, prompt: &str, headers: &[(&str, &str)]) -> (u16, Option<usize>, String) {
        let body = json!({"model": model, "messages": [{"role":"user","content": prompt}], "max_tokens": 2});
        let mut rb = self.http.post(self.envoy.url("/v1/chat/completions")).json(&body);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.timeout(Duration::from_secs(20)).send().await.unwrap();
        let status = r.status().as_u16();
        let sim = r.headers().get("x-sim-endpoint").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let text = r.text().await.unwrap();
        (status, sim, format!("{text}{}", retry.map(|r| format!(" retry-after={r}")).unwrap_or_default()))
    }

    fn set(&self, i: usize, o: MetricsOverride) {
        self.sims[i].set_override(Some(o));
    }

    async fn stat(&self, s: &str) -> u64 {
        self.envoy.stat(&format!("meshwarden.inference_router.{s}")).await.unwrap()
    }
}

fn load(waiting: u32, running: u32, kv: f64) -> MetricsOverride {
    MetricsOverride { waiting, running, kv, ..Default::default() }
}

fn fast() -> SimConfig {
    SimConfig { prefill_us_per_token: 1.0, decode_step_us: 1000.0, decode_us_per_seq: 0.0, ..Default::default() }
}

#[tokio::test]
async fn picks_follow_queue_kv_lora_and_prefix() {
    let s = setup(3, fast(), json!({}), true).await;
    // Queue: endpoint 1 has the fewest outstanding requests.
    s.set(0, load(4, 8, 0.3));
    s.set(1, load(0, 1, 0.3));
    s.set(2, load(3, 8, 0.3));
    s.settle().await;
    let (st, sim, body) = s.send("base", "hello", &[]).await;
    assert_eq!((st, sim), (200, Some(1)), "{body}");

    // KV: equal queues, endpoint 2 has the emptiest cache.
    s.set(0, load(0, 2, 0.7));
    s.set(1, load(0, 2, 0.5));
    s.set(2, load(0, 2, 0.1));
    s.settle().await;
    let (st, sim, body) = s.send("base", "hello", &[]).await;
    assert_eq!((st, sim), (200, Some(2)), "{body}");

    // LoRA: adapter loaded on 2; a new adapter goes where a slot is free (1).
    let lora = |running: &[&str]| MetricsOverride {
        waiting: 0,
        running: 2,
        kv: 0.3,
        lora_running: running.iter().map(|s| s.to_string()).collect(),
        lora_waiting: vec![],
    };
    s.set(0, lora(&["x", "y", "u", "v"]));
    s.set(1, lora(&["z"]));
    s.set(2, lora(&["q", "w", "e", "r"]));
    s.settle().await;
    let (st, sim, body) = s.send("q", "hello", &[]).await;
    assert_eq!((st, sim), (200, Some(2)), "{body}");
    s.settle().await;
    let (st, sim, body) = s.send("brand-new-adapter", "hello", &[]).await;
    assert_eq!((st, sim), (200, Some(1)), "{body}");

    // Prefix: equal load; the same long prompt keeps going where it went first, a slightly busier
    // endpoint notwithstanding.
    for i in 0..3 {
        s.set(i, load(0, 1, 0.2));
    }
    s.settle().await;
    let doc = "Tenant 42 handbook: refunds within 30 days; escalate fraud to tier 2. ".repeat(60);
    let (st, first, _) = s.send("base", &doc, &[]).await;
    assert_eq!(st, 200);
    let first = first.unwrap();
    s.set(first, load(0, 2, 0.2));
    s.settle().await;
    for _ in 0..5 {
        let (st, sim, _) = s.send("base", &doc, &[]).await;
        assert_eq!((st, sim), (200, Some(first)));
    }
    assert!(s.stat("prefix_hit_blocks").await >= 5 * 60, "prefix hits counted");
    assert!(s.stat("routed.scored").await >= 9);
}

#[tokio::test]
async fn sheddable_requests_get_429_when_all_saturated_critical_are_placed() {
    let s = setup(2, fast(), json!({}), true).await;
    s.set(0, load(9, 8, 0.5));
    s.set(1, load(2, 8, 0.95));
    s.settle().await;
    let (st, _, body) = s.send("base", "hi", &[("x-gateway-inference-priority", "sheddable")]).await;
    assert_eq!(st, 429, "{body}");
    let v: Value = serde_json::from_str(body.split(" retry-after=").next().unwrap()).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(body.ends_with("retry-after=1"), "{body}");
    let (st, _, body) = s.send("base", "hi", &[("x-gateway-inference-priority", "-3")]).await;
    assert_eq!(st, 429, "{body}");
    let (st, _, body) = s.send("base", "hi", &[("x-gateway-inference-priority", "critical")]).await;
    assert_eq!(st, 200, "{body}");
    let (st, _, body) = s.send("base", "hi", &[]).await;
    assert_eq!(st, 200, "standard requests are placed too: {body}");
    let (st, _, _) = s.send("base", "hi", &[("x-gateway-inference-priority", "urgent!!")]).await;
    assert_eq!(st, 200, "unparsable priority = default (standard)");
    assert_eq!(s.stat("shed").await, 2);
    assert_eq!(s.stat("bad_priority").await, 1);
    assert!(s.stat("routed.all_saturated").await >= 3);
    // One endpoint recovers: sheddable requests go there.
    s.set(1, load(0, 1, 0.2));
    s.settle().await;
    let (st, sim, body) = s.send("base", "hi", &[("x-gateway-inference-priority", "sheddable")]).await;
    assert_eq!((st, sim), (200, Some(1)), "{body}");
}

#[tokio::test]
async fn client_cannot_choose_the_endpoint() {
    let s = setup(2, fast(), json!({}), true).await;
    s.set(0, load(4, 8, 0.6));
    s.set(1, load(0, 0, 0.1));
    s.settle().await;
    let spoofs = [s.sims[0].endpoint(), "127.0.0.1:1".to_string(), "10.255.255.1:80".to_string()];
    for spoof in &spoofs {
        let (st, sim, body) = s.send("base", "hi", &[("x-gateway-destination-endpoint", spoof)]).await;
        assert_eq!((st, sim), (200, Some(1)), "spoofed {spoof}: {body}");
    }
    // Also on a request without a body (decided in the headers callback).
    let r = s
        .http
        .get(s.envoy.url("/metrics"))
        .header("x-gateway-destination-endpoint", "127.0.0.1:1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A `model` that cannot be a header value (CR/LF, other control bytes) is routed without the model
/// header; copying it made Envoy answer its own 503 "invalid header value for: x-gateway-model-name".
#[tokio::test]
async fn a_model_that_is_not_a_header_value_is_routed_without_the_model_header() {
    let s = setup(2, fast(), json!({}), true).await;
    let (st, sim, body) = s.send("base\r\nx-injected: yes", "hi", &[]).await;
    assert_eq!(st, 200, "{body}");
    assert!(sim.is_some(), "served by a model server: {body}");
    assert_eq!(s.stat("model_not_a_header_value").await, 1);
    let (st, sim, body) = s.send("base", "hi", &[]).await;
    assert_eq!((st, sim.is_some()), (200, true), "{body}");
    assert_eq!(s.stat("model_not_a_header_value").await, 1);
}

#[tokio::test]
async fn sidecar_down_falls_back_to_least_in_flight_and_recovers() {
    let mut s = setup(3, fast(), json!({}), true).await;
    let (st, _, _) = s.send("base", "hi", &[]).await;
    assert_eq!(st, 200);
    s.sidecar.as_mut().unwrap().kill();
    // Past max_snapshot_age_ms (500): every request still succeeds, on the fallback policy.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (st, sim, body) = s.send("base", "hi", &[]).await;
        assert_eq!(st, 200, "{body}");
        served.insert(sim.unwrap());
    }
    assert!(s.stat("routed.stale").await >= 6);
    assert!(s.stat("snapshot.failures.timeout").await + s.stat("snapshot.failures.status").await > 0);
    // Back up: scored routing resumes.
    s.sidecar.as_mut().unwrap().restart().unwrap();
    s.wait_for_snapshot().await;
    s.settle().await;
    let before = s.stat("routed.scored").await;
    let (st, _, _) = s.send("base", "hi", &[]).await;
    assert_eq!(st, 200);
    assert_eq!(s.stat("routed.scored").await, before + 1);
}

/// A snapshot answer cut after its headers is a failed refresh (`snapshot.failures.timeout`); it used to
/// panic the VM in its tick (the SDK's header read fails for a call Envoy reports without headers).
#[tokio::test]
async fn a_snapshot_answer_cut_mid_body_is_a_failed_refresh_not_a_dead_vm() {
    let (port, task) = meshwarden_integration_tests::faulty::server_that_cuts_its_answers().await;
    let sim = SimServer::start(SimConfig { id: 0, ..fast() }).await.unwrap();
    let envoy = EnvoyBuilder::new("inference-router-pool.yaml")
        .filter_config("inference-router", &filter_config(json!({})))
        .var("POOL_LB_ENDPOINTS", lb_endpoints_yaml(&[sim.addr]))
        .var("SIDECAR_PORT", port.to_string())
        .start()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while envoy.stat("meshwarden.inference_router.snapshot.failures.timeout").await.unwrap_or(0) < 3 {
        assert!(Instant::now() < deadline, "no failed refreshes counted:\n{}", envoy.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for i in 0..3 {
        let body = json!({"model": "base", "messages": [{"role":"user","content": "hi"}], "max_tokens": 2});
        let r = http.post(envoy.url("/v1/chat/completions")).json(&body).timeout(Duration::from_secs(5)).send().await;
        let r = r.unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status(), 200, "request {i}");
    }
    assert!(!envoy.log().contains("panicked"), "{}", envoy.log());
    task.abort();
}

#[tokio::test]
async fn no_sidecar_ever_passthrough_to_envoy_load_balancer() {
    let s = setup(2, fast(), json!({}), false).await;
    for _ in 0..4 {
        let (st, sim, body) = s.send("base", "hi", &[("x-gateway-destination-endpoint", "127.0.0.1:1")]).await;
        assert_eq!(st, 200, "{body}");
        assert!(sim.is_some());
    }
    assert_eq!(s.stat("passthrough.no_snapshot").await, 4);
}

#[tokio::test]
async fn stale_metrics_never_make_a_healthy_pool_look_saturated() {
    // The llm-d failure: one healthy endpoint whose last metrics said "saturated".
    let s = setup(1, fast(), json!({}), true).await;
    s.set(0, load(50, 8, 0.99));
    s.settle().await;
    let (st, _, body) = s.send("base", "hi", &[("x-gateway-inference-priority", "sheddable")]).await;
    assert_eq!(st, 429, "fresh evidence of saturation sheds: {body}");
    // Scrapes now hang: the sidecar marks the endpoint stale (stale_after_ms 300); the old
    // "saturated" values must neither shed nor delay requests.
    s.sims[0].set_metrics_mode(MetricsMode::Hang);
    tokio::time::sleep(Duration::from_millis(800)).await;
    for _ in 0..5 {
        let start = Instant::now();
        let (st, sim, body) = s.send("base", "hi", &[("x-gateway-inference-priority", "sheddable")]).await;
        assert_eq!((st, sim), (200, Some(0)), "{body}");
        assert!(start.elapsed() < Duration::from_secs(5), "a request was held: {:?}", start.elapsed());
    }
    assert!(s.stat("routed.stale").await >= 5);
    s.sims[0].set_metrics_mode(MetricsMode::Normal);
}

#[tokio::test]
async fn sidecar_snapshot_api_etag_dns_and_staleness() {
    let a = SimServer::start(SimConfig { id: 0, old_kv_metric_name: true, ..fast() }).await.unwrap();
    let b = SimServer::start(SimConfig { id: 1, ..fast() }).await.unwrap();
    a.set_override(Some(MetricsOverride { waiting: 3, running: 2, kv: 0.456, ..Default::default() }));
    let pools = pools_config_file(
        POOL,
        &[a.endpoint()],
        json!({"dns": [{"host": "localhost", "port": b.addr.port(), "family": "ipv4"}], "resolve_interval_ms": 200}),
    )
    .unwrap();
    let sc = Sidecar::start(&["--pools-config", &pools.path().display().to_string()]).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = sc.url(&format!("/v1/pools/{POOL}/endpoints"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let v: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        if v["eps"].as_array().is_some_and(|e| e.len() == 2 && e.iter().all(|e| e["f"] == true)) {
            break v;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ea = v["eps"].as_array().unwrap().iter().find(|e| e["a"] == a.endpoint().as_str()).unwrap().clone();
    assert_eq!((ea["w"].as_u64(), ea["r"].as_u64()), (Some(3), Some(2)));
    assert!((ea["kv"].as_f64().unwrap() - 0.46).abs() < 1e-6, "older vLLM KV name read and rounded: {ea}");
    assert_eq!(ea["ml"], 4);
    assert_eq!(ea["m"], json!(["base"]));
    assert!(v["eps"].as_array().unwrap().iter().any(|e| e["a"] == b.endpoint().as_str()), "found through DNS");
    // ETag: unchanged snapshot -> 304 without body.
    let r = http.get(&url).send().await.unwrap();
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let version = r.json::<Value>().await.unwrap()["version"].as_u64().unwrap();
    assert_eq!(etag, format!("\"{version}\""));
    let r = http.get(&url).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 304);
    assert!(r.bytes().await.unwrap().is_empty());
    // A change: new version, 200.
    a.set_override(Some(MetricsOverride { waiting: 7, running: 2, kv: 0.456, ..Default::default() }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = http.get(&url).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["version"].as_u64().unwrap() > version);
    // Failing scrapes: stale after stale_after_ms (300).
    a.set_metrics_mode(MetricsMode::Fail);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let v: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    let ea = v["eps"].as_array().unwrap().iter().find(|e| e["a"] == a.endpoint().as_str()).unwrap().clone();
    assert_eq!(ea["f"], false, "{v}");
    let r = http.get(sc.url("/v1/pools/nope/endpoints")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let list: Value = http.get(sc.url("/v1/pools")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["pools"][0]["pool"], POOL);
    let m = http.get(sc.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("meshwarden_sidecar_endpoint_scrapes_total{pool=\"test\",result=\"ok\"}"), "{m}");
    assert!(m.contains("result=\"status\""), "{m}");
}

#[tokio::test]
async fn invalid_config_is_rejected_with_the_field() {
    let log = EnvoyBuilder::new("inference-router-pool.yaml")
        .filter_config("inference-router", &json!({"weights": {"prefix": -1}}))
        .var("POOL_LB_ENDPOINTS", lb_endpoints_yaml(&["127.0.0.1:9".parse().unwrap()]))
        .var("SIDECAR_PORT", "9")
        .start_expect_failure()
        .await
        .unwrap();
    assert!(log.contains("weights.prefix"), "{log}");
}

#[tokio::test]
async fn sidecar_rejects_a_bad_pools_config() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), r#"{"pools":[{"name":"p","endpoints":["not-an-address"]}]}"#).unwrap();
    let err = Sidecar::start(&["--pools-config", &f.path().display().to_string()]).err().unwrap();
    assert!(err.to_string().contains("pools[0].endpoints[0]"), "{err}");
}

#[tokio::test]
async fn without_allow_on_headers_stop_iteration_requests_are_released_not_stalled() {
    // The same template minus the flag: Envoy never delivers the body while headers are held.
    let template = std::fs::read_to_string(
        meshwarden_integration_tests::paths::repo_root().join("envoy-configs/inference-router-pool.yaml"),
    )
    .unwrap();
    let stripped: String =
        template.lines().filter(|l| !l.contains("allow_on_headers_stop_iteration")).map(|l| format!("{l}\n")).collect();
    assert_ne!(stripped, template);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noflag.yaml");
    std::fs::write(&path, stripped).unwrap();
    let sim = SimServer::start(fast()).await.unwrap();
    let envoy = EnvoyBuilder::new(path.to_str().unwrap())
        .filter_config("inference-router", &filter_config(json!({})))
        .var("POOL_LB_ENDPOINTS", lb_endpoints_yaml(&[sim.addr]))
        .var("SIDECAR_PORT", "9")
        .start()
        .await
        .unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for _ in 0..3 {
        let r = http
            .post(envoy.url("/v1/chat/completions"))
            .json(&json!({"model":"base","messages":[{"role":"user","content":"hi"}],"max_tokens":1}))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(envoy.stat("meshwarden.inference_router.released_without_body").await.unwrap() >= 1);
    assert!(envoy.log().contains("allow_on_headers_stop_iteration"));
}
