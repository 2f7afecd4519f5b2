//! Every benchmark scenario, one file per filter (each filter's issue adds its own cases).

use super::{chat_body_of_size, Scenario};

mod inference_router;
mod mcp_authz;
mod pii_redactor;
mod prompt_guard;
mod token_limiter;

pub fn all() -> Vec<Scenario> {
    // The floor: a Wasm filter that does nothing (integration-tests/wasm-floor), what Envoy's Wasm
    // machinery alone adds; every filter scenario below is that plus the filter's own work.
    let floor = crate::paths::repo_root().join("integration-tests").join("wasm-floor").join("envoy.yaml");
    let mut v = vec![
        Scenario::post_json("wasm-floor-1kb-chat", &floor.display().to_string(), "/v1/chat/completions", &chat_body_of_size(1024)),
        Scenario::post_json("chain-1kb-chat", "chain.yaml", "/v1/chat/completions", &chat_body_of_size(1024)),
    ];
    v.extend(token_limiter::scenarios());
    v.extend(prompt_guard::scenarios());
    v.extend(pii_redactor::scenarios());
    v.extend(mcp_authz::scenarios());
    v.extend(inference_router::scenarios());
    v
}
