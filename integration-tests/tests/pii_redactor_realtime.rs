//! pii-redactor masking OpenAI Realtime sessions (`on_upgrade: mask`): real Envoy with WebSocket upgrades
//! enabled + the real `.wasm`, the mock Realtime server (`integration-tests/python/realtime_server.py`
//! with `--echo`: the spoken answer repeats the user's message, its transcript in 5-character deltas with
//! audio deltas between) and the official `openai` SDK's Realtime client (`openai_realtime.py`).
//!
//! What left the gateway (the server's record of the items it read) is masked; what the client heard
//! (the transcript joined from its deltas, and the one in `response.done`) has the values back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::envoy::Envoy;
use meshwarden_integration_tests::python::PyServer;
use meshwarden_integration_tests::upgrade::{
    envoy_with_upgrades, realtime_sdk_session, realtime_server_stats, upgrade_round_trip,
};
use serde_json::{json, Value};
use std::time::Duration;

const P: &str = "meshwarden.pii_redactor";
const SAID: &str = "Email jane.doe@example.com or call +1 415 555 2671 about card 4111 1111 1111 1111, thanks";

async fn envoy(upstream: u16, cfg: &Value) -> (tempfile::NamedTempFile, Envoy) {
    envoy_with_upgrades("pii-redactor.yaml", "pii-redactor", upstream, cfg, &[]).await.unwrap()
}

async fn sdk_session(e: &Envoy, say: &str) -> Value {
    realtime_sdk_session(e.port, &["1", "--deflate", "--say", say]).await.unwrap()
}

async fn server_stats(port: u16) -> Value {
    realtime_server_stats(port).await.unwrap()
}

async fn stat_at_least(e: &Envoy, name: &str, want: u64) -> u64 {
    for _ in 0..100 {
        let n = e.stat(name).await.unwrap();
        if n >= want {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    e.stat(name).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realtime_session_is_masked_on_the_way_out_and_restored_in_the_spoken_answer() {
    let server = PyServer::start("realtime_server.py", &["--echo"]).await.unwrap();
    let (_f, e) = envoy(server.port, &json!({"on_upgrade": "mask"})).await;
    let v = sdk_session(&e, SAID).await;
    assert!(v["error"].is_null() && v["closed"].is_null(), "{v}");
    // What the server read: placeholders, none of the values.
    let s = server_stats(server.port).await;
    let sent = s["items"][0].as_str().unwrap();
    assert_eq!(sent, "Email <EMAIL_1> or call <PHONE_1> about card <CREDIT_CARD_1>, thanks", "{s}");
    assert_eq!(s["extensions"][0], Value::Null, "no compression negotiated: {s}");
    // What the client heard: the values back, in the transcript's deltas (placeholders cut across
    // deltas of 5 characters, audio between) and in response.done.
    assert_eq!(v["transcripts"][0]["deltas"], SAID, "{v}");
    assert_eq!(v["transcripts"][0]["done"], SAID, "{v}");
    assert_eq!(stat_at_least(&e, &format!("{P}.findings.email.mask"), 1).await, 1);
    assert_eq!(e.stat(&format!("{P}.findings.credit_card.mask")).await.unwrap(), 1);
    // Three placeholders, each restored four times: in the server's echo of the item
    // (`conversation.item.created`), the transcript deltas, the `.done` transcript and response.done.
    assert_eq!(e.stat(&format!("{P}.restored")).await.unwrap(), 12);
    assert_eq!(e.stat(&format!("{P}.realtime.sessions")).await.unwrap(), 2);

    // Without masking (upgrades passed unscanned), the same values reach the server: the test can fail.
    let server = PyServer::start("realtime_server.py", &["--echo"]).await.unwrap();
    let (_f, e) = envoy(server.port, &json!({"on_unscannable": "pass"})).await;
    let v = sdk_session(&e, SAID).await;
    assert_eq!(v["transcripts"][0]["deltas"], SAID, "{v}");
    assert_eq!(server_stats(server.port).await["items"][0], SAID);
}

/// A `reject` detector ends the session: the server never reads the message, the client gets an `error`
/// event and a close frame 1008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_value_ends_the_realtime_session() {
    let server = PyServer::start("realtime_server.py", &["--echo"]).await.unwrap();
    let cfg = json!({"on_upgrade": "mask", "detectors": {"credit_card": {"action": "reject"}}});
    let (_f, e) = envoy(server.port, &cfg).await;
    let v = sdk_session(&e, SAID).await;
    assert_eq!(v["error"]["code"], "sensitive_data_rejected", "{v}");
    assert_eq!(v["closed"]["code"], 1008, "{v}");
    assert_eq!(v["closed"]["reason"], "sensitive data refused", "{v}");
    let s = server_stats(server.port).await;
    assert_eq!(s["items"], json!([]), "nothing of the message reached the server: {s}");
    assert_eq!(s["response_creates_received"], 0, "{s}");
    assert_eq!(stat_at_least(&e, &format!("{P}.realtime.ended_rejected"), 1).await, 1);
    // Other upgrades stay unscannable: refused by default.
    let gemini = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";
    let out = upgrade_round_trip(e.port, gemini, &[], b"\x81\x02{}", Duration::from_secs(3)).await.unwrap();
    assert_eq!(out.status(), 403, "{}", out.head);
}
