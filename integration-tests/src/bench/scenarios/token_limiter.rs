//! token-limiter benchmark scenarios.

use crate::bench::{chat_body_of_size, Scenario};

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::post_json(
        "token-limiter-1kb-chat",
        "token-limiter.yaml",
        "/v1/chat/completions",
        &chat_body_of_size(1024),
    )]
}
