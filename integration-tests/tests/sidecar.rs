//! The sidecar binary serves health, readiness and Prometheus metrics, and shuts down on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::sidecar::Sidecar;

#[tokio::test]
async fn health_readiness_and_metrics() {
    let sidecar = Sidecar::start(&["--log-format", "json"]).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = http.get(sidecar.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(sidecar.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(sidecar.url("/readyz/backend")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.text().await.unwrap()), (200, "memory ok".to_string()));
    let m = http.get(sidecar.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("meshwarden_sidecar_http_requests_total{route=\"/readyz\",status=\"2xx\"} 1"), "{m}");
    assert!(m.contains("meshwarden_sidecar_http_request_duration_seconds_bucket"), "{m}");
}

/// SIGTERM drains: a reserve call in flight (Redis frozen, so the call waits on it) is answered, not
/// cut, once Redis answers; new connections are refused while draining; the process then exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_calls_in_flight() {
    let redis = meshwarden_integration_tests::redis_server::RedisServer::start().unwrap();
    let mut sidecar = Sidecar::start(&[
        "--redis-url",
        &redis.url(),
        "--redis-timeout-ms",
        "5000",
        "--shutdown-grace-secs",
        "10",
        "--shutdown-delay-secs",
        "0",
    ])
    .unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let req = serde_json::json!({"groups":[{"key":"drain","windows":[{"limit":1000,"window_ms":60000}],"cost":10}]});
    let warm = http.post(sidecar.url("/v1/ratelimit/reserve")).json(&req).send().await.unwrap();
    assert_eq!(warm.status(), 200, "connected to Redis");
    let signal = |sig: &str, pid: u32| {
        assert!(std::process::Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
    };
    let redis_pid = redis.pid().unwrap();
    signal("-STOP", redis_pid);
    let in_flight = tokio::spawn({
        let (http, url, req) = (http.clone(), sidecar.url("/v1/ratelimit/reserve"), req.clone());
        async move { http.post(url).json(&req).send().await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    signal("-TERM", sidecar.pid());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let fresh = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(fresh.get(sidecar.url("/healthz")).send().await.is_err(), "no new connections while draining");
    assert!(!in_flight.is_finished(), "the call waits for Redis");
    signal("-CONT", redis_pid);
    let answer = in_flight.await.unwrap().expect("answered, not cut");
    assert_eq!(answer.status(), 200);
    let v: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(v["allowed"], true, "{v}");
    let status = sidecar.wait_exit(std::time::Duration::from_secs(5)).expect("exits after draining");
    assert!(status.success(), "{status:?}");
}

/// SIGTERM first takes the sidecar out of service and keeps serving: `/readyz` answers 503 and rate-limit
/// calls on new connections are still answered for `--shutdown-delay-secs` (default 5), while Kubernetes
/// removes the pod's endpoint and the gateways' Envoys learn it; then it drains and exits 0. It closed its
/// port at once: during every rollout the gateways' calls to the replica being replaced were refused (each
/// one the filter's `failure_mode`: unlimited with `allow`, a 503 to the client with `deny`), and the
/// documented "503 while draining" could never be seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_serving_while_the_endpoint_is_removed() {
    let mut sidecar = Sidecar::start(&[]).unwrap();
    let req = serde_json::json!({"groups":[{"key":"k","windows":[{"limit":1000,"window_ms":60000}],"cost":10}]});
    // One answered call first: the server (and its signal handlers) is running, not only bound.
    let fresh = || reqwest::Client::builder().no_proxy().build().unwrap();
    let r = fresh().post(sidecar.url("/v1/ratelimit/reserve")).json(&req).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(std::process::Command::new("kill").args(["-TERM", &sidecar.pid().to_string()]).status().unwrap().success());
    let started = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // New connections each time, as from a gateway that has not yet learned the endpoint is going.
    let r = fresh().get(sidecar.url("/readyz")).send().await.expect("still accepting");
    assert_eq!(r.status(), 503, "not ready once terminating");
    let r = fresh().post(sidecar.url("/v1/ratelimit/reserve")).json(&req).send().await.expect("still accepting");
    assert_eq!(r.status(), 200);
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let r = fresh().post(sidecar.url("/v1/ratelimit/reserve")).json(&req).send().await.expect("still accepting");
    assert_eq!(r.status(), 200, "served until the delay ends");
    let status = sidecar.wait_exit(std::time::Duration::from_secs(5)).expect("exits after the delay");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(5), "{:?}", started.elapsed());
}

/// With Redis down every rate-limit call fails: each is answered 503 and counted, but the log gets one
/// line per interval with the number of failures since, not a line per call (it was one per call: at
/// thousands of calls a second, the logs were buried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_failures_are_logged_once_per_interval() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let redis_url = format!("redis://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let sidecar = Sidecar::start(&["--redis-url", &redis_url, "--redis-timeout-ms", "50"]).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let reserve = serde_json::json!({"groups":[{"key":"k","windows":[{"limit":1000,"window_ms":60000}],"cost":10}]});
    let settle = serde_json::json!({"items":[{"key":"k","windows":[{"limit":1000,"window_ms":60000}],"delta":-5}]});
    for _ in 0..20 {
        let r = http.post(sidecar.url("/v1/ratelimit/reserve")).json(&reserve).send().await.unwrap();
        assert_eq!(r.status(), 503);
    }
    for _ in 0..5 {
        let r = http.post(sidecar.url("/v1/ratelimit/settle")).json(&settle).send().await.unwrap();
        assert_eq!(r.status(), 503);
    }
    let m = http.get(sidecar.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("ratelimit_backend_errors_total{op=\"reserve\"} 20"), "every failure counted: {m}");
    assert!(m.contains("ratelimit_backend_errors_total{op=\"settle\"} 5"), "{m}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let log = sidecar.log();
    let lines = log.lines().filter(|l| l.contains("backend failed") || l.contains("reserve failed")).count();
    assert_eq!(lines, 1, "one line for 25 failures:\n{log}");
}

/// With Redis gone, a rate-limit call is answered (503) within the Redis timeout, whether the sidecar
/// never reached Redis or lost it, and calls do not queue behind one another: a call took 1.5 s (the
/// connection manager's reconnect and retry), calls without a connection waited one after the other (the
/// 10th 15 s), and a reserve that ran when Redis was back took a concurrency lease long after the filter
/// had given up on it and sent its release, holding the slot for `lease_ms`. Once Redis is back, calls
/// are answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_with_redis_gone_fail_within_the_timeout_and_recover() {
    let mut redis = meshwarden_integration_tests::redis_server::RedisServer::start().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let never_up = format!("redis://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let lost = Sidecar::start(&["--redis-url", &redis.url(), "--redis-timeout-ms", "50"]).unwrap();
    let unreachable = Sidecar::start(&["--redis-url", &never_up, "--redis-timeout-ms", "50"]).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let req = serde_json::json!({"groups":[{"key":"slots","windows":[],"cost":0,
        "concurrency":{"max":1,"lease_id":"l1","lease_ms":600000}}]});
    let reserve = |s: &Sidecar| {
        let (http, url, req) = (http.clone(), s.url("/v1/ratelimit/reserve"), req.clone());
        async move {
            let t = std::time::Instant::now();
            let r = http.post(url).json(&req).send().await.unwrap();
            (r.status().as_u16(), t.elapsed())
        }
    };
    let (status, _) = reserve(&lost).await;
    assert_eq!(status, 200, "connected");
    let release = serde_json::json!({"items":[{"key":"slots","windows":[],"delta":0,"release_lease":"l1"}]});
    let r = http.post(lost.url("/v1/ratelimit/settle")).json(&release).send().await.unwrap();
    assert_eq!(r.status(), 204);
    redis.kill();
    for sidecar in [&lost, &unreachable] {
        let calls: Vec<_> = (0..10).map(|_| tokio::spawn(reserve(sidecar))).collect();
        for c in calls {
            let (status, took) = c.await.unwrap();
            assert_eq!(status, 503);
            assert!(took < std::time::Duration::from_millis(600), "answered after {took:?}");
        }
    }
    redis.restart().unwrap();
    let mut status = 0;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        status = reserve(&lost).await.0;
        if status == 200 {
            break;
        }
    }
    assert_eq!(status, 200, "answered again once Redis is back");
}

/// A Redis Cluster (what the docs and the Istio overlay recommend in production, for the key layout with
/// hash tags) keeps every budget: a sidecar given one node's URL reaches the keys of every slot. It spoke to
/// that one node only, so each key another node holds was answered `MOVED`: a 503 for about two teams in
/// three (their requests refused under `failure_mode: deny`, unlimited under `allow`), while
/// `/readyz/backend` said "redis ok".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_keeps_the_budget_of_every_key() {
    let cluster = meshwarden_integration_tests::redis_server::RedisCluster::start().unwrap();
    let sidecar = Sidecar::start(&["--redis-url", &cluster.url(), "--redis-timeout-ms", "1000"]).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let post = |path: &str, body: serde_json::Value| {
        let (http, url) = (http.clone(), sidecar.url(path));
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    let mut failed = Vec::new();
    for i in 0..24 {
        let key = format!("team-total:h:{i:032x}");
        let group = |lease: &str| {
            serde_json::json!({"groups":[{"key": key, "windows":[{"limit":100,"window_ms":3_600_000}],"cost":60,
                "concurrency":{"max":2,"lease_id":lease,"lease_ms":60000}}]})
        };
        let (status, first) = post("/v1/ratelimit/reserve", group("a")).await;
        if status != 200 {
            failed.push(format!("{key}: {status} {first}"));
            continue;
        }
        let first: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert_eq!(first["allowed"], true, "{key}: {first}");
        // The state is kept: the second reservation finds the first one's tokens spent.
        let (status, second) = post("/v1/ratelimit/reserve", group("b")).await;
        assert_eq!(status, 200, "{key}: {second}");
        let second: serde_json::Value = serde_json::from_str(&second).unwrap();
        assert_eq!((&second["allowed"], &second["groups"][0]["reason"]), (&false.into(), &"tokens".into()), "{key}");
        let release = serde_json::json!({"items":[{"key": key, "windows":[{"limit":100,"window_ms":3_600_000}],
            "delta":-60,"release_lease":"a"}]});
        let (status, body) = post("/v1/ratelimit/settle", release).await;
        assert_eq!(status, 204, "{key}: {body}");
        let (status, third) = post("/v1/ratelimit/reserve", group("c")).await;
        assert_eq!(status, 200, "{key}: {third}");
        assert!(third.contains(r#""allowed":true"#), "refunded and released: {key}: {third}");
    }
    assert!(failed.is_empty(), "{} of 24 keys failed:\n{}", failed.len(), failed.join("\n"));
    let r = http.get(sidecar.url("/readyz/backend")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.text().await.unwrap()), (200, "redis ok".to_string()));
}

/// `rediss://` (the docs' way to reach a Redis over TLS, which managed Redis services require) connects
/// with TLS, checking the server's certificate against the system's CA certificates (here the test CA,
/// through `SSL_CERT_FILE`). The sidecar was built without TLS: it refused to start ("can't connect with
/// TLS, the feature is not enabled").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_over_tls_is_reached_with_rediss() {
    let pki = tempfile::tempdir().unwrap();
    meshwarden_integration_tests::pki::spiffe_pki(pki.path(), &[]).unwrap();
    let redis = meshwarden_integration_tests::redis_server::RedisServer::start_tls(pki.path()).unwrap();
    let url = redis.tls_url().unwrap();
    let ca = pki.path().join("ca.crt").display().to_string();
    let sidecar =
        Sidecar::start_with_env(&["--redis-url", &url, "--redis-timeout-ms", "1000"], &[("SSL_CERT_FILE", &ca)])
            .unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let req = serde_json::json!({"groups":[{"key":"tls","windows":[{"limit":100,"window_ms":60000}],"cost":60}]});
    let mut allowed = Vec::new();
    for _ in 0..2 {
        let r = http.post(sidecar.url("/v1/ratelimit/reserve")).json(&req).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        allowed.push(v["allowed"].as_bool().unwrap());
    }
    assert_eq!(allowed, [true, false], "the budget is kept in that Redis");
    let r = http.get(sidecar.url("/readyz/backend")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.text().await.unwrap()), (200, "redis ok".to_string()));
    // A certificate the sidecar cannot trust is refused: no CA given, the test CA is unknown.
    let untrusted = Sidecar::start(&["--redis-url", &url, "--redis-timeout-ms", "1000"]).unwrap();
    let r = http.post(untrusted.url("/v1/ratelimit/reserve")).json(&req).send().await.unwrap();
    assert_eq!(r.status(), 503, "an unverified server is not used");
}

/// A TCP proxy to `127.0.0.1:upstream` that delivers what the server sends `delay` late (a Redis a
/// network hop away, as a managed one is); returns its port.
async fn slow_answers_proxy(upstream: u16, delay: std::time::Duration) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else { continue };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
            });
            // A delay line: each chunk leaves `delay` after it arrived (chunks in flight overlap).
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 || tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some((due, chunk)) = rx.recv().await {
                    tokio::time::sleep_until(due).await;
                    if cw.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A settle call carries a tick's settlements of a whole gateway worker (up to 256 items): with Redis a
/// millisecond or two away they are applied in about one round trip, within the filter's callout timeout
/// (50 ms by default). They were applied one after the other, a round trip each: 100 items took over
/// 200 ms at 2 ms, the filter gave up on the call (a settle failure: the refunds and debts of the batch
/// dropped, the budgets left charged the reservations) and the sidecar stopped applying the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_batch_is_applied_in_about_one_redis_round_trip() {
    let redis = meshwarden_integration_tests::redis_server::RedisServer::start().unwrap();
    let port = slow_answers_proxy(redis.port, std::time::Duration::from_millis(5)).await;
    let url = format!("redis://127.0.0.1:{port}/0");
    let sidecar = Sidecar::start(&["--redis-url", &url, "--redis-timeout-ms", "5000"]).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let window = serde_json::json!([{"limit":1000,"window_ms":3_600_000}]);
    let groups: Vec<serde_json::Value> =
        (0..100).map(|i| serde_json::json!({"key": format!("k{i}"), "windows": window, "cost": 100})).collect();
    for g in &groups {
        let r = http.post(sidecar.url("/v1/ratelimit/reserve")).json(&serde_json::json!({"groups":[g]})).send().await;
        assert_eq!(r.unwrap().status(), 200);
    }
    let items: Vec<serde_json::Value> = (0..100)
        .map(|i| serde_json::json!({"key": format!("k{i}"), "windows": window, "delta": -90, "release_lease": "l"}))
        .collect();
    let started = std::time::Instant::now();
    let r = http.post(sidecar.url("/v1/ratelimit/settle")).json(&serde_json::json!({"items": items})).send().await;
    let took = started.elapsed();
    assert_eq!(r.unwrap().status(), 204);
    assert!(took < std::time::Duration::from_millis(150), "100 settlements took {took:?}");
    // Every refund was applied: 990 of 1000 left on each key.
    for g in &groups {
        let mut probe = g.clone();
        probe["cost"] = serde_json::json!(0);
        let r = http.post(sidecar.url("/v1/ratelimit/reserve")).json(&serde_json::json!({"groups":[probe]})).send();
        let v: serde_json::Value = r.await.unwrap().json().await.unwrap();
        assert_eq!(v["groups"][0]["windows"][0]["remaining"], 990, "{v}");
    }
}

/// Reads from `tcp` until the sidecar closes it (EOF or a reset), at most `limit`; returns when it did.
async fn closed_within(tcp: &mut tokio::net::TcpStream, limit: std::time::Duration) -> Option<std::time::Duration> {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(tokio::time::Instant::from_std(started + limit), tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Sends one `GET path` on `tcp` (keep-alive) and reads its whole answer; returns the status line.
async fn get_on(tcp: &mut tokio::net::TcpStream, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: sidecar\r\n\r\n").as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the answer: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .unwrap();
            if got.len() >= end + 4 + len {
                return text.lines().next().unwrap().to_string();
            }
        }
    }
}

/// A client that connects and sends nothing, or trickles a request's headers (a byte every 100 ms, on a
/// new connection or on one that already had an answer), is disconnected once the header-read timeout
/// (`--header-read-timeout-ms`, here 500 ms) is over. Connections had no read timeout (`axum::serve` runs
/// hyper without a timer): whoever reached the port (0.0.0.0:9090 in the Istio manifests) held as many
/// connections as it liked, forever, and a gateway that died without closing left its connections open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_trickling_clients_are_disconnected_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let sidecar = Sidecar::start_with_env(&[], &[("MESHWARDEN_SIDECAR_HEADER_READ_TIMEOUT_MS", "500")]).unwrap();
    let limit = std::time::Duration::from_secs(3);
    let addr = ("127.0.0.1", sidecar.port());
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let took = closed_within(&mut silent, limit).await.expect("a silent client is disconnected");
    assert!(took >= std::time::Duration::from_millis(400), "{took:?}");

    let trickle = |mut tcp: tokio::net::TcpStream| async move {
        let started = std::time::Instant::now();
        let head =
            b"GET /healthz HTTP/1.1\r\nhost: sidecar\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for b in head {
            if tcp.write_all(&[*b]).await.is_err() {
                return Some(started.elapsed());
            }
            if let Some(took) = closed_within(&mut tcp, std::time::Duration::from_millis(100)).await {
                return Some(started.elapsed().max(took));
            }
        }
        None
    };
    let fresh = tokio::net::TcpStream::connect(addr).await.unwrap();
    let took = trickle(fresh).await.expect("a trickling client is disconnected");
    assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    let mut used = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(get_on(&mut used, "/healthz").await, "HTTP/1.1 200 OK");
    let took = trickle(used).await.expect("a trickling second request is disconnected");
    assert!(took < std::time::Duration::from_secs(2), "{took:?}");
}

/// The header-read timeout does not cut the idle keep-alive connections a gateway's Envoy keeps in its
/// pool: a connection reused after an idle period three times the timeout is answered (hyper's own timeout
/// also runs while a connection waits for its next request, and a call Envoy sent as it closed would fail).
/// Idle connections are closed after `--idle-timeout-secs` (here 2 s; by default longer than Envoy's own
/// upstream idle timeout, so Envoy closes first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_outlive_the_header_timeout() {
    let sidecar = Sidecar::start_with_env(
        &[],
        &[("MESHWARDEN_SIDECAR_HEADER_READ_TIMEOUT_MS", "300"), ("MESHWARDEN_SIDECAR_IDLE_TIMEOUT_SECS", "2")],
    )
    .unwrap();
    let addr = ("127.0.0.1", sidecar.port());
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(get_on(&mut tcp, "/healthz").await, "HTTP/1.1 200 OK");
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    assert_eq!(get_on(&mut tcp, "/readyz").await, "HTTP/1.1 200 OK", "reused after an idle 900 ms");
    let answered = std::time::Instant::now();
    // Normal calls through a pooled client too.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for _ in 0..3 {
        assert_eq!(http.get(sidecar.url("/healthz")).send().await.unwrap().status(), 200);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    closed_within(&mut tcp, std::time::Duration::from_secs(4)).await.expect("closed once idle 2 s");
    let idle = answered.elapsed();
    assert!(idle >= std::time::Duration::from_millis(1900) && idle < std::time::Duration::from_secs(3), "{idle:?}");
}

/// Sends a request's headers, then its body a chunk every `every` (on a new connection); returns what the
/// sidecar answered (the status line, empty if none) and when the connection ended, or None when it was
/// still open after `limit`.
async fn trickle_body(
    port: u16,
    body: &[u8],
    chunk: usize,
    every: std::time::Duration,
    limit: std::time::Duration,
) -> (String, Option<std::time::Duration>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let started = std::time::Instant::now();
    let head = format!(
        "POST /v1/ratelimit/reserve HTTP/1.1\r\nhost: sidecar\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let body = body.to_vec();
    let writer = tokio::spawn(async move {
        for c in body.chunks(chunk) {
            tokio::time::sleep(every).await;
            if wr.write_all(c).await.is_err() {
                return;
            }
        }
        // Keep the write half open: the sidecar, not the client, ends the connection.
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        drop(wr);
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let ended = loop {
        match tokio::time::timeout_at(tokio::time::Instant::from_std(started + limit), rd.read(&mut buf)).await {
            Err(_) => break None,
            Ok(Ok(0) | Err(_)) => break Some(started.elapsed()),
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                // A complete 200 answer on a keep-alive connection: done, the connection stays open.
                if text.starts_with("HTTP/1.1 200") && text.contains("\"allowed\"") {
                    break Some(started.elapsed());
                }
            }
        }
    };
    writer.abort();
    (String::from_utf8_lossy(&got).lines().next().unwrap_or_default().to_string(), ended)
}

/// A client that sends a request's headers, then trickles its body, is answered `408` and disconnected
/// once the body-read timeout (`--body-read-timeout-ms`, here 500 ms) is over, and the timeout is counted
/// on `/metrics`; a body that arrives in pieces within the timeout is served. The body was not timed: a
/// client that sent its headers, then a byte every 100 ms of a body of up to 2 MB, held its connection
/// (and its buffer) for as long as it liked, whatever `--header-read-timeout-ms` said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_answered_408_after_the_body_timeout() {
    let sidecar = Sidecar::start_with_env(&[], &[("MESHWARDEN_SIDECAR_BODY_READ_TIMEOUT_MS", "500")]).unwrap();
    let req = br#"{"groups":[{"key":"slow","windows":[{"limit":100,"window_ms":60000}],"cost":1}]}"#;
    let ms = std::time::Duration::from_millis;
    // One byte every 100 ms: the body would take 8 s.
    let (status, ended) = trickle_body(sidecar.port(), req, 1, ms(100), ms(4000)).await;
    let ended = ended.expect("a trickling body is cut");
    assert_eq!(status, "HTTP/1.1 408 Request Timeout");
    assert!(ended >= ms(450) && ended < ms(2000), "{ended:?}");
    // Four pieces 100 ms apart: within the timeout, served.
    let (status, ended) = trickle_body(sidecar.port(), req, req.len().div_ceil(4), ms(100), ms(4000)).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(ended.is_some());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // A body over 2 MB is still answered 413, not a timeout.
    let big = http.post(sidecar.url("/v1/ratelimit/reserve")).body(vec![b' '; 2 * 1024 * 1024 + 1]).send().await;
    assert_eq!(big.unwrap().status(), 413);
    let m = http.get(sidecar.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("meshwarden_sidecar_body_read_timeouts_total 1"), "{m}");
    assert!(
        m.contains("meshwarden_sidecar_http_requests_total{route=\"/v1/ratelimit/reserve\",status=\"4xx\"} 2"),
        "{m}"
    );
}

/// The memory backend keeps time with a monotonic clock: the wall clock stepping back an hour (an NTP
/// step, a VM resumed from a snapshot; here libfaketime under the real binary) does not lock a
/// per-second budget for that hour, and stepping forward does not expire the concurrency leases held.
/// It used the wall clock: after a step back of an hour, a spent per-second budget answered "retry
/// after 3,599 s"; after a step forward, every lease had expired and `max_concurrent_requests` admitted
/// a request over the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_backend_does_not_follow_wall_clock_steps() {
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(std::path::Path::new(lib).is_file(), "install libfaketime (scripts/tools/apt-token-limiter.txt)");
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    let sidecar = Sidecar::start_with_env(
        &[],
        &[
            ("LD_PRELOAD", lib),
            ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
    .unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let reserve = |body: serde_json::Value| {
        let r = http.post(sidecar.url("/v1/ratelimit/reserve")).json(&body).send();
        async move { r.await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    let second = serde_json::json!({"groups":[{"key":"s","windows":[{"limit":10,"window_ms":1000}],"cost":10}]});
    let slot = |lease: &str| {
        serde_json::json!({"groups":[{"key":"c","windows":[],"cost":0,
            "concurrency":{"max":1,"lease_id":lease,"lease_ms":600_000}}]})
    };
    assert_eq!(reserve(second.clone()).await["allowed"], true);
    assert_eq!(reserve(slot("held")).await["allowed"], true);
    // The wall clock steps back an hour: a second later the per-second budget is full again.
    std::fs::write(&offset, "-3600\n").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let again = reserve(second.clone()).await;
    assert_eq!(again["allowed"], true, "{again}");
    // It steps forward a day: the lease taken before is still held.
    std::fs::write(&offset, "+86400\n").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let over = reserve(slot("other")).await;
    assert_eq!(over["allowed"], false, "{over}");
}

/// A call's size is bounded by what a gateway sends (4 windows per rule, 256 rules, settlements in
/// batches of 256): more windows in a group, more groups or more items are refused `400` naming the
/// field, before Redis sees them. One reserve with 40,000 windows ran as one Lua script that held the
/// shared Redis for about 130 ms (its slowlog): every other sidecar's call failed its 40 ms timeout
/// meanwhile (each gateway's `failure_mode`), and whoever reached an open sidecar port could repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_larger_than_a_gateway_sends_are_refused_before_redis() {
    let redis = meshwarden_integration_tests::redis_server::RedisServer::start().unwrap();
    // A long Redis timeout: the largest accepted calls must pass on a loaded test machine too.
    let sidecar = Sidecar::start(&["--redis-url", &redis.url(), "--redis-timeout-ms", "5000"]).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let window = |i: u64| serde_json::json!({"limit": i + 1, "window_ms": 60_000});
    let group = |key: String, windows: u64| serde_json::json!({"key": key, "windows": (0..windows).map(window).collect::<Vec<_>>(), "cost": 1});
    let item = |key: String| serde_json::json!({"key": key, "windows": [window(0)], "delta": 1});
    let call = |op: &str, body: serde_json::Value| {
        let r = http.post(sidecar.url(&format!("/v1/ratelimit/{op}"))).json(&body).send();
        async move {
            let r = r.await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let cases = [
        ("reserve", serde_json::json!({"groups": [group("wide".into(), 40_000)]}), "groups[0].windows"),
        (
            "reserve",
            serde_json::json!({"groups": (0..257).map(|i| group(format!("g{i}"), 1)).collect::<Vec<_>>()}),
            "groups",
        ),
        ("settle", serde_json::json!({"items": (0..257).map(|i| item(format!("i{i}"))).collect::<Vec<_>>()}), "items"),
    ];
    for (op, body, field) in cases {
        let (status, text) = call(op, body).await;
        assert_eq!(status, 400, "{op} {field}: {}", text.get(..300).unwrap_or(&text));
        assert!(text.contains(field), "{text}");
    }
    let keys = meshwarden_integration_tests::redis_server::command(redis.port, "DBSIZE").unwrap();
    assert_eq!(keys, ":0\r\n", "Redis saw none of them");
    // What a gateway sends at most passes.
    let (status, text) =
        call("reserve", serde_json::json!({"groups": (0..256).map(|i| group(format!("g{i}"), 4)).collect::<Vec<_>>()}))
            .await;
    assert_eq!(status, 200, "{text}");
    let (status, text) =
        call("settle", serde_json::json!({"items": (0..256).map(|i| item(format!("i{i}"))).collect::<Vec<_>>()})).await;
    assert_eq!(status, 204, "{text}");
}

/// The memory backend holds at most `--memory-max-keys` entries. A client choosing a fresh key per request
/// (a header-keyed rule) grew it without bound: each key on a per-day window stayed a day. At the cap a
/// reserve of a new key is answered 503 (the filter's `failure_mode`), counted on /metrics; the keys held
/// keep their budgets (nothing spent is reset, a debt settled at the cap still counts), and a bucket full
/// again is worth nothing, so it makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_backend_refuses_new_keys_at_its_cap_and_keeps_the_budgets_it_holds() {
    let sidecar = Sidecar::start_with_env(&[], &[("MESHWARDEN_SIDECAR_MEMORY_MAX_KEYS", "3")]).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let day = 86_400_000u64;
    let call = |op: &str, body: serde_json::Value| {
        let r = http.post(sidecar.url(&format!("/v1/ratelimit/{op}"))).json(&body).send();
        async move {
            let r = r.await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, serde_json::from_str::<serde_json::Value>(&text).unwrap_or(serde_json::Value::Null), text)
        }
    };
    let reserve = |key: &str, limit: u64, window_ms: u64, cost: u64| {
        call(
            "reserve",
            serde_json::json!({"groups":[{"key":key,"windows":[{"limit":limit,"window_ms":window_ms}],"cost":cost}]}),
        )
    };
    let metric = |name: &'static str| {
        let r = http.get(sidecar.url("/metrics")).send();
        async move {
            let m = r.await.unwrap().text().await.unwrap();
            let line = m.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} missing: {m}"));
            line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
        }
    };
    // The repro: one token a day, a new key per call. Three fit.
    let (s, r, t) = reserve("team:h:0", 10, day, 4).await;
    assert_eq!((s, &r["allowed"]), (200, &serde_json::json!(true)), "{t}");
    for key in ["team:h:1", "team:h:2"] {
        let (s, r, t) = reserve(key, 1, day, 1).await;
        assert_eq!((s, &r["allowed"]), (200, &serde_json::json!(true)), "{t}");
    }
    assert_eq!(metric("meshwarden_sidecar_ratelimit_memory_keys ").await, 3);
    // The fourth new key is refused, nothing reserved, and counted.
    let (s, _, t) = reserve("team:h:3", 1, day, 1).await;
    assert_eq!(s, 503, "{t}");
    assert!(t.contains("memory full") && t.contains("--memory-max-keys"), "{t}");
    assert_eq!(metric("meshwarden_sidecar_ratelimit_memory_full_refusals_total ").await, 1);
    // The keys held keep working with their budgets: spent stays spent.
    let (s, r, t) = reserve("team:h:1", 1, day, 1).await;
    assert_eq!((s, &r["allowed"]), (200, &serde_json::json!(false)), "team:h:1 was not reset: {t}");
    let (s, r, t) = reserve("team:h:0", 10, day, 4).await;
    assert_eq!(
        (s, &r["allowed"], &r["groups"][0]["windows"][0]["remaining"]),
        (200, &serde_json::json!(true), &serde_json::json!(2)),
        "{t}"
    );
    // A debt settled at the cap is applied (never refused: refusing it would lose spent tokens).
    let item =
        serde_json::json!({"items":[{"key":"team:h:0","windows":[{"limit":10,"window_ms":day}],"delta":2,"id":"r1"}]});
    let (s, _, t) = call("settle", item).await;
    assert_eq!(s, 204, "{t}");
    let (s, r, t) = reserve("team:h:0", 10, day, 1).await;
    assert_eq!(
        (s, &r["allowed"], &r["groups"][0]["windows"][0]["remaining"]),
        (200, &serde_json::json!(false), &serde_json::json!(0)),
        "{t}"
    );
    // Still full: another new key is refused, a second time counted.
    let (s, _, t) = reserve("team:h:4", 1, day, 1).await;
    assert_eq!(s, 503, "{t}");
    assert_eq!(metric("meshwarden_sidecar_ratelimit_memory_full_refusals_total ").await, 2);
    assert_eq!(metric("meshwarden_sidecar_ratelimit_memory_keys ").await, 3);
}

/// At the cap, an entry whose bucket is full again is worth nothing ("never seen"): it is dropped to make
/// room for a new key at once, not at the next periodic prune; the live ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_backend_makes_room_from_buckets_full_again_only() {
    let sidecar = Sidecar::start(&["--memory-max-keys", "2"]).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let reserve = |key: &str, window_ms: u64| {
        let body = serde_json::json!({"groups":[{"key":key,"windows":[{"limit":1,"window_ms":window_ms}],"cost":1}]});
        let r = http.post(sidecar.url("/v1/ratelimit/reserve")).json(&body).send();
        async move {
            let r = r.await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let allowed = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap()["allowed"].as_bool().unwrap();
    let (s, t) = reserve("live", 86_400_000).await;
    assert!(s == 200 && allowed(&t), "{t}");
    let (s, t) = reserve("short", 200).await;
    assert!(s == 200 && allowed(&t), "{t}");
    assert_eq!(reserve("new", 86_400_000).await.0, 503, "full: both entries live");
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    // "short" is full again (and a second has passed since the last prune at the cap).
    let (s, t) = reserve("new", 86_400_000).await;
    assert!(s == 200 && allowed(&t), "{s} {t}");
    let (s, t) = reserve("live", 86_400_000).await;
    assert!(s == 200 && !allowed(&t), "live kept its spent budget: {t}");
    assert_eq!(reserve("other", 86_400_000).await.0, 503);
}
