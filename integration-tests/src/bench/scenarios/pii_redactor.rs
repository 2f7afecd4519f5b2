//! pii-redactor benchmark scenarios: a 1 KB prompt with two PII values (masked on the way out, the
//! mapping kept for the answer), the same with an answer that repeats them (restored), the same without
//! PII, and a 128 KB prompt with two PII values.

use crate::bench::{chat_body_of_size, Scenario};
use serde_json::Value;

/// A chat body of about `bytes` whose prompt carries an email and a phone number.
fn with_two_pii(bytes: usize) -> Value {
    let mut body = chat_body_of_size(bytes);
    let pii = "Contact jane.doe@example.com or +44 20 7946 0958. ";
    if let Some(Value::String(text)) = body.pointer_mut("/messages/0/content") {
        let keep = text.len().saturating_sub(pii.len());
        text.truncate(keep);
        let mid = text.len() / 2;
        let split = (0..=mid).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        text.insert_str(split, pii);
    }
    body
}

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::post_json("pii-redactor-1kb-2pii", "pii-redactor.yaml", "/v1/chat/completions", &with_two_pii(1024)),
        // The model repeats the prompt (mock echo mode): both placeholders come back and are restored.
        Scenario::post_json(
            "pii-redactor-1kb-2pii-echoed",
            "pii-redactor.yaml",
            "/v1/chat/completions",
            &with_two_pii(1024),
        )
        .header("x-mock-echo", "1"),
        Scenario::post_json(
            "pii-redactor-1kb-clean",
            "pii-redactor.yaml",
            "/v1/chat/completions",
            &chat_body_of_size(1024),
        ),
        Scenario::post_json(
            "pii-redactor-128kb-2pii",
            "pii-redactor.yaml",
            "/v1/chat/completions",
            &with_two_pii(128 * 1024),
        ),
    ]
}
