//! Hiding the usage chunk of an OpenAI stream from a client that did not ask for it.
//!
//! The filter adds `stream_options.include_usage` to OpenAI chat/completions streams so that the answer
//! reports its usage. The upstream then ends the stream with one more chunk, `"choices": []` and the
//! `usage`, which a client that did not ask for it does not expect: code written to the documented stream
//! (`chunk.choices[0].delta`, the usual loop) fails on it with an index error. The filter reads the usage
//! from the stream as it passes and removes that chunk from what the client receives, so the client sees
//! the stream it asked for. Chunks that carry choices are passed as they are (a server that puts the usage
//! on its last content chunk keeps it there).
//!
//! Network chunks may cut an event anywhere: the unfinished event at the end of a chunk is held back
//! until its blank line arrives (or the stream ends), at most [`MAX_HELD_BYTES`]; a longer event cannot be
//! a usage chunk and is passed on as it comes.

use serde_json::Value;

/// Longest unfinished event held back; past it the event is passed on (a usage chunk is a few hundred
/// bytes).
pub const MAX_HELD_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct UsageChunkHider {
    /// The start of an event whose end has not arrived yet.
    held: Vec<u8>,
    /// Usage chunks removed so far.
    pub hidden: u64,
}

impl UsageChunkHider {
    /// What to pass on for `chunk` (`end`: the last one of the stream): the complete events of what was
    /// held and `chunk`, without usage-only chunks; the unfinished event at its end is held (at the end of
    /// the stream it is passed on, unless it is a usage-only chunk itself).
    pub fn feed(&mut self, chunk: &[u8], end: bool) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(chunk);
        let ends = event_ends(&data);
        let complete = if end { data.len() } else { ends.last().copied().unwrap_or(0) };
        let mut out = Vec::with_capacity(complete);
        let mut start = 0;
        let last = if end && ends.last() != Some(&data.len()) { Some(data.len()) } else { None };
        for event_end in ends.iter().copied().chain(last) {
            let event = data.get(start..event_end).unwrap_or_default();
            if is_usage_only_chunk(event) {
                self.hidden += 1;
            } else {
                out.extend_from_slice(event);
            }
            start = event_end;
        }
        let rest = data.get(complete..).unwrap_or_default();
        if rest.len() > MAX_HELD_BYTES {
            out.extend_from_slice(rest);
        } else {
            self.held = rest.to_vec();
        }
        out
    }
}

/// The offsets just past each blank line (the end of an event) in `buf`; lines end with `\n` or `\r\n`.
fn event_ends(buf: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut line_start = 0;
    for (i, b) in buf.iter().enumerate() {
        if *b == b'\n' {
            let line = buf.get(line_start..i).unwrap_or_default();
            if line.is_empty() || line == b"\r" {
                ends.push(i + 1);
            }
            line_start = i + 1;
        }
    }
    ends
}

/// An event whose data is a JSON object with `"choices": []` and a `usage` object: the chunk that
/// `include_usage` adds.
fn is_usage_only_chunk(event: &[u8]) -> bool {
    // Most events of a stream are content chunks: only one with an empty array somewhere is parsed.
    if !event.windows(2).any(|w| w == b"[]") {
        return false;
    }
    let mut data: Vec<u8> = Vec::new();
    let mut lines = 0;
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(d) = line.strip_prefix(b"data:") {
            if lines > 0 {
                data.push(b'\n');
            }
            data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
            lines += 1;
        }
    }
    if lines == 0 {
        return false;
    }
    let Ok(Value::Object(chunk)) = serde_json::from_slice::<Value>(&data) else {
        return false;
    };
    chunk.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty)
        && chunk.get("usage").is_some_and(Value::is_object)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        ": keep-alive\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n",
        "data: [DONE]\n\n",
    );

    fn expected() -> String {
        STREAM.replace(
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n",
            "",
        )
    }

    #[test]
    fn the_usage_chunk_is_removed_at_every_split() {
        for split in 1..=STREAM.len() {
            let mut h = UsageChunkHider::default();
            let mut out = Vec::new();
            let chunks: Vec<&[u8]> = STREAM.as_bytes().chunks(split).collect();
            for (i, c) in chunks.iter().enumerate() {
                out.extend(h.feed(c, i + 1 == chunks.len()));
            }
            assert_eq!(String::from_utf8(out).unwrap(), expected(), "split {split}");
            assert_eq!(h.hidden, 1);
        }
    }

    #[test]
    fn crlf_streams_and_a_last_event_without_its_blank_line() {
        let crlf = STREAM.replace('\n', "\r\n");
        let mut h = UsageChunkHider::default();
        let out = h.feed(crlf.as_bytes(), true);
        assert_eq!(String::from_utf8(out).unwrap(), expected().replace('\n', "\r\n"));
        // The stream ends right after the usage chunk's data line.
        let mut h = UsageChunkHider::default();
        let cut = "data: {\"choices\":[],\"usage\":{\"total_tokens\":6}}\n";
        assert!(h.feed(cut.as_bytes(), false).is_empty(), "held: its event has not ended");
        assert!(h.feed(b"", true).is_empty());
        assert_eq!(h.hidden, 1);
    }

    #[test]
    fn chunks_with_choices_and_other_events_pass_unchanged() {
        let keep = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}],\"usage\":{\"total_tokens\":6}}\n\n",
            "data: {\"choices\":[],\"usage\":null}\n\n",
            "data: not json\n\n",
            "event: error\ndata: {\"error\":{\"message\":\"overloaded\"}}\n\n",
        );
        let mut h = UsageChunkHider::default();
        assert_eq!(h.feed(keep.as_bytes(), true), keep.as_bytes());
        assert_eq!(h.hidden, 0);
    }

    #[test]
    fn a_long_unfinished_event_is_not_held() {
        let mut h = UsageChunkHider::default();
        let long = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}", "a".repeat(MAX_HELD_BYTES));
        assert_eq!(h.feed(long.as_bytes(), false), long.as_bytes());
        let tail = b"\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(h.feed(tail, true), tail);
    }
}
