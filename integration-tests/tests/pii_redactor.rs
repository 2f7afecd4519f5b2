//! pii-redactor through a real Envoy loading the real `.wasm`: what left the gateway (the mock's record)
//! is masked; what the client got back is restored, for JSON and streamed answers, OpenAI and Anthropic
//! shapes, including placeholders split across SSE events and network chunks, and Bedrock binary event
//! streams (valid frames, placeholders split across events); bad input is answered.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::envoy::{Envoy, EnvoyBuilder};
use meshwarden_integration_tests::mock_llm::MockLlm;
use meshwarden_shared::encoding::base64_encode;
use meshwarden_shared::eventstream::{encode, Decoder};
use meshwarden_shared::llm::extract_stream_delta_texts;
use meshwarden_shared::sse::SseParser;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FILTER: &str = "pii-redactor";
const PROMPT: &str = "I am Jane (jane.doe@example.com, +44 20 7946 0958). Card 4111 1111 1111 1111. \
Write to jane.doe@example.com. My own note says <EMAIL_1> literally. AWS key AKIAIOSFODNN7EXAMPLE.";
const ORIGINALS: [&str; 4] =
    ["jane.doe@example.com", "+44 20 7946 0958", "4111 1111 1111 1111", "AKIAIOSFODNN7EXAMPLE"];

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn envoy(mock_port: u16, config: Value) -> Envoy {
    EnvoyBuilder::new("pii-redactor.yaml")
        .upstream_port(mock_port)
        .filter_config(FILTER, &config)
        .start()
        .await
        .unwrap()
}

/// Streamed text of an SSE answer (content deltas of any provider).
fn sse_text(body: &str) -> String {
    let mut p = SseParser::default();
    let mut out = String::new();
    for e in p.feed(body.as_bytes()) {
        if let Ok(v) = serde_json::from_str::<Value>(&e.data) {
            for t in extract_stream_delta_texts(&v) {
                out.push_str(&t.text);
            }
        }
    }
    out
}

fn assert_masked(upstream_body: &str) {
    for o in ORIGINALS {
        assert!(!upstream_body.contains(o), "{o} left the gateway: {upstream_body}");
    }
    // The client's own look-alike stays as it was; the real email got the next free number.
    assert!(upstream_body.contains("<EMAIL_1> literally"), "{upstream_body}");
    assert!(upstream_body.contains("(<EMAIL_2>, <PHONE_1>)"), "{upstream_body}");
    assert!(upstream_body.contains("Write to <EMAIL_2>."), "same value, same placeholder: {upstream_body}");
    assert!(
        upstream_body.contains("Card <CREDIT_CARD_1>.") && upstream_body.contains("<AWS_KEY_1>"),
        "{upstream_body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_json_masked_upstream_and_restored_for_the_client() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = envoy(mock.port(), json!({})).await;
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"gpt-4o-mini","metadata":{"k":"v"},"messages":[{"role":"user","content":PROMPT}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-meshwarden-pii"], "aws_access_key=1,credit_card=1,email=2,phone=1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], PROMPT, "the client gets its values back");

    let sent = mock.last_request().unwrap();
    let sent_json = sent.json().expect("valid JSON left the gateway");
    assert_masked(sent_json["messages"][0]["content"].as_str().unwrap());
    assert_eq!(sent_json["metadata"], json!({"k":"v"}), "the rest of the body is untouched");
    assert!(sent.header("content-length").is_none_or(|l| l.parse::<usize>().unwrap() == sent.body.len()));
    assert!(sent.header("accept-encoding").is_none());

    assert_eq!(envoy.stat("meshwarden.pii_redactor.findings.email.mask").await.unwrap(), 2);
    assert_eq!(envoy.stat("meshwarden.pii_redactor.findings.credit_card.mask").await.unwrap(), 1);
    assert_eq!(envoy.stat("meshwarden.pii_redactor.requests_rewritten").await.unwrap(), 1);
    assert_eq!(envoy.stat("meshwarden.pii_redactor.restored").await.unwrap(), 5);
    // The access log line carries counts, never values.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = envoy.log();
    let line = log.lines().find(|l| l.contains("POST /v1/chat/completions")).unwrap_or_default().to_string();
    assert!(line.contains("pii=aws_access_key=1,credit_card=1,email=2,phone=1"), "{log}");
    assert!(line.contains("findings=aws_access_key=1,credit_card=1,email=2,phone=1"), "filter state: {log}");
    assert!(!log.contains("jane.doe@example.com"), "values never logged");
}

/// Only the masked strings change: key order, number notation (an integer beyond 64 bits that a
/// re-serialised `Value` would turn into a float) and whitespace reach the model as the client sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_leaves_as_sent_but_for_the_masked_strings() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = envoy(mock.port(), json!({})).await;
    let body = "{ \"seed\": 123456789012345678901234567890, \"temperature\": 1.0e0,\n  \"model\": \"gpt-4o-mini\",\n  \
                \"messages\": [ {\"role\": \"user\", \"content\": \"mail jane.doe@example.com \\\"now\\\"\"} ] }";
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent = mock.last_request().unwrap().body;
    assert_eq!(sent, body.replace("jane.doe@example.com", "<EMAIL_1>"));
    assert_eq!(envoy.stat("meshwarden.pii_redactor.requests_rewritten").await.unwrap(), 1);
    // A body of a shape the extraction does not know (Gemini's native API: every string is scanned)
    // leaves as sent too; it was re-serialised with sorted keys before 2026-12-07.
    let gemini = "{\"contents\": [{\"role\": \"user\", \"parts\": [{\"text\": \"mail jane.doe@example.com\"}]}],\n                   \"generationConfig\": {\"temperature\": 0.2, \"seed\": 123456789012345678901234567890}}";
    let resp = client()
        .post(envoy.url("/v1beta/models/gemini-2.5-flash:generateContent"))
        .header("content-type", "application/json")
        .body(gemini)
        .send()
        .await
        .unwrap();
    let _ = resp.bytes().await;
    assert_eq!(mock.last_request().unwrap().body, gemini.replace("jane.doe@example.com", "<EMAIL_1>"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_json_and_both_streams_restored() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = envoy(mock.port(), json!({})).await;
    // Anthropic JSON
    let resp = client()
        .post(envoy.url("/v1/messages"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"claude-sonnet-4","max_tokens":256,"messages":[{"role":"user","content":[{"type":"text","text":PROMPT}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["content"][0]["text"], PROMPT);
    assert_masked(mock.last_request().unwrap().json().unwrap()["messages"][0]["content"][0]["text"].as_str().unwrap());

    // Streams, one delta per word, small delays so they cross Envoy as separate chunks.
    for (path, body) in [
        ("/v1/chat/completions", json!({"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":PROMPT}]})),
        (
            "/v1/messages",
            json!({"model":"claude-sonnet-4","max_tokens":256,"stream":true,"messages":[{"role":"user","content":PROMPT}]}),
        ),
        ("/v1/responses", json!({"model":"gpt-4o","stream":true,"input":PROMPT})),
    ] {
        let resp = client()
            .post(envoy.url(path))
            .header("x-mock-echo", "1")
            .header("x-mock-chunk-delay-ms", "2")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let text = resp.text().await.unwrap();
        assert_eq!(sse_text(&text), PROMPT, "{path}: {text}");
        if path.ends_with("completions") {
            assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        } else if path.ends_with("responses") {
            // The final event repeats the whole text: restored as well.
            assert!(text.contains("response.completed") && !text.contains("<EMAIL_2>"), "{text}");
        } else {
            assert!(text.contains("event: message_stop"), "{text}");
        }
        let sent = mock.last_request().unwrap().body;
        assert_masked(&sent);
    }
}

/// A raw HTTP/1.1 upstream that answers with fixed SSE bytes cut into the given network chunks (sent
/// with pauses, chunked encoding), and records the request body it received.
async fn chunky_upstream(chunks: Vec<Vec<u8>>) -> (u16, Arc<Mutex<Vec<String>>>) {
    chunky_upstream_with(chunks, "200 OK\r\ncontent-type: text/event-stream").await
}

/// Like [`chunky_upstream`] with the given status and header lines; records request heads and bodies.
async fn chunky_upstream_with(chunks: Vec<Vec<u8>>, headers: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let chunks = chunks.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                // headers, then content-length or chunked body (read until the terminator)
                loop {
                    let n = sock.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(h) = text.find("\r\n\r\n") {
                        let head = text[..h].to_ascii_lowercase();
                        let body = &text[h + 4..];
                        let done = if let Some(cl) = head.lines().find_map(|l| l.strip_prefix("content-length:")) {
                            body.len() >= cl.trim().parse::<usize>().unwrap_or(0)
                        } else {
                            body.ends_with("0\r\n\r\n")
                        };
                        if done {
                            seen.lock().unwrap().push(format!("{head}\r\n\r\n{body}"));
                            break;
                        }
                    }
                }
                let _ = sock
                    .write_all(format!("HTTP/1.1 {headers}\r\ntransfer-encoding: chunked\r\n\r\n").as_bytes())
                    .await;
                for c in chunks {
                    let _ = sock.write_all(format!("{:x}\r\n", c.len()).as_bytes()).await;
                    let _ = sock.write_all(&c).await;
                    let _ = sock.write_all(b"\r\n").await;
                    let _ = sock.flush().await;
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
                let _ = sock.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    (port, seen)
}

/// An Envoy with `scan_responses` in front of the upstream on `port`, and the text of its answer to a
/// streamed chat request saying `prompt` (status 200 checked).
async fn scanned_chat_stream(port: u16, prompt: &str) -> (Envoy, String) {
    let proxy = envoy(port, json!({"scan_responses": true})).await;
    let resp = client()
        .post(proxy.url("/v1/chat/completions"))
        .json(&json!({"model":"m","stream":true,"messages":[{"role":"user","content":prompt}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    (proxy, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholder_split_across_events_and_network_chunks_and_escaped() {
    let ev = |t: &str| format!("data: {}\n\n", json!({"choices":[{"index":0,"delta":{"content":t}}]}));
    // "<EMA" | "IL_1> and <PHO" | "NE_1>" across three events; then an escaped placeholder in one event.
    let stream = format!(
        "{}{}{}{}{}data: [DONE]\n\n",
        ev("Mail <EMA"),
        ev("IL_1> or call <PHO"),
        ev("NE_1>; again "),
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\u003cEMAIL_1\\u003e.\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    );
    // Network chunks cut inside events, inside JSON strings and inside the placeholders.
    let bytes = stream.as_bytes();
    let cuts = [7usize, 60, 75, 130, 131, 190, 250];
    let mut chunks = Vec::new();
    let mut last = 0;
    for c in cuts.iter().copied().filter(|c| *c < bytes.len()) {
        chunks.push(bytes[last..c].to_vec());
        last = c;
    }
    chunks.push(bytes[last..].to_vec());
    let (port, seen) = chunky_upstream(chunks).await;
    let envoy = envoy(port, json!({})).await;
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .json(&json!({"model":"m","stream":true,"messages":[{"role":"user","content":"I am bob@corp.io, tel 415-555-2671"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert_eq!(sse_text(&text), "Mail bob@corp.io or call 415-555-2671; again bob@corp.io.", "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let sent = seen.lock().unwrap().join("");
    assert!(sent.contains("I am <EMAIL_1>, tel <PHONE_1>") && !sent.contains("bob@corp.io"), "{sent}");
}

/// Hugging Face TGI's native `/generate_stream`: the prompt (`inputs`) is masked, and the answer, one token
/// per event, is restored with placeholders cut across tokens and network chunks, the final event's whole
/// `generated_text` too; the final event stays last (TGI sends no terminator). Before 2026-12-07 each
/// token was restored alone, so a placeholder cut across tokens reached the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tgi_native_stream_restored_across_tokens() {
    let ev = |i: u32, t: &str, last: Option<&str>| {
        format!(
            "data:{}\n\n",
            json!({"index": i, "token": {"id": i, "text": t, "logprob": -0.1, "special": false},
                   "generated_text": last, "details": null, "top_tokens": null})
        )
    };
    let stream = format!(
        "{}{}{}{}{}",
        ev(1, "Mail <EMA", None),
        ev(2, "IL_1> or", None),
        ev(3, " call <PHO", None),
        ev(4, "NE_1>", None),
        ev(5, ".", Some("Mail <EMAIL_1> or call <PHONE_1>.")),
    );
    let bytes = stream.as_bytes();
    let chunks: Vec<Vec<u8>> = bytes.chunks(37).map(<[u8]>::to_vec).collect();
    let (port, seen) = chunky_upstream(chunks).await;
    let envoy = envoy(port, json!({})).await;
    let resp = client()
        .post(envoy.url("/generate_stream"))
        .json(&json!({"inputs": "I am bob@corp.io, tel 415-555-2671", "parameters": {"max_new_tokens": 20}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let mut tokens = String::new();
    let mut finals = Vec::new();
    let mut last_is_final = false;
    for line in text.lines().filter_map(|l| l.strip_prefix("data:")) {
        let v: Value = serde_json::from_str(line.trim()).unwrap();
        tokens.push_str(v["token"]["text"].as_str().unwrap_or(""));
        last_is_final = v["generated_text"].is_string();
        if last_is_final {
            finals.push(v["generated_text"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(tokens, "Mail bob@corp.io or call 415-555-2671.", "{text}");
    assert_eq!(finals, ["Mail bob@corp.io or call 415-555-2671."], "{text}");
    assert!(last_is_final, "{text}");
    let sent = seen.lock().unwrap().join("");
    assert!(sent.contains("I am <EMAIL_1>, tel <PHONE_1>") && !sent.contains("bob@corp.io"), "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_off_leaks_nothing_and_look_alikes_are_never_restored() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = envoy(mock.port(), json!({"restore": false})).await;
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"m","messages":[{"role":"user","content":"<EMAIL_1> <EMAIL_2> me: a@b.io"}]}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "<EMAIL_1> <EMAIL_2> me: <EMAIL_3>");

    // With restore on, the client's look-alikes echo back as themselves, never as the real value.
    let envoy = envoy_default(&mock).await;
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .header("x-mock-answer", "<EMAIL_1> <EMAIL_2> <EMAIL_3>")
        .json(&json!({"model":"m","messages":[{"role":"user","content":"<EMAIL_1> <EMAIL_2> me: a@b.io"}]}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "<EMAIL_1> <EMAIL_2> a@b.io");

    // Placeholders belong to one request: another request (another caller) whose answer names the
    // first request's placeholder gets the placeholder, never the first caller's value.
    let first = client()
        .post(envoy.url("/v1/chat/completions"))
        .header("x-mock-answer", "done")
        .json(&json!({"model":"m","messages":[{"role":"user","content":"mine: secret.person@corp.io"}]}))
        .send()
        .await
        .unwrap();
    let _ = first.text().await;
    assert!(mock.last_request().unwrap().body.contains("<EMAIL_1>"));
    for stream in [false, true] {
        let resp = client()
            .post(envoy.url("/v1/chat/completions"))
            .header("x-mock-answer", "the first caller was <EMAIL_1>")
            .json(&json!({"model":"m","stream":stream,"messages":[{"role":"user","content":"who was first?"}]}))
            .send()
            .await
            .unwrap();
        let text = resp.text().await.unwrap();
        let answer = if stream {
            sse_text(&text)
        } else {
            serde_json::from_str::<Value>(&text).unwrap()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(answer, "the first caller was <EMAIL_1>", "stream {stream}: {text}");
        assert!(!text.contains("secret.person"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_answer_is_passed_unrestored_and_accept_encoding_is_dropped() {
    let answer = br#"{"choices":[{"message":{"content":"<EMAIL_1>"}}]}"#.to_vec();
    let (port, seen) = chunky_upstream_with(
        vec![answer.clone()],
        "200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip",
    )
    .await;
    let envoy = envoy(port, json!({})).await;
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .header("accept-encoding", "gzip")
        .json(&json!({"model":"m","messages":[{"role":"user","content":"mail a@b.io"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().to_vec(), answer, "bytes untouched: placeholders, never values");
    let upstream = seen.lock().unwrap().join("");
    assert!(!upstream.contains("accept-encoding"), "{upstream}");
    assert!(upstream.contains("mail <EMAIL_1>"), "{upstream}");
    assert_eq!(envoy.stat("meshwarden.pii_redactor.response_not_restored_encoded").await.unwrap(), 1);
}

/// `scan_responses` covers answers that are not parsed too: a plain-text answer, an error body labelled
/// as an event stream, and a JSON answer over `max_body_bytes` (streamed on as JSON text). Each arrives in
/// network chunks cut inside our placeholder and inside the model's own values; the client gets our
/// value restored and the model's redacted, and the JSON stays valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_scanning_covers_plain_text_error_and_oversized_json_answers() {
    let config = json!({"scan_responses": true, "max_body_bytes": 1024});
    let prompt = json!({"model":"m","messages":[{"role":"user","content":"I am bob@corp.io"}]});
    let chunks = |s: &str, cuts: &[usize]| {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts {
            out.push(b[last..c].to_vec());
            last = c;
        }
        out.push(b[last..].to_vec());
        out
    };

    // Plain text, cut inside `<EMAIL_1>`, between the card's groups and inside the leaked email.
    let plain = "Hello <EMAIL_1>, card 4111 1111 1111 1111 and mail leak@evil.example.org.";
    let (port, seen) = chunky_upstream_with(chunks(plain, &[10, 31, 56]), "200 OK\r\ncontent-type: text/plain").await;
    let proxy = envoy(port, config.clone()).await;
    let resp = client().post(proxy.url("/v1/chat/completions")).json(&prompt).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "Hello bob@corp.io, card [REDACTED] and mail [REDACTED].");
    assert!(seen.lock().unwrap().join("").contains("I am <EMAIL_1>"));
    assert_eq!(proxy.stat("meshwarden.pii_redactor.response_findings.credit_card.redact").await.unwrap(), 1);
    assert_eq!(proxy.stat("meshwarden.pii_redactor.response_findings.email.redact").await.unwrap(), 1);

    // An error answer labelled as an event stream: passed as text, scanned all the same.
    let error = r#"{"error":{"message":"leak@evil.example.org may not mail <EMAIL_1>"}}"#;
    let (port, _) =
        chunky_upstream_with(chunks(error, &[25, 60]), "500 Internal Server Error\r\ncontent-type: text/event-stream")
            .await;
    let proxy = envoy(port, config.clone()).await;
    let resp = client().post(proxy.url("/v1/chat/completions")).json(&prompt).send().await.unwrap();
    assert_eq!(resp.status(), 500);
    assert_eq!(resp.text().await.unwrap(), r#"{"error":{"message":"[REDACTED] may not mail bob@corp.io"}}"#);

    // JSON over `max_body_bytes`: too large to buffer and parse, streamed as JSON text. The model's email
    // is written with an escaped `@`, our placeholder with escaped angle brackets; cuts inside both.
    let pad = "lorem ipsum ".repeat(150);
    let json_answer = format!(
        r#"{{"choices":[{{"message":{{"role":"assistant","content":"{pad}Ask leak\u0040evil.example.org about \u003cEMAIL_1\u003e."}}}}]}}"#
    );
    let at = json_answer.find("leak").unwrap();
    let ph = json_answer.find("u003cEMAIL").unwrap();
    let (port, _) = chunky_upstream_with(
        chunks(&json_answer, &[700, at + 8, ph + 3, ph + 12]),
        "200 OK\r\ncontent-type: application/json",
    )
    .await;
    let proxy = envoy(port, config).await;
    let resp = client().post(proxy.url("/v1/chat/completions")).json(&prompt).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = serde_json::from_str(&resp.text().await.unwrap()).expect("still JSON");
    assert_eq!(
        body["choices"][0]["message"]["content"].as_str().unwrap(),
        format!("{pad}Ask [REDACTED] about bob@corp.io.")
    );
    assert_eq!(proxy.stat("meshwarden.pii_redactor.response_findings.email.redact").await.unwrap(), 1);
}

/// A value used as an object key (here an Anthropic tool_use `input` keyed by email) leaves masked with
/// the placeholder of the same value elsewhere, and the answer that echoes it is restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_used_as_object_keys_are_masked() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let resp = client()
        .post(proxy.url("/v1/messages"))
        .header("x-mock-answer", "Done for <EMAIL_1>.")
        .json(&json!({"model":"c","max_tokens":5,"messages":[
            {"role":"user","content":"update jane@corp.example"},
            {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"update",
                "input":{"jane@corp.example":{"plan":"gold"}}}]},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"ok"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["content"][0]["text"], "Done for jane@corp.example.");
    let sent = mock.last_request().unwrap().json().unwrap();
    assert!(!sent.to_string().contains("jane@corp.example"), "{sent}");
    assert_eq!(sent["messages"][1]["content"][0]["input"]["<EMAIL_1>"]["plan"], "gold", "{sent}");
}

/// Send `prompt` as one user message through the gateway to the echoing mock: the client must get it back
/// restored as written; returns the text that left the gateway (masked).
async fn echo_masked(proxy: &Envoy, mock: &MockLlm, prompt: &str) -> String {
    let resp = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"m","messages":[{"role":"user","content":prompt}]}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], prompt, "restored for the client");
    let sent = mock.last_request().unwrap().json().unwrap();
    sent["messages"][0]["content"].as_str().unwrap().to_string()
}

/// Emails with non-ASCII local parts and IDN domains leave masked whole and come back restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_emails_are_masked_whole_and_restored() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let prompt = "Schreib an jörg.müller@bücher.de und иван@пример.рф bitte.";
    assert_eq!(echo_masked(&proxy, &mock, prompt).await, "Schreib an <EMAIL_1> und <EMAIL_2> bitte.");
}

/// Realistic shapes that left the gateway unmasked, whole or in part, before 2026-12-06: an apostrophe in
/// an email's local part (`john.o'` left), a lower-case IBAN (`de89 3704` left), an OpenPGP private key
/// block, a Stripe key over 99 characters. Masked whole upstream, restored for the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realistic_shapes_are_masked_whole_and_restored() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let pgp =
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF2xyzABCDEFqwerty\n=abcd\n-----END PGP PRIVATE KEY BLOCK-----";
    let stripe = format!("sk_live_51H{}", "aB3dE5gH7j".repeat(10));
    let prompt =
        format!("Mail john.o'reilly@example.com, pay de89 3704 0044 0532 0130 00, key:\n{pgp}\nand {stripe} please.");
    assert_eq!(
        echo_masked(&proxy, &mock, &prompt).await,
        "Mail <EMAIL_1>, pay <IBAN_1>, key:\n<PRIVATE_KEY_1>\nand <STRIPE_KEY_1> please."
    );
}

/// Emails whose local part holds RFC 5322 specials (`~ & = ! # / ...`) are masked whole (before
/// 2026-12-07 `jo~e&co@example.com` left as `jo~e&<EMAIL_1>`), while a `key=` or a URL path before an
/// address stays readable; the client gets every value back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_with_rfc5322_specials_are_masked_whole_and_restored() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let prompt = "Mail jo~e&co@example.com, list-bounces+jane=example.com@lists.example.org, \
                  b!ll#y$m%x*zq?r^s`t{u|v}w@example.com, jo/e@example.com; log user=kim@example.com GET /users/lee@example.com";
    assert_eq!(
        echo_masked(&proxy, &mock, prompt).await,
        "Mail <EMAIL_1>, <EMAIL_2>, <EMAIL_3>, <EMAIL_4>; log user=<EMAIL_5> GET /users/<EMAIL_6>"
    );
}

/// IBANs with dashes or a line break between groups and cards with two spaces or a line break between
/// groups are masked whole (before 2026-12-07 one space or dash only: the dashed IBAN left whole, the
/// wrapped card too); the client gets them back as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ibans_and_cards_with_wider_separators_are_masked_whole_and_restored() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let prompt = "Pay DE89-3704-0044-0532-0130-00 or GB82 WEST 1234\n5698 7654 32 with card 4111  1111  1111  1111 \
                  or\n5555 5555\n5555 4444\nthanks";
    assert_eq!(
        echo_masked(&proxy, &mock, prompt).await,
        "Pay <IBAN_1> or <IBAN_2> with card <CREDIT_CARD_1> or\n<CREDIT_CARD_2>\nthanks"
    );
}

/// A value cut across two text parts of one message (the model reads them as one text) is masked whole:
/// before 2026-12-07 each part was scanned alone, so `4111 1111` + ` 1111 1111` left the gateway. The
/// placeholder goes in the first part, the rest of the value leaves the second; the answer restores the
/// whole value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_cut_across_content_parts_are_masked_whole_and_restored() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let resp = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"m","messages":[{"role":"user","content":[
            {"type":"text","text":"my card is 4111 1111"},{"type":"text","text":" 1111 1111, mail jane@exa"},
            {"type":"text","text":"mple.com"}]}]}))
        .send()
        .await
        .unwrap();
    let sent = mock.last_request().unwrap().json().unwrap();
    let parts = &sent["messages"][0]["content"];
    assert_eq!(parts[0]["text"], "my card is <CREDIT_CARD_1>");
    assert_eq!(parts[1]["text"], ", mail <EMAIL_1>");
    assert_eq!(parts[2]["text"], "");
    let body: Value = resp.json().await.unwrap();
    let answer = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        answer.contains("my card is 4111 1111 1111 1111") && answer.contains(", mail jane@example.com"),
        "{answer}"
    );
    assert!(!answer.contains('<'), "{answer}");
}

/// Values in fullwidth forms (a CJK input method's `＠` and digits) are masked and restored as written:
/// before 2026-12-07 they left the gateway, and a model reads them as the ASCII value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fullwidth_values_are_masked_and_restored() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let prompt = "メール jane.doe＠example.com、カード ４１１１ １１１１ １１１１ １１１１ です";
    let resp = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"m","messages":[{"role":"user","content":prompt}]}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], prompt);
    let sent = mock.last_request().unwrap().json().unwrap();
    assert_eq!(sent["messages"][0]["content"], "メール <EMAIL_1>、カード <CREDIT_CARD_1> です");
}

/// Invisible format characters inside a value (a left-to-right mark between card groups, a bidirectional
/// isolate and an invisible operator inside an email, a value written in Unicode tag characters) do not
/// hide it: before 2026-12-07 the card and the tag-written address left the gateway as sent and the email
/// went out as `jane\u{2066}.<EMAIL_1>`. The answer gets the original spelling back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_format_characters_do_not_hide_values() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let tags: String = "ops@example.org".chars().map(|c| char::from_u32(0xE0000 + u32::from(c)).unwrap()).collect();
    let prompt = format!(
        "card 4111\u{200e}1111\u{200e}1111\u{200e}1111, mail jane\u{2066}.doe@exa\u{2062}mple.com\u{2069}, cc {tags}."
    );
    let resp = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"m","messages":[{"role":"user","content":prompt}]}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], prompt.as_str());
    let sent = mock.last_request().unwrap().json().unwrap();
    assert_eq!(sent["messages"][0]["content"], "card <CREDIT_CARD_1>, mail <EMAIL_1>\u{2069}, cc <EMAIL_2>.");
}

/// An AWS secret access key pasted with its key id (a `.env` file, `~/.aws/credentials`, `aws iam
/// create-access-key` output) is masked like the id: before 2026-12-07 only the id was, and the secret,
/// the half that signs requests, reached the provider. The echo gets both back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_secret_access_keys_are_masked_with_their_key_id() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let env = "why does this fail?\nAWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE\nAWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n";
    let output = r#"{"AccessKey": {"UserName": "ci", "SecretAccessKey": "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY", "Status": "Active"}}"#;
    let resp = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"m","messages":[
            {"role":"user","content":env},
            {"role":"tool","tool_call_id":"c1","content":output}]}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], format!("{env}\n{output}"), "the echo of both messages");
    let sent = mock.last_request().unwrap().json().unwrap();
    assert_eq!(
        sent["messages"][0]["content"],
        "why does this fail?\nAWS_ACCESS_KEY_ID=<AWS_KEY_1>\nAWS_SECRET_ACCESS_KEY=<AWS_KEY_2>\n"
    );
    assert_eq!(
        sent["messages"][1]["content"],
        r#"{"AccessKey": {"UserName": "ci", "SecretAccessKey": "<AWS_KEY_3>", "Status": "Active"}}"#
    );
    assert_eq!(proxy.stat("meshwarden.pii_redactor.findings.aws_access_key.mask").await.unwrap(), 3);
}

/// Temporary credentials (STS, SSO, an instance role) come with a session token: masked with the key id and
/// the secret since 2026-12-07 (before, it reached the provider), and restored in the echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_session_tokens_are_masked() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let token =
        format!("IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ{}==", "Ab3/+Cd5Ef7Gh9Ij1Kl3Mn5".repeat(8));
    let prompt = format!(
        "export AWS_ACCESS_KEY_ID=ASIAIOSFODNN7EXAMPLE\nexport AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\nexport AWS_SESSION_TOKEN={token}\n"
    );
    let resp = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"m","messages":[{"role":"user","content":prompt}]}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], prompt.as_str());
    let sent = mock.last_request().unwrap().json().unwrap();
    assert_eq!(
        sent["messages"][0]["content"],
        "export AWS_ACCESS_KEY_ID=<AWS_KEY_1>\nexport AWS_SECRET_ACCESS_KEY=<AWS_KEY_2>\nexport AWS_SESSION_TOKEN=<AWS_KEY_3>\n"
    );
}

/// GitLab tokens are masked (and restored in the echo): before 2026-12-07 no detector knew them, and a
/// `glpat-` token in a pasted CI file reached the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_tokens_are_masked() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let prompt = "fix my .gitlab-ci.yml:\nvariables:\n  GITLAB_TOKEN: \"glpat-xR4_kq9ZtB2mN7vLw-3c\"\n  DEPLOY: gldt-AbCdEfGhIjKlMnOpQrSt\n";
    let resp = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"m","messages":[{"role":"user","content":prompt}]}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], prompt);
    let sent = mock.last_request().unwrap().json().unwrap();
    assert_eq!(
        sent["messages"][0]["content"],
        "fix my .gitlab-ci.yml:\nvariables:\n  GITLAB_TOKEN: \"<GITLAB_TOKEN_1>\"\n  DEPLOY: <GITLAB_TOKEN_2>\n"
    );
    assert_eq!(proxy.stat("meshwarden.pii_redactor.findings.gitlab_token.mask").await.unwrap(), 2);
}

/// Claude Code's OAuth token and a Slack app-level token pasted into a prompt are masked and restored in the
/// echo: before 2026-12-07 only `sk-ant-api03-` / `sk-ant-admin01-` keys of the exact length and `xox?-`
/// tokens were known, and these reached the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_oauth_and_slack_app_tokens_are_masked() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let oat = format!("sk-ant-oat01-{}AA", "x_-Y".repeat(24).get(..93).unwrap());
    let prompt = format!(
        "CLAUDE_CODE_OAUTH_TOKEN={oat}\nSLACK_APP_TOKEN=xapp-1-A0123456789-1234567890123-0a1b2c3d4e5f60718293a4b5c6d7e8f9\n"
    );
    let resp = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"m","messages":[{"role":"user","content":prompt}]}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], prompt.as_str());
    let sent = mock.last_request().unwrap().json().unwrap();
    assert_eq!(
        sent["messages"][0]["content"],
        "CLAUDE_CODE_OAUTH_TOKEN=<ANTHROPIC_KEY_1>\nSLACK_APP_TOKEN=<SLACK_TOKEN_1>\n"
    );
}

/// A Responses client that keeps the conversation itself (`store: false`) sends earlier output items back:
/// the chunks a file search retrieved and an `apply_patch` diff are read by the model, and are masked
/// (before 2026-12-07 they left the gateway as sent); the answer that quotes them gets the values back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_history_file_search_results_and_patches_are_masked() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let chunk = "Signed by jane.doe@example.com, IBAN DE89 3704 0044 0532 0130 00";
    let diff = "@@\n-KEY = ''\n+KEY = 'glpat-xR4_kq9ZtB2mN7vLw-3c'\n";
    let resp = client()
        .post(proxy.url("/v1/responses"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"gpt-5.1","store":false,"input":[
            {"role":"user","content":"summarise the contract"},
            {"type":"file_search_call","id":"fs_1","status":"completed","queries":["contract"],
             "results":[{"file_id":"file-1","filename":"c.pdf","score":0.9,"text":chunk,"attributes":{}}]},
            {"type":"apply_patch_call","id":"ap_1","call_id":"call_1","status":"completed",
             "operation":{"type":"update_file","path":"config.py","diff":diff}}]}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    let answer = body["output"][0]["content"][0]["text"].as_str().unwrap().to_string();
    assert!(answer.contains(chunk) && answer.contains(diff), "{answer}");
    let sent = mock.last_request().unwrap().json().unwrap();
    assert_eq!(sent["input"][1]["results"][0]["text"], "Signed by <EMAIL_1>, IBAN <IBAN_1>");
    assert_eq!(sent["input"][2]["operation"]["diff"], "@@\n-KEY = ''\n+KEY = '<GITLAB_TOKEN_1>'\n");
    assert_eq!(sent["input"][2]["operation"]["path"], "config.py");
}

/// With `scan_responses`, secrets the model streams are redacted whole, however the stream is cut: a
/// private key block (before: only the piece with its BEGIN line, the base64 lines reached the client)
/// and an RS256 JWT of 600+ characters (before: a word over 256 bytes was not held back at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_secrets_the_model_writes_are_redacted_whole() {
    let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n\
               VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n-----END RSA PRIVATE KEY-----";
    let sig: String = (0..342).map(|i| char::from(b"AbC0_9-xYz"[i % 10])).collect();
    let jwt =
        format!("eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJqYW5lIiwi{}.{sig}", "aXNzIjoiaHR0cHM6".repeat(20));
    let answer = format!("Found {key} and the token {jwt} in the logs.");
    let ev = |t: &str| format!("data: {}\n\n", json!({"choices":[{"index":0,"delta":{"content":t}}]}));
    let mut stream: String = answer.as_bytes().chunks(12).map(|c| ev(std::str::from_utf8(c).unwrap())).collect();
    stream.push_str("data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n");
    let chunks: Vec<Vec<u8>> = stream.as_bytes().chunks(700).map(<[u8]>::to_vec).collect();
    let (port, _) = chunky_upstream(chunks).await;
    let (proxy, text) = scanned_chat_stream(port, "check the logs").await;
    assert_eq!(sse_text(&text), "Found [REDACTED] and the token [REDACTED] in the logs.", "{text}");
    assert_eq!(proxy.stat("meshwarden.pii_redactor.response_findings.private_key.redact").await.unwrap(), 1);
    assert_eq!(proxy.stat("meshwarden.pii_redactor.response_findings.jwt.redact").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_body_labelled_event_stream_is_restored_as_text_not_swallowed() {
    let body = br#"{"error":{"message":"bad address <EMAIL_1>"}}"#.to_vec();
    let (port, _seen) = chunky_upstream_with(vec![body], "400 Bad Request\r\ncontent-type: text/event-stream").await;
    let envoy = envoy(port, json!({})).await;
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .json(&json!({"model":"m","stream":true,"messages":[{"role":"user","content":"mail a@b.io"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.text().await.unwrap(), r#"{"error":{"message":"bad address a@b.io"}}"#);
}

async fn envoy_default(mock: &MockLlm) -> Envoy {
    envoy(mock.port(), json!({})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_reject_redact_partial_hash_and_response_scanning() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = envoy(
        mock.port(),
        json!({"hash_salt":"integration-test-salt","scan_responses":true,
               "detectors":{"us_ssn":{"action":"reject"},"credit_card":{"action":"partial"},
                            "email":{"action":"hash"},"phone":{"action":"redact"}}}),
    )
    .await;
    // reject: OpenAI-shaped and Anthropic-shaped 400, nothing sent upstream
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .json(&json!({"model":"m","messages":[{"role":"user","content":"my ssn is 536-22-8963"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "sensitive_data_rejected");
    assert!(body["error"]["message"].as_str().unwrap().contains("us_ssn"));
    assert!(!body.to_string().contains("536-22-8963"));
    let resp = client()
        .post(envoy.url("/v1/messages"))
        .json(&json!({"model":"c","max_tokens":5,"messages":[{"role":"user","content":"ssn 536-22-8963"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(mock.requests().is_empty(), "rejected requests never leave");

    // partial, hash, redact; the answer has a leaked email of its own, redacted by response scanning
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .header("x-mock-answer", "Sure. Also contact leak@evil.example.org please.")
        .json(&json!({"model":"m","messages":[{"role":"user","content":"card 4111-1111-1111-1111 mail a@b.io tel 415-555-2671"}]}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Sure. Also contact [REDACTED] please.");
    let sent = mock.last_request().unwrap().json().unwrap();
    let text = sent["messages"][0]["content"].as_str().unwrap();
    assert!(text.starts_with("card ****-****-****-1111 mail [EMAIL:"), "{text}");
    assert!(text.ends_with("tel [REDACTED]"), "{text}");
    // hash is stable across requests
    let _ = client()
        .post(envoy.url("/v1/chat/completions"))
        .json(&json!({"model":"m","messages":[{"role":"user","content":"a@b.io"}]}))
        .send()
        .await
        .unwrap();
    let again = mock.last_request().unwrap().json().unwrap()["messages"][0]["content"].as_str().unwrap().to_string();
    assert!(text.contains(&again), "{text} / {again}");
    // Streamed, one word per delta: a card and a phone number written in groups are cut between groups,
    // and still redacted whole.
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .header("x-mock-answer", "Card 4111 1111 1111 1111 or call +44 20 7946 0958 today.")
        .json(&json!({"model":"m","stream":true,"messages":[{"role":"user","content":"hello"}]}))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert_eq!(sse_text(&text), "Card [REDACTED] or call [REDACTED] today.", "{text}");
    assert_eq!(envoy.stat("meshwarden.pii_redactor.rejected").await.unwrap(), 2);
    assert_eq!(envoy.stat("meshwarden.pii_redactor.response_findings.email.redact").await.unwrap(), 1);
    assert_eq!(envoy.stat("meshwarden.pii_redactor.response_findings.credit_card.redact").await.unwrap(), 1);
    // The answers' findings reach the access log (the counts header left before the answers were scanned).
    // (Envoy flushes its stdout access log every few seconds.)
    let mut log = envoy.log();
    for _ in 0..150 {
        if log.contains("response_findings=credit_card=1,phone=1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        log = envoy.log();
    }
    assert!(log.contains("response_findings=email=1"), "{log}");
    assert!(log.contains("response_findings=credit_card=1,phone=1"), "{log}");
    assert!(!log.contains("leak@evil") && !log.contains("4111 1111"), "values never logged");
    assert_eq!(envoy.stat("meshwarden.pii_redactor.findings.email.hash").await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_answered_never_a_crash() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = envoy(mock.port(), json!({"max_body_bytes": 65536})).await;
    let post = |path: &str| client().post(envoy.url(path));

    // malformed JSON: scanned as raw text, masked
    let resp = post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body("{\"messages\": [ a@b.io")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "the mock refuses non-JSON; what matters is what it saw");
    assert_eq!(mock.last_request().unwrap().body, "{\"messages\": [ <EMAIL_1>");

    // non-UTF-8 text body (bytes FF FE not first: there they are a UTF-16 byte order mark, refused)
    let mut raw = b"mail \xff\xfe a@b.io \xc3".to_vec();
    raw.extend_from_slice(b" end");
    let _ = post("/upload").header("content-type", "application/octet-stream").body(raw).send().await.unwrap();
    let got = mock.last_request().unwrap();
    assert!(got.body.contains(" <EMAIL_1> ") && !got.body.contains("a@b.io"), "{}", got.body);

    // gzip: cannot be scanned -> 415, nothing forwarded
    let before = mock.requests().len();
    let resp = post("/v1/chat/completions")
        .header("content-encoding", "gzip")
        .body(vec![0x1f, 0x8b, 8, 0])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "encoded_body");
    // too large -> 413
    let big = json!({"model":"m","messages":[{"role":"user","content":"x".repeat(100_000)}]});
    let resp = post("/v1/chat/completions").json(&big).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(mock.requests().len(), before, "nothing unscanned left");
    assert_eq!(envoy.stat("meshwarden.pii_redactor.unscannable.encoded_body").await.unwrap(), 1);

    // GET without a body passes
    let resp = client().get(envoy.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    // fail-open config forwards the gzip body untouched
    let open = envoy_with(&mock, json!({"on_unscannable": "pass"})).await;
    let resp = client()
        .post(open.url("/v1/chat/completions"))
        .header("content-encoding", "gzip")
        .body(vec![0x1f, 0x8b, 8, 0])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "reached the mock (which cannot read gzip)");
    assert_eq!(open.stat("meshwarden.pii_redactor.unscannable.encoded_body").await.unwrap(), 1);
}

async fn envoy_with(mock: &MockLlm, config: Value) -> Envoy {
    envoy(mock.port(), config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_detectors_and_config_errors() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = envoy(
        mock.port(),
        // employee_id needs its context word (a bare match is `low`); order_ref is reported bare (its
        // threshold is lowered to `low`); badge is configured but switched off.
        json!({"custom_detectors":[{"name":"employee_id","pattern":"EMP-[0-9]{6}","context_words":["employee"]},
                                   {"name":"badge","pattern":"BDG-[0-9]{4}","enabled":false},
                                   {"name":"order_ref","pattern":"ORD-[0-9]{4}","context_words":["order"],"min_confidence":"low"}],
               "detectors":{"phone":{"enabled":false}}}),
    )
    .await;
    let prompt = "employee EMP-123456, tel 415-555-2671, badge BDG-1234 ref ORD-9876; ...................................... and EMP-654321";
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"m","messages":[{"role":"user","content":prompt}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-meshwarden-pii"], "employee_id=1,order_ref=1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], prompt);
    let sent = mock.last_request().unwrap().json().unwrap();
    assert_eq!(
        sent["messages"][0]["content"],
        "employee <EMPLOYEE_ID_1>, tel 415-555-2671, badge BDG-1234 ref <ORDER_REF_1>; ...................................... and EMP-654321"
    );

    // A custom detector that overlaps a built-in hit and runs past it: the union is masked, nothing of
    // it reaches the model; a chat path with a body of another shape is scanned whole.
    let overlap = envoy_with(&mock, json!({"custom_detectors":[{"name":"ticket","pattern":"io/T-[0-9]{8}"}]})).await;
    let resp = client()
        .post(overlap.url("/v1/chat/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"m","messages":[{"role":"user","content":"see alice@corp.io/T-12345678 now"}]}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "see alice@corp.io/T-12345678 now", "restored whole");
    let sent = mock.last_request().unwrap().json().unwrap();
    assert_eq!(sent["messages"][0]["content"], "see <EMAIL_1> now");
    let r = client()
        .post(overlap.url("/v1/chat/completions"))
        .json(&json!({"model":"m","query":"mail bob@corp.io"}))
        .send()
        .await
        .unwrap();
    let _ = r.text().await;
    assert_eq!(mock.last_request().unwrap().json().unwrap()["query"], "mail <EMAIL_1>");
    let log = EnvoyBuilder::new("pii-redactor.yaml")
        .upstream_port(9)
        .filter_config(FILTER, &json!({"custom_detectors":[{"name":"1st","pattern":"a"}]}))
        .start_expect_failure()
        .await
        .unwrap();
    assert!(log.contains("invalid configuration at $.custom_detectors[0].name"), "{log}");
    let log = EnvoyBuilder::new("pii-redactor.yaml")
        .upstream_port(9)
        .filter_config(FILTER, &json!({"custom_detectors":[{"name":"x","pattern":"(unclosed"}]}))
        .start_expect_failure()
        .await
        .unwrap();
    assert!(log.contains("invalid configuration at $.custom_detectors[0].pattern: invalid regex"), "{log}");
    let log = EnvoyBuilder::new("pii-redactor.yaml")
        .upstream_port(9)
        .filter_config(FILTER, &json!({"custom_detectors":[{"name":"x","pattern":"a","confidence":"low"}]}))
        .start_expect_failure()
        .await
        .unwrap();
    assert!(log.contains("invalid configuration at $.custom_detectors[0].confidence: matches are low"), "{log}");
    let log = EnvoyBuilder::new("pii-redactor.yaml")
        .upstream_port(9)
        .filter_config(FILTER, &json!({"detectors":{"emial":{}}}))
        .start_expect_failure()
        .await
        .unwrap();
    assert!(log.contains("invalid configuration at $.detectors.emial: unknown detector"), "{log}");
}

/// Filter CPU time inside Envoy's V8 for the bench bodies, from the filter's own histograms
/// (`request_processing_us`: body read + scan + rewrite; `response_processing_us`: restore).
/// Not a pass/fail test: `cargo test ... --test pii_redactor -- --ignored --nocapture filter_processing_time`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn filter_processing_time() {
    let mock = MockLlm::start().await.unwrap();
    for s in
        meshwarden_integration_tests::bench::scenarios::all().into_iter().filter(|s| s.name.starts_with("pii-redactor"))
    {
        let envoy = EnvoyBuilder::new(&s.template).upstream_port(mock.port()).concurrency(1).start().await.unwrap();
        let c = client();
        for _ in 0..400 {
            let r = c
                .post(envoy.url(&s.path))
                .header("content-type", "application/json")
                .body(s.body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let _ = r.bytes().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5500)).await; // histogram flush
        let text = c
            .get(envoy.admin_url("/stats?filter=pii_redactor.*processing_us"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        println!("{} ({} bytes):\n{text}", s.name, s.body.len());
    }
}

/// Text the model reads outside `content`: earlier tool calls' arguments (OpenAI), `tool_use` inputs and
/// plain-text documents (Anthropic), tool definitions. All of it is masked before it leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_tool_inputs_and_documents_are_masked() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = envoy(mock.port(), json!({})).await;
    let openai = json!({"model": "gpt-4o-mini",
        "tools": [{"type": "function", "function": {"name": "send", "description": "Sends mail (owner: ops@corp.example)",
                   "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "user", "content": "mail my colleague"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "send", "arguments": "{\"to\":\"jane.doe@example.com\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sent"}]});
    let resp = client().post(envoy.url("/v1/chat/completions")).json(&openai).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let sent = mock.last_request().unwrap().body;
    assert!(!sent.contains("jane.doe@example.com") && !sent.contains("ops@corp.example"), "{sent}");
    let sent: Value = serde_json::from_str(&sent).expect("valid JSON left the gateway");
    assert_eq!(sent["messages"][1]["tool_calls"][0]["function"]["arguments"], "{\"to\":\"<EMAIL_1>\"}");

    let anthropic = json!({"model": "claude-x", "max_tokens": 50, "messages": [
        {"role": "user", "content": [{"type": "document", "title": "HR memo",
            "source": {"type": "text", "media_type": "text/plain", "data": "Employee SSN 536-22-8963."}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "lookup",
            "input": {"email": "jane.doe@example.com"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "found"}]}]});
    let resp = client().post(envoy.url("/v1/messages")).json(&anthropic).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let sent = mock.last_request().unwrap().body;
    assert!(!sent.contains("536-22-8963") && !sent.contains("jane.doe@example.com"), "{sent}");
    let sent: Value = serde_json::from_str(&sent).unwrap();
    assert_eq!(sent["messages"][0]["content"][0]["source"]["data"], "Employee SSN <US_SSN_1>.");
    assert_eq!(sent["messages"][1]["content"][0]["input"]["email"], "<EMAIL_1>");
}

/// JSON that serde_json refuses but Python's `json.loads` reads (`NaN`, a lone surrogate, nesting deeper
/// than 128) goes to the raw scan: its `\uXXXX` escapes are decoded before scanning, so
/// `jane.doe\u0040example.com` never leaves the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_fallback_decodes_json_escapes() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = envoy(mock.port(), json!({})).await;
    let body = r#"{"model":"m","temperature":NaN,"messages":[{"role":"user","content":"mail jane.doe\u0040example.com, call \u002B44 20 7946 0958, card 4111\u00a01111\u00a01111\u00a01111 \ud800"}]}"#;
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let _ = resp.text().await;
    let sent = mock.last_request().unwrap().body;
    assert_eq!(
        sent,
        r#"{"model":"m","temperature":NaN,"messages":[{"role":"user","content":"mail <EMAIL_1>, call <PHONE_1>, card <CREDIT_CARD_1> \ud800"}]}"#
    );
    let deep = format!("{}\"mail jane.doe\\u0040example.com\"{}", "[".repeat(300), "]".repeat(300));
    let resp = client().post(envoy.url("/v1/embeddings")).body(deep).send().await.unwrap();
    let _ = resp.text().await;
    let sent = mock.last_request().unwrap().body;
    assert!(sent.contains("\"mail <EMAIL_1>\"") && !sent.contains("example.com"), "{sent}");
    assert_eq!(envoy.stat("meshwarden.pii_redactor.scanned_raw").await.unwrap(), 2);
}

/// Fields the model reads that the extraction used to skip: each body carries an email only there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extraction_gaps_are_masked_upstream() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = envoy(mock.port(), json!({})).await;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/model/anthropic.claude-3-haiku/converse",
            json!({
            "system": [{"text": "be brief"}, {"guardContent": {"text": {"text": "guard g1@corp.example"}}}],
            "messages": [
                {"role": "user", "content": [{"text": "plain t1@corp.example"}]},
                {"role": "assistant", "content": [{"toolUse": {"toolUseId": "tu1", "name": "send", "input": {"to": "u1@corp.example"}}}]},
                {"role": "user", "content": [{"toolResult": {"toolUseId": "tu1", "content": [{"text": "sent to r1@corp.example"}, {"json": {"cc": "j1@corp.example"}}]}}]}],
            "inferenceConfig": {"maxTokens": 20}}),
            "/messages/0/content/0/text",
        ),
        // Bedrock Converse with a prompt from Prompt management: its variables go into the prompt (before
        // 2026-12-07 they left unmasked beside masked messages).
        (
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A111122223333%3Aprompt%2FPROMPT12345%3A1/converse",
            json!({"promptVariables": {"customer": {"text": "pv1@corp.example"}},
            "messages": [{"role": "user", "content": [{"text": "and u1@corp.example"}]}]}),
            "/promptVariables/customer/text",
        ),
        ("/v1/completions", json!({"model": "m", "prompt": "def f():", "suffix": "# by s2@corp.example"}), "/suffix"),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "edit"}],
            "prediction": {"type": "content", "content": "owner p3@corp.example"},
            "functions": [{"name": "f", "description": "mails f3@corp.example", "parameters": {"type": "object"}}]}),
            "/prediction/content",
        ),
        (
            "/v1/responses",
            json!({"model": "m", "prompt": {"id": "pmpt_1", "variables": {"customer": "v4@corp.example"}},
            "input": [
                {"type": "mcp_call", "id": "mcp_1", "server_label": "crm", "name": "lookup", "arguments": "{\"email\":\"m4@corp.example\"}", "output": "owner o4@corp.example"},
                {"type": "local_shell_call_output", "id": "ls_1", "output": "l4@corp.example"}]}),
            "/prompt/variables/customer",
        ),
        (
            "/v1/messages",
            json!({"model": "claude", "max_tokens": 20, "messages": [
            {"role": "assistant", "content": [
                {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "lookup", "server_name": "crm", "input": {"email": "a5@corp.example"}},
                {"type": "web_fetch_tool_result", "tool_use_id": "srvtoolu_1", "content": {"type": "web_fetch_result", "url": "https://x.example",
                    "content": {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "page w5@corp.example"}}}}]},
            {"role": "user", "content": [{"type": "mcp_tool_result", "tool_use_id": "mcptoolu_1", "content": [{"type": "text", "text": "r5@corp.example"}]}]}]}),
            "/messages/0/content/0/input/email",
        ),
        ("/api/generate", json!({"model": "llama3", "prompt": "hi", "system": "user is y6@corp.example"}), "/system"),
        // Ollama renders `template` into the prompt: before 2026-12-07 it left unmasked.
        (
            "/api/generate",
            json!({"model": "llama3", "prompt": "hi", "template": "Owner z6@corp.example. {{ .System }} {{ .Prompt }}"}),
            "/template",
        ),
        ("/api/embed", json!({"model": "nomic", "input": ["doc e6@corp.example", "other"]}), "/input/0"),
        // An earlier turn's reasoning sent back with the history (DeepSeek tool-call loops, vLLM,
        // OpenRouter, Ollama): before 2026-12-06 it left unmasked.
        (
            "/v1/chat/completions",
            json!({"model": "deepseek-reasoner", "messages": [
                {"role": "user", "content": "mail my boss"},
                {"role": "assistant", "content": null, "reasoning_content": "The user is r7@corp.example; the boss b7@corp.example.",
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "send", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sent"}]}),
            "/messages/1/reasoning_content",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "assistant", "content": "ok", "reasoning": "for q8@corp.example"}, {"role": "user", "content": "go on"}]}),
            "/messages/0/reasoning",
        ),
        (
            "/api/chat",
            json!({"model": "qwen3", "messages": [{"role": "assistant", "content": "ok", "thinking": "t9@corp.example asked"}, {"role": "user", "content": "go on"}]}),
            "/messages/0/thinking",
        ),
        // A structured-output schema's example values (read by the model like tool definitions).
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "draft a mail"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "mail", "schema": {"type": "object",
                "properties": {"to": {"type": "string", "examples": ["x9@corp.example"]}}}}}}),
            "/response_format/json_schema/schema/properties/to/examples/0",
        ),
    ];
    for (path, body, pointer) in cases {
        let resp = client().post(envoy.url(path)).json(&body).send().await.unwrap();
        let _ = resp.text().await;
        let sent = mock.last_request().unwrap();
        assert!(!sent.body.contains("@corp.example"), "{path}: PII left the gateway: {}", sent.body);
        let v = sent.json().expect("valid JSON left the gateway");
        let masked = v.pointer(pointer).and_then(Value::as_str).unwrap_or_default().to_string();
        assert!(masked.contains("<EMAIL_"), "{path} {pointer}: {masked}");
    }
    // Echo: what upstream received comes back restored.
    let resp = client()
        .post(envoy.url("/v1/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model": "m", "prompt": "def f():", "suffix": "# by s2@corp.example"}))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert!(text.contains("s2@corp.example"), "restored: {text}");
    assert!(mock.last_request().unwrap().body.contains("# by <EMAIL_1>"));
}

/// A chat message's `name` is put into the prompt by chat templates: before 2026-12-07 it left the
/// gateway as sent. Masked, it stays a name OpenAI accepts (`^[a-zA-Z0-9_-]+$`, at most 64 characters):
/// `_CREDIT_CARD_1_`, not `<CREDIT_CARD_1>` (which OpenAI refuses with a 400).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_message_names_are_masked_upstream_as_valid_names() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = envoy(mock.port(), json!({})).await;
    let body = json!({"model": "gpt-4o", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "name": "4111111111111111", "content": "hi"},
        {"role": "user", "name": "jane.doe@example.com", "content": "mail jane.doe@example.com"},
        {"role": "assistant", "name": "helper-bot_2", "content": "ok"}]});
    let resp = client().post(envoy.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let sent = mock.last_request().unwrap();
    assert!(!sent.body.contains("4111111111111111") && !sent.body.contains("example.com"), "{}", sent.body);
    let v = sent.json().expect("valid JSON left the gateway");
    let valid = |n: &str| {
        !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    for (i, want) in [(1, "_CREDIT_CARD_1_"), (2, "_EMAIL_1_"), (3, "helper-bot_2")] {
        let name = v["messages"][i]["name"].as_str().unwrap();
        assert_eq!(name, want);
        assert!(valid(name), "{name}");
    }
    assert_eq!(v["messages"][2]["content"], "mail <EMAIL_1>", "the same value keeps its placeholder in a text");
}

/// n=2 streams: one choice per chunk at position 0, `index` alternating; a placeholder cut across two
/// events of one choice is restored, never joined with the other choice's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_choices_of_n_2_are_restored_separately() {
    let ev = |i: u32, t: &str| format!("data: {}\n\n", json!({"choices":[{"index":i,"delta":{"content":t}}]}));
    let fin = |i: u32| format!("data: {}\n\n", json!({"choices":[{"index":i,"delta":{},"finish_reason":"stop"}]}));
    let stream = format!(
        "{}{}{}{}{}{}data: [DONE]\n\n",
        ev(0, "Mail <EMA"),
        ev(1, "Call <PHO"),
        ev(0, "IL_1> now"),
        ev(1, "NE_1> now"),
        fin(0),
        fin(1)
    );
    let (port, seen) = chunky_upstream(vec![stream.into_bytes()]).await;
    let envoy = envoy(port, json!({})).await;
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .json(&json!({"model":"m","stream":true,"n":2,"messages":[{"role":"user","content":"I am bob@corp.io, tel 415-555-2671"}]}))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    let mut per = [String::new(), String::new()];
    for e in SseParser::default().feed(text.as_bytes()) {
        if let Ok(v) = serde_json::from_str::<Value>(&e.data) {
            let i = v.pointer("/choices/0/index").and_then(Value::as_u64).unwrap() as usize;
            per[i].push_str(v.pointer("/choices/0/delta/content").and_then(Value::as_str).unwrap_or(""));
        }
    }
    assert_eq!(per, ["Mail bob@corp.io now".to_string(), "Call 415-555-2671 now".to_string()], "{text}");
    assert!(seen.lock().unwrap().join("").contains("I am <EMAIL_1>, tel <PHONE_1>"));
}

/// Streamed text of a Bedrock event stream answer (ConverseStream deltas, or the model events inside
/// InvokeModelWithResponseStream chunks), after checking that every frame is valid (both CRCs, nothing
/// left over).
fn eventstream_text(body: &[u8]) -> String {
    let mut d = Decoder::default();
    let msgs = d.feed(body);
    assert_eq!(d.broken(), None, "the client got valid frames (prelude and message CRCs)");
    assert_eq!(d.pending(), 0, "no partial frame at the end");
    let mut out = String::new();
    for m in &msgs {
        if let Some(v) = m.event_json() {
            for t in extract_stream_delta_texts(&v) {
                out.push_str(&t.text);
            }
        }
    }
    out
}

fn bedrock_event(kind: &str, payload: &Value) -> Vec<u8> {
    encode(
        &[(":event-type", kind), (":content-type", "application/json"), (":message-type", "event")],
        payload.to_string().as_bytes(),
    )
}

/// `bytes` cut at the given offsets into network chunks.
fn cut_at(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut last = 0;
    for &c in cuts {
        if c > last && c < bytes.len() {
            chunks.push(bytes[last..c].to_vec());
            last = c;
        }
    }
    chunks.push(bytes[last..].to_vec());
    chunks
}

/// Bedrock ConverseStream (the mock's AWS binary event stream, one `contentBlockDelta` per word, echoing
/// the masked prompt): the client gets valid frames whose text is the original prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_converse_stream_restored_in_valid_frames() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = envoy(mock.port(), json!({})).await;
    let resp = client()
        .post(envoy.url("/model/anthropic.claude-3-haiku/converse-stream"))
        .header("x-mock-echo", "1")
        .header("x-mock-chunk-delay-ms", "2")
        .json(&json!({"messages":[{"role":"user","content":[{"text":PROMPT}]}],"inferenceConfig":{"maxTokens":200}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/vnd.amazon.eventstream");
    let body = resp.bytes().await.unwrap();
    let text = eventstream_text(&body);
    assert_eq!(text, PROMPT, "original values, no placeholder");
    for p in ["<EMAIL_2>", "<PHONE_1>", "<CREDIT_CARD_1>", "<AWS_KEY_1>"] {
        assert!(!text.contains(p), "{p} reached the client: {text}");
    }
    let sent = mock.last_request().unwrap().json().unwrap();
    assert_masked(sent["messages"][0]["content"][0]["text"].as_str().unwrap());
    assert_eq!(envoy.stat("meshwarden.pii_redactor.restored").await.unwrap(), 5);
}

/// Placeholders cut across two events, frames cut across network chunks: ConverseStream
/// `contentBlockDelta`s and InvokeModelWithResponseStream `chunk`s (base64 Anthropic events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_placeholder_split_across_events_and_network_chunks() {
    let prompt = "I am bob@corp.io, tel 415-555-2671";
    let want = "Mail bob@corp.io or call 415-555-2671; again bob@corp.io.";
    let pieces = ["Mail <EMA", "IL_1> or call <PHO", "NE_1>; again <", "EMAIL_1>."];
    let metadata = bedrock_event("metadata", &json!({"usage":{"inputTokens":9,"outputTokens":12,"totalTokens":21}}));
    let mut converse = bedrock_event("messageStart", &json!({"role":"assistant"}));
    for p in pieces {
        converse.extend(bedrock_event("contentBlockDelta", &json!({"contentBlockIndex":0,"delta":{"text":p}})));
    }
    converse.extend(bedrock_event("contentBlockStop", &json!({"contentBlockIndex":0})));
    converse.extend(bedrock_event("messageStop", &json!({"stopReason":"end_turn"})));
    converse.extend(&metadata);
    let chunk = |inner: Value| bedrock_event("chunk", &json!({"bytes": base64_encode(inner.to_string().as_bytes())}));
    let mut invoke = chunk(json!({"type":"message_start","message":{"role":"assistant","usage":{"input_tokens":9}}}));
    for p in pieces {
        invoke.extend(chunk(json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":p}})));
    }
    invoke.extend(chunk(json!({"type":"content_block_stop","index":0})));
    invoke.extend(chunk(json!({"type":"message_stop","amazon-bedrock-invocationMetrics":{"outputTokenCount":12}})));
    for (path, wire, body) in [
        (
            "/model/anthropic.claude-3-haiku/converse-stream",
            converse,
            json!({"messages":[{"role":"user","content":[{"text":prompt}]}]}),
        ),
        (
            "/model/anthropic.claude-3-haiku/invoke-with-response-stream",
            invoke,
            json!({"anthropic_version":"bedrock-2023-05-31","max_tokens":50,"messages":[{"role":"user","content":prompt}]}),
        ),
    ] {
        // Cut inside the prelude, inside the headers and inside the payloads (and their placeholders).
        let chunks = cut_at(&wire, &[5, 70, 120, 121, 200, 333, 420]);
        assert!(chunks.len() > 5);
        let (port, seen) =
            chunky_upstream_with(chunks, "200 OK\r\ncontent-type: application/vnd.amazon.eventstream").await;
        let envoy = envoy(port, json!({})).await;
        let resp = client().post(envoy.url(path)).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let out = resp.bytes().await.unwrap();
        assert_eq!(eventstream_text(&out), want, "{path}");
        if path.ends_with("converse-stream") {
            assert!(out.ends_with(&metadata), "events without text pass byte for byte, last");
        }
        let sent = seen.lock().unwrap().join("");
        assert!(sent.contains("I am <EMAIL_1>, tel <PHONE_1>") && !sent.contains("bob@corp.io"), "{sent}");
        assert_eq!(envoy.stat("meshwarden.pii_redactor.restored").await.unwrap(), 3, "{path}");
    }
}

/// Bedrock, placeholders split across events: OpenAI-shaped chunks with n=2 in
/// InvokeModelWithResponseStream (one choice per chunk at position 0, `index` says which) are restored
/// per choice, never mixed; ConverseStream tool input (JSON text) with an escaped `\u003c…\u003e`
/// placeholder split across deltas is restored and stays JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_choices_and_tool_input_restored_across_events() {
    let prompt = "I am bob@corp.io, tel 415-555-2671";
    let chunk = |inner: Value| bedrock_event("chunk", &json!({"bytes": base64_encode(inner.to_string().as_bytes())}));
    let c = |i: u64, t: &str| chunk(json!({"choices":[{"index":i,"delta":{"content":t}}]}));
    let fin = |i: u64| chunk(json!({"choices":[{"index":i,"delta":{},"finish_reason":"stop"}]}));
    let mut invoke = c(0, "Mail <EMA");
    invoke.extend(c(1, "Call <PHO"));
    invoke.extend(c(0, "IL_1> now"));
    invoke.extend(c(1, "NE_1> now"));
    invoke.extend(fin(0));
    invoke.extend(fin(1));
    let tool =
        |t: &str| bedrock_event("contentBlockDelta", &json!({"contentBlockIndex":1,"delta":{"toolUse":{"input":t}}}));
    let mut converse = bedrock_event("messageStart", &json!({"role":"assistant"}));
    converse.extend(tool("{\"to\":\"\\u003cEMA"));
    converse.extend(tool("IL_1\\u003e\",\"tel\":\"<PHONE_1>\"}"));
    converse.extend(bedrock_event("contentBlockStop", &json!({"contentBlockIndex":1})));
    converse.extend(bedrock_event("messageStop", &json!({"stopReason":"tool_use"})));
    for (path, wire) in [
        ("/model/openai.gpt-oss-20b-1:0/invoke-with-response-stream", invoke),
        ("/model/anthropic.claude-3-haiku/converse-stream", converse),
    ] {
        let chunks = cut_at(&wire, &[5, 70, 120, 121, 200, 333, 420]);
        let (port, seen) =
            chunky_upstream_with(chunks, "200 OK\r\ncontent-type: application/vnd.amazon.eventstream").await;
        let envoy = envoy(port, json!({})).await;
        let body = json!({"messages":[{"role":"user","content":[{"text":prompt}]}]});
        let resp = client().post(envoy.url(path)).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let out = resp.bytes().await.unwrap();
        let mut d = Decoder::default();
        let msgs = d.feed(&out);
        assert_eq!((d.broken(), d.pending()), (None, 0), "valid frames");
        let events: Vec<Value> = msgs.iter().filter_map(|m| m.event_json()).collect();
        if path.ends_with("invoke-with-response-stream") {
            let mut per = [String::new(), String::new()];
            for e in &events {
                let i = e.pointer("/choices/0/index").and_then(Value::as_u64).unwrap() as usize;
                per[i].push_str(e.pointer("/choices/0/delta/content").and_then(Value::as_str).unwrap_or(""));
            }
            assert_eq!(per, ["Mail bob@corp.io now".to_string(), "Call 415-555-2671 now".to_string()]);
        } else {
            let input: String =
                events.iter().filter_map(|e| e.pointer("/delta/toolUse/input").and_then(Value::as_str)).collect();
            let v: Value = serde_json::from_str(&input).unwrap_or_else(|e| panic!("{e}: {input}"));
            assert_eq!(v, json!({"to":"bob@corp.io","tel":"415-555-2671"}), "{input}");
        }
        let sent = seen.lock().unwrap().join("");
        assert!(sent.contains("I am <EMAIL_1>, tel <PHONE_1>"), "{sent}");
        assert_eq!(envoy.stat("meshwarden.pii_redactor.restored").await.unwrap(), 2, "{path}");
    }
}

/// Broken framing (here a bad prelude CRC after a valid frame): the valid frame is restored, the rest of
/// the stream is passed byte for byte and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_event_stream_with_broken_framing_passes_the_rest_unchanged() {
    let good = bedrock_event("contentBlockDelta", &json!({"contentBlockIndex":0,"delta":{"text":"Hi <EMAIL_1>"}}));
    // A frame-like binary body: total length, headers length, a wrong prelude CRC, payload with a placeholder.
    let payload = br#"{"contentBlockIndex":0,"delta":{"text":"Mail <EMAIL_1> now"}}"#;
    let mut frame = Vec::new();
    frame.extend_from_slice(&((16 + payload.len()) as u32).to_be_bytes());
    frame.extend_from_slice(&0u32.to_be_bytes());
    frame.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    frame.extend_from_slice(payload);
    frame.extend_from_slice(&[0x01, 0x02, 0x03, 0x04]);
    let (port, seen) = chunky_upstream_with(
        vec![good.clone(), frame.clone()],
        "200 OK\r\ncontent-type: application/vnd.amazon.eventstream",
    )
    .await;
    let envoy = envoy(port, json!({})).await;
    let resp = client()
        .post(envoy.url("/model/anthropic.claude-3-haiku/converse-stream"))
        .json(&json!({"messages":[{"role":"user","content":[{"text":"I am bob@corp.io"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let out = resp.bytes().await.unwrap().to_vec();
    let restored =
        bedrock_event("contentBlockDelta", &json!({"contentBlockIndex":0,"delta":{"text":"Hi bob@corp.io"}}));
    assert_eq!(out, [restored, frame].concat(), "valid frame restored, the rest byte for byte");
    assert!(seen.lock().unwrap().join("").contains("I am <EMAIL_1>"));
    assert_eq!(envoy.stat("meshwarden.pii_redactor.response_eventstream_broken").await.unwrap(), 1);
}

/// Numbers written with no-break spaces, en dashes or tabs, and zero-width characters inside an email,
/// are masked whole (separators included) and restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_separators_and_zero_width_characters_are_masked() {
    let mock = MockLlm::start().await.unwrap();
    let envoy = envoy(mock.port(), json!({})).await;
    let prompt = "card 4111\u{a0}1111\u{a0}1111\u{a0}1111, ssn 536\u{2013}22\u{2013}8963, \
                  mail jane\u{200b}.doe@example.com, card 5500\t0000\t0000\t0004, call +44\u{202f}20\u{202f}7946\u{202f}0958";
    let resp = client()
        .post(envoy.url("/v1/chat/completions"))
        .header("x-mock-echo", "1")
        .json(&json!({"model":"m","messages":[{"role":"user","content":prompt}]}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], prompt, "restored exactly");
    let sent = mock.last_request().unwrap().json().unwrap();
    assert_eq!(
        sent["messages"][0]["content"],
        "card <CREDIT_CARD_1>, ssn <US_SSN_1>, mail <EMAIL_1>, card <CREDIT_CARD_2>, call <PHONE_1>"
    );
}

/// Ollama's native API through real Envoy: its streams are NDJSON (`application/x-ndjson`, one token per
/// line), so a placeholder is cut across lines and must still be restored, lines kept JSON. (A body with
/// a key that Go's `encoding/json`, Ollama's parser, reads as a model-read one but the scan would not,
/// `"Content"`, is refused like a duplicate key: next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_ndjson_stream_restored_across_lines() {
    let line = |t: &str, done: bool| {
        format!("{}\n", json!({"model":"llama3","message":{"role":"assistant","content":t},"done":done}))
    };
    let lines: Vec<String> =
        ["Write to <", "EMAIL", "_1", "> now."].iter().map(|t| line(t, false)).chain([line("", true)]).collect();
    // Network chunks cut inside lines too.
    let all = lines.concat();
    let chunks = vec![all.as_bytes()[..50].to_vec(), all.as_bytes()[50..200].to_vec(), all.as_bytes()[200..].to_vec()];
    let (port, seen) = chunky_upstream_with(chunks, "200 OK\r\ncontent-type: application/x-ndjson").await;
    let envoy = envoy(port, json!({})).await;
    let resp = client()
        .post(envoy.url("/api/chat"))
        .json(&json!({"model":"llama3","messages":[{"role":"user","content":"mail jane.doe@example.com"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let mut content = String::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        content.push_str(v.pointer("/message/content").and_then(Value::as_str).unwrap());
    }
    assert_eq!(content, "Write to jane.doe@example.com now.", "{text}");
    let sent = seen.lock().unwrap().join("");
    assert!(sent.contains("mail <EMAIL_1>") && !sent.contains("jane.doe"), "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_variant_model_keys_are_refused_before_the_upstream() {
    let (port, seen) = chunky_upstream_with(vec![b"{}".to_vec()], "200 OK\r\ncontent-type: application/json").await;
    let envoy = envoy(port, json!({})).await;
    let before = seen.lock().unwrap().len();
    let resp = client()
        .post(envoy.url("/api/chat"))
        .json(&json!({"model":"llama3","messages":[{"role":"system","content":"be brief"},
            {"role":"user","Content":"card 4111 1111 1111 1111"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "duplicate_json_key", "{body}");
    assert_eq!(seen.lock().unwrap().len(), before, "nothing reached the upstream");
}

/// A request body with a UTF-8 byte order mark (PowerShell, .NET writers; Python's `json.loads` reads
/// it): a value used as an object key leaves masked as in any body. Before, such a key left as it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_keys_are_masked_in_a_body_with_a_byte_order_mark() {
    let (port, seen) = chunky_upstream_with(vec![b"{}".to_vec()], "200 OK\r\ncontent-type: application/json").await;
    let envoy = envoy(port, json!({})).await;
    let body = json!({"model":"c","max_tokens":5,"messages":[
        {"role":"user","content":"update bob@corp.example"},
        {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"update",
            "input":{"jane@corp.example":{"plan":"gold"}}}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"ok"}]}]});
    let bytes = [b"\xef\xbb\xbf".as_slice(), body.to_string().as_bytes()].concat();
    let resp = client()
        .post(envoy.url("/v1/messages"))
        .header("content-type", "application/json")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent = seen.lock().unwrap().join("");
    assert!(!sent.contains("corp.example"), "{sent}");
    assert!(sent.contains(r#""<EMAIL_2>":{"plan":"gold"}"#), "{sent}");
}

/// With `scan_responses`, a context word the model streamed in an earlier delta counts for a bare number
/// in a later one, as in a JSON answer: "Your SSN is" | "536228963" is redacted. Before, each piece was
/// scanned alone and the SSN reached the streaming client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_answer_scanning_reads_context_words_of_earlier_deltas() {
    let ev = |t: &str| format!("data: {}\n\n", json!({"choices":[{"index":0,"delta":{"content":t}}]}));
    let mut stream: String =
        ["Your", " SSN", " is", " 536", "228", "963", ".", " Call", " me", " at", " 4155552671", " tonight."]
            .iter()
            .map(|t| ev(t))
            .collect();
    stream.push_str("data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n");
    let chunks: Vec<Vec<u8>> = stream.as_bytes().chunks(90).map(<[u8]>::to_vec).collect();
    let (port, _) = chunky_upstream(chunks).await;
    let (_proxy, text) = scanned_chat_stream(port, "what is on file?").await;
    assert_eq!(sse_text(&text), "Your SSN is [REDACTED]. Call me at [REDACTED] tonight.", "{text}");
}

/// Gemini's `streamGenerateContent` without `alt=sse` streams a JSON array of chunks
/// (`application/json`): a placeholder cut across two chunks comes back restored. Before, each chunk's
/// text was restored alone and the client read `<EMA` `IL_1>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_json_array_stream_restored_across_chunks() {
    let chunk = |t: &str| {
        json!({"candidates":[{"content":{"parts":[{"text":t}],"role":"model"},"index":0}],
            "modelVersion":"gemini-2.0-flash"})
        .to_string()
    };
    let body = format!("[{}\r\n,\r\n{}\r\n,\r\n{}]", chunk("Write to <EMA"), chunk("IL_1"), chunk("> now."));
    let chunks: Vec<Vec<u8>> = body.as_bytes().chunks(60).map(<[u8]>::to_vec).collect();
    let (port, seen) = chunky_upstream_with(chunks, "200 OK\r\ncontent-type: application/json; charset=UTF-8").await;
    let envoy = envoy(port, json!({})).await;
    let resp = client()
        .post(envoy.url("/v1beta/models/gemini-2.0-flash:streamGenerateContent"))
        .json(&json!({"contents":[{"role":"user","parts":[{"text":"mail jane.doe@example.com"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    let text: String = answer
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.pointer("/candidates/0/content/parts/0/text").and_then(Value::as_str))
        .collect();
    assert_eq!(text, "Write to jane.doe@example.com now.", "{answer}");
    let sent = seen.lock().unwrap().join("");
    assert!(sent.contains("mail <EMAIL_1>") && !sent.contains("jane.doe"), "{sent}");
}

/// Gemini SSE with thought summaries (`includeThoughts`) and `scan_responses`: the thought's last word,
/// held back, stays in the thought and comes before the answer. Before, it was joined to the answer's
/// first delta (`userHello there`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_thought_summary_is_never_joined_to_the_answer() {
    let ev = |t: &str, thought: bool| {
        let mut part = json!({"text": t});
        if thought {
            part["thought"] = json!(true);
        }
        format!("data: {}\r\n\r\n", json!({"candidates":[{"content":{"parts":[part],"role":"model"},"index":0}]}))
    };
    let fin =
        json!({"candidates":[{"content":{"parts":[{"text":""}],"role":"model"},"finishReason":"STOP","index":0}]});
    let stream = format!(
        "{}{}{}data: {fin}\r\n\r\n",
        ev("Thinking about the user", true),
        ev("Hello there", false),
        ev(", friend.", false)
    );
    let (port, _) = chunky_upstream(vec![stream.into_bytes()]).await;
    let proxy = envoy(port, json!({"scan_responses": true})).await;
    let resp = client()
        .post(proxy.url("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"))
        .json(&json!({"contents":[{"role":"user","parts":[{"text":"hi"}]}],
            "generationConfig":{"thinkingConfig":{"includeThoughts":true}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let (mut thought, mut answer) = (String::new(), String::new());
    for e in SseParser::default().feed(text.as_bytes()) {
        let v: Value = serde_json::from_str(&e.data).unwrap();
        let part = &v["candidates"][0]["content"]["parts"][0];
        let t = part["text"].as_str().unwrap_or_default();
        if part["thought"] == true {
            assert!(answer.is_empty(), "thought text after the answer began: {text}");
            thought.push_str(t);
        } else {
            answer.push_str(t);
        }
    }
    assert_eq!((thought.as_str(), answer.as_str()), ("Thinking about the user", "Hello there, friend."), "{text}");
}

/// An SSE event over the bound (`max_body_bytes`, at least 256 KiB) reaches the client as it came when
/// the answer is only restored: a Responses image generation's `partial_image` (base64, here 400 KB)
/// was dropped, so the client's stream missed the image. Placeholders in it stay placeholders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_events_over_the_bound_pass_unchanged() {
    let partial = json!({"type": "response.image_generation_call.partial_image", "item_id": "ig_1",
        "output_index": 0, "partial_image_index": 0, "partial_image_b64": "QUJD".repeat(100 * 1024),
        "revised_prompt": "a card for <EMAIL_1>"});
    let delta = |t: &str| json!({"type": "response.output_text.delta", "item_id": "m", "output_index": 1, "content_index": 0, "delta": t});
    let mut stream = String::new();
    for (name, v) in [
        ("response.output_text.delta", &delta("Hi <EMA")),
        ("response.output_text.delta", &delta("IL_1>!")),
        ("response.image_generation_call.partial_image", &partial),
        ("response.output_text.delta", &delta(" Bye.")),
    ] {
        stream.push_str(&format!("event: {name}\ndata: {v}\n\n"));
    }
    let chunks: Vec<Vec<u8>> = stream.as_bytes().chunks(64 * 1024).map(<[u8]>::to_vec).collect();
    let (port, _) = chunky_upstream(chunks).await;
    let proxy = envoy(port, json!({"max_body_bytes": 4096})).await;
    let events = responses_stream_events(&proxy).await;
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types,
        [
            "response.output_text.delta",
            "response.output_text.delta",
            "response.image_generation_call.partial_image",
            "response.output_text.delta"
        ]
    );
    assert_eq!(events[2], partial, "passed as it came");
    let said: String = events.iter().filter_map(|e| e["delta"].as_str()).collect();
    assert_eq!(said, "Hi jane@x.io! Bye.");
}

/// The JSON events of the streamed answer to a Responses request from `jane@x.io`, sent through `proxy`.
async fn responses_stream_events(proxy: &Envoy) -> Vec<Value> {
    let resp = client()
        .post(proxy.url("/v1/responses"))
        .json(&json!({"model":"m","stream":true,"input":"I am jane@x.io"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    SseParser::new(usize::MAX)
        .feed(text.as_bytes())
        .into_iter()
        .filter_map(|e| serde_json::from_str(&e.data).ok())
        .collect()
}

/// A Responses stream echoes the request's `instructions` in `response.created` and repeats it with the
/// whole answer in `response.completed`: with a 300 KB system prompt both events are over 256 KiB. They
/// were dropped by the filter's SSE parser (its bound was 256 KiB whatever `max_body_bytes`), and the
/// OpenAI SDK's `responses.stream()` fails without `response.created` first. Now the bound is
/// `max_body_bytes` (1 MiB by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_stream_events_over_256_kib_reach_the_client() {
    let instructions = format!("Write to <EMAIL_1>. {}", "Context line. ".repeat(300 * 1024 / 14));
    let created = json!({"type": "response.created",
        "response": {"id": "resp_1", "status": "in_progress", "instructions": instructions, "output": []}});
    let delta = json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0,
        "delta": "Hi <EMAIL_1>"});
    let completed = json!({"type": "response.completed",
        "response": {"id": "resp_1", "status": "completed", "instructions": instructions,
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi <EMAIL_1>"}]}]}});
    let mut stream = String::new();
    for (name, v) in
        [("response.created", &created), ("response.output_text.delta", &delta), ("response.completed", &completed)]
    {
        stream.push_str(&format!("event: {name}\ndata: {v}\n\n"));
    }
    let chunks: Vec<Vec<u8>> = stream.as_bytes().chunks(64 * 1024).map(<[u8]>::to_vec).collect();
    let (port, _) = chunky_upstream(chunks).await;
    let proxy = envoy(port, json!({})).await;
    let events = responses_stream_events(&proxy).await;
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types, ["response.created", "response.output_text.delta", "response.completed"]);
    assert!(events[0]["response"]["instructions"].as_str().unwrap().starts_with("Write to jane@x.io."));
    assert_eq!(events[2]["response"]["output"][0]["content"][0]["text"], "Hi jane@x.io");
}

/// With `scan_responses`, a card the model streams wrapped across a line, or in fullwidth digits, cut
/// between two groups, is redacted whole: before 2026-12-07 the piece before the cut was released and
/// scanned alone, and both halves reached the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_cards_across_a_line_or_in_fullwidth_digits_are_redacted_whole() {
    let ev = |t: &str| format!("data: {}\n\n", json!({"choices":[{"index":0,"delta":{"content":t}}]}));
    let mut stream: String = ["Card 4111 1111\n", "1111 1111\nor ４１１１ １１１１", " １１１１ １１１１ then."]
        .iter()
        .map(|t| ev(t))
        .collect();
    stream.push_str("data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n");
    let (port, _) = chunky_upstream(vec![stream.into_bytes()]).await;
    let (_proxy, text) = scanned_chat_stream(port, "a card please").await;
    assert_eq!(sse_text(&text), "Card [REDACTED]\nor [REDACTED] then.", "{text}");
}

/// Values written percent-encoded (a pasted reset link, `mailto:`, an `sms?phone=` query) or with HTML
/// references (pasted HTML) leave the gateway masked whole, their encoding included, and come back to
/// the client byte for byte as written: before 2026-12-07 they left as sent. The same address written
/// plain and encoded gets two placeholders, each restored to its own spelling (a link the model repeats
/// keeps `%40`, prose keeps `@`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_and_html_written_values_are_masked_and_restored() {
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let prompt = "Reset link https://app.example.com/reset?email=jane.doe%40example.com&token=Xy12 was sent to \
                  jane.doe@example.com; mailto:jane%40example.com, sms?phone=%2B14155552671, \
                  <p>ops&#64;example.org, Tel &plus;44&nbsp;20&nbsp;7946&nbsp;0958</p>";
    assert_eq!(
        echo_masked(&proxy, &mock, prompt).await,
        "Reset link https://app.example.com/reset?email=<EMAIL_1>&token=Xy12 was sent to <EMAIL_2>; \
         mailto:<EMAIL_3>, sms?phone=<PHONE_1>, <p><EMAIL_4>, Tel <PHONE_2></p>"
    );
    // A form body is scanned as raw text: its values are percent-encoded, with `+` for a space.
    let resp = client()
        .post(proxy.url("/v1/completions"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("to=jane.doe%40example.com&phone=%2B44+20+7946+0958&card=4111+1111+1111+1111&note=see+you+at+5")
        .send()
        .await
        .unwrap();
    let _ = resp.text().await;
    assert_eq!(
        mock.last_request().unwrap().body,
        "to=<EMAIL_1>&phone=<PHONE_1>&card=<CREDIT_CARD_1>&note=see+you+at+5"
    );
}

/// With `scan_responses`, a card the model streams with its groups separated by a zero-width space or a
/// soft hyphen is redacted whole, whether an SSE event ends right after it or between two of its groups,
/// and with network chunks cut inside the invisible character: before 2026-12-07, with an event ending
/// after the card's trailing space, the hold-back released all but its last group to the scanner alone
/// and the card reached the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_cards_with_invisible_separators_are_redacted_whole() {
    let ev = |t: &str| format!("data: {}\n\n", json!({"choices":[{"index":0,"delta":{"content":t}}]}));
    let mut stream: String =
        ["Card 4111\u{200b}1111\u{200b}1111\u{200b}1111 ", "ok, and 5500\u{ad}0000", "\u{ad}0000\u{ad}0004 ", "then."]
            .iter()
            .map(|t| ev(t))
            .collect();
    stream.push_str("data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n");
    // `json!` writes the invisible characters as UTF-8: cut the network chunks inside them.
    let bytes = stream.into_bytes();
    let zwsp = bytes.windows(3).position(|w| w == "\u{200b}".as_bytes()).unwrap();
    let shy = bytes.windows(2).rposition(|w| w == "\u{ad}".as_bytes()).unwrap();
    let (port, _) = chunky_upstream(cut_at(&bytes, &[zwsp + 1, zwsp + 2, shy + 1])).await;
    let (proxy, text) = scanned_chat_stream(port, "a card please").await;
    assert_eq!(sse_text(&text), "Card [REDACTED] ok, and [REDACTED] then.", "{text}");
    assert_eq!(proxy.stat("meshwarden.pii_redactor.response_findings.credit_card.redact").await.unwrap(), 2);
}

/// Text files sent base64-encoded leave masked: a CSV of customers in Gemini `inline_data` and a
/// `data:text/plain` file part in OpenAI chat are decoded, masked and re-encoded (binary files as sent),
/// and the model's placeholders come back restored. Before 2026-12-07 their values reached the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_text_files_leave_masked_and_answers_are_restored() {
    use meshwarden_shared::encoding::base64_decode;
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let decoded = |b64: &str| String::from_utf8(base64_decode(b64).unwrap()).unwrap();
    let csv = "name,email,card\nJane Doe,jane.doe@example.com,4111 1111 1111 1111\nBob,bob@example.org,-\n";
    let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
    let gemini = json!({"contents": [{"role": "user", "parts": [
        {"text": "Which customers are in this file?"},
        {"inline_data": {"mime_type": "text/csv", "data": base64_encode(csv.as_bytes())}},
        {"inline_data": {"mime_type": "image/png", "data": png}},
        {"inline_data": {"mime_type": "text/csv", "data": base64_encode(b"Name;E-Mail\nJ\xfcrgen;juergen@example.de\n")}}]}]});
    let resp =
        client().post(proxy.url("/v1beta/models/gemini-2.5-flash:generateContent")).json(&gemini).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.bytes().await;
    let sent = mock.last_request().unwrap().json().unwrap();
    let file = decoded(sent["contents"][0]["parts"][1]["inline_data"]["data"].as_str().unwrap());
    assert_eq!(file, "name,email,card\nJane Doe,<EMAIL_1>,<CREDIT_CARD_1>\nBob,<EMAIL_2>,-\n");
    assert_eq!(sent["contents"][0]["parts"][2]["inline_data"]["data"], png, "a binary file leaves as sent");
    // A Latin-1 file: masked as bytes, still Latin-1 around the placeholder (before 2026-12-08: as sent).
    let latin1 = base64_decode(sent["contents"][0]["parts"][3]["inline_data"]["data"].as_str().unwrap()).unwrap();
    assert_eq!(latin1, b"Name;E-Mail\nJ\xfcrgen;<EMAIL_3>\n");
    assert_eq!(proxy.stat("meshwarden.pii_redactor.encoded_texts_scanned").await.unwrap(), 2);

    // OpenAI chat: the answer names the file's values by their placeholders; the client reads them restored.
    let note = "Escalate to jane.doe@example.com, phone +44 20 7946 0958.";
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Who do I escalate to?"},
        {"type": "file", "file": {"filename": "oncall.txt",
            "file_data": format!("data:text/plain;base64,{}", base64_encode(note.as_bytes()))}}]}]});
    let resp = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("x-mock-answer", "Write to <EMAIL_1> or call <PHONE_1>.")
        .json(&chat)
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Write to jane.doe@example.com or call +44 20 7946 0958.");
    let sent = mock.last_request().unwrap();
    assert!(!sent.body.contains("jane.doe") && !sent.body.contains(&base64_encode(note.as_bytes())));
    let url = sent.json().unwrap()["messages"][0]["content"][1]["file"]["file_data"].as_str().unwrap().to_string();
    let payload = url.strip_prefix("data:text/plain;base64,").expect("still a data: URL");
    assert_eq!(decoded(payload), "Escalate to <EMAIL_1>, phone <PHONE_1>.");
}

/// Base64 written into a prompt (a pasted Kubernetes Secret): what it encodes leaves masked, re-encoded
/// in place (the model decodes `<EMAIL_1>`), a short password and the YAML around it as sent; the answer
/// that names the placeholders, JSON and streamed (Anthropic SSE), comes back restored. With
/// `scan_base64_in_text: false` the Secret leaves as sent. Before 2026-12-08 the base64 was not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_in_prompt_text_leaves_masked_and_answers_are_restored() {
    use meshwarden_shared::encoding::base64_decode;
    let mock = MockLlm::start().await.unwrap();
    let proxy = envoy_default(&mock).await;
    let token = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";
    let owner = base64_encode(b"jane.doe@example.com");
    let secret = base64_encode(token.as_bytes());
    let yaml = format!(
        "Why does this Secret not mount?\n```yaml\napiVersion: v1\nkind: Secret\ndata:\n  owner: {owner}\n  token: {secret}\n  password: aHVudGVyMg==\n```"
    );
    let answer = "Ask <EMAIL_1>; the token <GITHUB_TOKEN_1> looks fine.";
    let restored = format!("Ask jane.doe@example.com; the token {token} looks fine.");
    let resp = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("x-mock-answer", answer)
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": yaml}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], restored.as_str());
    let sent = mock.last_request().unwrap();
    assert!(!sent.body.contains(&owner) && !sent.body.contains(&secret) && !sent.body.contains("jane.doe"));
    let text = sent.json().unwrap()["messages"][0]["content"].as_str().unwrap().to_string();
    let value = |key: &str| {
        let line = text.lines().find(|l| l.trim_start().starts_with(key)).unwrap();
        String::from_utf8(base64_decode(line.split(": ").nth(1).unwrap()).unwrap()).unwrap()
    };
    assert_eq!(value("owner:"), "<EMAIL_1>");
    assert_eq!(value("token:"), "<GITHUB_TOKEN_1>");
    assert!(text.contains("  password: aHVudGVyMg==\n```"), "{text}");
    assert_eq!(proxy.stat("meshwarden.pii_redactor.base64_in_text_masked").await.unwrap(), 2);

    // Anthropic, streamed: the same values in a text block, restored across the SSE deltas.
    let resp = client()
        .post(proxy.url("/v1/messages"))
        .header("x-mock-answer", answer)
        .json(&json!({"model": "claude", "max_tokens": 50, "stream": true,
            "messages": [{"role": "user", "content": [{"type": "text", "text": yaml}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(sse_text(&resp.text().await.unwrap()), restored);
    let sent = mock.last_request().unwrap();
    assert!(!sent.body.contains(&owner) && !sent.body.contains(&secret), "{}", sent.body);

    let off = envoy_with(&mock, json!({"scan_base64_in_text": false})).await;
    let resp = client()
        .post(off.url("/v1/chat/completions"))
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": yaml}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent = mock.last_request().unwrap().json().unwrap();
    assert_eq!(sent["messages"][0]["content"], yaml.as_str(), "left as sent when switched off");
}

/// gRPC and other length-framed binary bodies are never scanned as text nor rewritten: refused with a
/// gRPC answer (`grpc-status` 7) by default, or passed byte for byte with `on_unscannable: pass`; an
/// opaque answer (audio) passes unscanned under `scan_responses`. Before 2026-12-07 the protobuf was
/// scanned as raw bytes and the email replaced by `<EMAIL_1>` inside it, leaving the protobuf field's and
/// the gRPC frame's lengths wrong (the server could not parse it), and a `scan_responses` answer's
/// bytes were rewritten the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_binary_bodies_are_never_rewritten() {
    // A protobuf message holding an email, in its gRPC frame.
    let body = meshwarden_integration_tests::upgrade::grpc_message(b"llama", b"jane.doe@example.com");
    let grpc = |proxy: &Envoy| {
        client()
            .post(proxy.url("/inference.GRPCInferenceService/ModelInfer"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body.clone())
            .send()
    };
    let (port, seen) = chunky_upstream_with(vec![b"{}".to_vec()], "200 OK\r\ncontent-type: application/json").await;
    let strict = envoy(port, json!({})).await;
    let resp = grpc(&strict).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "7", "a gRPC refusal: {:?}", resp.headers());
    assert!(resp.headers()["grpc-message"].to_str().unwrap().contains("cannot be scanned"));
    assert!(seen.lock().unwrap().is_empty(), "nothing reached the upstream");
    assert_eq!(strict.stat("meshwarden.pii_redactor.unscannable.binary_body").await.unwrap(), 1);

    let open = envoy(port, json!({"on_unscannable": "pass", "scan_responses": true})).await;
    let resp = grpc(&open).await.unwrap();
    assert_eq!(resp.status(), 200);
    let received = seen.lock().unwrap().last().cloned().unwrap();
    let sent_body = received.split_once("\r\n\r\n").unwrap().1.to_string();
    assert!(
        sent_body.contains(std::str::from_utf8(&body).unwrap()),
        "the protobuf left byte for byte, its lengths intact: {sent_body:?}"
    );

    // An audio answer holding text that looks like PII: passed as the upstream sent it.
    let audio = b"ID3\x03\x00jane.doe@example.com\x00\xff\xfb".to_vec();
    let (port, _) = chunky_upstream_with(vec![audio.clone()], "200 OK\r\ncontent-type: audio/mpeg").await;
    let scanning = envoy(port, json!({"scan_responses": true})).await;
    let resp = client()
        .post(scanning.url("/v1/audio/speech"))
        .json(&json!({"model": "tts-1", "voice": "alloy", "input": "Hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().to_vec(), audio, "the audio bytes untouched");
    assert_eq!(scanning.stat("meshwarden.pii_redactor.response_opaque_passed").await.unwrap(), 1);
}
