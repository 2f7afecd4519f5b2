//! The Bedrock event-stream decoder over arbitrary bytes and splits: never panics, never holds more
//! than one message, and a stream decoded in pieces gives the messages of the stream decoded whole.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshwarden_shared::eventstream::{Decoder, MAX_MESSAGE};

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else { return };
    let mut whole = Decoder::default();
    let expected = whole.feed(bytes);
    let mut pieces = Decoder::default();
    let mut got = Vec::new();
    for chunk in bytes.chunks(usize::from(split).max(1)) {
        got.extend(pieces.feed(chunk));
        assert!(pieces.pending() <= MAX_MESSAGE + chunk.len());
    }
    assert_eq!(got, expected);
    assert_eq!(pieces.broken(), whole.broken());
    for m in &got {
        let _ = m.event_json();
    }
});
