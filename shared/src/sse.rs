//! Incremental Server-Sent Events parser (WHATWG "event stream" interpretation).
//!
//! Network chunks may cut anywhere: inside a line, between `\r` and `\n`, inside a UTF-8 character or a
//! JSON escape. The parser buffers bytes until a full line is available and only decodes complete lines,
//! so no split can change what is parsed. Lines end with `\n`, `\r\n` or `\r`; an event ends with a blank
//! line; several `data:` lines are joined with `\n`; lines starting with `:` are comments.
//!
//! Memory is bounded: a line or an event longer than `max_event_bytes` is dropped whole and counted in
//! [`SseParser::oversized_events`], so a broken or hostile upstream cannot make the filter buffer forever.

use crate::llm::Usage;
use crate::usage_scan::UsageScanner;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, if any (Anthropic names its events; OpenAI does not).
    pub event: Option<String>,
    /// `data:` lines joined with `\n`.
    pub data: String,
    /// The `id:` field, if any.
    pub id: Option<String>,
}

impl SseEvent {
    /// OpenAI ends a stream with `data: [DONE]`.
    pub fn is_done_marker(&self) -> bool {
        self.data.trim() == "[DONE]"
    }
}

/// Default bound on one event; generous for tool-call deltas, small next to Envoy's 1 MiB buffer limit.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 256 * 1024;

#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous chunk ended with `\r`: a `\n` starting the next chunk belongs to that line ending.
    after_cr: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
    id: Option<String>,
    event_bytes: usize,
    discarding: bool,
    max_event_bytes: usize,
    /// A `u32` (saturating) to keep the parser small: it sits in other filters' per-request state.
    oversized: u32,
    /// Opt-in ([`SseParser::scan_oversized_usage`]): the usage of `data:` lines too large to keep. Boxed:
    /// rarely used, and parsers sit inside other filters' per-request state.
    oversized_usage: Option<Box<OversizedUsage>>,
}

#[derive(Debug, Default)]
struct OversizedUsage {
    /// Scanning the `data:` line of the oversized event being dropped: its event name and the scanner.
    scanning: Option<(Option<String>, UsageScanner)>,
    /// Usage found in dropped events, with their event names, until [`SseParser::take_oversized_usage`].
    found: Vec<(Option<String>, Usage)>,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseParser {
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            line: Vec::new(),
            after_cr: false,
            event: None,
            data: String::new(),
            has_data: false,
            id: None,
            event_bytes: 0,
            discarding: false,
            max_event_bytes: max_event_bytes.max(64),
            oversized: 0,
            oversized_usage: None,
        }
    }

    /// Read the usage of events too large to keep: the `data:` line of a dropped event is streamed through
    /// a [`UsageScanner`] (bounded memory), and a top-level `usage` (or one in a top-level `response`
    /// object, where Responses stream events nest it) found in it is handed out by
    /// [`take_oversized_usage`](Self::take_oversized_usage). For meters: an OpenAI image stream's
    /// `image_generation.completed` event holds the whole base64 image before its usage, a Responses
    /// `response.completed` the whole output (an `image_generation` tool's base64 result).
    pub fn scan_oversized_usage(mut self) -> Self {
        self.oversized_usage = Some(Box::default());
        self
    }

    /// The usage read from dropped events since the last call, with each event's `event:` name.
    pub fn take_oversized_usage(&mut self) -> Vec<(Option<String>, Usage)> {
        self.oversized_usage.as_mut().map(|o| std::mem::take(&mut o.found)).unwrap_or_default()
    }

    /// How many events were dropped for exceeding the size bound.
    pub fn oversized_events(&self) -> u64 {
        u64::from(self.oversized)
    }

    /// Bytes held back waiting for the rest of a line or event.
    pub fn buffered_bytes(&self) -> usize {
        self.line.len() + self.data.len()
    }

    /// Feed one network chunk; returns the events it completed, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        self.feed_with(chunk, |e| out.push(e));
        out
    }

    /// Like [`feed`](Self::feed) without allocating a vector.
    pub fn feed_with(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent)) {
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some((&b'\n', tail)) = rest.split_first() {
                rest = tail;
            }
        }
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.push_line_bytes(rest);
                    break;
                }
                Some(pos) => {
                    let (head, tail) = rest.split_at(pos);
                    self.push_line_bytes(head);
                    let mut tail = tail.get(1..).unwrap_or(&[]);
                    if rest.get(pos) == Some(&b'\r') {
                        match tail.first() {
                            Some(b'\n') => tail = tail.get(1..).unwrap_or(&[]),
                            None => self.after_cr = true,
                            Some(_) => {}
                        }
                    }
                    rest = tail;
                    if let Some(event) = self.end_line() {
                        on_event(event);
                    }
                }
            }
        }
    }

    /// End of stream. Per the SSE specification an event without its terminating blank line is discarded;
    /// a filter that wants to account for it (e.g. usage in a truncated stream) can take it here.
    pub fn finish(&mut self) -> Option<SseEvent> {
        let partial_line = std::mem::take(&mut self.line);
        if !partial_line.is_empty() && !self.discarding {
            self.process_field_line(&partial_line);
        }
        self.end_scan();
        self.after_cr = false;
        self.take_event()
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        if self.discarding {
            if let Some((_, scanner)) = self.oversized_usage.as_mut().and_then(|o| o.scanning.as_mut()) {
                scanner.feed(bytes);
            }
            return;
        }
        if self.line.len() + bytes.len() + self.event_bytes > self.max_event_bytes {
            self.discarding = true;
            self.oversized = self.oversized.saturating_add(1);
            if let Some(o) = &mut self.oversized_usage {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(bytes);
                if let Some(value) = line.strip_prefix(b"data:") {
                    let mut scanner = UsageScanner::with_response_usage();
                    scanner.feed(value.strip_prefix(b" ").unwrap_or(value));
                    o.scanning = Some((self.event.clone(), scanner));
                }
            }
            self.line.clear();
            self.reset_event();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    /// The oversized line ended: hand out the usage its scan found.
    fn end_scan(&mut self) {
        if let Some(o) = &mut self.oversized_usage {
            if let Some((event, scanner)) = o.scanning.take() {
                if let Some(usage) = scanner.finish() {
                    o.found.push((event, usage));
                }
            }
        }
    }

    fn end_line(&mut self) -> Option<SseEvent> {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if self.discarding {
                // The end of the oversized line; resume with the next one.
                self.end_scan();
                self.discarding = false;
                self.reset_event();
                return None;
            }
            return self.take_event();
        }
        if !self.discarding {
            self.event_bytes += line.len();
            self.process_field_line(&line);
        }
        None
    }

    fn process_field_line(&mut self, line: &[u8]) {
        if line.first() == Some(&b':') {
            return; // comment
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.find(':') {
            Some(idx) => {
                let value = text.get(idx + 1..).unwrap_or("");
                (text.get(..idx).unwrap_or(""), value.strip_prefix(' ').unwrap_or(value))
            }
            None => (text.as_ref(), ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_string()),
            "id" if !value.contains('\0') => self.id = Some(value.to_string()),
            _ => {} // `retry` and unknown fields are ignored, as the specification says
        }
    }

    fn take_event(&mut self) -> Option<SseEvent> {
        if !self.has_data && self.event.is_none() {
            self.reset_event();
            return None;
        }
        let event = SseEvent { event: self.event.take(), data: std::mem::take(&mut self.data), id: self.id.take() };
        self.reset_event();
        Some(event)
    }

    fn reset_event(&mut self) {
        self.event = None;
        self.data.clear();
        self.has_data = false;
        self.id = None;
        self.event_bytes = 0;
    }
}

/// Serialise an event back to wire form (used when a filter rewrites a stream).
pub fn encode_event(event: &SseEvent) -> String {
    let mut out = String::new();
    if let Some(id) = &event.id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    if let Some(name) = &event.event {
        out.push_str("event: ");
        out.push_str(name);
        out.push('\n');
    }
    for line in event.data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out
}

/// Splits an event stream into raw event blocks, every byte kept as sent (line endings, comments,
/// `retry:` and unknown fields), each block ending with the blank line that ends its event. For a filter
/// that rewrites a few events and must pass every other byte for byte: a `: keep-alive` comment that
/// keeps an idle connection open, or the `retry:` a 2025-11-25 MCP server sets before closing a polled
/// stream, are lost when events are re-encoded from [`SseParser`]'s fields.
#[derive(Debug)]
pub struct SseBlockSplitter {
    pending: Vec<u8>,
    /// The line being read has no byte yet.
    line_empty: bool,
    /// The last terminator was a `\r`: a `\n` right after it belongs to it.
    skip_lf: bool,
}

impl Default for SseBlockSplitter {
    fn default() -> Self {
        SseBlockSplitter { pending: Vec::new(), line_empty: true, skip_lf: false }
    }
}

impl SseBlockSplitter {
    /// Feed one network chunk; returns the blocks it completed, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        let mut blocks = Vec::new();
        let mut i = self.pending.len();
        self.pending.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(&b) = self.pending.get(i) {
            i += 1;
            if std::mem::take(&mut self.skip_lf) && b == b'\n' {
                continue;
            }
            if b != b'\n' && b != b'\r' {
                self.line_empty = false;
                continue;
            }
            self.skip_lf = b == b'\r';
            if self.line_empty {
                // A blank line ends the block; the `\n` of a `\r\n` goes with it when it is here.
                if self.skip_lf && self.pending.get(i) == Some(&b'\n') {
                    i += 1;
                    self.skip_lf = false;
                }
                blocks.push(self.pending.get(start..i).unwrap_or(&[]).to_vec());
                start = i;
            }
            self.line_empty = true;
        }
        self.pending.drain(..start);
        blocks
    }

    /// Bytes of the block not yet complete.
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    /// Take the bytes of the incomplete block (at the end of the stream, or to pass on a block too large
    /// to hold); the rest of that block comes out of later calls as blocks of their own.
    pub fn take_held(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    const ANTHROPIC: &str = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12}}}\r\n\r\n: keep-alive\r\n\r\nevent: content_block_delta\r\ndata: {\"delta\":{\"text\":\"h\u{e9}llo \u{1F600}\"}}\r\n\r\nevent: message_delta\ndata: {\"usage\":{\"output_tokens\":7}}\n\n";

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.feed(c));
        }
        out
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn parses_named_events_and_skips_comments() {
        let events = parse_all(&[ANTHROPIC.as_bytes()]);
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].event.as_deref(), Some("message_start"));
        assert!(events[1].data.contains("h\u{e9}llo \u{1F600}"));
        assert_eq!(events[2].event.as_deref(), Some("message_delta"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn any_split_gives_the_same_events() {
        let whole = parse_all(&[ANTHROPIC.as_bytes()]);
        let bytes = ANTHROPIC.as_bytes();
        for cut in 0..=bytes.len() {
            let (a, b) = bytes.split_at(cut);
            assert_eq!(parse_all(&[a, b]), whole, "cut at {cut}");
        }
        // and byte by byte
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse_all(&singles), whole);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn cr_only_line_endings_and_multiline_data() {
        let events = parse_all(&[b"data: a\rdata: b\r\rdata: [DONE]\r", b"\r"]);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].data, "a\nb");
        assert!(events[1].is_done_marker());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn cr_at_chunk_end_then_lf_is_one_line_ending() {
        let events = parse_all(&[b"data: x\r", b"\n\r", b"\n"]);
        assert_eq!(events, vec![SseEvent { event: None, data: "x".into(), id: None }]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn field_without_space_and_id() {
        let events = parse_all(&[b"id:7\ndata:{\"a\":1}\n\n"]);
        assert_eq!(events[0].id.as_deref(), Some("7"));
        assert_eq!(events[0].data, "{\"a\":1}");
    }

    /// Blocks keep every byte, whatever the line endings and wherever the chunks are cut, and each
    /// parses to the event it holds.
    #[wasm_bindgen_test(unsupported = test)]
    fn blocks_keep_every_byte_at_every_cut() {
        let stream = b": keep-alive\r\n\r\nretry: 5000\nid: 7\ndata: {\"a\":1}\n\nevent: x\rdata: b\r\rdata: c\r\n\r\n\ndata: tail";
        let want: Vec<&[u8]> = vec![
            b": keep-alive\r\n\r\n",
            b"retry: 5000\nid: 7\ndata: {\"a\":1}\n\n",
            b"event: x\rdata: b\r\r",
            b"data: c\r\n\r\n",
            b"\n",
        ];
        let mut s = SseBlockSplitter::default();
        let blocks = s.feed(stream);
        assert_eq!(blocks.iter().map(Vec::as_slice).collect::<Vec<_>>(), want);
        let events = |blocks: &[Vec<u8>]| blocks.iter().flat_map(|b| SseParser::default().feed(b)).collect::<Vec<_>>();
        let whole = events(&blocks);
        assert_eq!(whole.len(), 3, "a comment alone is no event");
        // Cut anywhere: the same bytes and the same events (a cut between the `\r` and `\n` of a blank
        // line's `\r\n` moves the `\n` to the next block, where it ends no event).
        for cut in 0..=stream.len() {
            for cut2 in cut..=stream.len() {
                let mut s = SseBlockSplitter::default();
                let mut blocks = s.feed(&stream[..cut]);
                blocks.extend(s.feed(&stream[cut..cut2]));
                blocks.extend(s.feed(&stream[cut2..]));
                assert_eq!(s.take_held(), b"data: tail");
                assert_eq!(blocks.concat(), stream[..stream.len() - 10].to_vec(), "cuts {cut} {cut2}");
                assert_eq!(events(&blocks), whole, "cuts {cut} {cut2}");
            }
        }
        let mut s = SseBlockSplitter::default();
        let block = s.feed(b"id: 7\ndata: {\"a\":1}\n\n").remove(0);
        let mut p = SseParser::default();
        let e = p.feed(&block).remove(0);
        assert_eq!((e.id.as_deref(), e.data.as_str()), (Some("7"), "{\"a\":1}"));
        // Taking an incomplete block mid-line: its rest is a block of its own, nothing is lost.
        let mut s = SseBlockSplitter::default();
        assert!(s.feed(b"data: aaaa").is_empty());
        assert_eq!(s.take_held(), b"data: aaaa");
        assert_eq!(s.feed(b"aa\n\ndata: b\n\n"), vec![b"aa\n\n".to_vec(), b"data: b\n\n".to_vec()]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn oversized_event_is_dropped_and_parsing_resumes() {
        let mut p = SseParser::new(100);
        let big = format!("data: {}\n\ndata: ok\n\n", "x".repeat(500));
        let events = p.feed(big.as_bytes());
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "ok");
        assert_eq!(p.oversized_events(), 1);
        assert!(p.buffered_bytes() < 100);
    }

    /// Opt-in: the usage after a large value in a dropped event (an image stream's completed event) is
    /// read, at every split of the stream, with the event's name; without the option nothing is.
    #[wasm_bindgen_test(unsupported = test)]
    fn usage_of_an_oversized_event_is_read_when_asked() {
        let stream = format!(
            "event: image_generation.partial_image\ndata: {{\"b64_json\":\"{b}\"}}\n\n\
             event: image_generation.completed\ndata: {{\"b64_json\":\"{b}\",\"usage\":{{\"input_tokens\":12,\"output_tokens\":4160}}}}\n\n\
             data: [DONE]\n\n",
            b = "QUJD".repeat(100)
        );
        for split in [1usize, 7, 64, 1000, stream.len()] {
            let mut p = SseParser::new(200).scan_oversized_usage();
            let mut events = Vec::new();
            let mut usage = Vec::new();
            for chunk in stream.as_bytes().chunks(split) {
                events.extend(p.feed(chunk));
                usage.extend(p.take_oversized_usage());
            }
            assert_eq!(p.oversized_events(), 2, "split {split}");
            assert_eq!(events.len(), 1, "split {split}: only [DONE] is kept");
            assert_eq!(usage.len(), 1, "split {split}");
            assert_eq!(usage[0].0.as_deref(), Some("image_generation.completed"));
            assert_eq!((usage[0].1.input_tokens, usage[0].1.output_tokens), (12, 4160));
        }
        let mut p = SseParser::new(200);
        let _ = p.feed(stream.as_bytes());
        assert!(p.take_oversized_usage().is_empty());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn finish_returns_an_unterminated_event() {
        let mut p = SseParser::default();
        assert!(p.feed(b"data: {\"usage\":1}").is_empty());
        assert_eq!(p.finish().map(|e| e.data), Some("{\"usage\":1}".to_string()));
        assert_eq!(p.finish(), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn garbage_does_not_panic() {
        let mut p = SseParser::new(64);
        let junk: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        for c in junk.chunks(7) {
            let _ = p.feed(c);
        }
        let _ = p.finish();
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn encode_round_trips() {
        let e = SseEvent { event: Some("x".into()), data: "a\nb".into(), id: Some("1".into()) };
        assert_eq!(parse_all(&[encode_event(&e).as_bytes()]), vec![e]);
    }
}
