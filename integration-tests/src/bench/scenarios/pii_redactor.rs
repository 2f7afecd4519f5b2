//! pii-redactor benchmark scenarios.

use crate::bench::{chat_body_of_size, Scenario};

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::post_json(
        "pii-redactor-1kb-chat",
        "pii-redactor.yaml",
        "/v1/chat/completions",
        &chat_body_of_size(1024),
    )]
}
