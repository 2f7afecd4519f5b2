//! Response accounting: what a response actually cost, from JSON usage, SSE usage (every provider
//! shape, chunks cut at any byte), or an estimate when the provider said nothing.

use meshwarden_shared::llm::{extract_response_texts, usage_from_json, StreamUsage, TokenEstimator};
use meshwarden_shared::sse::SseParser;

/// The top-level fields of a response body where providers put usage (see `usage_from_json`).
#[derive(serde::Deserialize)]
#[allow(non_snake_case)]
struct UsageCarriers {
    #[serde(default)]
    usage: Option<serde_json::Value>,
    #[serde(default)]
    usageMetadata: Option<serde_json::Value>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

impl UsageCarriers {
    fn into_value(self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, v) in [("usage", self.usage), ("usageMetadata", self.usageMetadata), ("metadata", self.metadata)] {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        }
        serde_json::Value::Object(m)
    }
}

#[derive(Debug)]
enum Kind {
    /// A JSON body, collected up to a bound.
    Json {
        buf: Vec<u8>,
        overflow: bool,
    },
    Sse {
        parser: SseParser,
        usage: StreamUsage,
        done: bool,
    },
    /// Compressed or unknown content: usage cannot be read.
    Opaque,
}

/// Where the charged numbers came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The provider's usage.
    Reported,
    /// Partly reported (a cut stream): reported input, output estimated from streamed text.
    Partial,
    /// Estimated: the prompt estimate plus the text seen.
    Estimated,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Reported => "reported",
            Source::Partial => "partial",
            Source::Estimated => "estimated",
        }
    }
}

#[derive(Debug)]
pub struct Meter {
    kind: Kind,
    max_bytes: usize,
    status: u32,
}

impl Meter {
    /// From the response headers: `:status`, `content-type`, `content-encoding`.
    pub fn new(status: u32, content_type: Option<&str>, content_encoding: Option<&str>, max_bytes: usize) -> Self {
        let encoded =
            content_encoding.is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity") && !e.trim().is_empty());
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        let kind = if encoded {
            Kind::Opaque
        } else if ct.starts_with("text/event-stream") {
            Kind::Sse { parser: SseParser::default(), usage: StreamUsage::default(), done: false }
        } else {
            Kind::Json { buf: Vec::new(), overflow: false }
        };
        Self { kind, max_bytes, status }
    }

    pub fn is_stream(&self) -> bool {
        matches!(self.kind, Kind::Sse { .. })
    }

    /// One body chunk, in order.
    pub fn on_chunk(&mut self, chunk: &[u8]) {
        match &mut self.kind {
            Kind::Json { buf, overflow } => {
                if !*overflow {
                    if buf.len() + chunk.len() > self.max_bytes {
                        *overflow = true;
                        buf.clear();
                        buf.shrink_to_fit();
                    } else {
                        buf.extend_from_slice(chunk);
                    }
                }
            }
            Kind::Sse { parser, usage, done } => parser.feed_with(chunk, |ev| {
                if ev.is_done_marker() {
                    *done = true;
                } else {
                    if matches!(ev.event.as_deref(), Some("message_stop") | Some("response.completed")) {
                        *done = true;
                    }
                    usage.on_event_data(&ev.data);
                }
            }),
            Kind::Opaque => {}
        }
    }

    /// The tokens to charge, `(input, output, source)`, given the admission's prompt estimate.
    /// `complete` is false when the stream was cut (client went away or upstream reset).
    pub fn finish(&mut self, input_estimate: u64) -> (u64, u64, Source) {
        let error = self.status >= 400;
        match &mut self.kind {
            Kind::Json { buf, overflow } => {
                if *overflow {
                    return (input_estimate, 0, Source::Estimated);
                }
                // Fast path: only the fields that carry usage are materialised.
                if let Ok(light) = serde_json::from_slice::<UsageCarriers>(buf) {
                    if let Some(u) = usage_from_json(&light.into_value()) {
                        return (u.input_tokens, u.output_tokens, Source::Reported);
                    }
                }
                match serde_json::from_slice::<serde_json::Value>(buf) {
                    Ok(v) => match usage_from_json(&v) {
                        Some(u) => (u.input_tokens, u.output_tokens, Source::Reported),
                        None => {
                            let mut est = TokenEstimator::default();
                            if !error {
                                for s in extract_response_texts(&v) {
                                    est.add(&s.text);
                                }
                            }
                            (input_estimate, est.tokens(), Source::Estimated)
                        }
                    },
                    Err(_) => (input_estimate, 0, Source::Estimated),
                }
            }
            Kind::Sse { parser, usage, done } => {
                if let Some(ev) = parser.finish() {
                    usage.on_event_data(&ev.data);
                }
                let streamed = usage.estimated_output_tokens();
                match usage.reported() {
                    Some(u) if *done && (u.output_tokens > 0 || streamed == 0) => {
                        (u.input_tokens, u.output_tokens, Source::Reported)
                    }
                    Some(u) => {
                        let input = if u.input_tokens > 0 { u.input_tokens } else { input_estimate };
                        (input, u.output_tokens.max(streamed), Source::Partial)
                    }
                    None => (input_estimate, streamed, Source::Estimated),
                }
            }
            Kind::Opaque => (input_estimate, 0, Source::Estimated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENAI_STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hello world\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,\"total_tokens\":19}}\n\n\
data: [DONE]\n\n";

    const ANTHROPIC_STREAM: &str = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":30,\"output_tokens\":1}}}\r\n\r\n\
event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi \\u00e9t\\u00e9\"}}\r\n\r\n\
event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\r\n\r\n\
event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n";

    fn sse(body: &str, split_every: usize) -> (u64, u64, Source) {
        let mut m = Meter::new(200, Some("text/event-stream; charset=utf-8"), None, 1 << 20);
        for c in body.as_bytes().chunks(split_every) {
            m.on_chunk(c);
        }
        m.finish(99)
    }

    #[test]
    fn sse_usage_split_at_every_byte() {
        for split in [1, 2, 3, 7, 1000] {
            assert_eq!(sse(OPENAI_STREAM, split), (12, 7, Source::Reported), "split {split}");
            assert_eq!(sse(ANTHROPIC_STREAM, split), (30, 9, Source::Reported), "split {split}");
        }
    }

    #[test]
    fn cut_streams_are_estimated() {
        let cut = &ANTHROPIC_STREAM[..ANTHROPIC_STREAM.find("event: message_delta").unwrap()];
        let (i, o, s) = sse(cut, 5);
        assert_eq!((i, s), (30, Source::Partial));
        assert!(o >= 1);
        let no_usage = "data: {\"choices\":[{\"delta\":{\"content\":\"abcdefgh\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(sse(no_usage, 3), (99, 2, Source::Estimated));
    }

    #[test]
    fn json_shapes_and_bad_bodies() {
        let mut m = Meter::new(200, Some("application/json"), None, 1 << 20);
        m.on_chunk(br#"{"usageMetadata":{"promptTokenCount":3,"#);
        m.on_chunk(br#""candidatesTokenCount":4}}"#);
        assert_eq!(m.finish(50), (3, 4, Source::Reported));
        let mut m = Meter::new(200, Some("application/json"), None, 1 << 20);
        m.on_chunk(br#"{"choices":[{"message":{"content":"12345678"}}]}"#);
        assert_eq!(m.finish(50), (50, 2, Source::Estimated));
        let mut m = Meter::new(500, Some("application/json"), None, 1 << 20);
        m.on_chunk(b"not json");
        assert_eq!(m.finish(50), (50, 0, Source::Estimated));
        let mut m = Meter::new(200, Some("application/json"), Some("gzip"), 1 << 20);
        m.on_chunk(&[0x1f, 0x8b, 0, 1]);
        assert_eq!(m.finish(50), (50, 0, Source::Estimated));
        let mut m = Meter::new(200, Some("application/json"), None, 8);
        m.on_chunk(br#"{"usage":{"prompt_tokens":1}}"#);
        assert_eq!(m.finish(50), (50, 0, Source::Estimated));
    }
}
