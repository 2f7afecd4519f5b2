//! WebSocket upgrades (OpenAI's Realtime API, Gemini Live) through an Envoy with upgrades enabled, as
//! Istio's sidecars and gateways have them, for every filter that reads request bodies. Envoy hands the
//! upgraded bytes to the filters as a request body that never ends: before 2026-12-07 token-limiter,
//! prompt-guard and pii-redactor held the first frame waiting for that end, so the session hung after
//! its `101`. Each now refuses the upgrade (403 `upgrade_refused`, before anything reaches the upstream)
//! or, when configured to, lets it through untouched with its frames flowing both ways at once. gRPC
//! streams, whose request body does not end while the client waits for answers, are not held either.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::envoy::{Envoy, EnvoyBuilder};
use meshwarden_integration_tests::upgrade::{
    early_answer_upstream, echo_upgrade_upstream, grpc_message, streaming_post, upgrade_round_trip,
    with_websocket_upgrades,
};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::Duration;

const REALTIME: &str = "/v1/realtime?model=gpt-4o-realtime-preview";
/// A WebSocket text frame's first bytes; Envoy does not read frames, the filters must not wait for them.
const FRAMES: &[u8] = b"\x81\x05hello";

/// For `filter` (as in `envoy-configs/<filter>.yaml`): the default configuration refuses the upgrade, the
/// one with `pass` (its option set to pass) lets the frames through both ways; `stat` counts each.
async fn refused_by_default_passed_when_asked(filter: &str, pass: Value, stat: &str) {
    let (upstream, reached) = echo_upgrade_upstream().await.unwrap();
    let (_file, template) = with_websocket_upgrades(&format!("{filter}.yaml")).unwrap();
    let start = |config: &Value| {
        EnvoyBuilder::new(template.to_str().unwrap()).upstream_port(upstream).filter_config(filter, config).start()
    };
    let headers = [("x-team", "a"), ("authorization", "Bearer sk-test")];
    let e: Envoy = start(&json!({})).await.unwrap();
    let out = upgrade_round_trip(e.port, REALTIME, &headers, FRAMES, Duration::from_secs(3)).await.unwrap();
    assert_eq!(out.status(), 403, "{filter}: {}", out.head);
    let body: Value = serde_json::from_str(&out.body).unwrap();
    assert_eq!(body["error"]["code"], "upgrade_refused", "{filter}: {}", out.body);
    assert_eq!(body["error"]["type"], "permission_error", "{filter}");
    assert_eq!(reached.load(Ordering::SeqCst), 0, "{filter}: nothing reached the upstream");
    assert_eq!(e.stat(&format!("{stat}.rejected")).await.unwrap_or(0) + e.stat(stat).await.unwrap_or(0), 1, "{filter}");
    let e: Envoy = start(&pass).await.unwrap();
    let out = upgrade_round_trip(e.port, REALTIME, &headers, FRAMES, Duration::from_secs(3)).await.unwrap();
    assert_eq!(out.status(), 101, "{filter}: {}", out.head);
    assert_eq!(out.echoed.as_deref(), Some(FRAMES), "{filter}: the frames go both ways at once");
    assert_eq!(reached.load(Ordering::SeqCst), 1, "{filter}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_limiter_refuses_or_passes_websocket_upgrades() {
    let pass = json!({"on_upgrade": "pass",
                      "rules": [{"name": "t", "key": {"header": "x-team"}, "limits": {"tokens_per_day": 1000}}]});
    refused_by_default_passed_when_asked("token-limiter", pass, "meshwarden.token_limiter.upgrade").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_guard_refuses_or_passes_websocket_upgrades() {
    refused_by_default_passed_when_asked(
        "prompt-guard",
        json!({"on_upgrade": "pass"}),
        "meshwarden.prompt_guard.upgrade",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pii_redactor_refuses_or_passes_websocket_upgrades() {
    refused_by_default_passed_when_asked(
        "pii-redactor",
        json!({"on_unscannable": "pass"}),
        "meshwarden.pii_redactor.unscannable.upgrade_refused",
    )
    .await;
}

/// mcp-authz: a WebSocket upgrade to an MCP endpoint (the MCP Python SDK still ships a WebSocket server
/// transport) would carry JSON-RPC calls in frames the filter does not read. Before 2026-12-07 the GET was
/// decided as the session stream and, under a policy that allows it, every tool call in the frames passed
/// unauthorized. It is refused whatever the policy says; other paths still pass as `other_paths` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_authz_refuses_websocket_upgrades_to_mcp_endpoints() {
    let (upstream, reached) = echo_upgrade_upstream().await.unwrap();
    let (_file, template) = with_websocket_upgrades("mcp-authz.yaml").unwrap();
    let policy = json!({"mcp_paths": ["/mcp"], "policy": {"default": "allow", "rules": []}});
    let e = EnvoyBuilder::new(template.to_str().unwrap())
        .upstream_port(upstream)
        .filter_config("mcp-authz", &policy)
        .start()
        .await
        .unwrap();
    let out = upgrade_round_trip(e.port, "/mcp", &[], FRAMES, Duration::from_secs(3)).await.unwrap();
    assert_eq!(out.status(), 403, "{}", out.head);
    let body: Value = serde_json::from_str(&out.body).unwrap();
    assert_eq!(body["jsonrpc"], "2.0", "{}", out.body);
    assert!(body["error"]["message"].as_str().unwrap().contains("WebSocket"), "{}", out.body);
    assert_eq!(reached.load(Ordering::SeqCst), 0);
    assert_eq!(e.stat("meshwarden.mcp_authz.upgrade_refused").await.unwrap(), 1);
    // Not an MCP or A2A endpoint: passes (the default `other_paths`), frames both ways.
    let out = upgrade_round_trip(e.port, "/ws/chat", &[], FRAMES, Duration::from_secs(3)).await.unwrap();
    assert_eq!(out.status(), 101, "{}", out.head);
    assert_eq!(out.echoed.as_deref(), Some(FRAMES));
}

/// Envoy (upgrades enabled, no buffer filter) with inference-router routing to a pool of one endpoint, the
/// upstream on `upstream`; the file holds the configuration as long as the Envoy runs.
async fn inference_router_in_front_of(upstream: u16) -> (tempfile::NamedTempFile, Envoy) {
    let (file, template) = with_websocket_upgrades("inference-router-pool.yaml").unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{upstream}").parse().unwrap();
    let e = EnvoyBuilder::new(template.to_str().unwrap())
        .filter_config(
            "inference-router",
            &json!({"pool": "test", "refresh_interval_ms": 50, "max_snapshot_age_ms": 500}),
        )
        .var("POOL_LB_ENDPOINTS", meshwarden_integration_tests::model_sim::lb_endpoints_yaml(&[addr]))
        .var("SIDECAR_PORT", "9")
        .start()
        .await
        .unwrap();
    (file, e)
}

/// inference-router: a WebSocket upgrade sends no body before its `101`, so it is routed on its headers at
/// once. Before 2026-12-07 the headers were held for a body that could not come (the client waits for the
/// `101` before it sends a frame), and the upgrade waited for the hold's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_router_routes_websocket_upgrades_at_once() {
    let (upstream, reached) = echo_upgrade_upstream().await.unwrap();
    let (_file, e) = inference_router_in_front_of(upstream).await;
    let started = std::time::Instant::now();
    let out = upgrade_round_trip(e.port, REALTIME, &[], FRAMES, Duration::from_secs(3)).await.unwrap();
    assert_eq!(out.status(), 101, "{}", out.head);
    assert_eq!(out.echoed.as_deref(), Some(FRAMES));
    assert_eq!(reached.load(Ordering::SeqCst), 1);
    assert_eq!(e.stat("meshwarden.inference_router.upgrade").await.unwrap(), 1);
    eprintln!("upgrade answered in {:?}", started.elapsed());
}

/// gRPC client and bidirectional streams send their next message only after an answer, so their request
/// body does not end while they wait. Before 2026-12-07 token-limiter, pii-redactor and prompt-guard
/// held the first message until that end: the stream hung. token-limiter now admits a gRPC request on its
/// first message and lets the rest flow; pii-redactor and prompt-guard refuse it with a gRPC answer
/// (`grpc-status` 7) or, with `on_unscannable` / `on_binary_body: pass`, let it flow unread. A JSON body streamed the same way is still held by
/// token-limiter (it reads the prompt at the body's end), which shows what holding looks like.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_are_not_held() {
    let (upstream, reached) = early_answer_upstream().await.unwrap();
    let path = "/inference.GRPCInferenceService/ModelStreamInfer";
    let grpc = [("content-type", "application/grpc"), ("te", "trailers"), ("x-team", "a")];
    let wait = Duration::from_secs(3);
    let start = |filter: &'static str, config: Value| async move {
        let (file, template) = with_websocket_upgrades(&format!("{filter}.yaml")).unwrap();
        let e = EnvoyBuilder::new(template.to_str().unwrap())
            .upstream_port(upstream)
            .filter_config(filter, &config)
            .start()
            .await
            .unwrap();
        (file, e)
    };
    let budget = json!({"rules": [{"name": "t", "key": {"header": "x-team"}, "limits": {"tokens_per_day": 100000}}]});
    let (_f, tl) = start("token-limiter", budget).await;
    let (head, body) = streaming_post(tl.port, path, &grpc, &grpc_message(b"llama", b"PING"), wait).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "token-limiter held the stream: {head:?}");
    assert!(String::from_utf8_lossy(&body).contains("PING"), "the first message reached the server: {body:?}");
    assert_eq!(tl.stat("meshwarden.token_limiter.admitted").await.unwrap(), 1);
    let json = [("content-type", "application/json"), ("x-team", "a")];
    let (_, body) = streaming_post(tl.port, "/v1/chat/completions", &json, b"{\"model\":", wait).await.unwrap();
    assert!(!String::from_utf8_lossy(&body).contains("model"), "a JSON body is held to its end: {body:?}");
    // pii-redactor and prompt-guard: refused with a gRPC answer by default, passed unread when asked.
    for (filter, pass) in
        [("pii-redactor", json!({"on_unscannable": "pass"})), ("prompt-guard", json!({"on_binary_body": "pass"}))]
    {
        let before = reached.load(Ordering::SeqCst);
        let (_f, strict) = start(filter, json!({})).await;
        let (head, _) = streaming_post(strict.port, path, &grpc, &grpc_message(b"llama", b"PING"), wait).await.unwrap();
        let lower = head.to_ascii_lowercase();
        assert!(lower.starts_with("http/1.1 200") && lower.contains("grpc-status: 7"), "{filter}: {head:?}");
        assert_eq!(reached.load(Ordering::SeqCst), before, "{filter}: refused before the upstream");
        let (_f, open) = start(filter, pass).await;
        let (head, body) =
            streaming_post(open.port, path, &grpc, &grpc_message(b"llama", b"PING"), wait).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{filter} held the stream: {head:?}");
        assert!(String::from_utf8_lossy(&body).contains("PING"), "{filter}: {body:?}");
    }
}

/// A bidirectional gRPC stream sends many prompts on one admission: token-limiter counts the messages
/// after the first and charges them by size (bytes / 4) when the stream ends, and prices the gRPC
/// answer by its size too. Before 2026-12-07 only the first message was estimated and the answer cost the
/// flat output reservation, so a stream kept open was a budget that never ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_limiter_charges_a_grpc_streams_later_messages() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream, _reached) = early_answer_upstream().await.unwrap();
    let (_file, template) = with_websocket_upgrades("token-limiter.yaml").unwrap();
    let budget = json!({"rules": [{"name": "t", "key": {"header": "x-team"}, "limits": {"tokens_per_day": 10000000}}]});
    let e = EnvoyBuilder::new(template.to_str().unwrap())
        .upstream_port(upstream)
        .filter_config("token-limiter", &budget)
        .start()
        .await
        .unwrap();
    let charged = "meshwarden.token_limiter.rule.t.charged_tokens";
    // One stream with `later` more messages; returns what the budget was charged for it.
    let stream = |later: usize| {
        let e = &e;
        async move {
            let before = e.stat(charged).await.unwrap();
            let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", e.port)).await.unwrap();
            let first = grpc_message(b"llama", b"PING");
            let mut req = format!(
                "POST /inference.GRPCInferenceService/ModelStreamInfer HTTP/1.1\r\nhost: localhost\r\n\
                 transfer-encoding: chunked\r\ncontent-type: application/grpc\r\nte: trailers\r\nx-team: a\r\n\r\n{:x}\r\n",
                first.len()
            )
            .into_bytes();
            req.extend_from_slice(&first);
            req.extend_from_slice(b"\r\n");
            sock.write_all(&req).await.unwrap();
            let msg = grpc_message(b"llama", &[b'x'; 100]);
            let mut echoed = 0usize;
            let mut buf = [0u8; 65536];
            for _ in 0..later {
                let mut chunk = format!("{:x}\r\n", msg.len()).into_bytes();
                chunk.extend_from_slice(&msg);
                chunk.extend_from_slice(b"\r\n");
                sock.write_all(&chunk).await.unwrap();
            }
            // Read the echo until every message came back (the stream is open all along).
            let want = (later + 1) * msg.len() / 2;
            while echoed < want {
                match tokio::time::timeout(Duration::from_secs(3), sock.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => echoed += n,
                    _ => break,
                }
            }
            drop(sock); // the client goes away: the stream ends, and is settled
            for _ in 0..100 {
                if e.stat(charged).await.unwrap() > before {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (e.stat(charged).await.unwrap() - before, msg.len())
        }
    };
    let (one, _) = stream(0).await;
    let (many, msg_len) = stream(40).await;
    let later_input = (40 * msg_len).div_ceil(4) as u64;
    // Input: the 40 later messages by size; output: at least their echo by size (the echo also carries
    // the upstream's HTTP chunk framing).
    assert!(many >= one + 2 * later_input, "one message {one}, 41 messages {many}, later input {later_input}");
    assert!(many <= one + 2 * later_input + 400, "one message {one}, 41 messages {many}, later input {later_input}");
}

/// inference-router: a gRPC stream is routed on its headers at once (protobuf names no `model` it could
/// read); before 2026-12-07 its first message was held for the body's end, which a bidirectional stream
/// does not send while it waits for answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_router_routes_grpc_streams_at_once() {
    let (upstream, reached) = early_answer_upstream().await.unwrap();
    let (_file, e) = inference_router_in_front_of(upstream).await;
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];
    let path = "/inference.GRPCInferenceService/ModelStreamInfer";
    let (head, body) =
        streaming_post(e.port, path, &grpc, &grpc_message(b"llama", b"PING"), Duration::from_secs(3)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    assert!(String::from_utf8_lossy(&body).contains("PING"), "the first message reached the server: {body:?}");
    assert_eq!(reached.load(Ordering::SeqCst), 1);
    assert_eq!(e.stat("meshwarden.inference_router.grpc").await.unwrap(), 1);
}
