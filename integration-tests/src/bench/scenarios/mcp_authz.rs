//! mcp-authz benchmark scenarios.

use crate::bench::{chat_body_of_size, Scenario};

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::post_json("mcp-authz-1kb-chat", "mcp-authz.yaml", "/v1/chat/completions", &chat_body_of_size(1024))]
}
