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
    let floor = floor.display().to_string();
    let mut v = vec![
        Scenario::post_json("wasm-floor-1kb-chat", &floor, "/v1/chat/completions", &chat_body_of_size(1024))
            .var("FLOOR_CONFIG", "0"),
        // The same, touching 3000 random cache lines of a 1 MiB buffer per request (~6 µs in the VM):
        // how much a filter's memory footprint costs Envoy beyond the filter's own time.
        Scenario::post_json(
            "wasm-floor-touch-3000-lines-1kb-chat",
            &floor,
            "/v1/chat/completions",
            &chat_body_of_size(1024),
        )
        .var("FLOOR_CONFIG", "3000"),
        // The same, with 20 host calls per request of either kind: what one host call costs.
        // A read that hands data to the module (header, body, property, shared data) calls back into
        // the module to allocate the answer:
        Scenario::post_json(
            "wasm-floor-20-header-reads-1kb-chat",
            &floor,
            "/v1/chat/completions",
            &chat_body_of_size(1024),
        )
        .var("FLOOR_CONFIG", "0 20 0"),
        // a call that returns a number (clock; stat updates, header removals are of this kind):
        Scenario::post_json(
            "wasm-floor-20-clock-reads-1kb-chat",
            &floor,
            "/v1/chat/completions",
            &chat_body_of_size(1024),
        )
        .var("FLOOR_CONFIG", "0 0 20"),
        // The floor buffering the request body (Pause until its end), then both bodies: what Envoy's
        // buffering costs a filter that must see a whole body before letting it go.
        Scenario::post_json(
            "wasm-floor-buffer-request-1kb-chat",
            &floor,
            "/v1/chat/completions",
            &chat_body_of_size(1024),
        )
        .var("FLOOR_CONFIG", "0 0 0 1"),
        Scenario::post_json(
            "wasm-floor-buffer-both-1kb-chat",
            &floor,
            "/v1/chat/completions",
            &chat_body_of_size(1024),
        )
        .var("FLOOR_CONFIG", "0 0 0 2"),
        // The floor (request body buffered) busy-waiting 20 µs in `on_log`, then the same 20 µs at the
        // end of the request body: is work done once the answer is complete on the client's latency
        // path (for a sequential client: does it delay the answer's bytes)?
        Scenario::post_json(
            "wasm-floor-spin-20us-on-log-1kb-chat",
            &floor,
            "/v1/chat/completions",
            &chat_body_of_size(1024),
        )
        .var("FLOOR_CONFIG", "0 0 0 1 20 0"),
        Scenario::post_json(
            "wasm-floor-spin-20us-request-1kb-chat",
            &floor,
            "/v1/chat/completions",
            &chat_body_of_size(1024),
        )
        .var("FLOOR_CONFIG", "0 0 0 1 0 20"),
        Scenario::post_json("chain-1kb-chat", "chain.yaml", "/v1/chat/completions", &chat_body_of_size(1024)),
    ];
    v.extend(token_limiter::scenarios());
    v.extend(prompt_guard::scenarios());
    v.extend(pii_redactor::scenarios());
    v.extend(mcp_authz::scenarios());
    v.extend(inference_router::scenarios());
    v
}
