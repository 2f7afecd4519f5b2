//! Usage from a JSON answer read chunk by chunk, without holding or parsing the whole body.
//!
//! Providers put usage in a top-level field of the answer: `usage` (OpenAI, Anthropic, Responses,
//! Bedrock Converse), `usageMetadata` (Gemini), `metadata.usage` (Bedrock stream events). Gemini's
//! `streamGenerateContent` without `alt=sse` answers a JSON *array* of such objects (usage cumulative,
//! in the last ones). [`UsageScanner`] follows the JSON structure byte by byte (strings, escapes,
//! nesting), copies only the value of such a field when it sits in the top-level object or in an
//! object directly inside a top-level array, and hands the copies to [`usage_from_json`] at the end.
//!
//! Why not buffer and parse: an answer can be larger than any buffer a filter should hold (an OpenAI
//! answer with `logprobs` is about 1 KB of JSON per token), and OpenAI puts `usage` last. A filter
//! that gave up at its buffer limit charged no output at all for exactly the answers that cost the
//! most. Text the model wrote cannot fake a field: inside a JSON string every `"` is escaped, and a
//! model-written JSON object (an Anthropic `tool_use` input) sits deeper than the top level.

use crate::llm::{usage_from_json, Usage};
use serde_json::Value;

/// Largest usage value copied (a real one is a few hundred bytes).
const MAX_CAPTURE: usize = 16 * 1024;
/// Longest key remembered while reading it (longer keys are not ones we look for).
const MAX_KEY: usize = 16;
/// The top-level fields that carry usage (see [`usage_from_json`]).
const CARRIERS: [&str; 3] = ["usage", "usageMetadata", "metadata"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    Unknown,
    Object,
    Array,
    /// Not an object or array: nothing to find.
    Other,
}

/// Incremental scanner; feed every chunk in order, then call [`UsageScanner::finish`].
#[derive(Debug, Clone)]
pub struct UsageScanner {
    root: Root,
    /// Nesting depth: 1 inside the top-level container.
    depth: u32,
    in_string: bool,
    escape: bool,
    /// The current string is an object key at the depth where carriers sit.
    key_string: bool,
    /// An object at the carrier depth is open and the next string is a key.
    expect_key: bool,
    key: Vec<u8>,
    key_too_long: bool,
    /// After a carrier key: waiting for `:` and then the value's first byte.
    pending: Option<usize>,
    colon_seen: bool,
    /// Copying a carrier value: (carrier index, depth to return to, bytes).
    capture: Option<(usize, u32, Vec<u8>)>,
    /// The last complete value of each carrier.
    found: [Option<Vec<u8>>; 3],
    /// Bytes seen, for the caller's statistics.
    bytes: u64,
    /// Bytes inside string values (not keys): the text of an answer whose usage never comes.
    string_bytes: u64,
    /// The current string is a value (not an object key).
    value_string: bool,
    /// The last of `{ [ , : } ]` seen outside strings.
    last_structural: u8,
    /// Bit `d` set: the container at depth `d` is an object (depths above 127 count as arrays).
    objects: u128,
    /// Opt-in ([`UsageScanner::with_response_usage`]): also read `usage` inside a top-level `response`
    /// object (OpenAI Responses stream events).
    response_usage: bool,
    /// After the key `response` in the root object: waiting for `:` and `{`.
    pending_response: bool,
    /// Inside the root object's `response` object (depth 2), whose `usage` key is a carrier.
    in_response: bool,
}

impl Default for UsageScanner {
    fn default() -> Self {
        Self {
            root: Root::Unknown,
            depth: 0,
            in_string: false,
            escape: false,
            key_string: false,
            expect_key: false,
            key: Vec::new(),
            key_too_long: false,
            pending: None,
            colon_seen: false,
            capture: None,
            found: [None, None, None],
            bytes: 0,
            string_bytes: 0,
            value_string: false,
            last_structural: 0,
            objects: 0,
            response_usage: false,
            pending_response: false,
            in_response: false,
        }
    }
}

impl UsageScanner {
    /// A scanner that also reads `usage` one level down, in a top-level `response` object: the final events
    /// of an OpenAI Responses stream (`{"type": "response.completed", "response": {..., "usage": {...}}}`).
    /// Only `usage` there (not `metadata`, which the client writes). For events too large to parse.
    pub fn with_response_usage() -> Self {
        Self { response_usage: true, ..Self::default() }
    }

    /// Keys are read here: the carrier depth, or inside the top-level `response` object.
    fn key_depth(&self) -> bool {
        self.depth == self.carrier_depth() || (self.in_response && self.depth == 2)
    }

    /// Depth of the objects whose keys can be carriers: the root object (1) or an object directly
    /// inside a root array (2).
    fn carrier_depth(&self) -> u32 {
        match self.root {
            Root::Array => 2,
            _ => 1,
        }
    }

    /// Feed the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.bytes = self.bytes.saturating_add(chunk.len() as u64);
        if self.root == Root::Other {
            return;
        }
        let mut i = 0;
        while i < chunk.len() {
            let Some(&b) = chunk.get(i) else { break };
            if let Some((_, _, buf)) = self.capture.as_mut() {
                if buf.len() < MAX_CAPTURE + 1 {
                    buf.push(b);
                }
            }
            if self.in_string {
                if self.value_string && (self.escape || b != b'"') {
                    self.string_bytes += 1;
                }
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                    // A key spelled with an escape (`"us\u0061ge"`, `"usa\nge"`) is not matched byte by
                    // byte: it never counts as a carrier (the whole-body parse, when there is one, reads it).
                    if self.key_string {
                        self.key_too_long = true;
                    }
                } else if b == b'"' {
                    self.in_string = false;
                    if self.key_string {
                        self.key_string = false;
                        self.pending = if self.key_too_long {
                            None
                        } else if self.in_response && self.depth == 2 {
                            (self.key.as_slice() == b"usage").then_some(0)
                        } else {
                            CARRIERS.iter().position(|c| c.as_bytes() == self.key.as_slice())
                        };
                        self.pending_response = self.response_usage
                            && !self.key_too_long
                            && self.root == Root::Object
                            && self.depth == 1
                            && self.key.as_slice() == b"response";
                        self.colon_seen = false;
                    }
                } else if self.key_string {
                    if self.key.len() < MAX_KEY {
                        self.key.push(b);
                    } else {
                        self.key_too_long = true;
                    }
                } else if self.capture.is_none() {
                    // Skip ahead to the next byte that can end or escape the string.
                    let rest = chunk.get(i + 1..).unwrap_or_default();
                    match memchr::memchr2(b'"', b'\\', rest) {
                        Some(p) => {
                            if self.value_string {
                                self.string_bytes += p as u64;
                            }
                            i += p + 1;
                            continue;
                        }
                        None => {
                            if self.value_string {
                                self.string_bytes += rest.len() as u64;
                            }
                            break;
                        }
                    }
                }
                i += 1;
                continue;
            }
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b'"' => {
                    self.in_string = true;
                    // A key opens an object or follows a `,` in one; anything else is a value.
                    self.value_string = !(self.container_is_object() && matches!(self.last_structural, b'{' | b','));
                    self.pending = None;
                    self.pending_response = false;
                    if self.expect_key && self.capture.is_none() {
                        self.expect_key = false;
                        self.key_string = true;
                        self.key.clear();
                        self.key_too_long = false;
                    }
                }
                b':' => {
                    self.last_structural = b':';
                    if self.pending.is_some() || self.pending_response {
                        self.colon_seen = true;
                    }
                }
                b'{' | b'[' => {
                    if self.root == Root::Unknown {
                        self.root = if b == b'{' { Root::Object } else { Root::Array };
                    }
                    if let (Some(idx), true, true) = (self.pending, self.colon_seen, b == b'{') {
                        self.capture = Some((idx, self.depth, vec![b'{']));
                    }
                    let opens_response = self.pending_response && self.colon_seen && b == b'{';
                    self.pending = None;
                    self.pending_response = false;
                    self.depth = self.depth.saturating_add(1);
                    if opens_response {
                        self.in_response = true;
                    }
                    self.last_structural = b;
                    if let Some(bit) = 1u128.checked_shl(self.depth) {
                        self.objects = if b == b'{' { self.objects | bit } else { self.objects & !bit };
                    }
                    self.expect_key = b == b'{' && self.key_depth() && self.capture.is_none();
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth < 2 {
                        self.in_response = false;
                    }
                    self.last_structural = b;
                    self.pending = None;
                    self.pending_response = false;
                    self.expect_key = false;
                    if let Some((idx, d, buf)) = self.capture.take() {
                        if self.depth == d {
                            if buf.len() <= MAX_CAPTURE {
                                if let Some(slot) = self.found.get_mut(idx) {
                                    *slot = Some(buf);
                                }
                            }
                        } else {
                            self.capture = Some((idx, d, buf));
                        }
                    }
                }
                b',' => {
                    self.last_structural = b',';
                    self.pending = None;
                    self.pending_response = false;
                    // Back in an object at the carrier depth (or in `response`): a key follows.
                    self.expect_key = self.capture.is_none()
                        && ((self.depth == self.carrier_depth() && self.in_object())
                            || (self.in_response && self.depth == 2));
                }
                _ => {
                    if self.root == Root::Unknown {
                        self.root = Root::Other;
                        return;
                    }
                    self.pending = None;
                    self.pending_response = false;
                }
            }
            i += 1;
        }
    }

    /// Whether the innermost open container is an object.
    fn container_is_object(&self) -> bool {
        1u128.checked_shl(self.depth).is_some_and(|bit| self.objects & bit != 0)
    }

    /// Whether the innermost open container at the carrier depth is an object. The scanner keeps no
    /// stack: at depth 1 it is the root; at depth 2 under a root array it is an element, which is an
    /// object when a key was expected right after its `{` (tracked by `expect_key`), so a `,` there
    /// is taken as a key separator only for root objects and array elements that are objects.
    fn in_object(&self) -> bool {
        match (self.root, self.depth) {
            (Root::Object, 1) => true,
            // Inside a root array, depth 2 is an element; elements of Gemini's array are objects, and
            // a `,` inside a nested array element at depth 2 would be `[[...]]`, whose strings are
            // then read as keys: harmless, since a carrier value must also be an object after `:`.
            (Root::Array, 2) => true,
            _ => false,
        }
    }

    /// Bytes fed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes inside string values so far (escapes counted as written), for an estimate of the text
    /// of an answer that never reports usage. Counts every string value, so an answer with
    /// `logprobs` counts its tokens' strings too: an estimate from above.
    pub fn string_bytes(&self) -> u64 {
        self.string_bytes
    }

    /// The usage the answer reported, if a carrier field held a readable one.
    pub fn finish(&self) -> Option<Usage> {
        let mut m = serde_json::Map::new();
        for (name, v) in CARRIERS.iter().zip(&self.found) {
            if let Some(v) = v.as_deref().and_then(|b| serde_json::from_slice::<Value>(b).ok()) {
                m.insert((*name).to_string(), v);
            }
        }
        if m.is_empty() {
            return None;
        }
        usage_from_json(&Value::Object(m))
    }
}

/// Usage of a whole JSON answer held in memory (same rules as feeding it to a [`UsageScanner`]).
pub fn usage_in_json_answer(body: &[u8]) -> Option<Usage> {
    let mut s = UsageScanner::default();
    s.feed(body);
    s.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use serde_json::json;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn every_split(body: &str) -> Vec<Option<(u64, u64)>> {
        let b = body.as_bytes();
        let mut out = Vec::new();
        for cut in 0..=b.len() {
            let mut s = UsageScanner::default();
            s.feed(&b[..cut]);
            s.feed(&b[cut..]);
            out.push(s.finish().map(|u| (u.input_tokens, u.output_tokens)));
        }
        // One byte at a time as well.
        let mut s = UsageScanner::default();
        for c in b.chunks(1) {
            s.feed(c);
        }
        out.push(s.finish().map(|u| (u.input_tokens, u.output_tokens)));
        out
    }

    /// Opt-in: `usage` inside a top-level `response` object (a Responses stream's final event), at every
    /// split; not `metadata` there, not deeper, and not without the option.
    #[wasm_bindgen_test(unsupported = test)]
    fn reads_usage_inside_response_when_asked() {
        let ev = json!({"type": "response.completed", "sequence_number": 9, "response": {"id": "r",
            "metadata": {"usage": "{\"input_tokens\": 1}"}, "output": [{"type": "image_generation_call",
            "result": "QUJD".repeat(50), "usage": {"input_tokens": 1, "output_tokens": 1}}],
            "usage": {"input_tokens": 40, "output_tokens": 1600, "total_tokens": 1640}}})
        .to_string();
        let b = ev.as_bytes();
        for cut in 0..=b.len() {
            let mut s = UsageScanner::with_response_usage();
            s.feed(&b[..cut]);
            s.feed(&b[cut..]);
            assert_eq!(s.finish().map(|u| (u.input_tokens, u.output_tokens)), Some((40, 1600)), "cut {cut}");
        }
        assert_eq!(every_split(&ev).into_iter().flatten().count(), 0, "top level only by default");
        let fake = json!({"type": "x", "response": {"output": [{"usage": {"input_tokens": 1, "output_tokens": 1}}]}});
        let mut s = UsageScanner::with_response_usage();
        s.feed(fake.to_string().as_bytes());
        assert_eq!(s.finish(), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn reads_usage_of_every_provider_shape_at_any_split() {
        let cases = [
            (
                json!({"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}),
                (5, 7),
            ),
            (
                json!({"type":"message","content":[{"type":"text","text":"a"}],"usage":{"input_tokens":3,"output_tokens":4}}),
                (3, 4),
            ),
            (json!({"candidates":[],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":3}}), (8, 3)),
            (json!({"output":{},"usage":{"inputTokens":2,"outputTokens":9,"totalTokens":11}}), (2, 9)),
            (json!({"metadata":{"usage":{"inputTokens":6,"outputTokens":1}}}), (6, 1)),
        ];
        for (v, want) in cases {
            let text = serde_json::to_string_pretty(&v).unwrap();
            for got in every_split(&text) {
                assert_eq!(got, Some(want), "{text}");
            }
            // Agrees with parsing the whole document.
            assert_eq!(usage_from_json(&v).map(|u| (u.input_tokens, u.output_tokens)), Some(want));
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn gemini_json_array_answer_uses_the_last_usage() {
        let body = r#"[{"candidates":[{"content":{"parts":[{"text":"a, \"usage\":{"}]}}],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":1}},
{"candidates":[],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":40}}]"#;
        for got in every_split(body) {
            assert_eq!(got, Some((8, 40)));
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn text_and_nested_objects_cannot_pose_as_usage() {
        // Model-written text with quotes and backslashes, and a model-written object (tool input)
        // with a `usage` key, before and after the real one.
        let body = json!({
            "content":[{"type":"tool_use","input":{"usage":{"input_tokens":1,"output_tokens":1}}},
                        {"type":"text","text":"\\\",\"usage\":{\"output_tokens\":1}} \\\\\" \"usage\":{"}],
            "usage":{"input_tokens":100,"output_tokens":900},
            "stop_sequence":"\"usage\":{\"output_tokens\":2}"
        });
        let text = body.to_string();
        for got in every_split(&text) {
            assert_eq!(got, Some((100, 900)), "{text}");
        }
        // No real usage at all: nothing found, whatever the text says.
        let fake = json!({"content":[{"text":"\"usage\":{\"output_tokens\":1}"}],"choices":[{"usage":{"completion_tokens":1}}]});
        assert_eq!(usage_in_json_answer(fake.to_string().as_bytes()), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn usage_after_a_large_body_is_found_with_bounded_memory() {
        let big = "x".repeat(3 << 20);
        let body = format!(
            r#"{{"choices":[{{"message":{{"content":"{big}"}},"logprobs":null}}],"usage":{{"prompt_tokens":9,"completion_tokens":700000}}}}"#
        );
        let mut s = UsageScanner::default();
        for c in body.as_bytes().chunks(16 * 1024) {
            s.feed(c);
        }
        assert_eq!(s.finish().map(|u| u.output_tokens), Some(700000));
        assert_eq!(s.bytes(), body.len() as u64);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn escaped_keys_are_never_carriers_and_string_bytes_count_values_only() {
        for body in [
            r#"{"usa\nge":{"prompt_tokens":1,"completion_tokens":1}}"#,
            r#"{"\"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
            r#"{"us\u0061ge":{"prompt_tokens":5,"completion_tokens":900}}"#,
        ] {
            assert_eq!(usage_in_json_answer(body.as_bytes()), None, "{body}");
        }
        // After a false key, the real usage is still the one read.
        let body = r#"{"usage":{"prompt_tokens":5,"completion_tokens":900},"usa\nge":{"prompt_tokens":1}}"#;
        assert_eq!(usage_in_json_answer(body.as_bytes()).map(|u| u.output_tokens), Some(900));
        for split in 1..40 {
            let body = br#"{"choices":[{"message":{"content":"0123456789","role":"x"}}],"n":[1,2]}"#;
            let mut s = UsageScanner::default();
            for c in body.chunks(split) {
                s.feed(c);
            }
            assert_eq!(s.string_bytes(), 11, "split {split}: content and role values, no keys");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn malformed_or_unfinished_input_finds_nothing_and_does_not_panic() {
        for body in [
            "",
            "null",
            "42",
            "\"usage\"",
            "{\"usage\":",
            "{\"usage\":{\"prompt_tokens\":5,\"completion_tokens\"",
            "{\"usage\":[1,2]}",
            "{\"usage\":null}",
            "}}}]]]{\"usage\":{",
            "{\"usage\"{\"prompt_tokens\":1}}",
        ] {
            assert_eq!(usage_in_json_answer(body.as_bytes()), None, "{body}");
        }
        // A usage value too large to be real is not copied past the bound.
        let huge = format!("{{\"usage\":{{\"prompt_tokens\":1,\"pad\":\"{}\"}}}}", "y".repeat(MAX_CAPTURE));
        assert_eq!(usage_in_json_answer(huge.as_bytes()), None);
    }
}
