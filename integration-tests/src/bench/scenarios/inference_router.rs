//! inference-router benchmark scenarios: the added latency of reading the body, hashing the prompt
//! prefix and deciding (here without a sidecar: no snapshot, so the request is passed through after the
//! full per-request work; the scoring step itself is measured by
//! `cargo run --release -p meshwarden-inference-router --example decision_bench`, and the routed
//! end-to-end behaviour by the `inference-router-sim` binary).

use crate::bench::{chat_body_of_size, Scenario};

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::post_json(
            "inference-router-1kb-chat",
            "inference-router.yaml",
            "/v1/chat/completions",
            &chat_body_of_size(1024),
        ),
        Scenario::post_json(
            "inference-router-16kb-chat",
            "inference-router.yaml",
            "/v1/chat/completions",
            &chat_body_of_size(16 * 1024),
        ),
    ]
}
