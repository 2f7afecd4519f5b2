//! Response accounting: what a response actually cost, from JSON usage, SSE usage (every provider
//! shape, chunks cut at any byte), or an estimate when the provider said nothing.

use meshwarden_shared::eventstream::Decoder as EventStreamDecoder;
use meshwarden_shared::llm::{extract_response_texts, usage_from_json, StreamUsage, TokenEstimator};
use meshwarden_shared::sse::SseParser;
use meshwarden_shared::usage_scan::UsageScanner;

#[derive(Debug)]
enum Kind {
    /// A JSON body: usage is read from every chunk by the scanner, whatever the size; the body
    /// itself is kept up to a bound, only to estimate an answer that reports no usage.
    Json {
        scan: UsageScanner,
        buf: Vec<u8>,
        overflow: bool,
    },
    Sse {
        parser: SseParser,
        usage: StreamUsage,
        done: bool,
    },
    /// Bedrock's binary event stream (`application/vnd.amazon.eventstream`): usage in the
    /// `metadata` event (ConverseStream) or in the model's own events (InvokeModelWithResponseStream).
    EventStream {
        decoder: EventStreamDecoder,
        usage: StreamUsage,
        /// The last event arrived (`messageStop` is followed by `metadata`, which carries the usage).
        done: bool,
    },
    /// Compressed content: usage cannot be read.
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
        } else if ct.starts_with("application/vnd.amazon.eventstream") {
            Kind::EventStream { decoder: EventStreamDecoder::default(), usage: StreamUsage::default(), done: false }
        } else if ct.starts_with("text/event-stream") {
            Kind::Sse { parser: SseParser::default(), usage: StreamUsage::default(), done: false }
        } else {
            Kind::Json { scan: UsageScanner::default(), buf: Vec::new(), overflow: false }
        };
        Self { kind, max_bytes, status }
    }

    pub fn is_stream(&self) -> bool {
        matches!(self.kind, Kind::Sse { .. } | Kind::EventStream { .. })
    }

    /// One body chunk, in order.
    pub fn on_chunk(&mut self, chunk: &[u8]) {
        match &mut self.kind {
            Kind::Json { scan, buf, overflow } => {
                scan.feed(chunk);
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
            Kind::EventStream { decoder, usage, done } => {
                for m in decoder.feed(chunk) {
                    // Exceptions (`throttlingException`, ...) carry no usage.
                    if m.message_type.as_deref().is_some_and(|t| t != "event") {
                        continue;
                    }
                    if let Some(v) = m.event_json() {
                        usage.on_event_json(&v);
                        // ConverseStream ends with `metadata` (after `messageStop`); the invoke API's
                        // last chunk carries the invocation metrics.
                        if m.event_type.as_deref() == Some("metadata")
                            || v.get("amazon-bedrock-invocationMetrics").is_some()
                        {
                            *done = true;
                        }
                    }
                }
            }
            Kind::Opaque => {}
        }
    }

    /// The tokens to charge, `(input, output, source)`, given the admission's prompt estimate and
    /// output reservation. An answer whose usage cannot be read and whose text cannot be estimated
    /// (compressed, or a JSON answer over `max_body_bytes` without usage) is charged the reservation:
    /// the output the admission allowed, never nothing.
    pub fn finish(&mut self, input_estimate: u64, output_reservation: u64) -> (u64, u64, Source) {
        let error = self.status >= 400;
        let unreadable_output = if error { 0 } else { output_reservation };
        match &mut self.kind {
            Kind::Json { scan, buf, overflow } => {
                if let Some(u) = scan.finish() {
                    return (u.input_tokens, u.output_tokens, Source::Reported);
                }
                if *overflow {
                    return (input_estimate, unreadable_output, Source::Estimated);
                }
                match serde_json::from_slice::<serde_json::Value>(buf) {
                    // Usage wrapped one level deeper (`message.usage`, `response.usage`, as some
                    // gateways re-wrap streamed events) is read from the parsed body.
                    Ok(v) => {
                        if let Some(u) = usage_from_json(&v) {
                            return (u.input_tokens, u.output_tokens, Source::Reported);
                        }
                        let mut est = TokenEstimator::default();
                        if !error {
                            for s in extract_response_texts(&v) {
                                est.add(&s.text);
                            }
                        }
                        (input_estimate, est.tokens(), Source::Estimated)
                    }
                    // Not JSON (a plain-text answer): its text is the output; an error page is not.
                    Err(_) => {
                        let mut est = TokenEstimator::default();
                        if !error {
                            est.add(&String::from_utf8_lossy(buf));
                        }
                        (input_estimate, est.tokens(), Source::Estimated)
                    }
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
            Kind::EventStream { decoder, usage, done } => {
                let streamed = usage.estimated_output_tokens();
                match usage.reported() {
                    Some(u) if *done => (u.input_tokens, u.output_tokens, Source::Reported),
                    Some(u) => {
                        let input = if u.input_tokens > 0 { u.input_tokens } else { input_estimate };
                        (input, u.output_tokens.max(streamed), Source::Partial)
                    }
                    // Framing that could not be read: what was streamed, at least the reservation.
                    None if decoder.broken().is_some() => {
                        (input_estimate, streamed.max(unreadable_output), Source::Estimated)
                    }
                    None => (input_estimate, streamed, Source::Estimated),
                }
            }
            Kind::Opaque => (input_estimate, unreadable_output, Source::Estimated),
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
        m.finish(99, 300)
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
        assert_eq!(m.finish(50, 300), (3, 4, Source::Reported));
        let mut m = Meter::new(200, Some("application/json"), None, 1 << 20);
        m.on_chunk(br#"{"choices":[{"message":{"content":"12345678"}}]}"#);
        assert_eq!(m.finish(50, 300), (50, 2, Source::Estimated));
        let mut m = Meter::new(500, Some("application/json"), None, 1 << 20);
        m.on_chunk(b"not json");
        assert_eq!(m.finish(50, 300), (50, 0, Source::Estimated));
        // An error answer without usage costs the prompt only, whatever its encoding.
        let mut m = Meter::new(503, Some("application/json"), Some("gzip"), 1 << 20);
        m.on_chunk(&[0x1f, 0x8b, 0, 1]);
        assert_eq!(m.finish(50, 300), (50, 0, Source::Estimated));
    }

    #[test]
    fn unreadable_answers_are_charged_the_output_reservation_not_nothing() {
        // Compressed (an upstream that compresses although the filter removed accept-encoding).
        let mut m = Meter::new(200, Some("application/json"), Some("gzip"), 1 << 20);
        m.on_chunk(&[0x1f, 0x8b, 0, 1]);
        assert_eq!(m.finish(50, 300), (50, 300, Source::Estimated));
        // Bytes that are not the event-stream framing the content type announced.
        let mut m = Meter::new(200, Some("application/vnd.amazon.eventstream"), None, 1 << 20);
        m.on_chunk(&[0, 0, 0, 90, 0, 0, 0, 50, 1, 2, 3, 4]);
        assert_eq!(m.finish(50, 300), (50, 300, Source::Estimated));
        // Over the buffer bound and no usage anywhere.
        let mut m = Meter::new(200, Some("application/json"), None, 8);
        m.on_chunk(br#"{"choices":[{"message":{"content":"a long answer"}}]}"#);
        assert_eq!(m.finish(50, 300), (50, 300, Source::Estimated));
    }

    #[test]
    fn wrapped_usage_and_plain_text_answers_are_charged() {
        let mut m = Meter::new(200, Some("application/json"), None, 1 << 20);
        m.on_chunk(br#"{"type":"message_start","message":{"usage":{"input_tokens":11,"output_tokens":13}}}"#);
        assert_eq!(m.finish(50, 300), (11, 13, Source::Reported));
        let mut m = Meter::new(200, Some("text/plain"), None, 1 << 20);
        m.on_chunk(b"a plain text answer of forty characters!");
        assert_eq!(m.finish(50, 300), (50, 10, Source::Estimated));
        let mut m = Meter::new(502, Some("text/html"), None, 1 << 20);
        m.on_chunk(b"<html>bad gateway</html>");
        assert_eq!(m.finish(50, 300), (50, 0, Source::Estimated));
    }

    fn bedrock_event(kind: &str, payload: &str) -> Vec<u8> {
        meshwarden_shared::eventstream::encode(
            &[(":event-type", kind), (":content-type", "application/json"), (":message-type", "event")],
            payload.as_bytes(),
        )
    }

    #[test]
    fn bedrock_event_streams_are_read_at_any_split() {
        let mut converse = bedrock_event("messageStart", r#"{"role":"assistant"}"#);
        converse
            .extend(bedrock_event("contentBlockDelta", r#"{"contentBlockIndex":0,"delta":{"text":"Hello there"}}"#));
        converse.extend(bedrock_event("messageStop", r#"{"stopReason":"end_turn"}"#));
        converse
            .extend(bedrock_event("metadata", r#"{"usage":{"inputTokens":21,"outputTokens":43,"totalTokens":64}}"#));
        for split in [1, 3, 7, 64, converse.len()] {
            let mut m = Meter::new(200, Some("application/vnd.amazon.eventstream"), None, 1 << 20);
            for c in converse.chunks(split) {
                m.on_chunk(c);
            }
            assert_eq!(m.finish(50, 300), (21, 43, Source::Reported), "split {split}");
        }
        // InvokeModelWithResponseStream: base64 Anthropic events, the last with invocation metrics.
        let b64 = |s: &str| {
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut out = String::new();
            for c in s.as_bytes().chunks(3) {
                let n = (u32::from(c[0]) << 16)
                    | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                    | u32::from(*c.get(2).unwrap_or(&0));
                for i in 0..4 {
                    out.push(if i <= c.len() { A[(n >> (18 - 6 * i)) as usize & 63] as char } else { '=' });
                }
            }
            out
        };
        let chunk = |inner: &str| bedrock_event("chunk", &format!(r#"{{"bytes":"{}"}}"#, b64(inner)));
        let mut invoke = chunk(r#"{"type":"message_start","message":{"usage":{"input_tokens":9,"output_tokens":1}}}"#);
        invoke.extend(chunk(r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"Hi"}}"#));
        invoke.extend(chunk(
            r#"{"type":"message_stop","amazon-bedrock-invocationMetrics":{"inputTokenCount":9,"outputTokenCount":17}}"#,
        ));
        let mut m = Meter::new(200, Some("application/vnd.amazon.eventstream"), None, 1 << 20);
        m.on_chunk(&invoke);
        assert_eq!(m.finish(50, 300), (9, 17, Source::Reported));
    }

    #[test]
    fn bedrock_streams_cut_or_broken_are_charged_what_is_known() {
        let mut start = bedrock_event("contentBlockDelta", r#"{"contentBlockIndex":0,"delta":{"text":"12345678"}}"#);
        // Cut before the metadata event: the streamed text.
        let mut m = Meter::new(200, Some("application/vnd.amazon.eventstream"), None, 1 << 20);
        m.on_chunk(&start);
        assert_eq!(m.finish(50, 300), (50, 2, Source::Estimated));
        // Broken framing (CRC) before any usage: the reservation, not nothing.
        let n = start.len();
        start[n - 1] ^= 0xff;
        let mut m = Meter::new(200, Some("application/vnd.amazon.eventstream"), None, 1 << 20);
        m.on_chunk(&start);
        assert_eq!(m.finish(50, 300), (50, 300, Source::Estimated));
    }

    #[test]
    fn usage_after_the_buffer_bound_is_still_read() {
        // OpenAI puts usage last; an answer with logprobs passes any buffer bound long before it.
        let mut m = Meter::new(200, Some("application/json"), None, 64);
        m.on_chunk(br#"{"choices":[{"logprobs":{"content":[{"token":"a","logprob":-0.1}"#);
        for _ in 0..1000 {
            m.on_chunk(br#",{"token":""usage":{","logprob":-0.2}"#);
        }
        m.on_chunk(br#"]}}],"usage":{"prompt_tokens":7,"completion_tokens":1001}}"#);
        assert_eq!(m.finish(50, 300), (7, 1001, Source::Reported));
    }
}
