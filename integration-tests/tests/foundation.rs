//! Foundation: each filter's real `.wasm` loads in Envoy 1.40 and passes traffic; the whole chain serves
//! OpenAI JSON and streaming answers; an invalid config is rejected with the bad field named.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::envoy::EnvoyBuilder;
use meshwarden_integration_tests::mock_llm::MockLlm;
use meshwarden_integration_tests::paths::FILTERS;
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream,
           "messages": [{"role": "user", "content": "Say hello to the gateway."}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_filter_loads_and_passes_traffic() {
    let mock = MockLlm::start().await.unwrap();
    for filter in FILTERS {
        let envoy = EnvoyBuilder::new(&format!("{filter}.yaml"))
            .upstream_port(mock.port())
            .start()
            .await
            .unwrap_or_else(|e| panic!("{filter}: {e:#}"));
        let resp = client().post(envoy.url("/v1/chat/completions")).json(&chat(false)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{filter}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion", "{filter}");
        assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);
        let stat = format!("meshwarden.{}.requests", filter.replace('-', "_"));
        assert_eq!(envoy.stat(&stat).await.unwrap(), 1, "{filter}: stat {stat}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_chain_serves_json_and_streams() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = EnvoyBuilder::new("chain.yaml").upstream_port(mock.port()).start().await.unwrap();

    let sent = chat(false);
    let resp = client().post(envoy.url("/v1/chat/completions")).json(&sent).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let upstream = mock.last_request().unwrap();
    assert_eq!(upstream.path, "/v1/chat/completions");
    assert_eq!(upstream.json().unwrap(), sent, "the chain passes the body through unchanged");

    let resp = client().post(envoy.url("/v1/chat/completions")).json(&chat(true)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    assert!(text.contains("chat.completion.chunk"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // Anthropic too
    let resp = client()
        .post(envoy.url("/v1/messages"))
        .json(&json!({"model":"claude-sonnet-4","max_tokens":64,"stream":true,
                      "messages":[{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("event: message_delta"), "{text}");

    for filter in FILTERS {
        let stat = format!("meshwarden.{}.requests", filter.replace('-', "_"));
        assert_eq!(envoy.stat(&stat).await.unwrap(), 3, "{stat}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_is_rejected_naming_the_field() {
    for filter in FILTERS {
        let log = EnvoyBuilder::new(&format!("{filter}.yaml"))
            .upstream_port(9)
            .filter_config(filter, &json!({"max_body_bytes": 1024, "max_bodybytes": 5}))
            .start_expect_failure()
            .await
            .unwrap();
        assert!(
            log.contains(&format!(
                "meshwarden {}: invalid configuration at $.max_bodybytes: unknown field `max_bodybytes`",
                filter.replace('-', "_")
            )),
            "{filter}: {log}"
        );
    }
    let log = EnvoyBuilder::new("token-limiter.yaml")
        .upstream_port(9)
        .filter_config("token-limiter", &json!({"max_body_bytes": 0}))
        .start_expect_failure()
        .await
        .unwrap();
    assert!(log.contains("invalid configuration at $.max_body_bytes: must be between 1 and"), "{log}");
    let log = EnvoyBuilder::new("token-limiter.yaml")
        .upstream_port(9)
        .filter_config_raw("token-limiter", "{not json")
        .start_expect_failure()
        .await
        .unwrap();
    assert!(log.contains("invalid configuration at $: malformed JSON"), "{log}");
}
