//! token-limiter in `sidecar` state mode: real Envoy + the real `.wasm` + the real `meshwarden-sidecar`
//! binary, with the memory backend and with a real `redis-server`: one semantics for both backends,
//! two Envoys (and two sidecar replicas) sharing one budget through Redis, the sidecar killed mid-test
//! (failure_mode allow and deny), Redis restarted, and concurrency leases released on client aborts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::envoy::{Envoy, EnvoyBuilder};
use meshwarden_integration_tests::mock_llm::MockLlm;
use meshwarden_integration_tests::redis_server::RedisServer;
use meshwarden_integration_tests::sidecar::Sidecar;
use meshwarden_shared::llm::{estimate_request_tokens, extract_request_texts, Api};
use serde_json::{json, Value};
use std::time::Duration;

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn config(failure_mode: &str, limit_per_hour: u64) -> Value {
    json!({"state":"sidecar",
           "sidecar":{"cluster":"meshwarden_sidecar","timeout_ms":200,"failure_mode":failure_mode},
           "settle_interval_ms": 10,
           "rules":[{"name":"team","key":{"header":"x-team"},"limits":{"tokens_per_hour":limit_per_hour}},
                    {"name":"conc","key":{"header":"x-team"},"model":"slow-*","max_concurrent_requests":2}]})
}

/// For the tests of a budget shared through Redis (not of timeouts): on a loaded CI machine (load average
/// 10-13) a Redis call outlasted the default `--redis-timeout-ms` and the 200 ms callout timeout, and
/// `failure_mode: deny` answered 503 where the test counts 200s and 429s.
fn patient_redis_sidecar(redis: &RedisServer) -> Sidecar {
    Sidecar::start(&["--redis-url", &redis.url(), "--redis-timeout-ms", "1500"]).unwrap()
}

fn patient_config(limit_per_hour: u64) -> Value {
    let mut cfg = config("deny", limit_per_hour);
    cfg["sidecar"]["timeout_ms"] = json!(2000);
    cfg
}

async fn envoy(mock: &MockLlm, sidecar_port: u16, cfg: &Value) -> Envoy {
    EnvoyBuilder::new("token-limiter-sidecar.yaml")
        .upstream_port(mock.port())
        .var("SIDECAR_PORT", sidecar_port.to_string())
        .filter_config("token-limiter", cfg)
        .start()
        .await
        .unwrap()
}

fn body() -> Value {
    json!({"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"Share one budget across gateways."}]})
}

fn cost() -> u64 {
    estimate_request_tokens(&extract_request_texts(Api::OpenAiChat, &body())) + 50
}

async fn send(e: &Envoy, team: &str) -> reqwest::Response {
    client()
        .post(e.url("/v1/chat/completions"))
        .header("x-team", team)
        .header("x-mock-completion-tokens", "50")
        .json(&body())
        .send()
        .await
        .unwrap()
}

fn hdr(r: &reqwest::Response, n: &str) -> Option<String> {
    r.headers().get(n).map(|v| v.to_str().unwrap().to_string())
}

/// Sends until the first 429; returns (admitted, the 429).
async fn drain(envoys: &[&Envoy], team: &str) -> (u64, reqwest::Response) {
    for (admitted, i) in (0u64..).zip(0..100) {
        let r = send(envoys[i % envoys.len()], team).await;
        if r.status() == 429 {
            return (admitted, r);
        }
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        let _ = r.text().await;
        // Settlements are batched every 10 ms; actual == reserved here, so no need to wait for them.
    }
    panic!("never limited");
}

async fn budget_case(sidecar: &Sidecar) {
    let mock = MockLlm::start().await.unwrap();
    let limit = 1000;
    let e = envoy(&mock, sidecar.port(), &config("deny", limit)).await;
    // remaining goes down
    let r1 = send(&e, "a").await;
    let rem1: u64 = hdr(&r1, "x-ratelimit-remaining-tokens").unwrap().parse().unwrap();
    let _ = r1.text().await;
    let r2 = send(&e, "a").await;
    let rem2: u64 = hdr(&r2, "x-ratelimit-remaining-tokens").unwrap().parse().unwrap();
    let _ = r2.text().await;
    assert_eq!(rem1, limit - cost());
    assert!(rem2 < rem1 && rem1 - rem2 >= cost() - 1, "{rem1} -> {rem2}");
    let (admitted, denied) = drain(&[&e], "a").await;
    assert_eq!(admitted + 2, limit / cost());
    let retry_ms: u64 = hdr(&denied, "retry-after-ms").unwrap().parse().unwrap();
    let rem: u64 = hdr(&denied, "x-ratelimit-remaining-tokens").unwrap().parse().unwrap();
    // exact: (cost - remaining) tokens at limit/3600 s per token, up to one token of flooring.
    let per_token_ms = 3_600_000 / limit;
    let expected = (cost() - rem) * per_token_ms;
    assert!(retry_ms <= expected && retry_ms + per_token_ms >= expected, "{retry_ms} vs {expected}");
    let v: Value = denied.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(e.stat("meshwarden.token_limiter.callout_failures").await.unwrap(), 0);
    let metrics = client().get(sidecar.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("meshwarden_sidecar_ratelimit_decisions_total{result=\"denied_tokens\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_memory_backend_limits_like_local_mode() {
    let sidecar = Sidecar::start(&[]).unwrap();
    budget_case(&sidecar).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_redis_backend_limits_like_local_mode() {
    let redis = RedisServer::start().unwrap();
    let sidecar = Sidecar::start(&["--redis-url", &redis.url()]).unwrap();
    budget_case(&sidecar).await;
}

/// The sidecar API itself: the same sequence of reserve/settle calls gives the same answers on both
/// backends (per-day windows, so refill between calls is negligible).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_redis_backends_answer_the_same() {
    let redis = RedisServer::start().unwrap();
    let mem = Sidecar::start(&[]).unwrap();
    let red = Sidecar::start(&["--redis-url", &redis.url()]).unwrap();
    let steps: Vec<(&str, Value)> = vec![
        (
            "reserve",
            json!({"groups":[{"key":"t","windows":[{"limit":1000,"window_ms":86400000},{"limit":300,"window_ms":3600000}],"cost":120}]}),
        ),
        (
            "reserve",
            json!({"groups":[{"key":"t","windows":[{"limit":1000,"window_ms":86400000},{"limit":300,"window_ms":3600000}],"cost":120}]}),
        ),
        (
            "reserve",
            json!({"groups":[{"key":"t","windows":[{"limit":1000,"window_ms":86400000},{"limit":300,"window_ms":3600000}],"cost":120}]}),
        ),
        (
            "settle",
            json!({"items":[{"key":"t","windows":[{"limit":1000,"window_ms":86400000},{"limit":300,"window_ms":3600000}],"delta":-100}]}),
        ),
        (
            "reserve",
            json!({"groups":[{"key":"t","windows":[{"limit":1000,"window_ms":86400000},{"limit":300,"window_ms":3600000}],"cost":120}]}),
        ),
        (
            "reserve",
            json!({"groups":[{"key":"u","windows":[{"limit":100,"window_ms":86400000}],"cost":10,"concurrency":{"max":1,"lease_id":"a"}},
                                     {"key":"t","windows":[{"limit":1000,"window_ms":86400000}],"cost":5000}]}),
        ),
        (
            "reserve",
            json!({"groups":[{"key":"u","windows":[{"limit":100,"window_ms":86400000}],"cost":10,"concurrency":{"max":1,"lease_id":"b"}}]}),
        ),
        (
            "reserve",
            json!({"groups":[{"key":"u","windows":[{"limit":100,"window_ms":86400000}],"cost":10,"concurrency":{"max":1,"lease_id":"c"}}]}),
        ),
        ("settle", json!({"items":[{"key":"u","windows":[],"delta":0,"release_lease":"b"}]})),
        (
            "reserve",
            json!({"groups":[{"key":"u","windows":[{"limit":100,"window_ms":86400000}],"cost":10,"concurrency":{"max":1,"lease_id":"d"}}]}),
        ),
        ("reserve", json!({"groups":[{"key":"v","windows":[{"limit":10,"window_ms":86400000}],"cost":11}]})),
        // A denial tries every group: w1 and w3 (both spent) deny, w2 is reserved and refunded.
        ("reserve", json!({"groups":[{"key":"w1","windows":[{"limit":100,"window_ms":86400000}],"cost":100}]})),
        ("reserve", json!({"groups":[{"key":"w3","windows":[{"limit":50,"window_ms":86400000}],"cost":50}]})),
        (
            "reserve",
            json!({"groups":[{"key":"w1","windows":[{"limit":100,"window_ms":86400000}],"cost":10},
                             {"key":"w2","windows":[{"limit":100,"window_ms":86400000}],"cost":10},
                             {"key":"w3","windows":[{"limit":50,"window_ms":86400000}],"cost":20}]}),
        ),
        ("reserve", json!({"groups":[{"key":"w2","windows":[{"limit":100,"window_ms":86400000}],"cost":10}]})),
    ];
    let mut answers = [Vec::new(), Vec::new()];
    for (i, s) in [&mem, &red].iter().enumerate() {
        for (op, req) in &steps {
            let r = client().post(s.url(&format!("/v1/ratelimit/{op}"))).json(req).send().await.unwrap();
            assert!(r.status().is_success(), "{op}: {}", r.status());
            let mut v: Value = if *op == "reserve" { r.json().await.unwrap() } else { Value::Null };
            // reset_ms / retry_after_ms drift by the milliseconds between calls; compare them coarsely.
            if let Some(groups) = v["groups"].as_array_mut() {
                for g in groups {
                    if let Some(ws) = g["windows"].as_array_mut() {
                        for w in ws {
                            w["reset_ms"] = json!(w["reset_ms"].as_u64().unwrap().div_ceil(60_000));
                            w["retry_after_ms"] = json!(w["retry_after_ms"].as_u64().unwrap().div_ceil(60_000));
                        }
                    }
                }
            }
            answers[i].push(v);
        }
    }
    assert_eq!(answers[0], answers[1]);
    let allowed: Vec<Value> = answers[0].iter().map(|v| v["allowed"].clone()).collect();
    assert_eq!(
        allowed,
        vec![
            json!(true),
            json!(true),
            json!(false),
            Value::Null,
            json!(true),
            json!(false),
            json!(true),
            json!(false),
            Value::Null,
            json!(true),
            json!(false),
            json!(true),
            json!(true),
            json!(false),
            json!(true)
        ],
        "{:#?}",
        answers[0]
    );
    assert_eq!(answers[0][10]["groups"][0]["never"], true);
    let probe = &answers[0][13];
    assert_eq!(probe["denied_group"], 0, "{probe}");
    let allowed: Vec<Value> = probe["groups"].as_array().unwrap().iter().map(|g| g["allowed"].clone()).collect();
    assert_eq!(allowed, [json!(false), json!(true), json!(false)], "{probe}");
    // w3 (20 tokens at 50/day) waits 4x longer than w1 (10 at 100/day); minutes, rounded up.
    assert_eq!(
        (
            probe["groups"][0]["windows"][0]["retry_after_ms"].clone(),
            probe["groups"][2]["windows"][0]["retry_after_ms"].clone()
        ),
        (json!(144), json!(576))
    );
    assert_eq!(answers[0][14]["groups"][0]["windows"][0]["remaining"], 90, "w2 refunded after the probe");
}

/// Odd numbers get one answer from both backends: the same calls (limits of 0 and of 15 to 20 digits,
/// windows of 0 ms, a cost and a debt of 2^64 - 1 tokens, a concurrency limit of 0, a lease of 2^64 - 1 ms,
/// keys with Redis hash-tag braces) answer the same status and the same body on memory and on a real
/// Redis. The Lua script computed in doubles and wrote numbers with Lua's 14 significant digits: windows
/// whose limits differ past the 14th digit shared one state on Redis (one was denied a budget it had on
/// memory), `remaining` / `retry_after_ms` past 2^63 came back as 0 (a limit of 0 was denied with "retry
/// after 0 ms"), a concurrency `max` of 0 meant "no limit" on Redis and "nothing" on memory, and a lease
/// over 292 million years failed the script (503). Calls a backend cannot answer exactly are now refused
/// (400) before either backend sees them, and Redis's script gets integers computed by the shared GCRA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_numbers_get_the_same_answer_from_memory_and_redis() {
    let redis = RedisServer::start().unwrap();
    let mem = Sidecar::start(&[]).unwrap();
    let red = Sidecar::start(&["--redis-url", &redis.url()]).unwrap();
    let day = 86_400_000u64;
    let max = u64::MAX;
    let w = |limit: u64, window_ms: u64| json!({"limit": limit, "window_ms": window_ms});
    let res = |key: &str, windows: Value, cost: u64| json!({"groups":[{"key":key,"windows":windows,"cost":cost}]});
    let steps: Vec<(&str, Value)> = vec![
        // 0: a limit of 0; 1: a window of 0 ms.
        ("reserve", res("zero", json!([w(0, day)]), 1)),
        ("reserve", res("zero-w", json!([w(100, 0)]), 1)),
        // 2, 3: limits that differ past the 14th digit are two budgets.
        ("reserve", res("big", json!([w(100_000_000_000_001, 1000)]), 60_000_000_000_000)),
        ("reserve", res("big", json!([w(100_000_000_000_002, 1000)]), 60_000_000_000_000)),
        // 4: the largest limit; 5: the largest cost a rollback can give back (a settle's delta is an i64).
        ("reserve", res("huge", json!([w(max, day)]), 1)),
        ("reserve", res("huge-cost", json!([w(1000, day)]), i64::MAX as u64)),
        // 6, 7: the largest debt, then what is left.
        ("settle", json!({"items":[{"key":"debt","windows":[w(1000, day)],"delta":i64::MAX}]})),
        ("reserve", res("debt", json!([w(1000, day)]), 1)),
        // 8: a concurrency limit of 0; 9: the longest lease.
        ("reserve", json!({"groups":[{"key":"c0","windows":[],"cost":0,"concurrency":{"max":0,"lease_id":"a"}}]})),
        (
            "reserve",
            json!({"groups":[{"key":"cl","windows":[],"cost":0,"concurrency":{"max":1,"lease_id":"a","lease_ms":max}}]}),
        ),
        // 10, 11: keys and ids with hash-tag braces.
        ("reserve", res("a}:s:x", json!([w(1000, day)]), 1)),
        ("settle", json!({"items":[{"key":"a","windows":[w(1000, day)],"delta":5,"id":"x}:w"}]})),
        // 12: a cost over i64::MAX, reserved then rolled back (the second group denies); 13: what is left.
        (
            "reserve",
            json!({"groups":[{"key":"rb","windows":[w(max, day)],"cost":max},
                             {"key":"rb-deny","windows":[w(1, day)],"cost":2}]}),
        ),
        ("reserve", res("rb", json!([w(max, day)]), 0)),
    ];
    let mut answers = [Vec::new(), Vec::new()];
    for (i, s) in [&mem, &red].iter().enumerate() {
        for (op, req) in &steps {
            let r = client().post(s.url(&format!("/v1/ratelimit/{op}"))).json(req).send().await.unwrap();
            let status = r.status().as_u16();
            let mut v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null);
            if let Some(groups) = v["groups"].as_array_mut() {
                for g in groups {
                    for w in g["windows"].as_array_mut().unwrap() {
                        w["reset_ms"] = json!(w["reset_ms"].as_u64().unwrap().div_ceil(60_000));
                        w["retry_after_ms"] = json!(w["retry_after_ms"].as_u64().unwrap().div_ceil(60_000));
                    }
                }
            }
            answers[i].push((status, v));
        }
    }
    for (k, (m, r)) in answers[0].iter().zip(&answers[1]).enumerate() {
        assert_eq!(m, r, "step {k} {}: memory (left) and Redis (right) differ", steps[k].1);
    }
    let statuses: Vec<u16> = answers[0].iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [400, 400, 200, 200, 200, 200, 204, 200, 400, 400, 400, 400, 400, 200], "{:#?}", answers[0]);
    // Nothing of `rb` stays charged: a rollback gives back at most i64::MAX tokens, and a cost over it
    // left half of this budget charged (2^64 - 1 reserved, 2^63 - 1 given back).
    assert_eq!(answers[0][13].1["groups"][0]["windows"][0]["remaining"].as_u64(), Some(max), "{:?}", answers[0][13]);
    let allowed = |k: usize| answers[0][k].1["allowed"].as_bool().unwrap();
    assert!(allowed(2) && allowed(3), "two budgets: {:?}", answers[0][3]);
    // One token costs 1 µs of the day: u64::MAX * (1 - 1/86.4e9) tokens are left.
    let remaining = answers[0][4].1["groups"][0]["windows"][0]["remaining"].as_u64().unwrap();
    assert_eq!(remaining, max - max.div_ceil(86_400_000_000), "{:?}", answers[0][4]);
    assert!(!allowed(5) && answers[0][5].1["groups"][0]["never"] == json!(true));
    assert!(!allowed(7));
    // Refused calls say why.
    for k in [0, 1, 8, 9, 10, 11, 12] {
        assert!(answers[0][k].1["error"].as_str().is_some_and(|e| !e.is_empty()), "{:?}", answers[0][k]);
    }
}

/// A settlement id is remembered for `id_ttl_ms` from its first application on both backends: a resend
/// within it is skipped, one after it is applied. The memory backend restarted the id's time at every
/// resend, so a caller resending within each `id_ttl_ms` kept a settlement from ever applying again
/// while Redis (`SET NX PX`) applied it after `id_ttl_ms`: one sequence, two budgets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_id_is_remembered_from_its_first_application_on_both_backends() {
    let redis = RedisServer::start().unwrap();
    let mem = Sidecar::start(&[]).unwrap();
    let red = Sidecar::start(&["--redis-url", &redis.url()]).unwrap();
    let windows = json!([{"limit": 1000, "window_ms": 86_400_000u64}]);
    let debt = json!({"items":[{"key":"ids","windows":windows,"delta":100,"id":"r-1","id_ttl_ms":1500}]});
    let probe = json!({"groups":[{"key":"ids","windows":windows,"cost":0}]});
    let mut got = Vec::new();
    for s in [&mem, &red] {
        let settle =
            || async { client().post(s.url("/v1/ratelimit/settle")).json(&debt).send().await.unwrap().status() };
        let remaining = || async {
            let r = client().post(s.url("/v1/ratelimit/reserve")).json(&probe).send().await.unwrap();
            r.json::<Value>().await.unwrap()["groups"][0]["windows"][0]["remaining"].as_u64().unwrap()
        };
        let first = std::time::Instant::now();
        assert_eq!(settle().await, 204);
        let mut seen = vec![remaining().await];
        // Resent 900 ms later, within the id's 1500 ms: skipped.
        tokio::time::sleep(Duration::from_millis(900).saturating_sub(first.elapsed())).await;
        assert_eq!(settle().await, 204);
        seen.push(remaining().await);
        // Resent 2100 ms after the first: past its 1500 ms (within 1500 ms of the second send).
        tokio::time::sleep(Duration::from_millis(2100).saturating_sub(first.elapsed())).await;
        assert_eq!(settle().await, 204);
        seen.push(remaining().await);
        got.push(seen);
    }
    assert_eq!(got[0], got[1], "memory (left) and Redis (right)");
    assert_eq!(got[0], [900, 900, 800]);
}

/// Gateways with different `lease_ms` (a rollout that lowers it, as the docs advise) share a key's
/// concurrency slots: a lease lives its own `lease_ms` on both backends. On Redis, each reservation set the
/// expiry of the key's whole set of leases to its own lease, so a short lease taken and released after a
/// long one let the set expire with it: the long request's slot was gone and one more request was
/// admitted over `max_concurrent_requests` (the memory backend kept it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lease_does_not_end_the_longer_leases_of_its_key() {
    let redis = RedisServer::start().unwrap();
    let mem = Sidecar::start(&[]).unwrap();
    let red = Sidecar::start(&["--redis-url", &redis.url()]).unwrap();
    let slot = |lease: &str, lease_ms: u64| {
        json!({"groups":[{"key":"slots","windows":[],"cost":0,
            "concurrency":{"max":2,"lease_id":lease,"lease_ms":lease_ms}}]})
    };
    for s in [&mem, &red] {
        let call = |op: &str, body: Value| {
            let url = s.url(&format!("/v1/ratelimit/{op}"));
            async move { client().post(url).json(&body).send().await.unwrap() }
        };
        let allowed = |r: Value| r["allowed"].as_bool().unwrap();
        assert!(allowed(call("reserve", slot("long", 600_000)).await.json().await.unwrap()));
        assert!(allowed(call("reserve", slot("short", 1_000)).await.json().await.unwrap()));
        let release = json!({"items":[{"key":"slots","windows":[],"delta":0,"release_lease":"short"}]});
        assert_eq!(call("settle", release).await.status(), 204);
        // Past the short lease's expiry (and Redis's second of slack): the long one still holds its slot.
        tokio::time::sleep(Duration::from_millis(2_300)).await;
        let mut got = Vec::new();
        for lease in ["x", "y"] {
            got.push(allowed(call("reserve", slot(lease, 600_000)).await.json().await.unwrap()));
        }
        assert_eq!(
            got,
            [true, false],
            "one slot of two is free ({})",
            if std::ptr::eq(s, &mem) { "memory" } else { "redis" }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_envoys_share_one_budget_through_redis() {
    let redis = RedisServer::start().unwrap();
    let (s1, s2) = (patient_redis_sidecar(&redis), patient_redis_sidecar(&redis));
    let mock = MockLlm::start().await.unwrap();
    let limit = 1200;
    let e1 = envoy(&mock, s1.port(), &patient_config(limit)).await;
    let e2 = envoy(&mock, s2.port(), &patient_config(limit)).await;
    let (admitted, denied) = drain(&[&e1, &e2], "shared").await;
    assert_eq!(admitted, limit / cost(), "one budget across both gateways");
    assert_eq!(denied.status(), 429);
    // both gateways see it spent
    assert_eq!(send(&e1, "shared").await.status(), 429);
    assert_eq!(send(&e2, "shared").await.status(), 429);
    assert_eq!(mock.requests().len() as u64, admitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_killed_mid_test_allow_and_deny() {
    let mock = MockLlm::start().await.unwrap();
    let mut sidecar = Sidecar::start(&[]).unwrap();
    let allow = envoy(&mock, sidecar.port(), &config("allow", 100_000)).await;
    let deny = envoy(&mock, sidecar.port(), &config("deny", 100_000)).await;
    assert_eq!(send(&allow, "a").await.status(), 200);
    assert_eq!(send(&deny, "a").await.status(), 200);
    sidecar.kill();
    for _ in 0..5 {
        let r = send(&allow, "a").await;
        assert_eq!(r.status(), 200, "fail open");
        assert!(hdr(&r, "x-ratelimit-remaining-tokens").is_none(), "no budget to report");
        let r = send(&deny, "a").await;
        assert_eq!(r.status(), 503, "fail closed");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "server_error");
    }
    assert_eq!(allow.stat("meshwarden.token_limiter.failure_allowed").await.unwrap(), 5);
    assert_eq!(deny.stat("meshwarden.token_limiter.failure_denied").await.unwrap(), 5);
    assert!(deny.stat("meshwarden.token_limiter.callout_failures").await.unwrap() >= 5);
    // logged once per interval, not per request
    let lines = deny.log().matches("sidecar reserve failed").count();
    assert!((1..=2).contains(&lines), "throttled failure log: one line per worker VM per interval, got {lines}");
    sidecar.restart().unwrap();
    let mut ok = false;
    for _ in 0..40 {
        if send(&deny, "a").await.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "limiting resumes after the sidecar is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted() {
    let mut redis = RedisServer::start().unwrap();
    let sidecar = Sidecar::start(&["--redis-url", &redis.url()]).unwrap();
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, sidecar.port(), &config("deny", 100_000)).await;
    assert_eq!(send(&e, "a").await.status(), 200);
    let backend = || async { client().get(sidecar.url("/readyz/backend")).send().await.unwrap() };
    let r = backend().await;
    assert_eq!((r.status().as_u16(), r.text().await.unwrap()), (200, "redis ok".to_string()));
    redis.kill();
    let r = send(&e, "a").await;
    assert_eq!(r.status(), 503, "Redis down: the sidecar answers 503, the filter fails closed");
    let r = backend().await;
    assert_eq!(r.status(), 503, "the backend probe sees Redis down");
    assert!(r.text().await.unwrap().starts_with("redis: "));
    let r = client().get(sidecar.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the process itself stays ready (failure_mode decides)");
    redis.restart().unwrap();
    let mut ok = false;
    for _ in 0..60 {
        let r = send(&e, "a").await;
        if r.status() == 200 {
            assert!(hdr(&r, "x-ratelimit-remaining-tokens").is_some());
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the sidecar reconnects to the restarted Redis");
    assert_eq!(backend().await.status(), 200);
    let metrics = client().get(sidecar.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("meshwarden_sidecar_ratelimit_backend_errors_total{op=\"reserve\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_concurrency_leases_released_on_client_abort() {
    let redis = RedisServer::start().unwrap();
    let sidecar = Sidecar::start(&["--redis-url", &redis.url()]).unwrap();
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, sidecar.port(), &config("deny", 1_000_000)).await;
    let slow = json!({"model":"slow-model","stream":true,"messages":[{"role":"user","content":"slow"}]});
    let post = |extra: Option<&'static str>| {
        let mut r = client().post(e.url("/v1/chat/completions")).header("x-team", "c").json(&slow);
        if let Some(d) = extra {
            r = r.header("x-mock-chunk-delay-ms", d);
        }
        r.send()
    };
    for round in 0..2 {
        let a = post(Some("300")).await.unwrap();
        let b = post(Some("300")).await.unwrap();
        if b.status() != 200 {
            panic!("{}", b.text().await.unwrap());
        }
        assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
        let c = post(None).await.unwrap();
        assert_eq!(c.status(), 429, "round {round}");
        drop((a, b));
        let mut ok = false;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let x = post(None).await.unwrap();
            let st = x.status();
            let _ = x.text().await;
            if st == 200 {
                let y = post(None).await.unwrap();
                let st2 = y.status();
                let _ = y.text().await;
                if st2 == 200 {
                    ok = true;
                    break;
                }
            }
        }
        assert!(ok, "round {round}: leases not released");
        // The lease goes back with a settle call sent from on_log: let it land before the next round.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A finished request's concurrency slot is free for the very next request, not at the next settlement
/// tick: with `settle_interval_ms` at 10 s (the maximum), `max_concurrent_requests: 1` still admits back-to-back
/// requests, and token settlements still wait for the tick (the sidecar's budget shows only reservations).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_concurrency_slot_free_right_after_the_request() {
    let sidecar = Sidecar::start(&[]).unwrap();
    let mock = MockLlm::start().await.unwrap();
    let cfg = json!({"state":"sidecar",
        "sidecar":{"cluster":"meshwarden_sidecar","timeout_ms":500,"failure_mode":"deny"},
        "settle_interval_ms": 10_000,
        "rules":[{"name":"one-at-a-time","key":{"header":"x-team"},"max_concurrent_requests":1}]});
    let e = envoy(&mock, sidecar.port(), &cfg).await;
    for i in 0..20 {
        let r = send(&e, "serial").await;
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 200, "request {i} after {i} finished ones: {text}");
        // The release is its own call dispatched in on_log, right after the answer: give it that hop.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the slot is really held while a request runs.
    let slow = json!({"model":"m","stream":true,"messages":[{"role":"user","content":"slow"}]});
    let held = client()
        .post(e.url("/v1/chat/completions"))
        .header("x-team", "serial")
        .header("x-mock-chunk-delay-ms", "300")
        .json(&slow)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    assert_eq!(send(&e, "serial").await.status(), 429);
    drop(held);
}

/// The sidecar slowed to a standstill (SIGSTOP: connections are accepted by the kernel, nothing answers):
/// every request gets its `failure_mode` answer within `timeout_ms` (not later), and limiting
/// resumes without restarting Envoy once the sidecar runs again (SIGCONT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_slowed_failure_mode_within_timeout_then_recovers() {
    let mock = MockLlm::start().await.unwrap();
    let sidecar = Sidecar::start(&[]).unwrap();
    let allow = envoy(&mock, sidecar.port(), &config("allow", 100_000)).await;
    let deny = envoy(&mock, sidecar.port(), &config("deny", 100_000)).await;
    assert_eq!(send(&allow, "s").await.status(), 200);
    assert_eq!(send(&deny, "s").await.status(), 200);
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill").args([sig, &sidecar.pid().to_string()]).status().unwrap();
        assert!(ok.success());
    };
    signal("-STOP");
    for _ in 0..3 {
        for (e, want) in [(&allow, 200), (&deny, 503)] {
            let t = std::time::Instant::now();
            let r = send(e, "s").await;
            let took = t.elapsed();
            assert_eq!(r.status(), want);
            // timeout_ms is 200: never much longer than that (Envoy may also fail the call sooner, e.g.
            // when its connections to the frozen sidecar are exhausted; that is still within the timeout).
            assert!(took < Duration::from_millis(1500), "failure_mode applied late: {took:?}");
        }
    }
    assert!(allow.stat("meshwarden.token_limiter.failure_allowed").await.unwrap() >= 3);
    assert!(allow.stat("meshwarden.token_limiter.callout_failures.timeout").await.unwrap() >= 1);
    assert!(deny.stat("meshwarden.token_limiter.failure_denied").await.unwrap() >= 3);
    signal("-CONT");
    let mut ok = false;
    for _ in 0..40 {
        let r = send(&deny, "s").await;
        if r.status() == 200 && hdr(&r, "x-ratelimit-remaining-tokens").is_some() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "limiting resumes once the sidecar answers again");
}

/// A sidecar answer cut after its headers is a failed call, handled by `failure_mode` like a timeout.
/// It used to kill the filter's VM: reading `:status` of a call Envoy reports without headers fails in
/// the host, the SDK panicked, the request hung and every later one on that worker was Envoy's 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_answer_cut_mid_body_is_a_failed_call_not_a_dead_vm() {
    let (port, task) = meshwarden_integration_tests::faulty::server_that_cuts_its_answers().await;
    let mock = MockLlm::start().await.unwrap();
    for (mode, want) in [("allow", 200), ("deny", 503)] {
        let e = envoy(&mock, port, &config(mode, 1_000_000)).await;
        for i in 0..3 {
            let r = tokio::time::timeout(Duration::from_secs(5), send(&e, "a"))
                .await
                .unwrap_or_else(|_| panic!("{mode}: request {i} hangs"));
            let status = r.status().as_u16();
            let from_mock = r.headers().contains_key("x-mock-served-by");
            let text = r.text().await.unwrap();
            assert_eq!(status, want, "{mode}: request {i}: {text}");
            if mode == "allow" {
                assert!(from_mock, "allow: request {i} reaches the upstream");
            } else {
                let v: Value =
                    serde_json::from_str(&text).unwrap_or_else(|_| panic!("deny: the filter's JSON: {text}"));
                assert!(v["error"]["message"].is_string(), "{text}");
            }
        }
        assert!(e.stat("meshwarden.token_limiter.callout_failures.timeout").await.unwrap() >= 3, "{mode}");
        assert!(!e.log().contains("panicked"), "{mode}: {}", e.log());
    }
    task.abort();
}

/// A slow but live sidecar: the reserve call times out in the filter (failure_mode deny: 503) and is
/// still handled by the sidecar later, taking the request's concurrency lease. Nothing would release it
/// before `lease_ms` (10 min by default), so the filter releases it once the reserve must have been
/// handled: the key's single slot is free again within a second, not after ten minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_by_a_timed_out_reserve_is_released() {
    use meshwarden_integration_tests::faulty::{sidecar_fault_proxy, SidecarFaults};
    use std::sync::atomic::Ordering;
    let sidecar = Sidecar::start(&[]).unwrap();
    let faults = std::sync::Arc::new(SidecarFaults::default());
    let (proxy_port, proxy) = sidecar_fault_proxy(sidecar.port(), faults.clone()).await;
    let mock = MockLlm::start().await.unwrap();
    let cfg = json!({"state":"sidecar",
        "sidecar":{"cluster":"meshwarden_sidecar","timeout_ms":200,"failure_mode":"deny"},
        "settle_interval_ms": 10,
        "rules":[{"name":"one-at-a-time","key":{"header":"x-team"},"max_concurrent_requests":1}]});
    let e = envoy(&mock, proxy_port, &cfg).await;
    assert_eq!(send(&e, "t").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    faults.reserve_delay_ms.store(400, Ordering::SeqCst);
    let r = send(&e, "t").await;
    assert_eq!(r.status(), 503, "the reserve timed out: failure_mode deny");
    faults.reserve_delay_ms.store(0, Ordering::SeqCst);
    // The held reserve reaches the sidecar ~200 ms after the 503 and takes the slot; the filter's
    // release follows it (timeout + 100 ms after the failure).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let r = send(&e, "t").await;
        statuses.push(r.status().as_u16());
        let _ = r.text().await;
        if statuses.last() == Some(&200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(statuses.last(), Some(&200), "the slot stays taken: {statuses:?}");
    proxy.abort();
}

/// A client that leaves while its reserve call is in flight stays charged the whole reservation the
/// sidecar took (prompt estimate and output reservation): the filter cannot know whether the sidecar
/// admitted it, so nothing is given back. The docs said the prompt estimate only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_during_the_reserve_stays_charged_its_reservation() {
    use meshwarden_integration_tests::faulty::{sidecar_fault_proxy, SidecarFaults};
    use std::sync::atomic::Ordering;
    let sidecar = Sidecar::start(&[]).unwrap();
    let faults = std::sync::Arc::new(SidecarFaults::default());
    let (proxy_port, proxy) = sidecar_fault_proxy(sidecar.port(), faults.clone()).await;
    let mock = MockLlm::start().await.unwrap();
    let cfg = json!({"state":"sidecar",
        "sidecar":{"cluster":"meshwarden_sidecar","timeout_ms":2000,"failure_mode":"deny"},
        "settle_interval_ms": 10,
        "rules":[{"name":"team","key":{"header":"x-team"},"limits":{"tokens_per_day":100000}}]});
    let e = envoy(&mock, proxy_port, &cfg).await;
    faults.reserve_delay_ms.store(400, Ordering::SeqCst);
    let mut big = body();
    big["max_tokens"] = json!(3000);
    let left = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap()
        .post(e.url("/v1/chat/completions"))
        .header("x-team", "t")
        .json(&big)
        .send()
        .await;
    assert!(left.is_err(), "the client leaves while the reserve is held");
    // The held reserve reaches the sidecar and is admitted; settle ticks pass.
    tokio::time::sleep(Duration::from_millis(800)).await;
    faults.reserve_delay_ms.store(0, Ordering::SeqCst);
    let r = send(&e, "t").await;
    assert_eq!(r.status(), 200);
    let remaining: u64 = hdr(&r, "x-ratelimit-remaining-tokens").unwrap().parse().unwrap();
    let charged_to_the_one_that_left = 100_000 - remaining - cost();
    let estimate = cost() - 50;
    assert_eq!(charged_to_the_one_that_left, estimate + 3000, "the prompt estimate and the output reservation");
    proxy.abort();
}

/// A settle call that fails (the sidecar answers 503) is not the end of the lease it carries: the release
/// is sent again, so the key's single slot is free for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_settle_call_does_not_keep_the_slot() {
    use meshwarden_integration_tests::faulty::{sidecar_fault_proxy, SidecarFaults};
    use std::sync::atomic::Ordering;
    let sidecar = Sidecar::start(&[]).unwrap();
    let faults = std::sync::Arc::new(SidecarFaults::default());
    let (proxy_port, proxy) = sidecar_fault_proxy(sidecar.port(), faults.clone()).await;
    let mock = MockLlm::start().await.unwrap();
    let cfg = json!({"state":"sidecar",
        "sidecar":{"cluster":"meshwarden_sidecar","timeout_ms":500,"failure_mode":"deny"},
        "settle_interval_ms": 100,
        "rules":[{"name":"one-at-a-time","key":{"header":"x-team"},"max_concurrent_requests":1}]});
    let e = envoy(&mock, proxy_port, &cfg).await;
    faults.failed_settles.store(2, Ordering::SeqCst);
    let r = send(&e, "t").await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    let mut statuses = Vec::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = send(&e, "t").await;
        statuses.push(r.status().as_u16());
        let _ = r.text().await;
        if statuses.last() == Some(&200) {
            break;
        }
    }
    assert_eq!(faults.settles_refused.load(Ordering::SeqCst), 2, "both refused calls were made: {statuses:?}");
    assert_eq!(statuses.last(), Some(&200), "the release was lost: {statuses:?}");
    // The first call was made from the finished request (its answer is never seen, its release is sent
    // again from the root); the resend's failure is seen and counted.
    assert!(e.stat("meshwarden.token_limiter.settle_failures").await.unwrap() >= 1);
    proxy.abort();
}

/// Forty clients at once, spread over two Envoys with their own sidecars on one Redis: the shared budget
/// holds under concurrency (what was charged never exceeds the limit plus the refill during the run),
/// and it is not wasted (the admitted reservations fill it to within one request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_on_two_gateways_stay_within_one_budget() {
    let redis = RedisServer::start().unwrap();
    let (s1, s2) = (patient_redis_sidecar(&redis), patient_redis_sidecar(&redis));
    let mock = MockLlm::start().await.unwrap();
    let limit = 3000u64;
    let e1 = envoy(&mock, s1.port(), &patient_config(limit)).await;
    let e2 = envoy(&mock, s2.port(), &patient_config(limit)).await;
    let urls = [e1.url("/v1/chat/completions"), e2.url("/v1/chat/completions")];
    let start = std::time::Instant::now();
    let (ok, limited) = meshwarden_integration_tests::crowd::admitted_and_limited(40, 4, move |i| {
        client()
            .post(&urls[i % 2])
            .header("x-team", "crowd")
            .header("x-mock-completion-tokens", if i % 3 == 0 { "30" } else { "50" })
            .json(&body())
    })
    .await;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(ok + limited, 160);
    assert!(limited > 0, "the budget ran out");
    let mut charged = 0;
    for e in [&e1, &e2] {
        charged += e.stat("meshwarden.token_limiter.input_tokens").await.unwrap()
            + e.stat("meshwarden.token_limiter.output_tokens").await.unwrap();
    }
    let refill = (limit as f64 * secs / 3600.0).ceil() as u64;
    assert!(charged <= limit + refill, "charged {charged} > {limit} + {refill}");
    assert!(ok * cost() + cost() >= limit, "only {ok} admitted of cost {}", cost());
    assert_eq!(mock.requests().len() as u64, ok, "every admitted request and no other reached the model");
    for e in [&e1, &e2] {
        assert_eq!(e.stat("meshwarden.token_limiter.callout_failures").await.unwrap(), 0);
    }
}

/// With `--api-token`, only callers that carry it may use the rate-limit API. Before, whoever reached the
/// sidecar's port (any pod of the mesh, with the shipped Service) could refund its own budget with a
/// settle call (its key is the rule name, which a 429 names, and a hash of its own key value), spend
/// another team's, or release concurrency slots. The filter sends the token (`sidecar_token`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_api_needs_the_sidecar_token() {
    let sidecar = Sidecar::start(&["--api-token", "s3cret"]).unwrap();
    let mock = MockLlm::start().await.unwrap();
    let mut cfg = config("deny", 1000);
    cfg["sidecar_token"] = json!("s3cret");
    let e = envoy(&mock, sidecar.port(), &cfg).await;
    let (admitted, r) = drain(&[&e], "a").await;
    assert!(admitted > 0, "the filter's calls carry the token");
    assert!(hdr(&r, "retry-after").is_some());

    let refund = json!({"items":[{"key":"team:h:0123","windows":[{"limit":1000,"window_ms":3600000}],"delta":-1000}]});
    let reserve = json!({"groups":[{"key":"team:h:0123","windows":[{"limit":1000,"window_ms":3600000}],"cost":1}]});
    for (path, body) in [("/v1/ratelimit/settle", &refund), ("/v1/ratelimit/reserve", &reserve)] {
        for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
            let mut req = client().post(sidecar.url(path)).json(body);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            assert_eq!(req.send().await.unwrap().status(), 401, "{path} with {auth:?}");
        }
        let ok = client().post(sidecar.url(path)).header("authorization", "Bearer s3cret").json(body).send().await;
        assert!(ok.unwrap().status().is_success(), "{path} with the token");
    }
    // Health and metrics stay open (probes, scrapers).
    assert_eq!(client().get(sidecar.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(client().get(sidecar.url("/metrics")).send().await.unwrap().status(), 200);

    // A gateway without the token is refused by the sidecar, so `failure_mode` applies (deny: 503).
    let mut no_token = config("deny", 1000);
    no_token["sidecar"]["timeout_ms"] = json!(500);
    let e2 = envoy(&mock, sidecar.port(), &no_token).await;
    assert_eq!(send(&e2, "b").await.status(), 503);
    assert!(e2.stat("meshwarden.token_limiter.callout_failures.status").await.unwrap() >= 1);
}

/// `sidecar_token_env`: the token comes from the Wasm VM's environment (here Envoy's own variable, passed
/// by `vm_config.environment_variables.host_env_keys` in the template; in Istio `vmConfig.env` with
/// `valueFrom: HOST`), so the secret need not be written into the plugin configuration. Without the
/// variable the configuration is refused naming the field, instead of a plugin whose every call the
/// sidecar refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_token_comes_from_the_vm_environment() {
    let sidecar = Sidecar::start(&["--api-token", "s3cret"]).unwrap();
    let mock = MockLlm::start().await.unwrap();
    let mut cfg = config("deny", 1000);
    cfg["sidecar_token_env"] = json!("MESHWARDEN_SIDECAR_API_TOKEN");
    let builder = || {
        EnvoyBuilder::new("token-limiter-sidecar.yaml")
            .upstream_port(mock.port())
            .var("SIDECAR_PORT", sidecar.port().to_string())
            .filter_config("token-limiter", &cfg)
    };
    // A token file's trailing newline (kubectl create secret --from-file) is not part of the token.
    let e = builder().env("MESHWARDEN_SIDECAR_API_TOKEN", "s3cret\n").start().await.unwrap();
    let (admitted, r) = drain(&[&e], "a").await;
    assert!(admitted > 0, "the filter's calls carry the token from the environment");
    assert_eq!(r.status(), 429);
    assert_eq!(e.stat("meshwarden.token_limiter.callout_failures").await.unwrap(), 0);

    // The wrong secret in the environment: the sidecar refuses, failure_mode deny answers 503.
    let wrong = builder().env("MESHWARDEN_SIDECAR_API_TOKEN", "other").start().await.unwrap();
    assert_eq!(send(&wrong, "b").await.status(), 503);

    // No variable at all: Envoy refuses the plugin and the log names the field.
    let log = builder().env("MESHWARDEN_SIDECAR_API_TOKEN_UNRELATED", "x").start_expect_failure().await.unwrap();
    assert!(log.contains("$.sidecar_token_env"), "{log}");
    assert!(log.contains("MESHWARDEN_SIDECAR_API_TOKEN is not set"), "{log}");
}

/// A settlement whose call fails is resent, and one whose answer was lost after the sidecar applied it
/// is not applied twice (each carries an id the sidecar applies once per key). The answers here use 190
/// tokens more than reserved: before, a failed settle call dropped that debt (the budget was
/// under-charged for every request settled while the sidecar was unreachable). Memory and Redis backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_settlements_are_resent_and_applied_once() {
    let redis = RedisServer::start().unwrap();
    for backend in [vec![], vec!["--redis-url".to_string(), redis.url()]] {
        let args: Vec<&str> = backend.iter().map(String::as_str).collect();
        settlements_resent_case(&Sidecar::start(&args).unwrap(), if args.is_empty() { "memory" } else { "redis" })
            .await;
    }
}

async fn settlements_resent_case(sidecar: &Sidecar, backend: &str) {
    use meshwarden_integration_tests::faulty::{sidecar_fault_proxy, SidecarFaults};
    use std::sync::atomic::Ordering;
    let faults = std::sync::Arc::new(SidecarFaults::default());
    let (proxy_port, proxy) = sidecar_fault_proxy(sidecar.port(), faults.clone()).await;
    let mock = MockLlm::start().await.unwrap();
    let cfg = json!({"state":"sidecar",
        "sidecar":{"cluster":"meshwarden_sidecar","timeout_ms":500,"failure_mode":"deny"},
        "settle_interval_ms": 50, "default_output_reservation": 10,
        "rules":[{"name":"team","key":{"header":"x-team"},"limits":{"tokens_per_day":100000}}]});
    let e = envoy(&mock, proxy_port, &cfg).await;
    let body = json!({"model":"gpt-4o-mini","messages":[{"role":"user","content":"Settle me exactly once."}]});
    let request = |team: &str| {
        client()
            .post(e.url("/v1/chat/completions"))
            .header("x-team", team)
            .header("x-mock-completion-tokens", "200")
            .json(&body)
            .send()
    };
    // One answered request per team, each with its own fault on the settle call that follows it.
    let mut refused = 0;
    for (team, fault) in
        [("ok", None), ("lost", Some(&faults.failed_settles)), ("applied", Some(&faults.applied_but_failed_settles))]
    {
        if let Some(f) = fault {
            f.store(1, Ordering::SeqCst);
            refused += 1;
        }
        let r = request(team).await.unwrap();
        assert_eq!(r.status(), 200, "{backend} {team}");
        let _ = r.text().await;
        for _ in 0..100 {
            if faults.settles_refused.load(Ordering::SeqCst) >= refused {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(faults.settles_refused.load(Ordering::SeqCst), refused, "{backend} {team}: the fault was used");
        // The failed call is resent at a later tick.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // A second request per team shows what the first one left charged.
    let mut remaining = std::collections::BTreeMap::new();
    for team in ["ok", "lost", "applied"] {
        let r = request(team).await.unwrap();
        remaining.insert(team, hdr(&r, "x-ratelimit-remaining-tokens").unwrap().parse::<i64>().unwrap());
        let _ = r.text().await;
    }
    let ok = remaining["ok"];
    assert!(ok < 100_000 - 190, "{backend}: the first answer's output was charged: {remaining:?}");
    assert!((remaining["lost"] - ok).abs() <= 3, "{backend}: a failed settlement was dropped: {remaining:?}");
    assert!((remaining["applied"] - ok).abs() <= 3, "{backend}: a resent settlement was applied twice: {remaining:?}");
    assert!(e.stat("meshwarden.token_limiter.settle_failures").await.unwrap() >= 2);
    assert_eq!(e.stat("meshwarden.token_limiter.settlements_abandoned").await.unwrap_or(0), 0);
    proxy.abort();
}

/// The sidecar's header-read timeout (here 300 ms) does not close the keep-alive connections Envoy keeps
/// to it: after an idle second, the gateway's next calls go out on them and are answered, and the sidecar
/// closed none (hyper's own header timeout also runs while a connection waits for its next request: every
/// pooled connection would be closed after the timeout, and a call Envoy sent as one closed would fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_to_the_sidecar_outlive_its_header_timeout() {
    let sidecar = Sidecar::start_with_env(&[], &[("MESHWARDEN_SIDECAR_HEADER_READ_TIMEOUT_MS", "300")]).unwrap();
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, sidecar.port(), &config("deny", 100_000)).await;
    assert_eq!(send(&e, "idle").await.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    for _ in 0..3 {
        assert_eq!(send(&e, "idle").await.status(), 200);
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let stats = e.stats_now("cluster.meshwarden_sidecar.upstream_cx").await.unwrap();
    assert!(stats["cluster.meshwarden_sidecar.upstream_cx_total"] >= 1, "{stats:?}");
    assert_eq!(stats["cluster.meshwarden_sidecar.upstream_cx_destroy_remote"], 0, "{stats:?}");
    assert_eq!(e.stat("meshwarden.token_limiter.callout_failures").await.unwrap(), 0);
}

/// A header-keyed rule lets clients choose their key: with the sidecar's memory backend at
/// `--memory-max-keys`, a request with a new key value gets the filter's `failure_mode` (deny: 503; allow:
/// admitted without a budget), while the teams already held keep their budgets (not reset) through Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sidecar_memory_gives_new_keys_the_failure_mode_and_keeps_held_budgets() {
    let mock = MockLlm::start().await.unwrap();
    let sidecar = Sidecar::start(&["--memory-max-keys", "2"]).unwrap();
    let deny = envoy(&mock, sidecar.port(), &config("deny", 100_000)).await;
    let allow = envoy(&mock, sidecar.port(), &config("allow", 100_000)).await;
    let remaining = |r: &reqwest::Response| hdr(r, "x-ratelimit-remaining-tokens").unwrap().parse::<u64>().unwrap();
    let r = send(&deny, "a").await;
    assert_eq!(r.status(), 200);
    let rem_a = remaining(&r);
    assert_eq!(send(&deny, "b").await.status(), 200);
    let metrics = client().get(sidecar.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("meshwarden_sidecar_ratelimit_memory_keys 2"), "{metrics}");
    for fresh in ["c", "d", "e"] {
        let r = send(&deny, fresh).await;
        assert_eq!(r.status(), 503, "fail closed for a new key at the cap");
        let r = send(&allow, fresh).await;
        assert_eq!(r.status(), 200, "fail open");
        assert!(hdr(&r, "x-ratelimit-remaining-tokens").is_none(), "no budget to report");
    }
    // Team a's budget was kept: it goes on down from where it was, on both gateways.
    let r = send(&allow, "a").await;
    assert_eq!(r.status(), 200);
    assert!(remaining(&r) < rem_a, "a's spent budget was not reset: {} vs {rem_a}", remaining(&r));
    assert_eq!(deny.stat("meshwarden.token_limiter.failure_denied").await.unwrap(), 3);
    let metrics = client().get(sidecar.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("meshwarden_sidecar_ratelimit_memory_full_refusals_total 6"), "{metrics}");
}
