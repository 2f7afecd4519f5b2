//! token-limiter in `local` mode through real Envoy (2 worker threads) + the real `.wasm` + the mock LLM:
//! 429 shape and exact retry-after, remaining headers going down, stream usage (OpenAI + Anthropic),
//! fallback model, concurrency with client aborts, 50 concurrent clients within the stated bound, and
//! bad inputs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::envoy::{Envoy, EnvoyBuilder};
use meshwarden_integration_tests::mock_llm::MockLlm;
use meshwarden_shared::errors::rfc3339_utc;
use meshwarden_shared::llm::{estimate_request_tokens, extract_request_texts, Api};
use serde_json::{json, Value};
use std::time::Duration;

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// One rule `t`: a daily token budget per `x-team`, 10 output tokens reserved when a request sets no cap.
fn team_budget(tokens_per_day: u64) -> Value {
    json!({"default_output_reservation": 10,
           "rules":[{"name":"t","key":{"header":"x-team"},"limits":{"tokens_per_day":tokens_per_day}}]})
}

async fn envoy(mock: &MockLlm, config: Value) -> Envoy {
    EnvoyBuilder::new("token-limiter.yaml")
        .upstream_port(mock.port())
        .filter_config("token-limiter", &config)
        .start()
        .await
        .unwrap()
}

fn chat(model: &str, text: &str, max_tokens: Option<u64>, stream: bool) -> Value {
    let mut v = json!({"model": model, "messages": [{"role": "user", "content": text}]});
    if let Some(m) = max_tokens {
        v["max_tokens"] = json!(m);
    }
    if stream {
        v["stream"] = json!(true);
    }
    v
}

fn estimate(api: Api, body: &Value) -> u64 {
    estimate_request_tokens(&extract_request_texts(api, body))
}

async fn post(envoy: &Envoy, path: &str, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = client().post(envoy.url(path)).json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

fn h(resp: &reqwest::Response, name: &str) -> String {
    resp.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_else(|| panic!("no header {name}"))
}

/// Send `body` to the chat endpoint until the first 429: (requests admitted before it, the 429).
async fn until_limited(e: &Envoy, body: &Value, hdrs: &[(&str, &str)]) -> (u64, reqwest::Response) {
    for admitted in 0..20 {
        let r = post(e, "/v1/chat/completions", body, hdrs).await;
        if r.status() == 429 {
            return (admitted, r);
        }
        assert_eq!(r.status(), 200);
        let _ = r.text().await;
    }
    panic!("never limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_budget_gets_openai_429_with_exact_retry_after() {
    let mock = MockLlm::start().await.unwrap();
    // 600 tokens per minute = 10 tokens per second.
    let e =
        envoy(&mock, json!({"rules":[{"name":"team","key":{"header":"x-team"},"limits":{"tokens_per_minute":600}}]}))
            .await;
    let body = chat("gpt-4o-mini", "Tell me a story about budgets and gateways.", Some(100), false);
    let cost = estimate(Api::OpenAiChat, &body) + 100;
    let hdrs = [("x-team", "alpha"), ("x-mock-completion-tokens", "100")];
    let (admitted, denied) = until_limited(&e, &body, &hdrs).await;
    assert_eq!(admitted, 600 / cost, "admitted exactly as many as the budget holds");
    let retry_ms: u64 = h(&denied, "retry-after-ms").parse().unwrap();
    let retry_s: u64 = h(&denied, "retry-after").parse().unwrap();
    let remaining: u64 = h(&denied, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert_eq!(h(&denied, "x-ratelimit-limit-tokens"), "600");
    assert!(h(&denied, "x-ratelimit-reset-tokens").ends_with('s'));
    // exact: (cost - remaining) tokens at 10 tokens/s; `remaining` is floored, so up to 100 ms less.
    let expected = (cost - remaining) * 100;
    assert!(retry_ms <= expected && retry_ms + 100 >= expected, "retry {retry_ms} ms vs {expected} ms");
    assert_eq!(retry_s, retry_ms.div_ceil(1000));
    assert_eq!(h(&denied, "content-type"), "application/json");
    let err: Value = denied.json().await.unwrap();
    assert_eq!(err["error"]["type"], "rate_limit_error");
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    assert!(err["error"]["message"].as_str().unwrap().contains("team"));
    let upstream_before = mock.requests().len();
    assert_eq!(upstream_before, admitted as usize, "the 429 never reached the model");
    // Another team has its own budget.
    assert_eq!(post(&e, "/v1/chat/completions", &body, &[("x-team", "beta")]).await.status(), 200);
    // Honouring retry-after-ms is enough (and not much more is needed).
    tokio::time::sleep(Duration::from_millis(retry_ms + 20)).await;
    assert_eq!(post(&e, "/v1/chat/completions", &body, &hdrs).await.status(), 200);
    assert_eq!(e.stat("meshwarden.token_limiter.rule.team.limited").await.unwrap(), 1);
    assert_eq!(e.stat("meshwarden.token_limiter.limited").await.unwrap(), 1);
    assert_eq!(e.stat("meshwarden.token_limiter.model.gpt-4o-mini.limited").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_route_gets_anthropic_429() {
    let mock = MockLlm::start().await.unwrap();
    let e =
        envoy(&mock, json!({"rules":[{"name":"all","key":{"constant":"g"},"limits":{"tokens_per_hour":50}}]})).await;
    let body = json!({"model":"claude-sonnet-4","max_tokens":64,"messages":[{"role":"user","content":"hello"}]});
    let r = post(&e, "/v1/messages", &body, &[]).await;
    assert_eq!(r.status(), 429, "64 output tokens reserved exceed 50: never fits");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("too large"), "{v}");
    assert!(mock.requests().is_empty());

    // A spent budget: Anthropic's error shape, retry-after, and Anthropic's rate-limit headers.
    let e = envoy(&mock, json!({"rules":[{"name":"team","key":{"constant":"g"},"limits":{"tokens_per_minute":600}}]}))
        .await;
    let body = json!({"model":"claude-sonnet-4","max_tokens":100,"messages":[{"role":"user","content":"hello there"}]});
    let denied = loop {
        let r = post(&e, "/v1/messages", &body, &[("x-mock-completion-tokens", "100")]).await;
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
        assert_eq!(h(&r, "anthropic-ratelimit-tokens-limit"), "600");
        let _ = r.text().await;
        assert!(mock.requests().len() < 10, "never limited");
    };
    let retry_ms: u64 = h(&denied, "retry-after-ms").parse().unwrap();
    assert!(retry_ms > 0 && retry_ms <= 60_000, "{retry_ms}");
    assert_eq!(h(&denied, "retry-after").parse::<u64>().unwrap(), retry_ms.div_ceil(1000));
    assert_eq!(h(&denied, "anthropic-ratelimit-tokens-limit"), "600");
    let remaining: u64 = h(&denied, "anthropic-ratelimit-tokens-remaining").parse().unwrap();
    assert!(remaining < 600);
    // When the bucket is full again, as an RFC 3339 instant within the minute (a per-minute limit).
    // Same-format RFC 3339 UTC instants order as strings; the formatter has its own unit test.
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let reset = h(&denied, "anthropic-ratelimit-tokens-reset");
    let (earliest, latest) = (rfc3339_utc(now_ms - 1000), rfc3339_utc(now_ms + 61_000));
    assert!(reset.len() == 20 && earliest <= reset && reset <= latest, "{reset} not in {earliest}..{latest}");
    let v: Value = denied.json().await.unwrap();
    assert_eq!((v["type"].as_str(), v["error"]["type"].as_str()), (Some("error"), Some("rate_limit_error")), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remaining_headers_go_down_as_tokens_are_spent() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(100000)).await;
    let body = chat("gpt-4o-mini", "How many tokens do I have left?", None, false);
    let est = estimate(Api::OpenAiChat, &body);
    let mut last = u64::MAX;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let r = post(&e, "/v1/chat/completions", &body, &[("x-team", "a"), ("x-mock-completion-tokens", "50")]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(h(&r, "x-ratelimit-limit-tokens"), "100000");
        let rem: u64 = h(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
        assert!(rem < last, "{seen:?} then {rem}");
        seen.push(rem);
        last = rem;
        let _ = r.text().await.unwrap();
    }
    // First: limit - reservation (est + 10). Later ones: the previous request settled at est + 50.
    assert_eq!(seen[0], 100000 - (est + 10));
    let step = seen[1] as i64 - seen[2] as i64;
    assert!((est as i64 + 50 - step).abs() <= 2, "each request costs est+50 once settled: {seen:?}");
    assert_eq!(e.stat("meshwarden.token_limiter.model.gpt-4o-mini.output_tokens").await.unwrap(), 200);
    assert_eq!(e.stat("meshwarden.token_limiter.usage.reported").await.unwrap(), 4);
}

/// Token-counting calls run no model and are not billed: they pass without drawing on the budget. Before,
/// each was charged its prompt, so a client that counts before it sends (agents managing their context)
/// paid twice, and a team that only counted was refused with 429s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_counting_calls_are_not_charged() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(400)).await;
    let prompt = "Count the tokens of this prompt before sending it, as agents do with long contexts. ".repeat(4);
    let anthropic = json!({"model":"claude-sonnet-4","messages":[{"role":"user","content":prompt}]});
    let responses = json!({"model":"gpt-4o","input":prompt});
    let gemini = json!({"contents":[{"role":"user","parts":[{"text":prompt}]}]});
    for round in 0..6 {
        for (path, body) in [
            ("/v1/messages/count_tokens", &anthropic),
            ("/v1/responses/input_tokens", &responses),
            ("/v1beta/models/gemini-2.0-flash:countTokens", &gemini),
        ] {
            let r = post(&e, path, body, &[("x-team", "a")]).await;
            assert_eq!(r.status(), 200, "round {round}: {path}");
            let _ = r.text().await;
        }
    }
    assert_eq!(e.stat("meshwarden.token_limiter.skipped_count_tokens").await.unwrap(), 18);
    // The whole budget is still there for the request that generates.
    let body = chat("gpt-4o-mini", "Now the real request.", None, false);
    let r = post(&e, "/v1/chat/completions", &body, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 200);
    let rem: u64 = h(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert_eq!(rem, 400 - (estimate(Api::OpenAiChat, &body) + 10));
}

/// A `multipart/form-data` upload (audio transcription, image edit, file upload) is estimated by its text
/// fields, not by the bytes of its file: before, a 200 KB audio clip was estimated at 50,000 tokens (a token
/// per 4 bytes), refused as larger than the budget ("request too large", retry useless), and a smaller one
/// drained the budget (a transcription reports no tokens to settle with). Its `model` field meets the model
/// rules, also when the form is over `max_body_bytes` (read from the part Envoy buffered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_upload_is_estimated_by_its_text_not_its_file() {
    let mock = MockLlm::start().await.unwrap();
    let mut form = Vec::new();
    for (name, value) in [("model", "whisper-1"), ("prompt", "Spell the speakers' names: Aoife, Siobhan.")] {
        form.extend_from_slice(
            format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    form.extend_from_slice(
        b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"clip.mp3\"\r\nContent-Type: audio/mpeg\r\n\r\n",
    );
    form.extend((0..200_000u32).map(|i| (i % 251) as u8));
    form.extend_from_slice(b"\r\n--XyZ--\r\n");
    let rules = json!([
        {"name":"t","key":{"constant":"all"},"limits":{"tokens_per_hour":20000}},
        {"name":"whisper","key":{"constant":"all"},"model":"whisper-1","limits":{"tokens_per_hour":20000}},
        {"name":"gpt4o","key":{"constant":"all"},"model":"gpt-4o","limits":{"tokens_per_hour":20000}}]);
    for max_body_bytes in [1_048_576, 65_536] {
        let e =
            envoy(&mock, json!({"max_body_bytes": max_body_bytes, "default_output_reservation": 10, "rules": rules}))
                .await;
        for i in 0..3 {
            let r = client()
                .post(e.url("/v1/audio/transcriptions"))
                .header("content-type", "multipart/form-data; boundary=XyZ")
                .body(form.clone())
                .send()
                .await
                .unwrap();
            assert_ne!(r.status(), 429, "max_body_bytes {max_body_bytes}, upload {i}: {:?}", r.text().await);
            let _ = r.text().await;
        }
        let charged = |rule: &str| format!("meshwarden.token_limiter.rule.{rule}.charged_tokens");
        let t = e.stat(&charged("t")).await.unwrap();
        assert!(t > 0 && t < 3 * 40, "max_body_bytes {max_body_bytes}: the prompts charged, not the files: {t}");
        assert_eq!(e.stat(&charged("whisper")).await.unwrap(), t, "the form's model meets its rule");
        assert_eq!(e.stat(&charged("gpt4o")).await.unwrap(), 0, "and only its rule");
        assert_eq!(e.stat("meshwarden.token_limiter.bad_body.not_json").await.unwrap(), 0);
    }
}

/// The usual two layers, a team total and a per-model limit keyed on the same team, live in one
/// shared-data entry: a request the model limit denies charges the team nothing, and an admitted one
/// charges both, exactly (answers use exactly their reservation, so nothing is settled afterwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_total_and_model_limit_on_one_identity_charge_together_or_not_at_all() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"default_output_reservation": 10, "rules":[
            {"name":"team","key":{"header":"x-team"},"limits":{"tokens_per_day":10000}},
            {"name":"gpt4o","key":{"header":"x-team"},"model":"gpt-4o","limits":{"tokens_per_day":300}}]}),
    )
    .await;
    let exact = [("x-team", "blue"), ("x-mock-completion-tokens", "10")];
    let remaining = |r: &reqwest::Response| h(r, "x-ratelimit-remaining-tokens").parse::<u64>().unwrap();
    let mini = chat("gpt-4o-mini", "Only the team total applies to me.", None, false);
    let mini_cost = estimate(Api::OpenAiChat, &mini) + 10;

    let r1 = post(&e, "/v1/chat/completions", &mini, &exact).await;
    assert_eq!(r1.status(), 200);
    assert_eq!(remaining(&r1), 10000 - mini_cost, "team only");
    let _ = r1.text().await.unwrap();

    let big = chat("gpt-4o", "Over the model limit, well within the team's.", Some(400), false);
    let r2 = post(&e, "/v1/chat/completions", &big, &exact).await;
    assert_eq!(r2.status(), 429, "the model limit denies");
    let _ = r2.text().await.unwrap();

    let r3 = post(&e, "/v1/chat/completions", &mini, &exact).await;
    assert_eq!(remaining(&r3), 10000 - 2 * mini_cost, "the denied request charged the team nothing");
    let _ = r3.text().await.unwrap();

    let small = chat("gpt-4o", "Within both.", None, false);
    let small_cost = estimate(Api::OpenAiChat, &small) + 10;
    let r4 = post(&e, "/v1/chat/completions", &small, &exact).await;
    assert_eq!(r4.status(), 200);
    assert_eq!(remaining(&r4), 300 - small_cost, "the tighter of the two rules is reported");
    let _ = r4.text().await.unwrap();

    let r5 = post(&e, "/v1/chat/completions", &mini, &exact).await;
    assert_eq!(remaining(&r5), 10000 - 3 * mini_cost - small_cost, "the admitted request charged the team too");
    let _ = r5.text().await.unwrap();
    assert_eq!(e.stat("meshwarden.token_limiter.rule.gpt4o.limited").await.unwrap(), 1);
}

/// Two budgets spent by the same requests: `retry-after` is the longer wait (the hourly one), since
/// retrying when the per-minute budget refills would only be refused again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_the_longest_wait_of_every_denying_rule() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"rules":[
            {"name":"minute","key":{"header":"x-team"},"limits":{"tokens_per_minute":600}},
            {"name":"hour","key":{"header":"x-team"},"limits":{"tokens_per_hour":600}}]}),
    )
    .await;
    let body = chat("gpt-4o-mini", "Spend two budgets at once.", Some(100), false);
    let cost = estimate(Api::OpenAiChat, &body) + 100;
    let hdrs = [("x-team", "alpha"), ("x-mock-completion-tokens", "100")];
    let (admitted, denied) = until_limited(&e, &body, &hdrs).await;
    assert_eq!(admitted, 600 / cost);
    let retry_ms: u64 = h(&denied, "retry-after-ms").parse().unwrap();
    let missing = cost - (600 - admitted * cost);
    // 600 tokens per hour is one token per 6 s; the per-minute budget alone would say `missing` * 100 ms.
    let hourly = missing * 6_000;
    assert!(retry_ms <= hourly && retry_ms + 6_000 >= hourly, "retry {retry_ms} ms vs the hourly {hourly} ms");
    assert_eq!(h(&denied, "retry-after").parse::<u64>().unwrap(), retry_ms.div_ceil(1000));
    assert_eq!(h(&denied, "x-ratelimit-limit-tokens"), "600");
    let err: Value = denied.json().await.unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("minute"), "the first denying rule is named: {err}");
    assert_eq!(e.stat("meshwarden.token_limiter.rule.minute.limited").await.unwrap(), 1);
}

/// Per-model budgets cannot be escaped by hiding the model: a compressed body (model unreadable) meets
/// every rule that has a `model` by default, a Bedrock path names its model, `skip_model_rules` keeps the
/// old behaviour and `reject` answers 400 before anything is reserved or sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hidden_model_still_meets_the_model_rules() {
    let mock = MockLlm::start().await.unwrap();
    let rules = json!([
        {"name":"gpt4o","key":{"constant":"g"},"model":"gpt-4o","limits":{"tokens_per_hour":100000}},
        {"name":"claude","key":{"constant":"g"},"model":"anthropic.claude-*","limits":{"tokens_per_hour":100000}}]);
    let gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3];
    async fn charged(e: &Envoy, rule: &str) -> u64 {
        e.stat(&format!("meshwarden.token_limiter.rule.{rule}.charged_tokens")).await.unwrap_or(0)
    }
    let send_gz = |e: &Envoy| {
        client().post(e.url("/v1/chat/completions")).header("content-encoding", "gzip").body(gz.clone()).send()
    };
    let e = envoy(&mock, json!({"rules": rules})).await;
    let _ = send_gz(&e).await.unwrap().text().await;
    assert!(charged(&e, "gpt4o").await > 0 && charged(&e, "claude").await > 0, "both model rules charged");
    let (gpt_before, claude_before) = (charged(&e, "gpt4o").await, charged(&e, "claude").await);
    let converse = json!({"messages":[{"role":"user","content":[{"text":"Which model am I?"}]}],"inferenceConfig":{"maxTokens":20}});
    let r = post(&e, "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse", &converse, &[]).await;
    assert!(r.headers().contains_key("x-ratelimit-remaining-tokens"), "a model rule applied");
    let _ = r.text().await;
    assert!(charged(&e, "claude").await > claude_before, "the path's model is charged");
    assert_eq!(charged(&e, "gpt4o").await, gpt_before, "and only its rules");

    let skip = envoy(&mock, json!({"unknown_model": "skip_model_rules", "rules": rules})).await;
    let _ = send_gz(&skip).await.unwrap().text().await;
    assert_eq!(skip.stat("meshwarden.token_limiter.bad_body.encoded").await.unwrap(), 1, "stats flushed");
    assert_eq!((charged(&skip, "gpt4o").await, charged(&skip, "claude").await), (0, 0));

    let reject = envoy(&mock, json!({"unknown_model": "reject", "rules": rules})).await;
    let upstream_before = mock.requests().len();
    let r = send_gz(&reject).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_unreadable", "{v}");
    assert_eq!(mock.requests().len(), upstream_before, "nothing sent upstream");
    assert_eq!(reject.stat("meshwarden.token_limiter.unknown_model_rejected").await.unwrap(), 1);
}

/// Azure OpenAI serves the deployment its path names and ignores the body's `model`: naming a cheaper
/// model in the body must not take the request out of the deployment's budget.
/// Claude on Vertex AI names its model only in the path (`.../models/{model}:streamRawPredict`, no `model`
/// in the body): its rules apply, and only its rules. Before, the model was unknown, so every model rule
/// (here the gpt-4o budget) was charged, and with `skip_model_rules` none was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vertex_claude_request_meets_its_models_rules() {
    let mock = MockLlm::start().await.unwrap();
    async fn charged(e: &Envoy, rule: &str) -> u64 {
        e.stat(&format!("meshwarden.token_limiter.rule.{rule}.charged_tokens")).await.unwrap()
    }
    let rules = json!([
        {"name":"gpt4o","key":{"constant":"g"},"model":"gpt-4o","limits":{"tokens_per_hour":100000}},
        {"name":"claude","key":{"constant":"g"},"model":"claude-*","limits":{"tokens_per_hour":100000}}]);
    let body = json!({"anthropic_version":"vertex-2023-10-16","max_tokens":50,
                      "messages":[{"role":"user","content":"Which model am I?"}]});
    let path = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict";
    for unknown_model in ["apply_model_rules", "skip_model_rules"] {
        let e = envoy(&mock, json!({"unknown_model": unknown_model, "rules": rules})).await;
        let r = post(&e, path, &body, &[]).await;
        assert_eq!(r.status(), 200);
        let _ = r.text().await;
        assert!(charged(&e, "claude").await > 0, "{unknown_model}: the path's model rule is charged");
        assert_eq!(charged(&e, "gpt4o").await, 0, "{unknown_model}: another model's rule is not");
        assert_eq!(e.stat("meshwarden.token_limiter.bad_body.no_model").await.unwrap(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_deployment_budget_cannot_be_escaped_through_the_body_model() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"default_output_reservation": 10, "rules":[
            {"name":"prod","key":{"header":"x-team"},"model":"gpt4o-prod","limits":{"tokens_per_day":100}}]}),
    )
    .await;
    let path = "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21";
    let body = chat("gpt-4o-mini", "Which deployment serves me?", None, false);
    let hdrs = [("x-team", "a"), ("x-mock-completion-tokens", "30")];
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = post(&e, path, &body, &hdrs).await;
        statuses.push(r.status().as_u16());
        let _ = r.text().await;
    }
    assert_eq!(statuses.last(), Some(&429), "the deployment's budget is spent: {statuses:?}");
    assert!(e.stat("meshwarden.token_limiter.rule.prod.charged_tokens").await.unwrap_or(0) > 0);
}

/// A weighted rule (`input + 4*output`) with two windows charges both windows the weighted actual
/// usage; `on_missing_key: skip` leaves requests without the key to the other rules and `shared` puts
/// them in one common budget; `/v1/completions` streams are settled from their usage too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_multi_window_rules_and_missing_keys() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"rules":[
            {"name":"weighted","key":{"header":"x-team"},"model":"gpt-4o-mini","counts":{"input":1,"output":4},
             "limits":{"tokens_per_minute":100000,"tokens_per_day":2000}},
            {"name":"per-user","key":{"header":"x-user"},"on_missing_key":"skip","limits":{"tokens_per_hour":100}},
            {"name":"per-app","key":{"header":"x-app"},"on_missing_key":"shared","limits":{"tokens_per_hour":3000}}]}),
    )
    .await;
    let body = chat("gpt-4o-mini", "weigh my tokens", Some(10), false);
    let usage = [("x-team", "t"), ("x-app", "a"), ("x-mock-prompt-tokens", "20"), ("x-mock-completion-tokens", "10")];
    let r = post(&e, "/v1/chat/completions", &body, &usage).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    let charged = e.stat("meshwarden.token_limiter.rule.weighted.charged_tokens").await.unwrap();
    assert_eq!(charged, 20 + 4 * 10, "input + 4 * output, as reported");
    // Both windows were charged the weighted cost: the day window (the tighter) shows 2000 - 60 - the
    // next request's weighted reservation.
    let r = post(&e, "/v1/chat/completions", &body, &usage).await;
    let reserved = estimate(Api::OpenAiChat, &body) + 4 * 10;
    assert_eq!(h(&r, "x-ratelimit-limit-tokens"), "2000");
    assert_eq!(h(&r, "x-ratelimit-remaining-tokens").parse::<u64>().unwrap(), 2000 - 60 - reserved);
    let _ = r.text().await;
    // No x-user: `per-user` (100/h) is skipped, so a request reserving more than 100 passes.
    let big = chat("gpt-4o-mini", "no user header", Some(150), false);
    let r = post(&e, "/v1/chat/completions", &big, &[("x-team", "t2"), ("x-app", "b")]).await;
    assert_eq!(r.status(), 200, "skip: the rule does not apply");
    let _ = r.text().await;
    let r = post(&e, "/v1/chat/completions", &big, &[("x-team", "t2"), ("x-user", "u"), ("x-app", "b")]).await;
    assert_eq!(r.status(), 429, "with the key the 100/h rule applies");
    let _ = r.text().await;
    // No x-app: every such request shares one `per-app` budget of 3000/h.
    let mid = chat("gpt-4o", "no app header", Some(1000), false);
    let mut statuses = Vec::new();
    for team in ["t3", "t4", "t5", "t6"] {
        let r = post(&e, "/v1/chat/completions", &mid, &[("x-team", team), ("x-mock-completion-tokens", "1000")]).await;
        statuses.push(r.status().as_u16());
        let _ = r.text().await;
    }
    assert_eq!(statuses, [200, 200, 429, 429], "one shared budget for requests without the key");
    // A legacy completions stream is charged its reported usage.
    let before = e.stat("meshwarden.token_limiter.usage.reported").await.unwrap_or(0);
    let completion = json!({"model":"gpt-3.5-turbo-instruct","prompt":"Say hi","max_tokens":5,"stream":true});
    let r = post(
        &e,
        "/v1/completions",
        &completion,
        &[("x-team", "t7"), ("x-app", "c"), ("x-mock-completion-tokens", "5")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("data: [DONE]"), "{text}");
    assert_eq!(e.stat("meshwarden.token_limiter.usage.reported").await.unwrap(), before + 1);
}

/// The output reservation covers every answer asked for (`n`) and reads the output cap of each API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_cover_every_answer_and_every_api_output_cap() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(100000)).await;
    let mut body = chat("gpt-4o-mini", "Three answers, please.", Some(100), false);
    body["n"] = json!(3);
    let est = estimate(Api::OpenAiChat, &body);
    let r = post(&e, "/v1/chat/completions", &body, &[("x-team", "n3")]).await;
    assert_eq!(r.status(), 200);
    let rem: u64 = h(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert_eq!(rem, 100000 - (est + 300), "3 answers of up to 100 tokens");
    // Bedrock Converse: the cap is `inferenceConfig.maxTokens`.
    let converse = json!({"messages":[{"role":"user","content":[{"text":"One answer."}]}],
                          "inferenceConfig":{"maxTokens":77}});
    let est = estimate(Api::OpenAiChat, &converse);
    let r =
        post(&e, "/model/anthropic.claude-3-haiku-20240307-v1:0/converse", &converse, &[("x-team", "bedrock")]).await;
    assert_eq!(r.status(), 200);
    let rem: u64 = h(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert_eq!(rem, 100000 - (est + 77));
}

/// Output caps the upstream may honour are read whatever else the body says: a small cap in a field the
/// upstream ignores (`max_output_tokens` on a chat route served by vLLM, `max_tokens` on Ollama's native
/// `/api/chat`, which reads `options.num_predict`) beside a large one in the field it reads reserved the
/// small one, so a request that may generate 5,000 tokens passed a budget of 3,000 on a reservation of 1.
/// The largest cap present is reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoy_output_cap_does_not_shrink_the_reservation() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"max_output_reservation": 10000,
               "rules":[{"name":"t","key":{"header":"x-team"},"limits":{"tokens_per_day":3000}}]}),
    )
    .await;
    let mut honest = chat("llama3", "Write a long story.", Some(5000), false);
    let r = post(&e, "/v1/chat/completions", &honest, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 429, "5,000 output tokens do not fit a budget of 3,000");
    honest["max_output_tokens"] = json!(1);
    let r = post(&e, "/v1/chat/completions", &honest, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 429, "a decoy cap beside the real one: {:?}", r.text().await);
    let ollama = json!({"model": "llama3", "messages": [{"role": "user", "content": "Write a long story."}],
                        "max_tokens": 1, "options": {"num_predict": 5000}, "stream": false});
    let r = post(&e, "/api/chat", &ollama, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 429, "Ollama reads num_predict: {:?}", r.text().await);
    let small = chat("llama3", "Write a short story.", Some(100), false);
    let r = post(&e, "/v1/chat/completions", &small, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 200, "the budget is untouched by the refusals");
    let _ = r.text().await;
}

/// Output caps written the way the upstream still reads them: a string or a float (pydantic's lax mode in
/// vLLM, SGLang, LiteLLM; proto3 JSON in Gemini), Gemini's snake-case field names (proto3 JSON takes the
/// proto names too). Before 2026-12-07 each was not read: the request reserved the default 256 tokens and
/// ran for 5,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_cap_in_any_form_the_upstream_reads_is_reserved() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"max_output_reservation": 10000,
               "rules":[{"name":"t","key":{"header":"x-team"},"limits":{"tokens_per_day":3000}}]}),
    )
    .await;
    let story = |cap: Value| {
        let mut b = chat("llama3", "Write a long story.", None, false);
        b["max_tokens"] = cap;
        b
    };
    let gemini = |config: Value| json!({"contents": [{"role": "user", "parts": [{"text": "Write a long story."}]}], "generation_config": config});
    let cases = [
        ("/v1/chat/completions", story(json!("5000"))),
        ("/v1/chat/completions", story(json!(5000.0))),
        ("/v1/chat/completions", {
            let mut b = story(json!(1000));
            b["n"] = json!("4");
            b
        }),
        ("/v1beta/models/gemini-2.0-flash:generateContent", gemini(json!({"max_output_tokens": 5000}))),
        ("/v1beta/models/gemini-2.0-flash:generateContent", gemini(json!({"maxOutputTokens": "5000"}))),
        (
            "/v1beta/models/gemini-2.0-flash:generateContent",
            gemini(json!({"maxOutputTokens": 1000, "candidate_count": 4})),
        ),
    ];
    for (path, body) in &cases {
        let r = post(&e, path, body, &[("x-team", "a")]).await;
        assert_eq!(r.status(), 429, "{body}: {:?}", r.text().await);
    }
    let small = chat("llama3", "Write a short story.", Some(100), false);
    let r = post(&e, "/v1/chat/completions", &small, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 200, "the budget is untouched by the refusals");
    let _ = r.text().await;
}

/// Bedrock `InvokeModel` bodies cap the output in the model's own field: Llama `max_gen_len`, Titan
/// `textGenerationConfig.maxTokenCount`. Before 2026-12-07 neither was read: 5,000 output tokens were
/// admitted on the default reservation of 256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bedrock_invoke_model_output_cap_is_reserved() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"max_output_reservation": 10000,
               "rules":[{"name":"t","key":{"header":"x-team"},"limits":{"tokens_per_day":3000}}]}),
    )
    .await;
    let llama = json!({"prompt": "Write a long story.", "max_gen_len": 5000});
    let r = post(&e, "/model/meta.llama3-70b-instruct-v1%3A0/invoke", &llama, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 429, "{:?}", r.text().await);
    let titan = json!({"inputText": "Write a long story.", "textGenerationConfig": {"maxTokenCount": 5000}});
    let r = post(&e, "/model/amazon.titan-text-express-v1/invoke", &titan, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 429, "{:?}", r.text().await);
    let small = json!({"prompt": "Write a short story.", "max_gen_len": 100});
    let r = post(&e, "/model/meta.llama3-70b-instruct-v1%3A0/invoke", &small, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 200, "the budget is untouched by the refusals");
    let _ = r.text().await;
}

/// Ollama's `options.num_predict` -1 (until the model stops) and -2 (until the context is full) ask for
/// no output cap: the largest reservation (`max_output_reservation`) is taken. Before 2026-12-07 they
/// reserved the 256-token default and an open-ended generation was admitted on a nearly spent budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncapped_ollama_generation_reserves_the_largest_output() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"max_output_reservation": 10000,
               "rules":[{"name":"t","key":{"header":"x-team"},"limits":{"tokens_per_day":3000}}]}),
    )
    .await;
    for n in [-1, -2] {
        let body = json!({"model": "llama3", "stream": false, "options": {"num_predict": n},
                          "messages": [{"role": "user", "content": "Write a long story."}]});
        let r = post(&e, "/api/chat", &body, &[("x-team", "a")]).await;
        assert_eq!(r.status(), 429, "num_predict {n}: {:?}", r.text().await);
    }
    let capped = json!({"model": "llama3", "stream": false, "options": {"num_predict": 100},
                        "messages": [{"role": "user", "content": "Write a short story."}]});
    let r = post(&e, "/api/chat", &capped, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 200, "the budget is untouched by the refusals: {:?}", r.text().await);
}

/// vLLM, SGLang and LiteLLM (pydantic's lax mode) stream for `"stream": "true"` or `1` as for `true`. Before
/// 2026-12-07 only `true` was read as a stream: `include_usage` was not added and the answer was charged
/// from an estimate of its text instead of its usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_asked_for_in_another_form_is_charged_its_usage() {
    let mock = MockLlm::start().await.unwrap();
    let e =
        envoy(&mock, json!({"rules":[{"name":"t","key":{"constant":"x"},"limits":{"tokens_per_day":100000}}]})).await;
    // (`x-mock-stream: 1`: the mock streams as a Python server reading the body laxly would.)
    let hdrs = [("x-mock-completion-tokens", "37"), ("x-mock-prompt-tokens", "123"), ("x-mock-stream", "1")];
    for v in [json!("true"), json!(1)] {
        let body = json!({"model": "gpt-4o-mini", "stream": v, "messages": [{"role": "user", "content": "Hi."}]});
        let r = post(&e, "/v1/chat/completions", &body, &hdrs).await;
        assert_eq!(r.status(), 200);
        assert!(h(&r, "content-type").starts_with("text/event-stream"));
        let _ = r.text().await.unwrap();
        let sent = mock.last_request().unwrap().json().unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true, "{v}: include_usage added");
    }
    assert_eq!(e.stat("meshwarden.token_limiter.usage.reported").await.unwrap(), 2);
    assert_eq!(e.stat("meshwarden.token_limiter.rule.t.charged_tokens").await.unwrap(), 2 * 160);
}

/// Go's `encoding/json` (Ollama, LocalAI, Go gateways) reads `"MODEL"` as `model` and keeps the last copy:
/// `{"model": "cheap", "MODEL": "gpt-4o"}` ran gpt-4o while the filter matched and charged the rules of
/// `cheap` (and `"MAX_TOKENS": 5000` beside `"max_tokens": 1` reserved 1). Such keys are refused like a key
/// given twice (before 2026-12-07: admitted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_differing_only_in_case_are_refused_like_duplicates() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"max_output_reservation": 10000,
               "rules":[{"name":"big","key":{"header":"x-team"},"model":"gpt-4o","limits":{"tokens_per_day":1}},
                        {"name":"t","key":{"header":"x-team"},"limits":{"tokens_per_day":3000}}]}),
    )
    .await;
    let cases = [
        json!({"model": "cheap", "MODEL": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "cheap", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "Max_Tokens": 5000}),
        json!({"model": "cheap", "messages": [{"role": "user", "content": "hi"}],
               "options": {"num_predict": 1, "NUM_PREDICT": 5000}}),
    ];
    for body in &cases {
        let r = post(&e, "/api/chat", body, &[("x-team", "a")]).await;
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains("duplicate_json_key"), "{text}");
    }
    // Keys in different case inside a tool's schema are the user's own names, not ambiguous fields.
    let tools = json!({"model": "cheap", "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
            "properties": {"Name": {"type": "string"}, "name": {"type": "string"}}}}}]});
    let r = post(&e, "/api/chat", &tools, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
}

/// A Go upstream (Ollama's OpenAI-compatible API, LocalAI) reads `"MAX_TOKENS"` as `max_tokens` and
/// `"Model"` as `model`. Before 2026-12-07 the filter read neither: 5,000 output tokens were admitted on
/// the default reservation, and a per-model budget was escaped under `unknown_model: skip_model_rules`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_a_go_upstream_reads_in_any_case_are_read() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"max_output_reservation": 10000, "unknown_model": "skip_model_rules",
               "rules":[{"name":"big","key":{"header":"x-team"},"model":"gpt-4o","limits":{"tokens_per_day":1}},
                        {"name":"t","key":{"header":"x-team"},"limits":{"tokens_per_day":3000}}]}),
    )
    .await;
    let cap = json!({"model": "llama3", "messages": [{"role": "user", "content": "Write a long story."}],
                     "MAX_TOKENS": 5000});
    let r = post(&e, "/v1/chat/completions", &cap, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 429, "{:?}", r.text().await);
    let model = json!({"Model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let r = post(&e, "/v1/chat/completions", &model, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 429, "gpt-4o's budget applies: {:?}", r.text().await);
    let small = chat("llama3", "Write a short story.", Some(100), false);
    let r = post(&e, "/v1/chat/completions", &small, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
}

/// The prompt estimate frames each message once (4 tokens), however many content parts it has. Before
/// 2026-12-07 each part counted 4: one message of 50 short parts was estimated at 250 tokens instead of
/// 54 and refused as larger than a 100-token budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_of_many_parts_is_framed_once() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(100)).await;
    let parts: Vec<Value> = (0..50).map(|_| json!({"type": "text", "text": "abcd"})).collect();
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": parts}]});
    let r = post(&e, "/v1/chat/completions", &body, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    // 200 characters (50 tokens) + 4 for the one message + 10 reserved for the output.
    assert_eq!(h(&r, "x-ratelimit-remaining-tokens"), (100 - 50 - 4 - 10).to_string());
    let _ = r.text().await;
}

async fn stream_case(path: &str, body: Value, api: Api) {
    let mock = MockLlm::start().await.unwrap();
    let e =
        envoy(&mock, json!({"rules":[{"name":"t","key":{"constant":"x"},"limits":{"tokens_per_day":100000}}]})).await;
    let est = estimate(api, &body);
    for _ in 0..2 {
        let r = post(&e, path, &body, &[("x-mock-completion-tokens", "37"), ("x-mock-prompt-tokens", "123")]).await;
        assert_eq!(r.status(), 200);
        assert!(h(&r, "content-type").starts_with("text/event-stream"));
        let _ = r.text().await.unwrap();
    }
    if api == Api::OpenAiChat {
        let sent = mock.last_request().unwrap().json().unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true, "include_usage added");
    }
    // Charged from the stream's usage, exactly once each: 2 x (123 in, 37 out).
    let m = body["model"].as_str().unwrap().replace('.', "_"); // stat segments are sanitised
    assert_eq!(e.stat(&format!("meshwarden.token_limiter.model.{m}.input_tokens")).await.unwrap(), 246);
    assert_eq!(e.stat(&format!("meshwarden.token_limiter.model.{m}.output_tokens")).await.unwrap(), 74);
    assert_eq!(e.stat("meshwarden.token_limiter.usage.reported").await.unwrap(), 2);
    // The totals and the rule's charge (it counts input + output) agree with the per-model stats.
    assert_eq!(e.stat("meshwarden.token_limiter.input_tokens").await.unwrap(), 246);
    assert_eq!(e.stat("meshwarden.token_limiter.output_tokens").await.unwrap(), 74);
    assert_eq!(e.stat("meshwarden.token_limiter.rule.t.charged_tokens").await.unwrap(), 320);
    assert_eq!(e.stat("meshwarden.token_limiter.requests").await.unwrap(), 2);
    assert_eq!(e.stat("meshwarden.token_limiter.admitted").await.unwrap(), 2);
    // Budget: the 3rd request sees limit - 2*(123+37) - its own reservation.
    let r = post(&e, path, &body, &[("x-mock-completion-tokens", "1")]).await;
    let rem: u64 = h(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    let reserved = est + body["max_tokens"].as_u64().or(body["max_output_tokens"].as_u64()).unwrap_or(256);
    // (per day: refill adds about one token per second)
    assert!(rem <= 100000 - 320 - reserved + 3 && rem + 1 >= 100000 - 320 - reserved, "remaining {rem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_usage_openai_chat() {
    stream_case("/v1/chat/completions", chat("gpt-4o-mini", "Stream me a haiku.", None, true), Api::OpenAiChat).await;
}

/// The usage chunk that `include_usage` adds (`"choices": []`) reaches only a client that asked for it: one
/// that did not gets the stream it asked for (code reading `choices[0]` of every chunk failed on the extra
/// chunk), and its usage is charged all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_added_usage_chunk_is_hidden_from_a_client_that_did_not_ask() {
    let mock = MockLlm::start().await.unwrap();
    let e =
        envoy(&mock, json!({"rules":[{"name":"t","key":{"constant":"x"},"limits":{"tokens_per_day":100000}}]})).await;
    let usage_chunks = |text: &str| -> Vec<Value> {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter(|c| c["choices"].as_array().is_some_and(Vec::is_empty))
            .collect()
    };
    let hdrs = [("x-mock-completion-tokens", "37"), ("x-mock-prompt-tokens", "123")];
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let body = if path == "/v1/completions" {
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Stream me a haiku.", "stream": true})
        } else {
            chat("gpt-4o-mini", "Stream me a haiku.", None, true)
        };
        let r = post(&e, path, &body, &hdrs).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.contains("data: [DONE]"), "{text}");
        assert!(text.lines().filter(|l| l.starts_with("data: {")).count() >= 2, "the content chunks pass: {text}");
        assert_eq!(usage_chunks(&text), Vec::<Value>::new(), "{path}: a chunk the client did not ask for: {text}");
        assert_eq!(mock.last_request().unwrap().json().unwrap()["stream_options"]["include_usage"], true);
        // A client that asked for usage gets its chunk.
        let mut asked = body.clone();
        asked["stream_options"] = json!({"include_usage": true});
        let text = post(&e, path, &asked, &hdrs).await.text().await.unwrap();
        let chunks = usage_chunks(&text);
        assert_eq!(chunks.len(), 1, "{text}");
        assert_eq!(chunks[0]["usage"]["completion_tokens"], 37);
    }
    // All four were charged their reported usage.
    assert_eq!(e.stat("meshwarden.token_limiter.usage.reported").await.unwrap(), 4);
    assert_eq!(e.stat("meshwarden.token_limiter.rule.t.charged_tokens").await.unwrap(), 4 * 160);
}

/// The body changes (include_usage, the fallback model) are spliced into the client's bytes: key order,
/// an integer beyond 64 bits and whitespace reach the model as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_bodies_keep_the_clients_bytes() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"rules":[{"name":"big","key":{"constant":"x"},"model":"gpt-4o","limits":{"tokens_per_hour":1},
                         "fallback_model":"gpt-4o-mini"}]}),
    )
    .await;
    let raw = "{\"stream\": true, \"seed\": 123456789012345678901234567890,\n \"model\": \"gpt-4o\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}";
    let r = client()
        .post(e.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h(&r, "x-meshwarden-fallback-model"), "gpt-4o-mini");
    let _ = r.text().await.unwrap();
    let expected =
        raw.replacen('{', "{\"stream_options\":{\"include_usage\":true},", 1).replace("\"gpt-4o\"", "\"gpt-4o-mini\"");
    assert_eq!(mock.last_request().unwrap().body, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_usage_anthropic_messages() {
    let body = json!({"model":"claude-sonnet-4","max_tokens":300,"stream":true,"system":"Be brief.",
        "messages":[{"role":"user","content":"Stream me a haiku."}]});
    stream_case("/v1/messages", body, Api::AnthropicMessages).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_usage_responses_api() {
    let body = json!({"model":"gpt-4.1","input":"Stream me a haiku.","stream":true,"max_output_tokens":100});
    stream_case("/v1/responses", body, Api::OpenAiResponses).await;
}

/// The Responses stream ends with `response.completed`, which holds the whole output (and echoes the
/// request's `instructions` and `tools`): an answer of 300 KB makes it, and its one text delta, larger than
/// the SSE parser's default 256 KiB event bound. Its usage must still settle the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_final_stream_event_is_settled_with_its_usage() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(10_000_000)).await;
    let body = json!({"model": "gpt-4o", "stream": true, "input": "a".repeat(300 * 1024)});
    let hdrs =
        [("x-team", "a"), ("x-mock-echo", "1"), ("x-mock-completion-tokens", "5"), ("x-mock-prompt-tokens", "77000")];
    let r = post(&e, "/v1/responses", &body, &hdrs).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("response.completed"));
    assert_eq!(e.stat("meshwarden.token_limiter.model.gpt-4o.output_tokens").await.unwrap_or(0), 5);
    assert_eq!(e.stat("meshwarden.token_limiter.model.gpt-4o.input_tokens").await.unwrap_or(0), 77_000);
    assert_eq!(e.stat("meshwarden.token_limiter.usage.reported").await.unwrap_or(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_model_when_budget_is_spent() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"fallback_header":"x-meshwarden-fallback-model","rules":[
            {"name":"team","key":{"header":"x-team"},"limits":{"tokens_per_hour":100000}},
            {"name":"gpt4o","key":{"header":"x-team"},"model":"gpt-4o","limits":{"tokens_per_hour":300},"fallback_model":"gpt-4o-mini"},
            {"name":"mini","key":{"header":"x-team"},"model":"gpt-4o-mini","limits":{"tokens_per_hour":400}}]}),
    )
    .await;
    let body = chat("gpt-4o", "Expensive question", Some(100), false);
    let hdrs = [("x-team", "a"), ("x-mock-completion-tokens", "100")];
    let r = post(&e, "/v1/chat/completions", &body, &hdrs).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-meshwarden-fallback-model").is_none());
    assert_eq!(mock.last_request().unwrap().json().unwrap()["model"], "gpt-4o");
    let _ = r.text().await;
    let r = post(&e, "/v1/chat/completions", &body, &hdrs).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    // gpt-4o's 300 are spent (2 x ~105): the third goes to the cheaper model.
    let r = post(&e, "/v1/chat/completions", &body, &hdrs).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h(&r, "x-meshwarden-fallback-model"), "gpt-4o-mini");
    let sent = mock.last_request().unwrap().json().unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(sent["messages"], body["messages"], "only the model changed");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model"], "gpt-4o-mini");
    // The fallback model has its own budget (400 = 3 x ~105): 2 more fit, then 429 when both are spent.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(post(&e, "/v1/chat/completions", &body, &hdrs).await.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 429]);
    assert_eq!(e.stat("meshwarden.token_limiter.rule.gpt4o.fallbacks").await.unwrap(), 4);
    assert_eq!(e.stat("meshwarden.token_limiter.model.gpt-4o.fallbacks").await.unwrap(), 4, "per model too");
    assert_eq!(e.stat("meshwarden.token_limiter.rule.mini.limited").await.unwrap(), 1);
    assert_eq!(e.stat("meshwarden.token_limiter.model.gpt-4o-mini.output_tokens").await.unwrap(), 300);
    assert_eq!(e.stat("meshwarden.token_limiter.model.gpt-4o.output_tokens").await.unwrap(), 200);
}

/// The access log line of request `case` (the query string tells the requests apart), once Envoy wrote it.
async fn access_log_line(e: &Envoy, case: &str) -> String {
    let needle = format!("/v1/chat/completions?case={case} ");
    for _ in 0..200 {
        if let Some(line) = e.log().lines().find(|l| l.contains(&needle)) {
            return line.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no access log line for {case}:\n{}", e.log());
}

/// Envoy's access logs see each request's decision, model and tokens (filter state, the format of
/// `envoy-configs/token-limiter.yaml`; Envoy calls the filter's `on_log`, where the tokens are settled,
/// before it writes its access logs). A model name cannot write a log line of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_show_the_decision_model_and_tokens() {
    let mock = MockLlm::start().await.unwrap();
    let e = EnvoyBuilder::new("token-limiter.yaml")
        .upstream_port(mock.port())
        .access_log_flush_ms(50)
        .filter_config(
            "token-limiter",
            &json!({"filter_state": true, "rules":[
                {"name":"gpt4o","key":{"header":"x-team"},"model":"gpt-4o","limits":{"tokens_per_hour":300},"fallback_model":"gpt-4o-mini"},
                {"name":"mini","key":{"header":"x-team"},"model":"gpt-4o-mini","limits":{"tokens_per_hour":250}}]}),
        )
        .start()
        .await
        .unwrap();
    let usage = [("x-team", "a"), ("x-mock-prompt-tokens", "21"), ("x-mock-completion-tokens", "100")];
    let body = chat("gpt-4o", "Expensive question", Some(100), false);
    let r = post(&e, "/v1/chat/completions?case=json", &body, &usage).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    let line = access_log_line(&e, "json").await;
    assert!(
        line.contains(r#"tl_decision=allowed tl_rule=- tl_model="gpt-4o" tl_input_tokens=21 tl_output_tokens=100 tl_cached_input_tokens=0 tl_usage=reported"#),
        "{line}"
    );
    // A stream: its usage arrives in the last event.
    let r = post(&e, "/v1/chat/completions?case=stream", &chat("gpt-4o", "Stream it", Some(100), true), &usage).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    let line = access_log_line(&e, "stream").await;
    assert!(
        line.contains(
            r#"tl_model="gpt-4o" tl_input_tokens=21 tl_output_tokens=100 tl_cached_input_tokens=0 tl_usage=reported"#
        ),
        "{line}"
    );
    // gpt-4o's 300 are spent (2 x 121): the next goes to the cheaper model, then that is spent too.
    let r = post(&e, "/v1/chat/completions?case=fallback", &body, &usage).await;
    assert_eq!(h(&r, "x-meshwarden-fallback-model"), "gpt-4o-mini");
    let _ = r.text().await;
    let line = access_log_line(&e, "fallback").await;
    assert!(line.contains(r#"tl_decision=fallback tl_rule=- tl_model="gpt-4o-mini" tl_input_tokens=21"#), "{line}");
    let r = post(&e, "/v1/chat/completions?case=mini", &chat("gpt-4o-mini", "q", Some(100), false), &usage).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    let r = post(&e, "/v1/chat/completions?case=limited", &chat("gpt-4o-mini", "q", Some(100), false), &usage).await;
    assert_eq!(r.status(), 429);
    let line = access_log_line(&e, "limited").await;
    assert!(
        line.contains(r#" 429 "#)
            && line.contains(r#"tl_decision=limited tl_rule=mini tl_model="gpt-4o-mini" tl_input_tokens=- "#),
        "{line}"
    );
    // No rule for this model; a line break in its name is escaped, not a second line.
    let forged = "x\n[2026-01-01T00:00:00.000Z] \"POST /v1/chat/completions HTTP/1.1\" 200 tl_decision=allowed";
    let r = post(&e, "/v1/chat/completions?case=forged", &chat(forged, "q", None, false), &usage).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    let line = access_log_line(&e, "forged").await;
    assert!(line.contains(r#"tl_model="x\n[2026-01-01T00:00:00.000Z] \"POST"#), "{line}");
    assert!(!e.log().lines().any(|l| l.starts_with("[2026-01-01T00:00:00.000Z]")), "a forged line:\n{}", e.log());
    // Requests without a body are skipped, and say so.
    let r = client().get(e.url("/v1/chat/completions?case=get")).send().await.unwrap();
    let _ = r.text().await;
    let line = access_log_line(&e, "get").await;
    assert!(line.contains(r#"tl_decision=skipped tl_rule=- tl_model="-" tl_input_tokens=-"#), "{line}");
    // By default (`filter_state: false`) nothing is published (no host calls for gateways that do not log these).
    let quiet = EnvoyBuilder::new("token-limiter.yaml")
        .upstream_port(mock.port())
        .access_log_flush_ms(50)
        .filter_config("token-limiter", &json!({"rules": []}))
        .start()
        .await
        .unwrap();
    let r = post(&quiet, "/v1/chat/completions?case=quiet", &body, &usage).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    let line = access_log_line(&quiet, "quiet").await;
    assert!(
        line.contains(r#" 200 "#)
            && line.contains(r#"tl_decision=- tl_rule=- tl_model="-" tl_input_tokens=- tl_output_tokens=- tl_cached_input_tokens=- tl_usage=-"#),
        "{line}"
    );
}

/// Providers bill input tokens read from their prompt cache at a fraction of the input price; a rule's
/// `counts.cached_input` weight charges them that way at settlement, from every usage shape that reports
/// them (OpenAI `prompt_tokens_details.cached_tokens`, Responses `input_tokens_details.cached_tokens`,
/// Anthropic `cache_read_input_tokens`, JSON and streamed). A rule without the weight charges them as input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_input_tokens_are_charged_at_their_weight() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"rules":[
            {"name":"cache","key":{"constant":"x"},"limits":{"tokens_per_day":1000000},
             "counts":{"input":1,"cached_input":0.1,"output":1}},
            {"name":"plain","key":{"constant":"x"},"limits":{"tokens_per_day":1000000}}]}),
    )
    .await;
    let usage = [("x-mock-prompt-tokens", "1000"), ("x-mock-cached-tokens", "900"), ("x-mock-completion-tokens", "10")];
    let anthropic = |stream: bool| {
        let mut v = json!({"model": "claude-sonnet-4-5", "max_tokens": 50,
                           "messages": [{"role": "user", "content": "Cached context"}]});
        if stream {
            v["stream"] = json!(true);
        }
        v
    };
    let cases = [
        ("openai chat", "/v1/chat/completions", chat("gpt-4o", "Cached context", Some(50), false)),
        ("openai chat stream", "/v1/chat/completions", chat("gpt-4o", "Cached context", Some(50), true)),
        ("responses", "/v1/responses", json!({"model": "gpt-4o", "input": "Cached context", "max_output_tokens": 50})),
        ("anthropic", "/v1/messages", anthropic(false)),
        ("anthropic stream", "/v1/messages", anthropic(true)),
    ];
    let charged = |rule: &'static str| {
        let e = &e;
        async move { e.stat(&format!("meshwarden.token_limiter.rule.{rule}.charged_tokens")).await.unwrap() }
    };
    for (what, path, body) in cases {
        let (cache0, plain0) = (charged("cache").await, charged("plain").await);
        let r = post(&e, path, &body, &usage).await;
        assert_eq!(r.status(), 200, "{what}");
        let _ = r.text().await;
        // 100 uncached input + 900 cached at 0.1 + 10 output; the plain rule: 1000 + 10.
        assert_eq!(charged("cache").await - cache0, 200, "{what}");
        assert_eq!(charged("plain").await - plain0, 1010, "{what}");
    }
    assert_eq!(e.stat("meshwarden.token_limiter.cached_input_tokens").await.unwrap(), 5 * 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_with_client_aborts_leaks_no_slot() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, json!({"rules":[{"name":"c","key":{"header":"x-team"},"max_concurrent_requests":2}]})).await;
    let body = chat("gpt-4o-mini", "slow stream", None, true);
    for round in 0..3 {
        let mut held = Vec::new();
        for _ in 0..2 {
            let r = post(&e, "/v1/chat/completions", &body, &[("x-team", "a"), ("x-mock-chunk-delay-ms", "300")]).await;
            assert_eq!(r.status(), 200, "round {round}");
            held.push(r);
        }
        let r = post(&e, "/v1/chat/completions", &body, &[("x-team", "a")]).await;
        assert_eq!(r.status(), 429, "round {round}: third concurrent request");
        assert_eq!(h(&r, "retry-after"), "1");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("concurrent"));
        // Another key is not affected.
        let other = post(&e, "/v1/chat/completions", &chat("m", "x", None, false), &[("x-team", "b")]).await;
        assert_eq!(other.status(), 200);
        // Clients abort mid-stream: both slots must come back.
        drop(held);
        let mut ok = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let a = post(&e, "/v1/chat/completions", &chat("m", "x", None, false), &[("x-team", "a")]).await;
            let b = post(&e, "/v1/chat/completions", &chat("m", "x", None, false), &[("x-team", "a")]).await;
            if a.status() == 200 && b.status() == 200 {
                ok = true;
                break;
            }
        }
        assert!(ok, "round {round}: slots were not released after client aborts");
    }
    // Upstream aborts release too: afterwards both slots can be held at once (sequential requests would
    // not notice one leaked slot out of two).
    let r = post(&e, "/v1/chat/completions", &body, &[("x-team", "a"), ("x-mock-abort-after-chunks", "2")]).await;
    let _ = r.text().await;
    let mut both = false;
    for _ in 0..20 {
        let slow = [("x-team", "a"), ("x-mock-chunk-delay-ms", "300")];
        let a = post(&e, "/v1/chat/completions", &body, &slow).await;
        let b = post(&e, "/v1/chat/completions", &body, &slow).await;
        both = a.status() == 200 && b.status() == 200;
        drop((a, b));
        if both {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(both, "a slot stays taken after an upstream abort");
    assert!(e.stat("meshwarden.token_limiter.rule.c.limited_concurrency").await.unwrap() >= 3);
}

/// A request refused for a concurrency slot and for tokens at once: `retry-after` is the token budget's
/// wait (a retry after 1 s would only be refused by the token rule), and the headers describe that budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_denial_announces_the_longer_token_wait() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"rules":[
            {"name":"slots","key":{"header":"x-team"},"max_concurrent_requests":1},
            {"name":"tokens","key":{"header":"x-team"},"limits":{"tokens_per_minute":600}}]}),
    )
    .await;
    // Holds the only slot and reserves most of the minute's 600 tokens.
    let held = post(
        &e,
        "/v1/chat/completions",
        &chat("m", "slow stream", Some(550), true),
        &[("x-team", "a"), ("x-mock-chunk-delay-ms", "300")],
    )
    .await;
    assert_eq!(held.status(), 200);
    let r = post(&e, "/v1/chat/completions", &chat("m", "next", Some(100), false), &[("x-team", "a")]).await;
    assert_eq!(r.status(), 429);
    let retry_ms: u64 = h(&r, "retry-after-ms").parse().unwrap();
    assert!(retry_ms > 5_000, "the token rule needs ~6 s more (100 ms per token), not 1 s: {retry_ms} ms");
    assert_eq!(h(&r, "retry-after").parse::<u64>().unwrap(), retry_ms.div_ceil(1000));
    assert_eq!(h(&r, "x-ratelimit-limit-tokens"), "600");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_clients_stay_within_the_bound() {
    let mock = MockLlm::start().await.unwrap();
    // 3000 tokens per hour: refill during the test is < 1 token per second.
    let limit = 3000u64;
    let e =
        envoy(&mock, json!({"rules":[{"name":"shared","key":{"constant":"all"},"limits":{"tokens_per_hour":limit}}]}))
            .await;
    let body = chat("gpt-4o-mini", "Fifty clients share one budget; how much do they get?", Some(40), false);
    let est = estimate(Api::OpenAiChat, &body);
    let cost = est + 40;
    let start = std::time::Instant::now();
    let url = e.url("/v1/chat/completions");
    let (ok, limited) = meshwarden_integration_tests::crowd::admitted_and_limited(50, 4, move |i| {
        client().post(&url).header("x-mock-completion-tokens", if i % 2 == 0 { "40" } else { "25" }).json(&body)
    })
    .await;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(ok + limited, 200);
    assert!(limited > 0);
    let charged = e.stat("meshwarden.token_limiter.input_tokens").await.unwrap()
        + e.stat("meshwarden.token_limiter.output_tokens").await.unwrap();
    // Stated bound: charged <= limit + refill + sum(actual - reserved)+; actual <= reserved here
    // (completion <= max_tokens, prompt estimate == mock's count), so no overshoot at all.
    let refill = (limit as f64 * secs / 3600.0).ceil() as u64;
    assert!(charged <= limit + refill, "charged {charged} > {limit} + {refill}");
    // And the budget was not wasted: with reservations of `cost`, at least limit - cost was admitted
    // in reservations, i.e. ok * cost >= limit - cost.
    assert!(ok * cost + cost >= limit, "only {ok} admitted of cost {cost}");
    assert_eq!(mock.requests().len() as u64, ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_have_documented_behaviour() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"max_body_bytes": 2048, "rules":[
            {"name":"all","key":{"constant":"g"},"limits":{"tokens_per_hour":100000}},
            {"name":"gpt","key":{"constant":"g"},"model":"gpt-*","limits":{"tokens_per_hour":100000}}]}),
    )
    .await;
    let url = e.url("/v1/chat/completions");
    // non-JSON: limited on a size estimate, passed through (the upstream answers 400).
    let r =
        client().post(&url).header("content-type", "application/json").body("this is {not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(mock.last_request().unwrap().body, "this is {not json");
    assert_eq!(e.stat("meshwarden.token_limiter.bad_body.not_json").await.unwrap(), 1);
    // missing model: every rule applies, model rules too (`unknown_model`, see a_hidden_model_...).
    let r = post(&e, "/v1/chat/completions", &json!({"messages":[{"role":"user","content":"hi"}]}), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(e.stat("meshwarden.token_limiter.bad_body.no_model").await.unwrap(), 1);
    // gzip-encoded: not decoded; size estimate; forwarded byte for byte.
    let gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3];
    let r = client().post(&url).header("content-encoding", "gzip").body(gz).send().await.unwrap();
    assert!(r.status().is_client_error());
    assert_eq!(e.stat("meshwarden.token_limiter.bad_body.encoded").await.unwrap(), 1);
    // over max_body_bytes: admitted on the size estimate without buffering the rest.
    let big = chat("gpt-4o", &"word ".repeat(2000), None, false);
    let r = post(&e, "/v1/chat/completions", &big, &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(e.stat("meshwarden.token_limiter.bad_body.too_large").await.unwrap(), 1);
    assert_eq!(mock.last_request().unwrap().json().unwrap(), big, "forwarded unchanged");
    // response without usage: charged the estimate (prompt estimate + answer text).
    let r = post(&e, "/v1/chat/completions", &chat("gpt-4o", "hi", None, false), &[("x-mock-no-usage", "1")]).await;
    assert_eq!(r.status(), 200);
    let r = post(&e, "/v1/chat/completions", &chat("gpt-4o", "hi", None, true), &[("x-mock-no-usage", "1")]).await;
    let _ = r.text().await;
    // upstream error: charged once (prompt estimate).
    let r = post(&e, "/v1/chat/completions", &chat("gpt-4o", "hi", None, false), &[("x-mock-status", "503")]).await;
    assert_eq!(r.status(), 503);
    // estimated: not-JSON (upstream error body), gzip (error body), no-usage JSON, no-usage stream, 503
    assert_eq!(e.stat("meshwarden.token_limiter.usage.estimated").await.unwrap(), 5);
    // GET without body is not limited.
    assert_eq!(client().get(e.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(e.stat("meshwarden.token_limiter.skipped_no_body").await.unwrap(), 1);
}

/// Output must be charged whatever the answer's encoding or size: a client that sent
/// `accept-encoding: gzip` (every browser and most HTTP clients do), or asked for an answer larger than
/// `max_body_bytes` (`logprobs`, large `n`), got its output for free before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_charged_output_whatever_their_encoding_or_size() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"max_body_bytes": 4096, "default_output_reservation": 10,
               "rules":[{"name":"t","key":{"header":"x-team"},"limits":{"tokens_per_day":10000000}}]}),
    )
    .await;
    let stat = |name: &str| format!("meshwarden.token_limiter.{name}");
    // 1. The client accepts gzip and the upstream compresses when allowed (as OpenAI's API does): the
    //    filter removes accept-encoding, the answer comes back readable and its usage is charged.
    let r = post(
        &e,
        "/v1/chat/completions",
        &chat("model-gzip", "Compress this if you can.", None, false),
        &[("x-team", "a"), ("accept-encoding", "gzip, br"), ("x-mock-gzip", "1"), ("x-mock-completion-tokens", "50")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-encoding").is_none(), "the upstream was not asked for gzip");
    let _ = r.text().await.unwrap();
    assert!(mock.last_request().unwrap().header("accept-encoding").is_none());
    assert_eq!(e.stat(&stat("model.model-gzip.output_tokens")).await.unwrap(), 50);
    assert_eq!(e.stat(&stat("usage.reported")).await.unwrap(), 1);
    // 2. An upstream that compresses regardless: usage unreadable, so the output reservation
    //    (`max_tokens` here) is charged, not nothing.
    let r = post(
        &e,
        "/v1/chat/completions",
        &chat("model-always", "Compressed anyway.", Some(77), false),
        &[("x-team", "a"), ("x-mock-gzip", "always"), ("x-mock-completion-tokens", "50")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(h(&r, "content-encoding"), "gzip");
    let _ = r.bytes().await.unwrap();
    assert_eq!(e.stat(&stat("model.model-always.output_tokens")).await.unwrap(), 77);
    assert_eq!(e.stat(&stat("usage.estimated")).await.unwrap(), 1);
    // 3. A JSON answer far larger than max_body_bytes (usage last, as OpenAI sends it): still read.
    let r = post(
        &e,
        "/v1/chat/completions",
        &chat("model-big", "Write a long answer.", None, false),
        &[("x-team", "a"), ("x-mock-completion-tokens", "3000")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.len() > 4 * 4096, "the answer is {} bytes", text.len());
    assert_eq!(e.stat(&stat("model.model-big.output_tokens")).await.unwrap(), 3000);
    assert_eq!(e.stat(&stat("usage.reported")).await.unwrap(), 2);
    // The same over-size answer without usage: its text, estimated from the string bytes that passed
    // (3000 tokens really; the reservation, 10 here, would be far too little).
    let r = post(
        &e,
        "/v1/chat/completions",
        &chat("model-big-nousage", "Write a long answer.", None, false),
        &[("x-team", "a"), ("x-mock-completion-tokens", "3000"), ("x-mock-no-usage", "1")],
    )
    .await;
    let _ = r.text().await.unwrap();
    let charged = e.stat(&stat("model.model-big-nousage.output_tokens")).await.unwrap();
    assert!((2400..=6000).contains(&charged), "charged {charged} for a 3000-token answer without usage");
}

/// Text to speech answers binary audio (`audio/mpeg`) without usage: it is charged the output reservation,
/// as any answer whose usage cannot be read. Its bytes were read as text before (a 64 KiB MP3 cost ~30,000
/// output tokens), so one speech request spent this 20,000-token budget and the next got a 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_answers_are_charged_the_reservation_not_their_bytes() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"default_output_reservation": 100,
               "rules":[{"name":"t","key":{"header":"x-team"},"limits":{"tokens_per_day":20000}}]}),
    )
    .await;
    let stat = |name: &str| format!("meshwarden.token_limiter.{name}");
    let body = json!({"model": "tts-1", "voice": "alloy", "input": "Read this sentence aloud, please."});
    for i in 1..=3u64 {
        let r = post(&e, "/v1/audio/speech", &body, &[("x-team", "a")]).await;
        assert_eq!(r.status(), 200, "speech request {i}");
        assert_eq!(h(&r, "content-type"), "audio/mpeg");
        assert_eq!(r.bytes().await.unwrap().len(), 65_536, "the audio reaches the client whole");
        let mut charged = 0;
        for _ in 0..50 {
            charged = e.stat(&stat("model.tts-1.output_tokens")).await.unwrap();
            if charged >= 100 * i {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(charged, 100 * i, "speech request {i}: the output reservation per answer");
    }
}

/// The stat once it reached `want` (counters are flushed in batches), or its value after ~2 s.
async fn stat_at_least(e: &Envoy, name: &str, want: u64) -> u64 {
    let mut got = 0;
    for _ in 0..100 {
        got = e.stat(name).await.unwrap();
        if got >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    got
}

/// Image generation answers carry the image as base64 inside JSON (`data[].b64_json`). dall-e-2/3 report
/// no usage: such an answer is charged the output reservation, as a binary answer is. Its base64 was read
/// as text before (a 1.5 MB image cost ~375,000 output tokens), so one image spent a day's budget.
/// gpt-image-1 reports usage, which is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_answers_are_charged_the_reservation_or_their_usage() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"default_output_reservation": 100,
               "rules":[{"name":"t","key":{"header":"x-team"},"limits":{"tokens_per_day":50000}}]}),
    )
    .await;
    let stat = |name: &str| format!("meshwarden.token_limiter.{name}");
    let body = json!({"model": "dall-e-3", "prompt": "A red fox in the snow", "response_format": "b64_json"});
    for i in 1..=3u64 {
        let r = post(&e, "/v1/images/generations", &body, &[("x-team", "a")]).await;
        assert_eq!(r.status(), 200, "image request {i}");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(
            answer["data"][0]["b64_json"].as_str().unwrap().len(),
            1_500_000,
            "the image reaches the client whole"
        );
        let charged = stat_at_least(&e, &stat("model.dall-e-3.output_tokens"), 100 * i).await;
        assert_eq!(charged, 100 * i, "image request {i}: the output reservation per answer");
    }
    let body = json!({"model": "gpt-image-1", "prompt": "A red fox in the snow"});
    let r = post(&e, "/v1/images/generations", &body, &[("x-team", "a"), ("x-mock-image-usage", "1")]).await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    assert_eq!(stat_at_least(&e, &stat("model.gpt-image-1.output_tokens"), 4160).await, 4160);
    assert_eq!(stat_at_least(&e, &stat("model.gpt-image-1.input_tokens"), 12).await, 12);
}

/// Streamed image generation (gpt-image-1 `"stream": true`): `image_generation.partial_image` events, then
/// `image_generation.completed` with the usage, every event carrying a base64 image. The usage is charged
/// (the completed event ends the stream: before, the stream counted as cut, `usage.partial`), also when the
/// completed event is larger than the event bound (a real 1024 x 1024 PNG is ~2 MB of base64: its usage
/// was dropped with the event and only the reservation charged), and a stream cut before its end is charged
/// at least the output reservation (before: nothing, the partial images were free). Never the base64 as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_image_generation_is_charged_its_usage_or_the_reservation() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"default_output_reservation": 100,
               "rules":[{"name":"t","key":{"header":"x-team"},"limits":{"tokens_per_day":1000000}}]}),
    )
    .await;
    let stat = |name: &str| format!("meshwarden.token_limiter.{name}");
    let body = json!({"model": "gpt-image-1", "prompt": "A red fox in the snow", "stream": true, "partial_images": 2});
    // Events within the bound, then a 1.5 MB image per event (over the 1 MiB + 256 KiB event bound).
    let mut output = 0;
    let mut reported = 0;
    for (i, bytes) in ["200000", "1500000"].into_iter().enumerate() {
        let r = post(&e, "/v1/images/generations", &body, &[("x-team", "a"), ("x-mock-image-bytes", bytes)]).await;
        assert_eq!(r.status(), 200);
        assert!(h(&r, "content-type").starts_with("text/event-stream"));
        let text = r.text().await.unwrap();
        assert_eq!(text.matches("event: image_generation.").count(), 3, "the stream reaches the client whole");
        output += 4360;
        reported += 1;
        let got = stat_at_least(&e, &stat("model.gpt-image-1.output_tokens"), output).await;
        assert_eq!(got, output, "image stream {i} ({bytes} bytes of base64 per event): its reported output");
        assert_eq!(stat_at_least(&e, &stat("usage.reported"), reported).await, reported, "image stream {i}");
        assert_eq!(e.stat(&stat("model.gpt-image-1.input_tokens")).await.unwrap(), 12 * reported);
    }
    // Cut after the first partial image: the output reservation, not nothing.
    let r = post(
        &e,
        "/v1/images/generations",
        &body,
        &[("x-team", "a"), ("x-mock-image-bytes", "200000"), ("x-mock-abort-after-chunks", "1")],
    )
    .await;
    let _ = r.bytes().await;
    let got = stat_at_least(&e, &stat("model.gpt-image-1.output_tokens"), output + 100).await;
    assert_eq!(got, output + 100, "a cut image stream: the output reservation");
    assert_eq!(e.stat(&stat("usage.estimated")).await.unwrap(), 1);
}

/// A Responses stream whose `response.completed` is larger than the event bound (the `image_generation`
/// tool's result is the whole image in base64, ~2 MB) is charged the usage nested in it
/// (`response.usage`): before, the event was dropped with its usage and the answer charged the estimate
/// of the text it streamed, at least the output reservation (2,234 here) instead of the 1,600 reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responses_final_event_over_the_bound_is_charged_its_usage() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"default_output_reservation": 100,
               "rules":[{"name":"t","key":{"header":"x-team"},"limits":{"tokens_per_day":1000000}}]}),
    )
    .await;
    let body = json!({"model": "gpt-4.1", "input": "Draw a red fox in the snow.", "stream": true,
                      "tools": [{"type": "image_generation"}]});
    let hdrs = [
        ("x-team", "a"),
        ("x-mock-image-result-bytes", "2000000"),
        ("x-mock-prompt-tokens", "40"),
        ("x-mock-completion-tokens", "1600"),
    ];
    let r = post(&e, "/v1/responses", &body, &hdrs).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.len() > 2_000_000 && text.contains("event: response.completed"), "the stream reaches the client");
    let got = stat_at_least(&e, "meshwarden.token_limiter.model.gpt-4_1.output_tokens", 1).await;
    assert_eq!(got, 1600, "the reported output, not the reservation");
    assert_eq!(e.stat("meshwarden.token_limiter.model.gpt-4_1.input_tokens").await.unwrap(), 40);
    assert_eq!(e.stat("meshwarden.token_limiter.usage.reported").await.unwrap(), 1);
}

/// Images count at admission the way the provider bills them (a 1024 x 1024 PNG at `detail: "high"` on
/// gpt-4o: 85 + 4 tiles x 170 = 765 tokens, its size read from the base64 header). Before, images counted
/// nothing until the answer's usage: the same prompt with four images passed a budget that had room only
/// for its text. The settlement still replaces the estimate with the reported usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_estimated_at_admission_and_settled_from_usage() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(5000)).await;
    let url = format!(
        "data:image/png;base64,{}",
        meshwarden_shared::encoding::base64_encode(&meshwarden_shared::testing::png(1024, 1024))
    );
    let text = "What differs between these screenshots?";
    let with_images = |n: usize| {
        let mut content = vec![json!({"type": "text", "text": text})];
        content.extend((0..n).map(|_| json!({"type": "image_url", "image_url": {"url": url, "detail": "high"}})));
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]})
    };
    let est = estimate(Api::OpenAiChat, &with_images(0));
    let team = |id: &'static str| [("x-team", id), ("x-mock-prompt-tokens", "2000"), ("x-mock-completion-tokens", "5")];
    // Admission reserves the text, four images and the output reservation.
    let r = post(&e, "/v1/chat/completions", &with_images(4), &team("a")).await;
    assert_eq!(r.status(), 200);
    let rem: u64 = h(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert_eq!(rem, 5000 - (est + 4 * 765 + 10), "the images are in the reservation");
    let _ = r.text().await.unwrap();
    // Settled from the reported usage (2000 + 5), not the estimate.
    let charged = "meshwarden.token_limiter.rule.t.charged_tokens";
    let mut got = 0;
    for _ in 0..100 {
        got = e.stat(charged).await.unwrap();
        if got > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got, 2005);
    assert_eq!(e.stat("meshwarden.token_limiter.model.gpt-4o.input_tokens").await.unwrap(), 2000);
    // ~2,995 left: the prompt with four images (~3,100 reserved) is refused, the same prompt alone passes.
    let r = post(&e, "/v1/chat/completions", &with_images(4), &team("a")).await;
    assert_eq!(r.status(), 429, "{:?}", r.text().await);
    let r = post(&e, "/v1/chat/completions", &with_images(0), &team("a")).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    // A URL image (size unknown) costs `image_default_tokens`; `detail: "low"` costs 85 whatever its size.
    let e = envoy(
        &mock,
        json!({"default_output_reservation": 10, "image_default_tokens": 500,
               "rules":[{"name":"t","key":{"header":"x-team"},"limits":{"tokens_per_day":100000}}]}),
    )
    .await;
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}]});
    let r = post(&e, "/v1/chat/completions", &body, &[("x-team", "b")]).await;
    assert_eq!(r.status(), 200);
    let rem: u64 = h(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert_eq!(rem, 100000 - (est + 500 + 85 + 10));
}

/// A Gemini native request is estimated by its size (its `contents` are not read as text), and its inline
/// images were too: a token per 4 characters of base64, ~100,000 tokens for a 300 KB screenshot that
/// Gemini bills 1,032 (four 768-px tiles), so the request was refused as larger than a 20,000-token budget.
/// Inline images are priced as images now, the rest of the body still by its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_inline_images_are_priced_as_images_not_by_their_base64() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(20000)).await;
    let mut image = meshwarden_shared::testing::png(1024, 1024);
    image.extend(std::iter::repeat_n(0u8, 300_000)); // the pixels of a real screenshot, after the header
    let data = meshwarden_shared::encoding::base64_encode(&image);
    let body = json!({"contents": [{"role": "user", "parts": [
        {"text": "What is wrong in this screenshot?"},
        {"inline_data": {"mime_type": "image/png", "data": data}}]}]});
    let rest = serde_json::to_vec(&body).unwrap().len() - data.len();
    let r = post(&e, "/v1beta/models/gemini-2.5-flash:generateContent", &body, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let rem: u64 = h(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert_eq!(rem, 20000 - ((rest as u64).div_ceil(4) + 4 * 258 + 10));
}

/// A Responses request with `"background": true` is answered `queued` with no usage and the model runs
/// afterwards (the output is fetched with `GET /v1/responses/{id}`, which is not limited): its output is
/// charged the reservation (`max_output_tokens`), not the few strings of the queued object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_response_is_charged_the_output_reservation() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(10_000_000)).await;
    let stat = "meshwarden.token_limiter.model.o3.output_tokens";
    let body = json!({"model": "o3", "input": "Write a long report.", "background": true, "max_output_tokens": 3000});
    let r = post(&e, "/v1/responses", &body, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["status"], "queued");
    let mut charged = 0;
    for _ in 0..100 {
        charged = e.stat(stat).await.unwrap();
        if charged > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(charged, 3000, "the output reservation");
}

/// A streamed background response goes on when the client leaves (the client resumes it with
/// `GET /v1/responses/{id}?stream=true`, not charged): a stream cut before its usage is charged at least
/// the output reservation; a foreground stream cut the same way is charged what it streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_background_stream_is_charged_the_output_reservation() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(10_000_000)).await;
    for (model, background) in [("o3", true), ("o4-mini", false)] {
        let body = json!({"model": model, "input": "Write a long report.", "stream": true,
                          "background": background, "max_output_tokens": 3000});
        // Cut by the upstream after 5 events, each its own write so that they reach Envoy before the reset
        // (the filter sees the same stream as when the client leaves).
        let headers = [("x-team", "a"), ("x-mock-abort-after-chunks", "5"), ("x-mock-chunk-delay-ms", "10")];
        let r = post(&e, "/v1/responses", &body, &headers).await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
        let stat = format!("meshwarden.token_limiter.model.{model}.output_tokens");
        let mut charged = 0;
        for _ in 0..100 {
            charged = e.stat(&stat).await.unwrap();
            if charged > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if background {
            assert_eq!(charged, 3000, "{model}: the output reservation");
        } else {
            assert!((1..100).contains(&charged), "{model}: what it streamed, {charged}");
        }
    }
}

/// Bedrock's ConverseStream answers in the AWS binary event stream, not SSE: the usage in its last
/// (`metadata`) event is charged, and the stream reaches the client byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_event_stream_usage_is_charged() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(10000000)).await;
    let stat = |name: &str| format!("meshwarden.token_limiter.{name}");
    let body = json!({"messages":[{"role":"user","content":[{"text":"Stream me an answer."}]}],
                      "inferenceConfig":{"maxTokens":200}});
    let path = "/model/anthropic.claude-3-haiku-20240307-v1:0/converse-stream";
    let r =
        post(&e, path, &body, &[("x-team", "a"), ("x-mock-completion-tokens", "40"), ("x-mock-prompt-tokens", "25")])
            .await;
    assert_eq!(r.status(), 200);
    assert_eq!(h(&r, "content-type"), "application/vnd.amazon.eventstream");
    let bytes = r.bytes().await.unwrap();
    let mut decoder = meshwarden_shared::eventstream::Decoder::default();
    let messages = decoder.feed(&bytes);
    assert_eq!((decoder.broken(), decoder.pending()), (None, 0), "the client gets the frames intact");
    assert_eq!(messages.len(), 1 + 40 + 3, "messageStart, 40 deltas, contentBlockStop, messageStop, metadata");
    assert_eq!(e.stat(&stat("output_tokens")).await.unwrap(), 40);
    assert_eq!(e.stat(&stat("input_tokens")).await.unwrap(), 25);
    assert_eq!(e.stat(&stat("usage.reported")).await.unwrap(), 1);
    // Cut by the upstream after 6 events, before the usage: the text streamed so far is charged.
    let r = post(
        &e,
        path,
        &body,
        &[
            ("x-team", "a"),
            ("x-mock-completion-tokens", "40"),
            ("x-mock-abort-after-chunks", "6"),
            // Each event its own write, so the events before the reset reach Envoy.
            ("x-mock-chunk-delay-ms", "10"),
        ],
    )
    .await;
    let _ = r.bytes().await;
    // Settled in on_log, when Envoy finishes the reset stream.
    for _ in 0..50 {
        if e.stat(&stat("usage.estimated")).await.unwrap() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(e.stat(&stat("usage.estimated")).await.unwrap(), 1);
    let estimated = e.stat(&stat("output_tokens")).await.unwrap() - 40;
    assert!((1..40).contains(&estimated), "charged {estimated} output tokens for 5 streamed words");
}

/// Native APIs whose usage is not an OpenAI/Anthropic `usage` object: Ollama's NDJSON stream (counts in
/// the last line) and JSON answer, and Bedrock `InvokeModel`'s usage headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_and_bedrock_invoke_usage_is_charged() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(10000000)).await;
    let out = |m: &str| format!("meshwarden.token_limiter.model.{m}.output_tokens");
    let inp = |m: &str| format!("meshwarden.token_limiter.model.{m}.input_tokens");
    // Ollama chat, streamed (its default): NDJSON, one line per token.
    let body = json!({"model": "llama3", "messages": [{"role": "user", "content": "Stream, Ollama style."}]});
    let r = post(
        &e,
        "/api/chat",
        &body,
        &[("x-team", "a"), ("x-mock-completion-tokens", "30"), ("x-mock-prompt-tokens", "12")],
    )
    .await;
    assert_eq!(h(&r, "content-type"), "application/x-ndjson");
    assert_eq!(r.text().await.unwrap().lines().count(), 31);
    assert_eq!(e.stat(&out("llama3")).await.unwrap(), 30);
    assert_eq!(e.stat(&inp("llama3")).await.unwrap(), 12);
    // Ollama generate, not streamed: the counts at the top level of the JSON answer.
    let body = json!({"model": "qwen", "prompt": "Answer at once.", "stream": false});
    let r = post(&e, "/api/generate", &body, &[("x-team", "a"), ("x-mock-completion-tokens", "44")]).await;
    assert_eq!(h(&r, "content-type"), "application/json");
    let _ = r.text().await.unwrap();
    assert_eq!(e.stat(&out("qwen")).await.unwrap(), 44);
    // Bedrock InvokeModel: usage in response headers only.
    let body = json!({"model": "titan", "inputText": "Bedrock invoke."});
    let r = post(
        &e,
        "/model/amazon.titan-text-express-v1/invoke",
        &body,
        &[
            ("x-team", "a"),
            ("x-mock-no-usage", "1"),
            ("x-mock-response-header", "x-amzn-bedrock-input-token-count: 7"),
            ("x-mock-response-header", "x-amzn-bedrock-output-token-count: 321"),
        ],
    )
    .await;
    let _ = r.text().await.unwrap();
    // Counted under the model the path names (the one Bedrock serves), not the body's `model`.
    let titan = "amazon_titan-text-express-v1";
    assert_eq!(e.stat(&out(titan)).await.unwrap(), 321);
    assert_eq!(e.stat(&inp(titan)).await.unwrap(), 7);
    assert_eq!(e.stat("meshwarden.token_limiter.usage.reported").await.unwrap(), 3);
}

/// A model rule matches the model name in any letter case: Ollama and Azure OpenAI deployments serve
/// `GPT-4O` as `gpt-4o`, so before 2026-12-07 a client escaped gpt-4o's budget by writing its name in
/// capitals (the rule matched case-sensitively), on Ollama by adding the default `:latest` tag, and on
/// Bedrock by naming a cross-region inference profile (`us.anthropic.…`) or an ARN. All spellings share
/// the one budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_rule_matches_the_model_in_any_case() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"default_output_reservation": 10, "unknown_model": "skip_model_rules",
               "rules":[{"name":"gpt4o","key":{"header":"x-team"},"model":"gpt-4o","limits":{"tokens_per_day":60}},
                        {"name":"llama","key":{"header":"x-team"},"model":"llama3","limits":{"tokens_per_day":60}},
                        {"name":"sonnet","key":{"header":"x-team"},"model":"anthropic.claude-3-5-sonnet-20240620-v1:0",
                         "limits":{"tokens_per_day":60}}]}),
    )
    .await;
    let hdrs = [("x-team", "a"), ("x-mock-completion-tokens", "50")];
    let (admitted, denied) = until_limited(&e, &chat("GPT-4O", "hello", None, false), &hdrs).await;
    assert_eq!(admitted, 1);
    assert_eq!(denied.status(), 429);
    // Another spelling draws on the same spent budget; another model does not.
    let r = post(&e, "/v1/chat/completions", &chat("gpt-4o", "hello", None, false), &hdrs).await;
    assert_eq!(r.status(), 429);
    let r = post(&e, "/v1/chat/completions", &chat("gpt-4o-mini", "hello", None, false), &hdrs).await;
    assert_eq!(r.status(), 200);
    // Ollama fills in `:latest` (and its registry and `library/`): `llama3:latest` is the rule's llama3.
    let ollama =
        |model: &str| json!({"model": model, "stream": false, "messages": [{"role": "user", "content": "hello"}]});
    let r = post(&e, "/api/chat", &ollama("llama3:latest"), &hdrs).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await.unwrap();
    for spelling in ["llama3", "Llama3:Latest", "registry.ollama.ai/library/llama3:latest"] {
        let r = post(&e, "/api/chat", &ollama(spelling), &hdrs).await;
        assert_eq!(r.status(), 429, "{spelling}");
    }
    let r = post(&e, "/api/chat", &ollama("llama3:70b"), &hdrs).await;
    assert_eq!(r.status(), 200, "another tag is another model");
    // Bedrock serves a foundation model through cross-region inference profiles and ARNs as well.
    let converse = json!({"messages":[{"role":"user","content":[{"text":"hello"}]}]});
    let r = post(&e, "/model/us.anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse", &converse, &hdrs).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await.unwrap();
    for path in [
        "/model/anthropic.claude-3-5-sonnet-20240620-v1:0/converse",
        "/model/eu.anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse",
        "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse",
    ] {
        let r = post(&e, path, &converse, &hdrs).await;
        assert_eq!(r.status(), 429, "{path}");
    }
}

/// A stream of a shape the filter does not know (Triton's generate extension on the KServe v2 protocol,
/// `/v2/models/{model}/generate_stream`, which reports no token counts) is charged the text it streamed,
/// and the model the path names meets its rules. Before 2026-12-07 such a stream cost no output at all
/// and the path's model was not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_unknown_shape_is_charged_its_text() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"default_output_reservation": 10, "unknown_model": "skip_model_rules",
               "rules":[{"name":"llama","key":{"header":"x-team"},"model":"llama-3-8b","limits":{"tokens_per_day":100000}}]}),
    )
    .await;
    let body = json!({"text_input": "Explain machine learning.", "max_tokens": 60, "stream": true});
    let r = post(
        &e,
        "/v2/models/llama-3-8b/generate_stream",
        &body,
        &[("x-team", "a"), ("x-mock-completion-tokens", "40")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let streamed: usize = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<Value>(d).unwrap()["text_output"].as_str().unwrap().len())
        .sum();
    assert!(streamed > 100, "{text}");
    let out = e.stat("meshwarden.token_limiter.model.llama-3-8b.output_tokens").await.unwrap();
    assert_eq!(out, streamed.div_ceil(4) as u64, "a token per 4 characters of `text_output`");
    assert_eq!(e.stat("meshwarden.token_limiter.usage.estimated").await.unwrap(), 1);
}

/// Hugging Face TGI's native `/generate` and `/generate_stream` (also SageMaker's Hugging Face LLM
/// containers) and SGLang's native `/generate`: output caps reserved, usage read from TGI's response
/// headers, its stream's `details` or its token events, and SGLang's `meta_info`. Before 2026-12-07 a
/// TGI stream was charged no output at all, and `parameters.max_new_tokens` reserved the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tgi_and_sglang_native_generate_apis_are_charged() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(10_000_000)).await;
    let totals = || async {
        (
            e.stat("meshwarden.token_limiter.input_tokens").await.unwrap_or(0),
            e.stat("meshwarden.token_limiter.output_tokens").await.unwrap_or(0),
        )
    };
    let charged = |before: (u64, u64), after: (u64, u64)| (after.0 - before.0, after.1 - before.1);
    let tgi = json!({"inputs": "Tell me a story about a lighthouse.", "parameters": {"max_new_tokens": 600}});
    let usage = [("x-team", "a"), ("x-mock-prompt-tokens", "9"), ("x-mock-completion-tokens", "25")];
    // TGI JSON: the counts are in the response headers only.
    let before = totals().await;
    let r = post(&e, "/generate", &tgi, &usage).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h(&r, "x-generated-tokens"), "25");
    let _ = r.text().await.unwrap();
    assert_eq!(charged(before, totals().await), (9, 25));
    // TGI stream without `details`: no counts anywhere, one event per token.
    let before = totals().await;
    let r = post(&e, "/generate_stream", &tgi, &usage).await;
    assert_eq!(h(&r, "content-type"), "text/event-stream");
    let text = r.text().await.unwrap();
    assert_eq!(text.matches("\"token\"").count(), 25);
    let (input, output) = charged(before, totals().await);
    assert_eq!(output, 25, "one token per event");
    assert!(input > 0, "the prompt estimate");
    // TGI stream with `details`: the final event's counts.
    let before_reported = e.stat("meshwarden.token_limiter.usage.reported").await.unwrap_or(0);
    let before = totals().await;
    let detailed = json!({"inputs": "Tell me a story.", "parameters": {"max_new_tokens": 600, "details": true}});
    let r = post(&e, "/generate_stream", &detailed, &usage).await;
    let _ = r.text().await.unwrap();
    assert_eq!(charged(before, totals().await), (9, 25));
    assert_eq!(e.stat("meshwarden.token_limiter.usage.reported").await.unwrap(), before_reported + 1);
    // SGLang, JSON and streamed: `meta_info`.
    for stream in [false, true] {
        let before = totals().await;
        let body = json!({"text": "Once upon a time", "sampling_params": {"max_new_tokens": 64}, "stream": stream});
        let r = post(&e, "/generate", &body, &usage).await;
        assert_eq!(r.status(), 200);
        let _ = r.text().await.unwrap();
        assert_eq!(charged(before, totals().await), (9, 25), "stream: {stream}");
    }
    // The output cap is reserved: 3,000 new tokens do not fit a 1,000-token budget (the default
    // reservation of 10 did).
    let small = envoy(&mock, team_budget(1000)).await;
    let big = json!({"inputs": "Write a long essay.", "parameters": {"max_new_tokens": 3000}});
    let r = post(&small, "/generate", &big, &[("x-team", "b")]).await;
    assert_eq!(r.status(), 429);
    let big = json!({"text": "Write a long essay.", "sampling_params": {"max_new_tokens": 3000}});
    let r = post(&small, "/generate", &big, &[("x-team", "b")]).await;
    assert_eq!(r.status(), 429);
    let fits = json!({"inputs": "Write a short poem.", "parameters": {"max_new_tokens": 300}});
    let r = post(&small, "/generate", &fits, &[("x-team", "b")]).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_is_rejected_naming_the_field() {
    let mock = MockLlm::start().await.unwrap();
    let log = EnvoyBuilder::new("token-limiter.yaml")
        .upstream_port(mock.port())
        .filter_config(
            "token-limiter",
            &json!({"rules":[{"name":"a","key":{"unverified_jwt_claim":{"claim":"sub"}},"limits":{"tokens_per_second":1}}]}),
        )
        .start_expect_failure()
        .await
        .unwrap();
    assert!(log.contains("$.rules[0].key"), "{log}");
    // A fallback model Envoy could not send back in the fallback header is refused at load time too.
    let log = EnvoyBuilder::new("token-limiter.yaml")
        .upstream_port(mock.port())
        .filter_config(
            "token-limiter",
            &json!({"rules":[{"name":"a","key":{"constant":"x"},"limits":{"tokens_per_second":1},
                              "fallback_model":"gpt\r\nx-injected: 1"}]}),
        )
        .start_expect_failure()
        .await
        .unwrap();
    assert!(log.contains("$.rules[0].fallback_model"), "{log}");
}

/// An upstream that answers every request with `body` as SSE, one byte per HTTP chunk (flushed), so
/// Envoy hands the filter chunks cut at every byte: inside `\r\n`, UTF-8 characters and JSON escapes.
async fn byte_by_byte_upstream(body: &'static str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                sock.set_nodelay(true).unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // Read the request head and its (chunked) body.
                loop {
                    let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return,
                    };
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req);
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let head = text[..head_end].to_ascii_lowercase();
                        let body = &text[head_end + 4..];
                        let done = if let Some(cl) = head.lines().find_map(|l| l.strip_prefix("content-length:")) {
                            body.len() >= cl.trim().parse::<usize>().unwrap()
                        } else {
                            body.ends_with("0\r\n\r\n")
                        };
                        if done {
                            break;
                        }
                    }
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for b in body.as_bytes() {
                    let mut chunk = b"1\r\n".to_vec();
                    chunk.push(*b);
                    chunk.extend_from_slice(b"\r\n");
                    if sock.write_all(&chunk).await.is_err() {
                        return;
                    }
                    let _ = sock.flush().await;
                    tokio::task::yield_now().await;
                }
                let _ = sock.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_split_at_every_byte_through_envoy() {
    const STREAM: &str = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":30,\"output_tokens\":1}}}\r\n\r\n\
event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Gr\\u00fc\\u00dfe, \u{65e5}\u{672c} \\\"q\\\"\"}}\r\n\r\n\
: a comment line\r\n\r\n\
event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\r\n\r\n\
event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n";
    let port = byte_by_byte_upstream(STREAM).await;
    let e = EnvoyBuilder::new("token-limiter.yaml")
        .upstream_port(port)
        .filter_config(
            "token-limiter",
            &json!({"rules":[{"name":"t","key":{"constant":"x"},"limits":{"tokens_per_hour":100000}}]}),
        )
        .start()
        .await
        .unwrap();
    let body =
        json!({"model":"claude-sonnet-4","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hi"}]});
    for _ in 0..2 {
        let r = post(&e, "/v1/messages", &body, &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), STREAM, "the stream passes unchanged");
    }
    assert_eq!(e.stat("meshwarden.token_limiter.model.claude-sonnet-4.input_tokens").await.unwrap(), 60);
    assert_eq!(e.stat("meshwarden.token_limiter.model.claude-sonnet-4.output_tokens").await.unwrap(), 18);
    assert_eq!(e.stat("meshwarden.token_limiter.usage.reported").await.unwrap(), 2);
}

/// An upstream that answers every request with `body` as SSE in one chunk and then drops the connection
/// without ending the response: a stream cut by the upstream before its usage.
async fn cut_stream_upstream(body: String) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return,
                    };
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req);
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let head = text[..head_end].to_ascii_lowercase();
                        let cl = head.lines().find_map(|l| l.strip_prefix("content-length:"));
                        let done = match cl {
                            Some(cl) => text.len() - head_end - 4 >= cl.trim().parse::<usize>().unwrap(),
                            None => text.ends_with("0\r\n\r\n"),
                        };
                        if done {
                            break;
                        }
                    }
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                let chunk = format!("{head}{:x}\r\n{body}\r\n", body.len());
                let _ = sock.write_all(chunk.as_bytes()).await;
                let _ = sock.flush().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                // Dropped here: no last chunk, the response is cut.
            });
        }
    });
    port
}

/// A stream cut before its usage is charged what it streamed, and tool-call arguments and reasoning are
/// streamed output: before, an Anthropic stream of thinking and tool input cut by the upstream was charged
/// 1 output token (`message_start`'s), and an OpenAI tool call cut before the usage chunk nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_charges_the_tool_calls_and_reasoning_it_streamed() {
    let text = |n: usize| "a".repeat(4 * n); // n tokens by the documented estimate
    let anthropic = [
        json!({"type":"message_start","message":{"usage":{"input_tokens":30,"output_tokens":1}}}),
        json!({"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":text(100)}}),
        json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":text(50)}}),
    ]
    .iter()
    .map(|ev| format!("event: {}\ndata: {ev}\n\n", ev["type"].as_str().unwrap()))
    .collect::<String>();
    let openai = [
        json!({"choices":[{"index":0,"delta":{"role":"assistant","tool_calls":[{"index":0,"id":"c","type":"function",
            "function":{"name":"search","arguments":""}}]}}]}),
        json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":text(80)}}]}}]}),
    ]
    .iter()
    .map(|ev| format!("data: {ev}\n\n"))
    .collect::<String>();
    let config = json!({"rules":[{"name":"t","key":{"constant":"x"},"limits":{"tokens_per_hour":1000000}}]});
    for (path, model, stream, want_output) in
        [("/v1/messages", "claude-sonnet-4", anthropic, 150), ("/v1/chat/completions", "gpt-4o", openai, 80)]
    {
        let port = cut_stream_upstream(stream).await;
        let e = EnvoyBuilder::new("token-limiter.yaml")
            .upstream_port(port)
            .filter_config("token-limiter", &config)
            .start()
            .await
            .unwrap();
        let body = json!({"model":model,"max_tokens":1000,"stream":true,"messages":[{"role":"user","content":"hi"}]});
        let r = post(&e, path, &body, &[]).await;
        assert_eq!(r.status(), 200);
        assert!(r.text().await.is_err(), "{path}: the stream is cut");
        let stat = format!("meshwarden.token_limiter.model.{model}.output_tokens");
        let mut charged = 0;
        for _ in 0..50 {
            charged = e.stat(&stat).await.unwrap();
            if charged > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(charged, want_output, "{path}: output charged for the cut stream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverified_jwt_claim_keys_budgets_per_subject() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(
        &mock,
        json!({"trust_unverified_jwt": true, "rules":[{"name":"user","key":{"unverified_jwt_claim":{"claim":"sub"}},
               "on_missing_key":"reject","limits":{"tokens_per_hour":400}}]}),
    )
    .await;
    // {"alg":"none"}.{"sub":"alice"} / {"sub":"bob"}, with arbitrary signatures
    let alice = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.c2ln";
    let alice2 = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.b3RoZXI";
    let bob = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJib2IifQ.c2ln";
    let body = chat("gpt-4o-mini", "hello", Some(150), false);
    let auth = |t: &str| format!("Bearer {t}");
    let mut statuses = Vec::new();
    for t in [alice, alice2, alice] {
        statuses.push(
            post(
                &e,
                "/v1/chat/completions",
                &body,
                &[("authorization", &auth(t)), ("x-mock-completion-tokens", "150")],
            )
            .await
            .status()
            .as_u16(),
        );
    }
    assert_eq!(statuses, vec![200, 200, 429], "same subject, same budget, whatever the signature");
    assert_eq!(post(&e, "/v1/chat/completions", &body, &[("authorization", &auth(bob))]).await.status(), 200);
    // on_missing_key: reject answers 401 (what SDKs raise AuthenticationError for, and do not retry),
    // not a 429 that invites retries that can never pass.
    let r = post(&e, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status(), 401, "on_missing_key: reject");
    assert!(r.headers().get("retry-after").is_none());
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "missing_budget_key", "{err}");
    assert_eq!(e.stat("meshwarden.token_limiter.rule.user.missing_key").await.unwrap(), 1);
}

/// The official `openai` Python SDK (scripts/tools/pip-token-limiter.txt): our 429 raises
/// `RateLimitError` with `code`/`type` set, and the SDK's retry honours `retry-after-ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_raises_rate_limit_error_and_honours_retry_after() {
    let mock = MockLlm::start().await.unwrap();
    let e =
        envoy(&mock, json!({"rules":[{"name":"team","key":{"header":"x-team"},"limits":{"tokens_per_minute":600}}]}))
            .await;
    let script = meshwarden_integration_tests::paths::repo_root().join("integration-tests/python/openai_ratelimit.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(e.url("/v1"))
        .env("NO_PROXY", "*")
        .output()
        .await
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed (is the `openai` package installed? scripts/install-tools.sh installs it):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["limited"]["status"], 429);
    assert_eq!(v["limited"]["code"], "rate_limit_exceeded");
    assert_eq!(v["limited"]["type"], "rate_limit_error");
    assert!(v["admitted"].as_u64().unwrap() >= 1);
    let retry_ms = v["limited"]["retry_after_ms"].as_f64().unwrap();
    let elapsed = v["elapsed_ms"].as_f64().unwrap();
    assert!(elapsed + 50.0 >= retry_ms, "the SDK waited {elapsed} ms, retry-after-ms was {retry_ms}");
    assert_eq!(v["model"], "gpt-4o-mini");
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An HS256 JWT signed with `openssl dgst -mac HMAC` (no crypto crate in the test harness).
fn hs256_jwt(key_hex: &str, payload: &Value) -> String {
    let signing_input =
        format!("{}.{}", b64url(br#"{"alg":"HS256","typ":"JWT"}"#), b64url(payload.to_string().as_bytes()));
    let mut child = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-mac", "HMAC", "-macopt", &format!("hexkey:{key_hex}"), "-binary"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(signing_input.as_bytes()).unwrap();
    let sig = child.wait_with_output().unwrap().stdout;
    assert_eq!(sig.len(), 32);
    format!("{signing_input}.{}", b64url(&sig))
}

/// Verified claims: Envoy's jwt_authn checks the signature and puts the payload in dynamic metadata; the
/// filter charges the `team` claim from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_authn_metadata_claim_keys_budgets_per_team() {
    let mock = MockLlm::start().await.unwrap();
    let key_hex = "6d65736877617264656e2d746573742d7365637265742d6b65792d3332627974";
    let key_bytes: Vec<u8> =
        (0..key_hex.len()).step_by(2).map(|i| u8::from_str_radix(&key_hex[i..i + 2], 16).unwrap()).collect();
    let jwks = json!({"keys":[{"kty":"oct","alg":"HS256","kid":"k1","k": b64url(&key_bytes)}]}).to_string();
    let e = EnvoyBuilder::new("token-limiter-jwt.yaml")
        .upstream_port(mock.port())
        .var("JWKS", jwks)
        .filter_config(
            "token-limiter",
            &json!({"rules":[{"name":"team","key":{"jwt_claim":{"claim":"team","metadata_key":"jwt_payload"}},
                    "on_missing_key":"reject","limits":{"tokens_per_hour":400}}]}),
        )
        .start()
        .await
        .unwrap();
    let tok = |sub: &str, team: &str| {
        format!("Bearer {}", hs256_jwt(key_hex, &json!({"iss":"meshwarden-test","sub":sub,"team":team})))
    };
    let body = chat("gpt-4o-mini", "hello", Some(150), false);
    let mut statuses = Vec::new();
    for sub in ["alice", "bob", "carol"] {
        let r = post(
            &e,
            "/v1/chat/completions",
            &body,
            &[("authorization", &tok(sub, "ml")), ("x-mock-completion-tokens", "150")],
        )
        .await;
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 429], "one budget for team ml across users");
    assert_eq!(post(&e, "/v1/chat/completions", &body, &[("authorization", &tok("dave", "web"))]).await.status(), 200);
    // A token signed with another key never reaches the filter (jwt_authn answers 401).
    let forged = format!("Bearer {}", hs256_jwt("00112233", &json!({"iss":"meshwarden-test","sub":"x","team":"web"})));
    assert_eq!(post(&e, "/v1/chat/completions", &body, &[("authorization", &forged)]).await.status(), 401);

    // A numeric claim inside an object (`org.id`) keys budgets like a string one: read from the typed
    // metadata, not as the 8 raw bytes a property path would give (not UTF-8 for 1234: a "missing key").
    let e = EnvoyBuilder::new("token-limiter-jwt.yaml")
        .upstream_port(mock.port())
        .var("JWKS", json!({"keys":[{"kty":"oct","alg":"HS256","kid":"k1","k": b64url(&key_bytes)}]}).to_string())
        .filter_config(
            "token-limiter",
            &json!({"rules":[{"name":"org","key":{"jwt_claim":{"claim":"org.id","metadata_key":"jwt_payload"}},
                    "on_missing_key":"reject","limits":{"tokens_per_hour":400}}]}),
        )
        .start()
        .await
        .unwrap();
    let org = |sub: &str, id: u64| {
        format!("Bearer {}", hs256_jwt(key_hex, &json!({"iss":"meshwarden-test","sub":sub,"org":{"id":id}})))
    };
    let mut statuses = Vec::new();
    for sub in ["alice", "bob", "carol"] {
        let hdrs = [("authorization", org(sub, 1234)), ("x-mock-completion-tokens", "150".to_string())];
        let hdrs: Vec<(&str, &str)> = hdrs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        statuses.push(post(&e, "/v1/chat/completions", &body, &hdrs).await.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 429], "one budget for org 1234 across users");
    let other = org("dave", 1235);
    assert_eq!(post(&e, "/v1/chat/completions", &body, &[("authorization", &other)]).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_namespace_keys_budgets_under_mtls() {
    let mock = MockLlm::start().await.unwrap();
    let tls = tempfile::tempdir().unwrap();
    meshwarden_integration_tests::pki::spiffe_pki(
        tls.path(),
        &[
            ("a1", "spiffe://cluster.local/ns/team-a/sa/bot"),
            ("a2", "spiffe://cluster.local/ns/team-a/sa/other"),
            ("b1", "spiffe://cluster.local/ns/team-b/sa/bot"),
        ],
    )
    .unwrap();
    let e = EnvoyBuilder::new("token-limiter-mtls.yaml")
        .upstream_port(mock.port())
        .var("TLS_DIR", tls.path().display().to_string())
        .filter_config(
            "token-limiter",
            &json!({"rules":[{"name":"ns","key":{"spiffe":"namespace"},"on_missing_key":"reject","limits":{"tokens_per_hour":400}}]}),
        )
        .start()
        .await
        .unwrap();
    let body = chat("gpt-4o-mini", "hello", Some(150), false).to_string();
    let curl = |client: &str| {
        let d = tls.path();
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--noproxy", "*"])
            .arg("--cacert")
            .arg(d.join("ca.crt"))
            .arg("--cert")
            .arg(d.join(format!("{client}.crt")))
            .arg("--key")
            .arg(d.join(format!("{client}.key")))
            .args(["-H", "content-type: application/json", "-H", "x-mock-completion-tokens: 150", "-d", &body])
            .arg(format!("https://127.0.0.1:{}/v1/chat/completions", e.port))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // Two service accounts of namespace team-a share its budget (400 = 2 requests of ~155).
    let statuses: Vec<String> = ["a1", "a2", "a1"].iter().map(|c| curl(c)).collect();
    assert_eq!(statuses, vec!["200", "200", "429"]);
    assert_eq!(curl("b1"), "200", "team-b has its own budget");
}

/// "429 before any byte reaches the model": an upstream that counts every byte it receives sees nothing
/// of a rejected request, streaming or not (the filter holds the headers until admission).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_requests_send_no_byte_upstream() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bytes = Arc::new(AtomicUsize::new(0));
    let b2 = bytes.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let b3 = b2.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    b3.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    let e = EnvoyBuilder::new("token-limiter.yaml")
        .upstream_port(port)
        .filter_config(
            "token-limiter",
            &json!({"rules":[{"name":"tiny","key":{"constant":"x"},"limits":{"tokens_per_hour":10}}]}),
        )
        .start()
        .await
        .unwrap();
    for stream in [false, true] {
        let r = post(&e, "/v1/chat/completions", &chat("gpt-4o-mini", "hello there", Some(100), stream), &[]).await;
        assert_eq!(r.status(), 429);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(bytes.load(Ordering::SeqCst), 0, "the upstream received bytes of rejected requests");
}

/// A text file sent base64-encoded is estimated as the text the model reads: an OpenAI chat `data:text/csv`
/// file part of ~27,500 tokens against a 20,000-token budget is refused before the model (before
/// 2026-12-07 it was priced as an unknown file, 3,000 tokens, and admitted); a small one is admitted at its
/// text's estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_text_files_are_estimated_as_their_text() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(20000)).await;
    let file = |text: &str| {
        json!({"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Summarise it"},
            {"type": "file", "file": {"filename": "a.csv", "file_data":
                format!("data:text/csv;base64,{}", meshwarden_shared::encoding::base64_encode(text.as_bytes()))}}]}]})
    };
    let r = post(&e, "/v1/chat/completions", &file(&"name,email\n".repeat(10_000)), &[("x-team", "a")]).await;
    assert_eq!(r.status(), 429, "{:?}", r.text().await);
    assert!(mock.requests().is_empty(), "refused before any byte reached the model");
    let r = post(&e, "/v1/chat/completions", &file(&"name,email\n".repeat(400)), &[("x-team", "a")]).await;
    assert_eq!(r.status(), 200);
    let rem: u64 = h(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert_eq!(rem, 20000 - (7 + 1100 + 10), "the question, the file's 4,400 characters, max_tokens");
}

/// Team `a`'s first Responses turn, `resp_t1`: 6,000 input and 10 output tokens reported.
async fn first_responses_turn(e: &Envoy) {
    let turn1 = json!({"model": "gpt-4o", "input": "Summarise the attached contract.", "max_output_tokens": 10});
    let hdrs = [
        ("x-team", "a"),
        ("x-mock-response-id", "resp_t1"),
        ("x-mock-prompt-tokens", "6000"),
        ("x-mock-completion-tokens", "10"),
    ];
    let r = post(e, "/v1/responses", &turn1, &hdrs).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
}

/// A Responses turn that names a stored conversation (`previous_response_id`, or `conversation`) makes the
/// model read it again: it is admitted on the context the earlier turn left behind (that turn's reported
/// input plus output tokens), not on its few new tokens. Before 2026-12-08 `{"previous_response_id":
/// "resp_t1", "input": "go on"}` was admitted on ~6 tokens whatever the conversation held, and the budget
/// overshot by all of it (still so with `context_memory_slots: 0`, shown last). JSON and streamed answers;
/// an unknown id is admitted on the request's own estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_turns_are_admitted_on_the_stored_conversation_they_name() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(10_000)).await;
    let stat = |name: &str| format!("meshwarden.token_limiter.context_memory.{name}");
    first_responses_turn(&e).await;
    assert_eq!(stat_at_least(&e, &stat("stored"), 1).await, 1);
    // Team a has 3,990 tokens left; the next turn reads the 6,010 again.
    let turn2 =
        json!({"model": "gpt-4o", "previous_response_id": "resp_t1", "input": "go on", "max_output_tokens": 10});
    let r = post(&e, "/v1/responses", &turn2, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
    assert_eq!(e.stat(&stat("hits")).await.unwrap(), 1);
    // Team b has room for it: admitted (the charge is still the reported usage).
    let r = post(&e, "/v1/responses", &turn2, &[("x-team", "b"), ("x-mock-prompt-tokens", "6020")]).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    assert_eq!(e.stat(&stat("hits")).await.unwrap(), 2);
    // An id this Envoy never answered: the request's own estimate.
    let unknown = json!({"model": "gpt-4o", "previous_response_id": "resp_elsewhere", "input": "go on"});
    let r = post(&e, "/v1/responses", &unknown, &[("x-team", "c")]).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    assert_eq!(e.stat(&stat("misses")).await.unwrap(), 1);

    // Streamed, in a conversation: the id comes from `response.created`, and the conversation is remembered.
    let turn1 = json!({"model": "gpt-4o", "conversation": "conv_d", "input": "Read this log.", "stream": true,
                       "max_output_tokens": 10});
    let hdrs = [
        ("x-team", "d"),
        ("x-mock-response-id", "resp_d1"),
        ("x-mock-prompt-tokens", "7000"),
        ("x-mock-completion-tokens", "10"),
    ];
    let r = post(&e, "/v1/responses", &turn1, &hdrs).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("resp_d1"));
    // resp_d1 and conv_d, besides the three JSON answers above (b's and c's both answered as `resp_mock`).
    assert_eq!(stat_at_least(&e, &stat("stored"), 5).await, 5);
    for next in [
        json!({"model": "gpt-4o", "conversation": {"id": "conv_d"}, "input": "and then?", "max_output_tokens": 10}),
        json!({"model": "gpt-4o", "previous_response_id": "resp_d1", "input": "and then?", "max_output_tokens": 10}),
    ] {
        let r = post(&e, "/v1/responses", &next, &[("x-team", "d")]).await;
        assert_eq!(r.status(), 429, "{next}");
    }

    // Switched off: the second turn passes on its own few tokens.
    let mut off = team_budget(10_000);
    off["context_memory_slots"] = json!(0);
    let e = envoy(&mock, off).await;
    first_responses_turn(&e).await;
    let r = post(&e, "/v1/responses", &turn2, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 200, "admitted on ~6 tokens: the overshoot the memory prevents");
}

/// A Gemini request naming a context cache (`cachedContent`) is admitted on the cache's size, which the
/// answer to `POST .../cachedContents` gave (`usageMetadata.totalTokenCount`), not on its few new tokens.
/// Before 2026-12-08 it was admitted on its own size whatever the cache held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_requests_are_admitted_on_the_context_cache_they_name() {
    let mock = MockLlm::start().await.unwrap();
    let e = envoy(&mock, team_budget(10_000)).await;
    let create = json!({"model": "models/gemini-2.5-flash", "contents": [{"role": "user", "parts": [{"text": "A long manual."}]}],
                        "ttl": "3600s"});
    let r = post(
        &e,
        "/v1beta/cachedContents",
        &create,
        &[("x-team", "a"), ("x-mock-response-id", "m1"), ("x-mock-prompt-tokens", "8000")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("cachedContents/m1"));
    assert_eq!(stat_at_least(&e, "meshwarden.token_limiter.context_memory.stored", 1).await, 1);
    let ask = json!({"cachedContent": "cachedContents/m1", "contents": [{"role": "user", "parts": [{"text": "Chapter 2?"}]}],
                     "generationConfig": {"maxOutputTokens": 10}});
    let path = "/v1beta/models/gemini-2.5-flash:generateContent";
    // Team a spent little on the create call (its body's estimate): the first question fits (8,000 read),
    // and is charged what it reports; the second does not fit any more.
    let r = post(&e, path, &ask, &[("x-team", "a"), ("x-mock-prompt-tokens", "8010")]).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    let r = post(&e, path, &ask, &[("x-team", "a")]).await;
    assert_eq!(r.status(), 429, "8,000 cached tokens and ~1,900 left");
    assert_eq!(e.stat("meshwarden.token_limiter.context_memory.hits").await.unwrap(), 2);
    // Another team, a cache this Envoy never saw created: its own estimate.
    let other =
        json!({"cachedContent": "cachedContents/elsewhere", "contents": [{"role": "user", "parts": [{"text": "Hi"}]}]});
    let r = post(&e, path, &other, &[("x-team", "b")]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(e.stat("meshwarden.token_limiter.context_memory.misses").await.unwrap(), 1);
}
