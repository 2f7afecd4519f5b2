//! Response accounting: what a response actually cost, from JSON usage, SSE usage (every provider
//! shape, chunks cut at any byte), or an estimate when the provider said nothing.

use meshwarden_shared::eventstream::Decoder as EventStreamDecoder;
use meshwarden_shared::llm::{extract_response_texts, usage_from_json, StreamUsage, TokenEstimator};
use meshwarden_shared::sse::{SseParser, DEFAULT_MAX_EVENT_BYTES};
use meshwarden_shared::usage_scan::UsageScanner;

#[derive(Debug)]
enum Kind {
    /// A gRPC answer (protobuf, often a stream of many messages): its size is counted, and its output
    /// estimated from it (bytes / 4, as an unreadable request is), not the flat reservation, so a long
    /// stream costs what it carried.
    Sized { bytes: u64 },
    /// A JSON body: usage is read from every chunk by the scanner, whatever the size; the body
    /// itself is kept up to a bound, only to estimate an answer that reports no usage.
    Json { scan: UsageScanner, buf: Vec<u8>, overflow: bool },
    Sse {
        parser: SseParser,
        usage: StreamUsage,
        done: bool,
        /// A Responses `background` stream: the model goes on when the client leaves.
        background: bool,
    },
    /// Bedrock's binary event stream (`application/vnd.amazon.eventstream`): usage in the
    /// `metadata` event (ConverseStream) or in the model's own events (InvokeModelWithResponseStream).
    EventStream {
        decoder: EventStreamDecoder,
        usage: StreamUsage,
        /// The last event arrived (`messageStop` is followed by `metadata`, which carries the usage).
        done: bool,
    },
    /// Newline-delimited JSON (`application/x-ndjson`, Ollama's streams): one event per line, the
    /// counts in the last (`"done": true`).
    Ndjson {
        line: Vec<u8>,
        /// The current line passed the bound and is skipped to its end.
        skipping: bool,
        usage: StreamUsage,
        done: bool,
    },
    /// Compressed or binary content (audio, images, files): usage cannot be read, and its bytes are not text.
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
    /// Usage from response headers (Bedrock `InvokeModel`, TGI `/generate`), if any: input, output;
    /// a side the headers leave out is `None` (then estimated).
    header_usage: Option<(Option<u64>, Option<u64>)>,
    /// The answer's strings are media (base64 images), not text: see [`Meter::media_answer`].
    media: bool,
    /// Of the input tokens [`Meter::finish`] charged, those the usage reports as read from the
    /// provider's prompt cache (0 when estimated).
    cached_input: u64,
    /// Read the answer's Responses id ([`Meter::watch_response_id`]), and what was read.
    watch_response_id: bool,
    response_id: Option<String>,
    /// Read the Gemini context cache a `cachedContents` answer creates, and what was read.
    watch_gemini_cache: bool,
    gemini_cache: Option<(String, u64)>,
}

impl Meter {
    /// From the response headers: `:status`, `content-type`, `content-encoding`.
    pub fn new(status: u32, content_type: Option<&str>, content_encoding: Option<&str>, max_bytes: usize) -> Self {
        let encoded =
            content_encoding.is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity") && !e.trim().is_empty());
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        let kind = if !encoded && meshwarden_shared::binary::is_grpc(&ct) {
            Kind::Sized { bytes: 0 }
        } else if encoded || is_binary_media(&ct) {
            Kind::Opaque
        } else if ct.starts_with("application/vnd.amazon.eventstream") {
            Kind::EventStream { decoder: EventStreamDecoder::default(), usage: StreamUsage::default(), done: false }
        } else if ct.starts_with("application/x-ndjson") || ct.starts_with("application/jsonl") {
            Kind::Ndjson { line: Vec::new(), skipping: false, usage: StreamUsage::default(), done: false }
        } else if ct.starts_with("text/event-stream") {
            // An event can echo the whole request before its usage (OpenAI's `response.completed` carries
            // `instructions` and `tools`): room for any body this filter reads, plus the usual event bound.
            // An event too large for that is dropped, but its usage is still read as it passes (OpenAI's
            // image streams end with `image_generation.completed`: the whole base64 image, then the usage).
            let parser = SseParser::new(max_bytes.saturating_add(DEFAULT_MAX_EVENT_BYTES)).scan_oversized_usage();
            Kind::Sse { parser, usage: StreamUsage::default(), done: false, background: false }
        } else {
            Kind::Json { scan: UsageScanner::default(), buf: Vec::new(), overflow: false }
        };
        Self {
            kind,
            max_bytes,
            status,
            header_usage: None,
            media: false,
            cached_input: 0,
            watch_response_id: false,
            response_id: None,
            watch_gemini_cache: false,
            gemini_cache: None,
        }
    }

    /// Read the OpenAI Responses id of the answer (`resp_...`: the JSON's top-level `id`, or the
    /// `response.created` event's `response.id`), for [`crate::context_memory`]; see
    /// [`Meter::response_id`].
    pub fn watch_response_id(&mut self) {
        self.watch_response_id = true;
    }

    /// Read the name and size of the Gemini context cache the answer creates (`POST .../cachedContents`);
    /// see [`Meter::created_gemini_cache`].
    pub fn watch_gemini_cache(&mut self) {
        self.watch_gemini_cache = true;
    }

    /// The Gemini context cache the answer created (name, tokens), after [`Meter::finish`].
    pub fn created_gemini_cache(&self) -> Option<(&str, u64)> {
        self.gemini_cache.as_ref().map(|(n, t)| (n.as_str(), *t))
    }

    /// The answer's Responses id, once read (JSON answers: after [`Meter::finish`]).
    pub fn response_id(&self) -> Option<&str> {
        self.response_id.as_deref()
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
            Kind::Sse { parser, usage, done, background } => {
                let watch_id = self.watch_response_id;
                let response_id = &mut self.response_id;
                parser.feed_with(chunk, |ev| {
                    // The first event (small: no output yet) names the response.
                    if watch_id && response_id.is_none() && ev.event.as_deref() == Some("response.created") {
                        *response_id = serde_json::from_str::<serde_json::Value>(&ev.data)
                            .ok()
                            .and_then(|v| v.pointer("/response/id").and_then(|i| i.as_str().map(str::to_string)));
                    }
                    // The stream's first event says whether the response runs in the background.
                    if !*background
                        && matches!(ev.event.as_deref(), Some("response.created" | "response.queued"))
                        && ev.data.contains("\"background\"")
                    {
                        *background = serde_json::from_str::<serde_json::Value>(&ev.data)
                            .ok()
                            .and_then(|v| v.pointer("/response/background").and_then(serde_json::Value::as_bool))
                            .unwrap_or(false);
                    }
                    if ev.is_done_marker() {
                        *done = true;
                    } else {
                        // Gemini's SSE (`streamGenerateContent?alt=sse`) has no end marker: its last event is the
                        // one whose candidate carries a `finishReason`, with the final `usageMetadata`.
                        // The Responses API ends with `response.completed`, or with `response.incomplete` (the
                        // output cap was reached) or `response.failed`: each carries the final usage.
                        if is_final_event(ev.event.as_deref())
                            || (ev.data.contains("\"finishReason\"") && ev.data.contains("\"usageMetadata\""))
                        {
                            *done = true;
                        }
                        usage.on_event_data(&ev.data);
                        // TGI's native stream ends with the event that carries `generated_text`, no marker.
                        *done |= usage.ended();
                    }
                });
                for (event, u) in parser.take_oversized_usage() {
                    *done |= is_final_event(event.as_deref());
                    usage.on_usage(u);
                }
            }
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
            Kind::Ndjson { line, skipping, usage, done } => {
                let mut rest = chunk;
                while !rest.is_empty() {
                    let (piece, ended) = match rest.iter().position(|&b| b == b'\n') {
                        Some(p) => (rest.get(..p).unwrap_or_default(), true),
                        None => (rest, false),
                    };
                    rest = if ended { rest.get(piece.len() + 1..).unwrap_or_default() } else { &[] };
                    if !*skipping {
                        if line.len() + piece.len() > self.max_bytes {
                            *skipping = true;
                            line.clear();
                        } else {
                            line.extend_from_slice(piece);
                        }
                    }
                    if ended {
                        ndjson_line(line, usage, done);
                        line.clear();
                        *skipping = false;
                    }
                }
            }
            Kind::Opaque => {}
            Kind::Sized { bytes } => *bytes = bytes.saturating_add(chunk.len() as u64),
        }
    }

    /// The answer is an image generation's (`is_image_generation_path`): its JSON carries base64 images
    /// (`b64_json`), whose bytes are not text the model wrote. Without usage (dall-e-2/3) it is charged the
    /// output reservation, like a binary answer; with usage (gpt-image-1) the usage. Read as text, one
    /// 1024x1024 PNG cost ~500,000 output tokens. The body is not held for an estimate.
    pub fn media_answer(&mut self) {
        self.media = true;
        if let Kind::Json { buf, overflow, .. } = &mut self.kind {
            *overflow = true;
            buf.clear();
        }
    }

    /// Usage the upstream reported in response headers (Bedrock `InvokeModel`:
    /// `x-amzn-bedrock-input-token-count`, `x-amzn-bedrock-output-token-count`; Hugging Face TGI's
    /// `/generate`: `x-prompt-tokens`, `x-generated-tokens`); used when the body reports none. A side
    /// the headers leave out keeps its estimate (it counted as 0 before 2026-12-07).
    pub fn set_header_usage(&mut self, input: Option<u64>, output: Option<u64>) {
        if input.is_some() || output.is_some() {
            self.header_usage = Some((input, output));
        }
    }

    /// The tokens to charge, `(input, output, source)`, given the admission's prompt estimate and
    /// output reservation. Usage the answer reports wins; otherwise its text is estimated; an answer
    /// whose usage cannot be read and whose text cannot be estimated (compressed, broken framing) is
    /// charged at least the reservation: the output the admission allowed, never nothing. Error
    /// answers (status >= 400) without usage cost only the prompt.
    pub fn finish(&mut self, input_estimate: u64, output_reservation: u64) -> (u64, u64, Source) {
        let error = self.status >= 400;
        let unreadable_output = if error { 0 } else { output_reservation };
        let header_usage = self.header_usage;
        let media = self.media;
        if let Kind::Json { buf, overflow: false, .. } = &self.kind {
            if self.watch_response_id {
                self.response_id = response_object_id(buf);
            }
            if self.watch_gemini_cache && !error {
                self.gemini_cache = crate::context_memory::created_gemini_cache(buf);
            }
        }
        let body_only = match &mut self.kind {
            Kind::Json { scan, buf, overflow } => {
                if let Some(u) = scan.finish() {
                    self.cached_input = u.cached_input_tokens;
                    return (u.input_tokens, u.output_tokens, Source::Reported);
                }
                if self.media {
                    return (input_estimate, unreadable_output, Source::Estimated);
                }
                // The text of string values, for shapes and sizes the estimate below cannot read.
                let strings = if error { 0 } else { scan.string_bytes().div_ceil(4) };
                if *overflow {
                    // Over the buffer bound and no usage (e.g. the client left before OpenAI's
                    // trailing usage): the text that passed, at least the reservation.
                    (input_estimate, strings.max(unreadable_output), Source::Estimated)
                } else {
                    match serde_json::from_slice::<serde_json::Value>(buf) {
                        // Usage wrapped one level deeper (`message.usage`, `response.usage`) or at the
                        // top level (Ollama, Bedrock Llama) is read from the parsed body.
                        Ok(v) => {
                            if let Some(u) = usage_from_json(&v) {
                                self.cached_input = u.cached_input_tokens;
                                return (u.input_tokens, u.output_tokens, Source::Reported);
                            }
                            // A Responses `background` request answered before its model ran: its output is
                            // the reservation the admission allowed, not the strings of the queued object.
                            if !error && is_pending_response(&v) {
                                return (input_estimate, unreadable_output, Source::Estimated);
                            }
                            let mut est = TokenEstimator::default();
                            if !error {
                                for s in extract_response_texts(&v) {
                                    est.add(&s.text);
                                }
                            }
                            // A shape whose text fields are unknown here: its string values.
                            let out = if est.tokens() > 0 { est.tokens() } else { strings };
                            (input_estimate, out, Source::Estimated)
                        }
                        // Not JSON: plain text is the output; a cut JSON body its string values.
                        Err(_) => {
                            let mut est = TokenEstimator::default();
                            if !error && strings == 0 {
                                est.add(&String::from_utf8_lossy(buf));
                            }
                            (input_estimate, est.tokens().max(strings), Source::Estimated)
                        }
                    }
                }
            }
            Kind::Sse { parser, usage, done, background } => {
                if let Some(ev) = parser.finish() {
                    usage.on_event_data(&ev.data);
                }
                // An event dropped for its size, and no final event read: the usage may have been in it,
                // so at least the reservation (as for broken event-stream framing). A background response
                // cut before its end goes on without the client (who fetches the rest with
                // `GET /v1/responses/{id}`, not charged here): at least the reservation too.
                // An image stream (`media`) cut before its final event: the images were being made and
                // its partial images are billed; without usage at least the reservation, as for a JSON
                // image answer without usage.
                let dropped =
                    (!*done && (parser.oversized_events() > 0 || *background || media)).then_some(unreadable_output);
                self.cached_input = reported_cached_input(usage);
                stream_charge(usage, *done, dropped, input_estimate)
            }
            Kind::EventStream { decoder, usage, done } => {
                // Framing that stopped decoding (after some usage or none): at least the reservation.
                let broken = decoder.broken().map(|_| unreadable_output);
                self.cached_input = reported_cached_input(usage);
                stream_charge(usage, *done, broken, input_estimate)
            }
            Kind::Ndjson { line, usage, done, .. } => {
                ndjson_line(line, usage, done);
                self.cached_input = reported_cached_input(usage);
                stream_charge(usage, *done, None, input_estimate)
            }
            Kind::Opaque => (input_estimate, unreadable_output, Source::Estimated),
            Kind::Sized { bytes } => (input_estimate, if error { 0 } else { bytes.div_ceil(4) }, Source::Estimated),
        };
        match (body_only, header_usage) {
            ((_, _, Source::Estimated), Some((Some(input), Some(output)))) => (input, output, Source::Reported),
            ((est_in, est_out, Source::Estimated), Some((input, output))) => {
                (input.unwrap_or(est_in), output.unwrap_or(est_out), Source::Partial)
            }
            (charged, _) => charged,
        }
    }

    /// Of the input tokens the last [`Meter::finish`] charged, those read from the prompt cache.
    pub fn cached_input_tokens(&self) -> u64 {
        self.cached_input
    }
}

/// Cached input tokens a stream reported (a stream charged on its reported input; see [`stream_charge`]).
fn reported_cached_input(usage: &StreamUsage) -> u64 {
    usage.reported().filter(|u| u.input_tokens > 0).map_or(0, |u| u.cached_input_tokens)
}

/// The `id` of a JSON answer that is a Responses object (`"object": "response"`); other keys skipped unread.
fn response_object_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Top {
        id: Option<String>,
        object: Option<String>,
    }
    let top: Top = serde_json::from_slice(body).ok()?;
    top.id.filter(|_| top.object.as_deref() == Some("response"))
}

/// The event that ends a stream and carries its final usage: Anthropic `message_stop`, the Responses API's
/// `response.completed` / `response.incomplete` (the output cap was reached) / `response.failed`, OpenAI
/// image streams' `image_generation.completed` / `image_edit.completed` (gpt-image-1 `"stream": true`).
fn is_final_event(event: Option<&str>) -> bool {
    matches!(
        event,
        Some(
            "message_stop"
                | "response.completed"
                | "response.incomplete"
                | "response.failed"
                | "image_generation.completed"
                | "image_edit.completed"
        )
    )
}

/// An OpenAI Responses object whose model has not run yet (`"background": true` answers `queued` at once,
/// or `in_progress`): the output comes later, to `GET /v1/responses/{id}` polls this filter does not charge.
fn is_pending_response(v: &serde_json::Value) -> bool {
    v.get("object").and_then(serde_json::Value::as_str) == Some("response")
        && matches!(v.get("status").and_then(serde_json::Value::as_str), Some("queued" | "in_progress"))
}

/// A media type (lower case) whose body is binary, not text: text-to-speech audio (`/v1/audio/speech`),
/// image or video bytes, a file download (`/v1/files/{id}/content`). Read as text, such bytes counted one
/// token per invalid byte sequence: a 64 KiB MP3 cost ~30,000 output tokens.
fn is_binary_media(ct: &str) -> bool {
    ["audio/", "image/", "video/", "application/octet-stream"].iter().any(|p| ct.starts_with(p))
}

/// What a streamed answer (SSE, event stream, NDJSON) costs. Reported usage counts when the stream
/// finished and its output is plausible (a final 0 after streamed text is not); a cut stream with some
/// usage is charged its reported input and the larger of reported and streamed output; without usage,
/// the streamed text. `broken_floor`: the framing stopped decoding, so output is at least this.
fn stream_charge(
    usage: &StreamUsage,
    done: bool,
    broken_floor: Option<u64>,
    input_estimate: u64,
) -> (u64, u64, Source) {
    let streamed = usage.estimated_output_tokens();
    let floor = broken_floor.unwrap_or(0);
    match usage.reported() {
        Some(u) if done && broken_floor.is_none() && (u.output_tokens > 0 || streamed == 0) => {
            (u.input_tokens, u.output_tokens, Source::Reported)
        }
        Some(u) => {
            let input = if u.input_tokens > 0 { u.input_tokens } else { input_estimate };
            (input, u.output_tokens.max(streamed).max(floor), Source::Partial)
        }
        None => (input_estimate, streamed.max(floor), Source::Estimated),
    }
}

/// One complete NDJSON line (blank and non-JSON lines are skipped).
fn ndjson_line(line: &[u8], usage: &mut StreamUsage, done: &mut bool) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else { return };
    usage.on_event_json(&v);
    if v.get("done").and_then(serde_json::Value::as_bool) == Some(true) {
        *done = true;
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

    #[test]
    fn a_grpc_answer_is_priced_by_its_size() {
        let mut m = Meter::new(200, Some("application/grpc+proto"), None, 1 << 20);
        for _ in 0..10 {
            m.on_chunk(&[0u8; 401]);
        }
        assert_eq!(m.finish(7, 256), (7, 1003, Source::Estimated), "4010 bytes / 4, not the reservation");
        let mut small = Meter::new(200, Some("application/grpc"), None, 1 << 20);
        small.on_chunk(&[0u8; 12]);
        assert_eq!(small.finish(7, 256).1, 3);
        // Compressed: unreadable, the reservation as before.
        let mut gz = Meter::new(200, Some("application/grpc"), Some("gzip"), 1 << 20);
        gz.on_chunk(&[0u8; 4000]);
        assert_eq!(gz.finish(7, 256).1, 256);
    }

    #[test]
    fn gemini_sse_ends_with_its_finish_reason() {
        let gemini = "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hello\"}]}}],\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":1}}\r\n\r\n\
data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\" world\"}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":3,\"totalTokenCount\":11}}\r\n\r\n";
        for split in [1, 7, 4096] {
            assert_eq!(sse(gemini, split), (8, 3, Source::Reported), "split {split}");
        }
        // Cut before the final event: what was reported so far, as partial.
        let cut = gemini.split_inclusive("\r\n\r\n").next().unwrap();
        assert_eq!(sse(cut, 4096).2, Source::Partial);
    }

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

    /// An image generation answer's base64 images are not text: without usage it costs the reservation,
    /// with usage (gpt-image-1) the usage; an error costs only the prompt.
    #[test]
    fn image_answers_are_charged_the_reservation_or_their_usage() {
        let b64 = "iVBORw0KGgoAAAANSUhEUgAA".repeat(60_000);
        let answer = format!(r#"{{"created":1,"data":[{{"b64_json":"{b64}","revised_prompt":"a red fox"}}]}}"#);
        for max in [1 << 20, 8 << 20] {
            let mut m = Meter::new(200, Some("application/json"), None, max);
            m.media_answer();
            for c in answer.as_bytes().chunks(64 * 1024) {
                m.on_chunk(c);
            }
            assert_eq!(m.finish(30, 100), (30, 100, Source::Estimated), "max {max}");
        }
        let with_usage = format!(
            r#"{{"created":1,"data":[{{"b64_json":"{b64}"}}],"usage":{{"input_tokens":12,"output_tokens":4160,"total_tokens":4172}}}}"#
        );
        let mut m = Meter::new(200, Some("application/json"), None, 1 << 20);
        m.media_answer();
        m.on_chunk(with_usage.as_bytes());
        assert_eq!(m.finish(30, 100), (12, 4160, Source::Reported));
        let mut m = Meter::new(400, Some("application/json"), None, 1 << 20);
        m.media_answer();
        m.on_chunk(br#"{"error":{"message":"bad size","type":"invalid_request_error"}}"#);
        assert_eq!(m.finish(30, 100), (30, 0, Source::Estimated));
    }

    /// A Responses request with `"background": true` is answered at once with the response `queued` (or
    /// `in_progress`) and no usage; the model runs afterwards and the client polls `GET /v1/responses/{id}`
    /// (no body, not limited). Its output was charged the few strings of the queued object (~15 tokens),
    /// whatever the model then wrote: it is charged the output reservation, as an unreadable answer.
    /// The Responses id is read where asked for (JSON: the top-level `id` of a `response` object;
    /// SSE: `response.created`), whatever the chunking, and not from other answers.
    #[test]
    fn responses_ids_are_read_when_watched() {
        let json = r#"{"id":"resp_abc","object":"response","status":"completed","output":[],"usage":{"input_tokens":6000,"output_tokens":10,"total_tokens":6010}}"#;
        let mut m = Meter::new(200, Some("application/json"), None, 1 << 20);
        m.watch_response_id();
        m.on_chunk(json.as_bytes());
        assert_eq!(m.finish(1, 1), (6000, 10, Source::Reported));
        assert_eq!(m.response_id(), Some("resp_abc"));
        let mut unwatched = Meter::new(200, Some("application/json"), None, 1 << 20);
        unwatched.on_chunk(json.as_bytes());
        unwatched.finish(1, 1);
        assert_eq!(unwatched.response_id(), None);
        let mut chat = Meter::new(200, Some("application/json"), None, 1 << 20);
        chat.watch_response_id();
        chat.on_chunk(
            br#"{"id":"chatcmpl-1","object":"chat.completion","usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
        );
        chat.finish(1, 1);
        assert_eq!(chat.response_id(), None, "not a Responses object");
        let stream = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_s1\",\"object\":\"response\",\"status\":\"in_progress\",\"output\":[]}}\n\n\
event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n\
event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_s1\",\"object\":\"response\",\"status\":\"completed\",\"usage\":{\"input_tokens\":40,\"output_tokens\":2,\"total_tokens\":42}}}\n\n";
        for split in [1, 5, 1000] {
            let mut m = Meter::new(200, Some("text/event-stream"), None, 1 << 20);
            m.watch_response_id();
            for c in stream.as_bytes().chunks(split) {
                m.on_chunk(c);
            }
            assert_eq!(m.finish(1, 1), (40, 2, Source::Reported));
            assert_eq!(m.response_id(), Some("resp_s1"), "split {split}");
        }
    }

    #[test]
    fn a_background_response_is_charged_the_output_reservation() {
        let queued = r#"{"id":"resp_68b","object":"response","created_at":1765000000,"status":"queued","background":true,
            "error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":2000,"model":"o3-2025-04-16",
            "output":[],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":"high","summary":null},
            "store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,
            "truncation":"disabled","usage":null,"user":null,"metadata":{}}"#;
        for answer in [queued.to_string(), queued.replace("\"queued\"", "\"in_progress\"")] {
            let mut m = Meter::new(200, Some("application/json"), None, 1 << 20);
            m.on_chunk(answer.as_bytes());
            assert_eq!(m.finish(30, 2000), (30, 2000, Source::Estimated), "{answer}");
        }
        // A finished response (not background, or polled) is charged its usage as before.
        let done = r#"{"id":"r","object":"response","status":"completed","output":[],"usage":{"input_tokens":9,"output_tokens":5}}"#;
        let mut m = Meter::new(200, Some("application/json"), None, 1 << 20);
        m.on_chunk(done.as_bytes());
        assert_eq!(m.finish(30, 2000), (9, 5, Source::Reported));
    }

    /// A binary answer (text-to-speech audio, an image, a file download) is not text: it is charged the
    /// output reservation, as an unreadable answer, not its bytes read as characters (a 64 KiB MP3 read
    /// as text cost ~60,000 output tokens and spent a day's budget in a few speech requests).
    #[test]
    fn binary_answers_are_charged_the_output_reservation_not_their_bytes() {
        let audio: Vec<u8> = (0..64 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for ct in ["audio/mpeg", "audio/wav", "image/png", "application/octet-stream", "video/mp4"] {
            let mut m = Meter::new(200, Some(ct), None, 1 << 20);
            for c in audio.chunks(16 * 1024) {
                m.on_chunk(c);
            }
            assert_eq!(m.finish(50, 300), (50, 300, Source::Estimated), "{ct}");
        }
        // An error answer with a binary type still costs only the prompt.
        let mut m = Meter::new(500, Some("application/octet-stream"), None, 1 << 20);
        m.on_chunk(&audio);
        assert_eq!(m.finish(50, 300), (50, 0, Source::Estimated));
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
    fn answers_without_usage_are_charged_their_text_whatever_the_size_or_shape() {
        // Over the bound and cut before OpenAI's trailing usage: the content that passed.
        let mut m = Meter::new(200, Some("application/json"), None, 1024);
        m.on_chunk(br#"{"choices":[{"message":{"content":""#);
        for _ in 0..1000 {
            m.on_chunk(&[b'a'; 1000]);
        }
        assert_eq!(m.finish(50, 300), (50, 250_000, Source::Estimated));
        // Shapes without known text fields (Bedrock Mistral, Titan): their string values.
        let mut m = Meter::new(200, Some("application/json"), None, 1 << 20);
        m.on_chunk(br#"{"outputs":[{"text":"0123456789012345678901234567890123456789","stop_reason":"stop"}]}"#);
        assert_eq!(m.finish(50, 300), (50, 11, Source::Estimated), "44 bytes of string values");
        // Ollama and Bedrock Llama report their counts at the top level.
        let mut m = Meter::new(200, Some("application/json"), None, 1 << 20);
        m.on_chunk(
            br#"{"model":"llama3","message":{"content":"hi"},"done":true,"prompt_eval_count":26,"eval_count":300}"#,
        );
        assert_eq!(m.finish(50, 300), (26, 300, Source::Reported));
        let mut m = Meter::new(200, Some("application/json"), None, 1 << 20);
        m.on_chunk(br#"{"generation":"hi","prompt_token_count":10,"generation_token_count":3000}"#);
        assert_eq!(m.finish(50, 300), (10, 3000, Source::Reported));
        // Bedrock InvokeModel's usage headers, when the body reports none (here compressed).
        let mut m = Meter::new(200, Some("application/json"), Some("gzip"), 1 << 20);
        m.set_header_usage(Some(11), Some(222));
        m.on_chunk(&[0x1f, 0x8b, 0, 1]);
        assert_eq!(m.finish(50, 300), (11, 222, Source::Reported));
        // One side only (a server that reports just its output): the other keeps its estimate.
        let mut m = Meter::new(200, Some("application/json"), None, 1 << 20);
        m.set_header_usage(None, Some(222));
        m.on_chunk(br#"{"generated_text":"abcdefgh"}"#);
        assert_eq!(m.finish(50, 300), (50, 222, Source::Partial));
    }

    /// TGI's native stream has no terminator: the event with `generated_text` ends it, and its `details`
    /// (asked for with `"details": true`) carry the usage; without them each event is one token.
    #[test]
    fn tgi_native_streams_are_charged_their_tokens() {
        let event = |i: usize, text: &str, last: bool, details: &str| {
            let generated = if last { r#""Once upon a time""# } else { "null" };
            format!(
                "data:{{\"index\":{i},\"token\":{{\"id\":{i},\"text\":\"{text}\",\"logprob\":-0.5,\"special\":false}},\"generated_text\":{generated},\"details\":{details}}}\n\n"
            )
        };
        let body = |details: &str| {
            let words = ["Once", " upon", " a", " time"];
            let mut out = String::new();
            for (i, w) in words.iter().enumerate() {
                let last = i + 1 == words.len();
                out.push_str(&event(i + 1, w, last, if last { details } else { "null" }));
            }
            out
        };
        let with_details = body(r#"{"finish_reason":"length","generated_tokens":4,"seed":null,"input_length":17}"#);
        for split in 0..with_details.len() {
            let mut m = Meter::new(200, Some("text/event-stream"), None, 1 << 20);
            m.on_chunk(&with_details.as_bytes()[..split]);
            m.on_chunk(&with_details.as_bytes()[split..]);
            assert_eq!(m.finish(50, 300), (17, 4, Source::Reported), "split at {split}");
        }
        let mut m = Meter::new(200, Some("text/event-stream"), None, 1 << 20);
        m.on_chunk(body("null").as_bytes());
        assert_eq!(m.finish(50, 300), (50, 4, Source::Estimated));
        // Cut after two events (the final one with the details never came): the streamed tokens.
        let mut m = Meter::new(200, Some("text/event-stream"), None, 1 << 20);
        m.on_chunk(format!("{}{}", event(1, "Once", false, "null"), event(2, " upon", false, "null")).as_bytes());
        assert_eq!(m.finish(50, 300), (50, 2, Source::Estimated));
    }

    #[test]
    fn bedrock_streams_broken_after_early_usage_are_charged_the_reservation() {
        let b64 = "eyJ0eXBlIjoibWVzc2FnZV9zdGFydCIsIm1lc3NhZ2UiOnsidXNhZ2UiOnsiaW5wdXRfdG9rZW5zIjo5LCJvdXRwdXRfdG9rZW5zIjoxfX19";
        let mut m = Meter::new(200, Some("application/vnd.amazon.eventstream"), None, 1 << 20);
        m.on_chunk(&bedrock_event("chunk", &format!(r#"{{"bytes":"{b64}"}}"#)));
        let mut bad = bedrock_event("chunk", r#"{"bytes":"e30="}"#);
        let n = bad.len();
        bad[n - 1] ^= 1;
        m.on_chunk(&bad);
        assert_eq!(m.finish(50, 300), (9, 300, Source::Partial));
        // A final usage of 0 output after streamed text is not taken at its word.
        let mut s = bedrock_event("contentBlockDelta", r#"{"contentBlockIndex":0,"delta":{"text":"12345678"}}"#);
        s.extend(bedrock_event("metadata", r#"{"usage":{"inputTokens":5,"outputTokens":0}}"#));
        let mut m = Meter::new(200, Some("application/vnd.amazon.eventstream"), None, 1 << 20);
        m.on_chunk(&s);
        assert_eq!(m.finish(50, 300), (5, 2, Source::Partial));
    }

    #[test]
    fn ollama_ndjson_streams_are_read_at_any_split() {
        let body = concat!(
            r#"{"model":"llama3","created_at":"2026-12-05T08:00:00Z","message":{"role":"assistant","content":"Hello"},"done":false}"#,
            "\n",
            r#"{"model":"llama3","created_at":"2026-12-05T08:00:00Z","message":{"role":"assistant","content":" world"},"done":false}"#,
            "\n",
            r#"{"model":"llama3","done":true,"prompt_eval_count":26,"eval_count":2}"#,
            "\n"
        );
        for split in [1, 5, 64, body.len()] {
            let mut m = Meter::new(200, Some("application/x-ndjson"), None, 1 << 20);
            for c in body.as_bytes().chunks(split) {
                m.on_chunk(c);
            }
            assert_eq!(m.finish(50, 300), (26, 2, Source::Reported), "split {split}");
        }
        // Cut before the last line: the streamed text (generate API: `response`).
        let mut m = Meter::new(200, Some("application/x-ndjson"), None, 1 << 20);
        m.on_chunk(br#"{"model":"llama3","response":"0123456789abcdef","done":false}"#);
        assert_eq!(m.finish(50, 300), (50, 4, Source::Estimated));
    }

    /// A Responses stream stopped by `max_output_tokens` ends with `response.incomplete` (its final usage,
    /// reasoning included): the reported usage is charged, not max(reported, the estimate of the text).
    #[test]
    fn a_responses_stream_ending_incomplete_charges_its_reported_usage() {
        let text = "word ".repeat(200); // ~250 tokens by the estimate, 100 by the provider
        let body = format!(
            "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"{text}\"}}\n\n\
event: response.incomplete\ndata: {{\"type\":\"response.incomplete\",\"response\":{{\"status\":\"incomplete\",\
\"usage\":{{\"input_tokens\":40,\"output_tokens\":100}}}}}}\n\n"
        );
        assert_eq!(sse(&body, 7), (40, 100, Source::Reported));
    }

    /// A streamed background response keeps running when the client leaves (it resumes with
    /// `GET /v1/responses/{id}?stream=true`, neither limited nor charged): cut before its usage, it is
    /// charged at least the output reservation, not only the text streamed before the client left.
    #[test]
    fn a_cut_background_stream_is_charged_the_output_reservation() {
        let created = |background: bool| {
            format!(
                "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"id\":\"r\",\"object\":\"response\",\"status\":\"queued\",\"background\":{background},\"output\":[]}}}}\n\nevent: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"Hello there\"}}\n\n"
            )
        };
        let charge = |body: &str| {
            let mut m = Meter::new(200, Some("text/event-stream"), None, 1 << 20);
            for c in body.as_bytes().chunks(7) {
                m.on_chunk(c);
            }
            m.finish(30, 2000)
        };
        assert_eq!(charge(&created(true)), (30, 2000, Source::Estimated), "cut background stream");
        assert_eq!(charge(&created(false)), (30, 3, Source::Estimated), "a cut foreground stream: what it streamed");
        let finished = format!(
            "{}event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"status\":\"completed\",\"usage\":{{\"input_tokens\":40,\"output_tokens\":3}}}}}}\n\n",
            created(true)
        );
        assert_eq!(charge(&finished), (40, 3, Source::Reported), "a finished background stream: its usage");
    }

    /// OpenAI's Responses stream ends with `response.completed`, which carries the whole response: the
    /// client's `instructions` and `tools` echoed, the output, and the usage (reasoning tokens included,
    /// which are never streamed as text). A client that sends long instructions makes that event larger
    /// than the SSE parser's default event bound; the usage must still be charged, not the visible text.
    #[test]
    fn a_large_final_stream_event_still_charges_its_usage() {
        let completed = |instructions: &str| {
            format!(
                "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"usage\":null}}}}\n\n\
event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"12345678\"}}\n\n\
event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"instructions\":\"{instructions}\",\
\"usage\":{{\"input_tokens\":75000,\"output_tokens\":5000,\"output_tokens_details\":{{\"reasoning_tokens\":4998}}}}}}}}\n\n"
            )
        };
        // 300 KB of instructions (a 75,000-token prompt, well inside the default 1 MiB body bound).
        let body = completed(&"a".repeat(300 * 1024));
        for split in [4096, body.len()] {
            let mut m = Meter::new(200, Some("text/event-stream"), None, 1 << 20);
            for c in body.as_bytes().chunks(split) {
                m.on_chunk(c);
            }
            assert_eq!(m.finish(76_900, 300), (75_000, 5000, Source::Reported), "split {split}");
        }
        // Larger than any event the meter keeps: the event is dropped, but its `response.usage` is read as
        // it passes (before 2026-12-07: the prompt estimate and the output reservation, 600,000 + 300).
        let body = completed(&"a".repeat(2 << 20));
        for split in [4096, body.len()] {
            let mut m = Meter::new(200, Some("text/event-stream"), None, 1 << 20);
            for c in body.as_bytes().chunks(split) {
                m.on_chunk(c);
            }
            assert_eq!(m.finish(600_000, 300), (75_000, 5000, Source::Reported), "split {split}");
        }
        // Cut inside that event, before its usage: at least the output reservation, as for broken framing.
        let cut = body.get(..body.len() - 200).unwrap();
        let mut m = Meter::new(200, Some("text/event-stream"), None, 1 << 20);
        m.on_chunk(cut.as_bytes());
        let (input, output, _) = m.finish(600_000, 300);
        assert_eq!((input, output), (600_000, 300));
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
