//! Every filter's config parser on arbitrary input: an error or a config, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshwarden_shared::config::parse_config;

fuzz_target!(|data: &[u8]| {
    let _ = parse_config::<token_limiter::config::Config>(data);
    let _ = parse_config::<prompt_guard::config::Config>(data);
    let _ = parse_config::<pii_redactor::config::Config>(data);
    let _ = parse_config::<mcp_authz::config::Config>(data);
    let _ = parse_config::<inference_router::config::Config>(data);
});
