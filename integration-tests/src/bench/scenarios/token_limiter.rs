//! token-limiter benchmark scenarios: a 1 KB chat request admitted (never limited: the budget is far
//! above the load) in `local` mode and in `sidecar` mode (memory backend), so the figure is the cost of
//! the decision, the deduction and, for the sidecar, the callout.

use crate::bench::{chat_body_of_size, Scenario};
use serde_json::json;

fn rules() -> serde_json::Value {
    json!([
        {"name":"team","key":{"header":"x-team"},"limits":{"tokens_per_minute":1_000_000_000_000u64,"tokens_per_day":1_000_000_000_000_000u64}},
        {"name":"model","key":{"header":"x-team"},"model":"gpt-4o*","limits":{"tokens_per_second":1_000_000_000u64}}
    ])
}

pub fn scenarios() -> Vec<Scenario> {
    let body = chat_body_of_size(1024);
    vec![
        // Reference: the same Envoy config (filter + buffer filter) with no rules, to separate the cost of
        // the decision from the cost of the Wasm hop and request buffering.
        Scenario::post_json("token-limiter-norules-1kb-chat", "token-limiter.yaml", "/v1/chat/completions", &body)
            .config("token-limiter", json!({"rules": []})),
        Scenario::post_json("token-limiter-1kb-chat", "token-limiter.yaml", "/v1/chat/completions", &body)
            .config("token-limiter", json!({"rules": rules()}))
            .header("x-team", "bench"),
        Scenario::post_json("token-limiter-sidecar-1kb-chat", "token-limiter-sidecar.yaml", "/v1/chat/completions", &body)
            .config(
                "token-limiter",
                json!({"state":"sidecar","sidecar":{"cluster":"meshwarden_sidecar","failure_mode":"deny"},"rules": rules()}),
            )
            .header("x-team", "bench")
            .with_sidecar(&[]),
    ]
}
