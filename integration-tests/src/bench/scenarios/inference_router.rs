//! inference-router benchmark scenarios.

use crate::bench::{chat_body_of_size, Scenario};

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::post_json(
        "inference-router-1kb-chat",
        "inference-router.yaml",
        "/v1/chat/completions",
        &chat_body_of_size(1024),
    )]
}
