//! mcp-authz event id tags: for any event stream, tagging its `id:` lines changes nothing a client reads
//! but the ids, each of which verifies back to the server's id for its caller and session (and not for
//! another caller); cut at any point (the block splitter's parts), the tagged stream is the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mcp_authz::event_id::{EventIdKey, EventIdTagger};
use meshwarden_shared::sse::{SseBlockSplitter, SseEvent, SseParser};

fn parse(bytes: &[u8]) -> Vec<SseEvent> {
    let mut p = SseParser::new(1 << 20);
    let mut events = p.feed(bytes);
    events.extend(p.finish());
    events
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks where to cut; ids a client would read lossily (not UTF-8) are not tagged.
    let Some((cut, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let key = EventIdKey::from_secret(b"fuzz-secret-0123456789");
    let tagger = EventIdTagger::new(key.clone(), [1; 16], "session-a");
    let stranger = EventIdTagger::new(key, [2; 16], "session-a");
    let tagged = tagger.tag_id_lines(text.as_bytes(), false, true);
    let (before, after) = (parse(text.as_bytes()), parse(&tagged));
    assert_eq!(before.len(), after.len(), "{text:?} -> {tagged:?}");
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((&b.event, &b.data), (&a.event, &a.data));
        match (&b.id, &a.id) {
            (None, None) => {}
            (Some(raw), Some(out)) if raw.is_empty() => assert!(out.is_empty()),
            (Some(raw), Some(out)) => {
                assert_eq!(tagger.verify(out), Some(raw.as_str()), "{raw:?} -> {out:?}");
                assert_eq!(stranger.verify(out), None);
            }
            (b, a) => panic!("id {b:?} became {a:?}"),
        }
    }
    // Block by block, the stream cut in two: the same bytes as tagged whole.
    let at = usize::from(*cut) * text.len() / 255;
    let mut splitter = SseBlockSplitter::default();
    let mut out = Vec::new();
    for part in [&text.as_bytes()[..at], &text.as_bytes()[at..]] {
        for block in splitter.feed(part) {
            out.extend_from_slice(&tagger.tag_id_lines(&block, false, true));
        }
    }
    out.extend_from_slice(&tagger.tag_id_lines(&splitter.take_held(), false, true));
    assert_eq!(out, tagged.as_ref(), "cut at {at}");
});
