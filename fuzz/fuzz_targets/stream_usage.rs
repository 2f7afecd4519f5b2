//! Usage accounting over arbitrary SSE streams: never panics, and reported usage is consistent.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshwarden_shared::llm::StreamUsage;
use meshwarden_shared::sse::SseParser;

fuzz_target!(|data: &[u8]| {
    let mut parser = SseParser::new(8192);
    let mut usage = StreamUsage::default();
    for chunk in data.chunks(7) {
        parser.feed_with(chunk, |e| usage.on_event_data(&e.data));
    }
    if let Some(e) = parser.finish() {
        usage.on_event_data(&e.data);
    }
    if let Some(u) = usage.reported() {
        assert!(u.total_tokens >= u.input_tokens.saturating_add(u.output_tokens).min(u.total_tokens));
    }
    let _ = usage.estimated_output_tokens();
});
