//! prompt-guard benchmark scenarios: a 1 KB and a 128 KB chat prompt scanned by every built-in pack
//! (the default configuration), plus a 1 KB prompt with an extra user phrase list and response scanning,
//! and a baseline with no rules (the filter loaded, no body inspected).

use crate::bench::{chat_body_of_size, Scenario};
use serde_json::json;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        // baseline: the filter loaded with no packs or rules (no body inspection) = the cost of the Wasm hop
        Scenario::post_json(
            "prompt-guard-1kb-chat-no-rules",
            "prompt-guard.yaml",
            "/v1/chat/completions",
            &chat_body_of_size(1024),
        )
        .config("prompt-guard", json!({"packs": []})),
        Scenario::post_json(
            "prompt-guard-1kb-chat",
            "prompt-guard.yaml",
            "/v1/chat/completions",
            &chat_body_of_size(1024),
        )
        .config("prompt-guard", json!({})),
        Scenario::post_json(
            "prompt-guard-128kb-chat",
            "prompt-guard.yaml",
            "/v1/chat/completions",
            &chat_body_of_size(128 * 1024),
        )
        .config("prompt-guard", json!({})),
        Scenario::post_json(
            "prompt-guard-1kb-chat-rules-and-response",
            "prompt-guard.yaml",
            "/v1/chat/completions",
            &chat_body_of_size(1024),
        )
        .config(
            "prompt-guard",
            json!({"packs": [
                {"name": "prompt_override", "apply_to": "both"},
                {"name": "role_hijack"},
                {"name": "system_prompt_exfiltration", "apply_to": "both"},
                {"name": "delimiter_injection"},
                {"name": "encoded_payload"}],
              "rules": [{"name": "competitors", "phrases": ["acme corp", "globex", "initech", "umbrella corporation"],
                         "action": "mask", "apply_to": "both"}]}),
        ),
    ]
}
