//! prompt-guard benchmark scenarios.

use crate::bench::{chat_body_of_size, Scenario};

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::post_json(
        "prompt-guard-1kb-chat",
        "prompt-guard.yaml",
        "/v1/chat/completions",
        &chat_body_of_size(1024),
    )]
}
