//! Property: however a byte stream is cut into chunks, the SSE parser yields the same events, never panics,
//! and never holds more than its bound.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshwarden_shared::sse::SseParser;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (head, body) = data.split_at(2);
    let cut = usize::from(head[0]) * body.len() / 256;
    let step = usize::from(head[1] % 17) + 1;
    let whole = {
        let mut p = SseParser::new(4096);
        let mut v = p.feed(body);
        v.extend(p.finish());
        v
    };
    let split = {
        let mut p = SseParser::new(4096);
        let (a, b) = body.split_at(cut);
        let mut v = p.feed(a);
        for c in b.chunks(step) {
            v.extend(p.feed(c));
            assert!(p.buffered_bytes() <= 4096 + step);
        }
        v.extend(p.finish());
        v
    };
    assert_eq!(whole, split);
});
