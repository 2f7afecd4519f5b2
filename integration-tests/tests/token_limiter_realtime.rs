//! token-limiter metering OpenAI Realtime sessions (`on_upgrade: meter`): real Envoy with WebSocket
//! upgrades enabled (as every Istio sidecar and gateway has them) + the real `.wasm`, a mock Realtime
//! server speaking the API's events (`integration-tests/python/realtime_server.py`, the `websockets`
//! library) and the official `openai` Python SDK's Realtime client (`openai_realtime.py`).
//!
//! Each response's `response.done` usage is charged; when the next response's reservation is refused
//! the client gets an `error` event (`rate_limit_exceeded`) and a close frame 1008, the server a close
//! frame, and a new session gets a 429 with `retry-after`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::envoy::Envoy;
use meshwarden_integration_tests::python::PyServer;
use meshwarden_integration_tests::sidecar::Sidecar;
use meshwarden_integration_tests::upgrade::{envoy_with_upgrades, realtime_sdk_session, realtime_server_stats};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const P: &str = "meshwarden.token_limiter";

/// A budget of `per_minute` tokens (input + output) for every session, each response reserving 100 + 100.
fn metered(per_minute: u64) -> Value {
    json!({"on_upgrade": "meter",
           "realtime_input_reservation": 100, "realtime_output_reservation": 100,
           "rules": [{"name": "team", "key": {"constant": "all"}, "limits": {"tokens_per_minute": per_minute}}]})
}

async fn envoy(
    template: &str,
    upstream: u16,
    cfg: &Value,
    vars: &[(&str, String)],
) -> (tempfile::NamedTempFile, Envoy) {
    envoy_with_upgrades(template, "token-limiter", upstream, cfg, vars).await.unwrap()
}

/// Run the SDK client: `n` responses in one session, then a second connection attempt.
async fn sdk_session(e: &Envoy, n: usize, extra: &[&str]) -> Value {
    let n = n.to_string();
    let mut args = vec![n.as_str()];
    args.extend(extra);
    realtime_sdk_session(e.port, &args).await.unwrap()
}

/// Wait (5 s at most) for a stat to reach `want`: a session is settled when Envoy handles its end.
async fn wait_stat(e: &Envoy, name: &str, want: u64) {
    for _ in 0..100 {
        if e.stat(name).await.unwrap() >= want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(e.stat(name).await.unwrap(), want, "{name}");
}

async fn server_stats(port: u16) -> Value {
    realtime_server_stats(port).await.unwrap()
}

/// The server's counters settle once the closed connections are handled.
async fn server_stats_when(port: u16, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let s = server_stats(port).await;
        if done(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server_stats(port).await
}

/// Each response costs 100 + 300 tokens against 1500 per minute: four are charged (1600, one response
/// over, which the stated bound allows), the fifth reservation is refused, and the SDK sees the error
/// event and the close; the server never gets the fifth `response.create`; a new session gets a 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_sessions_are_charged_per_response_and_ended_when_the_budget_is_spent() {
    let server =
        PyServer::start("realtime_server.py", &["--input-tokens", "100", "--output-tokens", "300"]).await.unwrap();
    let (_f, e) = envoy("token-limiter.yaml", server.port, &metered(1500), &[]).await;
    let v = sdk_session(&e, 10, &["--deflate"]).await;
    assert!(v["first"].is_null(), "{v}");
    let done = v["done"].as_array().unwrap();
    assert_eq!(done.len(), 4, "{v}");
    assert_eq!(done[0]["input_tokens"], 100);
    assert_eq!(done[0]["output_tokens"], 300);
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("rule 'team'") && message.contains("Please try again in"), "{message}");
    assert_eq!(v["closed"]["code"], 1008, "{v}");
    assert_eq!(v["closed"]["reason"], "token budget exhausted", "{v}");
    assert_eq!(v["timed_out"], false, "{v}");
    // The next session is refused before it reaches the server, with the wait.
    assert_eq!(v["second"]["status"], 429, "{v}");
    let retry: u64 = v["second"]["retry_after"].as_str().unwrap().parse().unwrap();
    // 1600 charged against 1500/min (25 tokens/s): 100 of debt plus the 200-token reservation = 12 s.
    assert!((10..=13).contains(&retry), "retry-after {retry}: {v}");
    assert_eq!(v["second"]["remaining"], "0", "{v}");
    let body: Value = serde_json::from_str(v["second"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    let s = server_stats_when(server.port, |s| !s["close_codes_received"].as_array().unwrap().is_empty()).await;
    assert_eq!(s["connections"], 1, "the refused session never reached the server: {s}");
    assert_eq!(s["response_creates_received"], 4, "the fifth response.create was dropped: {s}");
    assert_eq!(s["close_codes_received"], json!([1008]), "{s}");
    assert_eq!(s["extensions"], json!([null]), "the permessage-deflate offer was withdrawn: {s}");
    assert_eq!(s["paths"], json!(["/v1/realtime?model=gpt-realtime"]));

    assert_eq!(e.stat(&format!("{P}.realtime.sessions")).await.unwrap(), 2);
    assert_eq!(e.stat(&format!("{P}.realtime.responses")).await.unwrap(), 4);
    assert_eq!(e.stat(&format!("{P}.realtime.ended_exhausted")).await.unwrap(), 1);
    assert_eq!(e.stat(&format!("{P}.rule.team.charged_tokens")).await.unwrap(), 1600);
    assert_eq!(e.stat(&format!("{P}.input_tokens")).await.unwrap(), 400);
    assert_eq!(e.stat(&format!("{P}.output_tokens")).await.unwrap(), 1200);
    assert_eq!(e.stat(&format!("{P}.usage.reported")).await.unwrap(), 4);
}

/// A session that ends with a response done gives its next reservation back: sessions one after another
/// are charged exactly their responses' usage. A response still being generated when the client leaves
/// is charged its reservation. Fragmented `response.done` events and large audio deltas are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_reservations_are_returned_and_cut_responses_charged() {
    let server = PyServer::start(
        "realtime_server.py",
        &["--input-tokens", "10", "--output-tokens", "20", "--fragment", "--audio-bytes", "200000"],
    )
    .await
    .unwrap();
    let (_f, e) = envoy("token-limiter.yaml", server.port, &metered(1_000_000), &[]).await;
    let v = sdk_session(&e, 3, &["--metadata-output-tokens", "50"]).await;
    assert_eq!(v["done"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["done"][2]["output_tokens"], 50, "{v}");
    assert!(v["error"].is_null() && v["closed"].is_null(), "{v}");
    assert_eq!(v["second"]["status"], 101, "{v}");
    let charged = format!("{P}.rule.team.charged_tokens");
    wait_stat(&e, &charged, 3 * 60).await;
    assert_eq!(e.stat(&format!("{P}.realtime.responses")).await.unwrap(), 3);

    // Two responses, the second held open when the client leaves: 10 + 20, then its reservation 200.
    let before = e.stat(&charged).await.unwrap();
    let v = sdk_session(&e, 2, &["--hold"]).await;
    assert_eq!(v["done"].as_array().unwrap().len(), 1, "{v}");
    wait_stat(&e, &format!("{P}.realtime.cut_responses"), 1).await;
    assert_eq!(e.stat(&charged).await.unwrap() - before, 30 + 200);
    assert_eq!(e.stat(&format!("{P}.usage.estimated")).await.unwrap(), 1);
}

/// A raw WebSocket handshake: the status, and the open socket.
async fn handshake(port: u16) -> (u16, TcpStream) {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = "GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nhost: localhost\r\nconnection: Upgrade\r\n\
               upgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut b)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the head: {}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    (head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), sock)
}

/// `max_concurrent_requests` counts open sessions: the slot is held while a session is open and
/// released when it ends, however it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_sessions_hold_a_concurrency_slot_until_they_end() {
    let server = PyServer::start("realtime_server.py", &[]).await.unwrap();
    let cfg = json!({"on_upgrade": "meter",
                     "rules": [{"name": "team", "key": {"constant": "all"}, "max_concurrent_requests": 1,
                                "limits": {"tokens_per_minute": 1_000_000}}]});
    let (_f, e) = envoy("token-limiter.yaml", server.port, &cfg, &[]).await;
    let (status, first) = handshake(e.port).await;
    assert_eq!(status, 101);
    let (status, _) = handshake(e.port).await;
    assert_eq!(status, 429, "the one slot is held by the open session");
    drop(first); // the client goes away without a close frame
    let mut admitted = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, _s) = handshake(e.port).await;
        if status == 101 {
            admitted = true;
            break;
        }
    }
    assert!(admitted, "the slot was released when the session ended");
    assert_eq!(e.stat(&format!("{P}.rule.team.limited_concurrency")).await.unwrap(), 1);
}

/// A raw upgrade request to `path`: the status and the head.
async fn upgrade_status(port: u16, path: &str, method: &str) -> (u16, String) {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_string();
    (head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), head)
}

/// An upstream that refuses the upgrade (a 401, no `101`): its answer passes unread and the session's
/// reservation is given back (nothing was generated), so a budget of one reservation admits session
/// after session. The whole budget stays intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_gives_its_reservation_back() {
    let server = PyServer::start("realtime_server.py", &[]).await.unwrap();
    let (_f, e) = envoy("token-limiter.yaml", server.port, &metered(200), &[]).await;
    for _ in 0..3 {
        let (status, head) = upgrade_status(e.port, "/v1/refused/realtime?model=gpt-realtime", "GET").await;
        assert_eq!(status, 401, "{head}");
    }
    wait_stat(&e, &format!("{P}.realtime.upgrade_refused_upstream"), 3).await;
    assert_eq!(server_stats(server.port).await["refused"], 3);
    let (status, head) = upgrade_status(e.port, "/v1/realtime?model=gpt-realtime", "GET").await;
    assert_eq!(status, 101, "the budget is whole: {head}");
    assert!(head.contains("x-ratelimit-remaining-tokens: 0"), "the 101 carries the budget left: {head}");
    assert_eq!(e.stat(&format!("{P}.rule.team.charged_tokens")).await.unwrap(), 0);
    // Gemini Live reports usage this filter does not read: `meter` refuses it rather than let it through
    // uncharged.
    let gemini = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";
    let reached = server_stats(server.port).await["paths"].as_array().unwrap().len();
    let (status, head) = upgrade_status(e.port, gemini, "GET").await;
    assert_eq!(status, 403, "{head}");
    assert_eq!(e.stat(&format!("{P}.upgrade.rejected")).await.unwrap(), 1);
    assert_eq!(
        server_stats(server.port).await["paths"].as_array().unwrap().len(),
        reached,
        "nothing reached the server"
    );
}

/// Sidecar state: the same session ends when the sidecar refuses the next reservation (decided after
/// the charged response reached it), and the sidecar's budget then refuses a new session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_sessions_are_metered_through_the_sidecar() {
    let server =
        PyServer::start("realtime_server.py", &["--input-tokens", "100", "--output-tokens", "300"]).await.unwrap();
    let sidecar = Sidecar::start(&[]).unwrap();
    let mut cfg = metered(1500);
    cfg["state"] = json!("sidecar");
    cfg["sidecar"] = json!({"cluster": "meshwarden_sidecar", "timeout_ms": 500, "failure_mode": "deny"});
    let (_f, e) =
        envoy("token-limiter-sidecar.yaml", server.port, &cfg, &[("SIDECAR_PORT", sidecar.port().to_string())]).await;
    let v = sdk_session(&e, 10, &[]).await;
    let done = v["done"].as_array().unwrap().len();
    // Four responses fit as in local mode; the refusal may come one response later, as the charge and
    // the next reservation are separate calls.
    assert!((4..=5).contains(&done), "{done} responses: {v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    assert_eq!(v["closed"]["code"], 1008, "{v}");
    assert_eq!(v["second"]["status"], 429, "{v}");
    let s = server_stats_when(server.port, |s| !s["close_codes_received"].as_array().unwrap().is_empty()).await;
    assert_eq!(s["connections"], 1, "{s}");
    // The refusal is decided when the sidecar answers: a `response.create` the client sent before that
    // reaches the server. That response is not shown to the client, but it is charged.
    let generated = s["responses_done_sent"].as_u64().unwrap();
    assert!(generated == done as u64 || generated == done as u64 + 1, "{done} shown, {s}");
    wait_stat(&e, &format!("{P}.realtime.responses"), generated).await;
    assert_eq!(e.stat(&format!("{P}.realtime.responses")).await.unwrap(), generated);
}
