//! The request side: scan the texts the model reads and rewrite the body.
//!
//! JSON bodies of a known API are scanned through the shared extraction (`llm::extract_request_texts`)
//! and rewritten with `llm::rewrite_body_texts`: the client's bytes with only the masked strings
//! replaced (key order, numbers and whitespace as sent), so the body stays valid JSON. JSON of an unknown
//! shape has every string value scanned. Anything else (or JSON that does not parse) is scanned as raw
//! bytes when `raw_fallback` is on. JSON with a key given twice, and UTF-16/32
//! text, are not scanned at all (`Scanned::Refused`): which copy the upstream reads is up to its parser,
//! and a byte scanner cannot read UTF-16/32 (which Python servers parse as JSON).

use crate::engine::{Engine, MaskState};
use meshwarden_shared::attachments::{extract_encoded_texts, EncodedText};
use meshwarden_shared::json::{case_folded_duplicate, go_fold_key, parse_strict, JsonBodyError};
use meshwarden_shared::llm::{
    extract_request_texts, is_message_name, next_text_part, participant_name, push_string_leaves, rewrite_body_texts,
    Api, Role,
};
use meshwarden_shared::stream_rewrite::{rewrite_strings, TextRewrite};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scanned {
    /// Prompt texts of a known API.
    Json,
    /// Every string of a JSON body of unknown shape.
    JsonAllStrings,
    /// The body as raw text.
    Raw,
    /// Not scanned (raw fallback off, not JSON).
    Skipped,
    /// Not scanned, refused: JSON with an object key given twice, or UTF-16/32 text
    /// (`RequestResult::problem` says which). A scan would see one copy (or nothing) where the upstream's
    /// parser might read another.
    Refused,
}

#[derive(Debug)]
pub struct RequestResult {
    pub api: Api,
    pub scanned: Scanned,
    /// The new body, if anything was replaced (and nothing is rejected).
    pub body: Option<Vec<u8>>,
    pub state: MaskState,
    /// Why the body was refused (`Refused`: names the key or the encoding).
    pub problem: Option<JsonBodyError>,
    /// Base64 text files scanned (decoded; see `meshwarden_shared::attachments`).
    pub encoded_texts: usize,
}

struct MaskAll<'a> {
    engine: &'a Engine,
    state: &'a mut MaskState,
}

impl TextRewrite for MaskAll<'_> {
    fn ready_len(&self, pending: &str) -> usize {
        pending.len()
    }
    fn rewrite(&mut self, text: &str) -> Option<String> {
        let out = self.state.mask(self.engine, text.as_bytes())?;
        String::from_utf8(out).ok()
    }
    fn rewrite_json(&mut self, text: &str) -> Option<String> {
        let out = self.state.mask_json(self.engine, text.as_bytes())?;
        String::from_utf8(out).ok()
    }
}

struct Reserve<'a>(&'a mut MaskState);

impl TextRewrite for Reserve<'_> {
    fn ready_len(&self, pending: &str) -> usize {
        pending.len()
    }
    fn rewrite(&mut self, text: &str) -> Option<String> {
        self.0.reserve_lookalikes(text.as_bytes());
        None
    }
}

/// The masked text of every string of `v` that `rw` changes, by JSON pointer, in document order as
/// `v` holds it. Tool-call `arguments` strings are JSON text and rewritten as such (as
/// `rewrite_strings` does). For [`rewrite_body_texts`], which splices them into the client's bytes: a
/// body of unknown shape (Gemini's native `contents`) kept its key order and numbers only when nothing
/// in it was masked; re-serialised, its keys came out sorted.
fn masked_strings(v: &Value, rw: &mut dyn TextRewrite) -> Vec<(String, String)> {
    let mut leaves = Vec::new();
    push_string_leaves(&mut leaves, Role::User, &mut String::new(), v);
    leaves
        .into_iter()
        .filter_map(|leaf| {
            let json_text = leaf.pointer.rsplit('/').next() == Some("arguments");
            let masked = if json_text { rw.rewrite_json(&leaf.text) } else { rw.rewrite(&leaf.text) };
            masked.map(|m| (leaf.pointer, m))
        })
        .collect()
}

/// Mask the decoded text of each base64 text file and put it back encoded, in place of any other edit of
/// the same string (scanned whole, the base64 itself is a string too).
fn mask_encoded_texts(
    engine: &Engine,
    state: &mut MaskState,
    encoded: &[EncodedText],
    edits: &mut Vec<(String, String)>,
) {
    for e in encoded {
        // The masked bytes are re-encoded as they are: UTF-8 stays UTF-8 (placeholders are ASCII), and a
        // Latin-1 file stays Latin-1 around them.
        if let Some(masked) = state.mask(engine, e.bytes()) {
            edits.retain(|(pointer, _)| pointer != &e.pointer);
            edits.push((e.pointer.clone(), e.encode_bytes(&masked)));
        }
    }
}

/// Calls `f` with every object key of `v`, at any depth.
fn for_each_key(v: &Value, f: &mut dyn FnMut(&str)) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                f(k);
                for_each_key(x, f);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| for_each_key(x, f)),
        _ => {}
    }
}

/// `body` (JSON, its texts already masked) with every object key that holds a finding masked like a
/// value (a value used as a key, `{"jane@corp.example": {...}}` in a tool's input or result, a map keyed
/// by email, left as it was before 2026-12-06) (the same value gets the same placeholder), re-serialised. Two keys of one object that become
/// one (`redact` turns two emails into `[REDACTED]`) are kept apart with ` #2`, ` #3`, ...: merging them
/// would drop one's value. `None` when `body` does not parse or nothing changes.
fn mask_keys(engine: &Engine, state: &mut MaskState, body: &[u8]) -> Option<Vec<u8>> {
    fn walk(v: &mut Value, engine: &Engine, state: &mut MaskState) -> bool {
        match v {
            Value::Object(m) => {
                let mut changed = false;
                let old = std::mem::take(m);
                for (k, mut x) in old {
                    changed |= walk(&mut x, engine, state);
                    let key = match state.mask(engine, k.as_bytes()).and_then(|b| String::from_utf8(b).ok()) {
                        Some(masked) => {
                            changed = true;
                            masked
                        }
                        None => k,
                    };
                    let mut unique = key.clone();
                    let mut n = 2;
                    while m.contains_key(&unique) {
                        unique = format!("{key} #{n}");
                        n += 1;
                    }
                    m.insert(unique, x);
                }
                changed
            }
            Value::Array(a) => a.iter_mut().fold(false, |acc, x| walk(x, engine, state) | acc),
            _ => false,
        }
    }
    // (A UTF-8 byte order mark is skipped, as the first parse skipped it: serde_json refuses it.)
    let json = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    let mut v: Value = serde_json::from_slice(json).ok()?;
    if walk(&mut v, engine, state) {
        serde_json::to_vec(&v).ok()
    } else {
        None
    }
}

pub fn process_request(engine: &Engine, path: &str, body: &[u8], raw_fallback: bool) -> RequestResult {
    let mut state = MaskState::default();
    match parse_strict(body) {
        Err(e @ (JsonBodyError::DuplicateKey(_) | JsonBodyError::NotUtf8(_))) => RequestResult {
            api: Api::from_path(path),
            scanned: Scanned::Refused,
            body: None,
            state,
            problem: Some(e),
            encoded_texts: 0,
        },
        Ok(mut v) => {
            let api = Api::detect(path, &v);
            let spans = extract_request_texts(api, &v);
            // Only the extracted strings are scanned, and Go's `encoding/json` (Ollama, LocalAI) reads keys
            // ignoring letter case: two keys differing only in case (`content`, then `Content`: the last
            // wins) or a model-read key in another case (`Content` alone) hide text from the scan. Refused
            // like duplicate keys. (A body scanned whole has every copy scanned.)
            let ambiguous = if spans.is_empty() {
                None
            } else if let Some(key) = case_folded_duplicate(&v) {
                Some(format!("duplicate key {key:?} (another key differs from it only in letter case; Go's encoding/json reads both as one)"))
            } else {
                misspelled_model_key(&v).map(|(key, known)| {
                    format!("key {key:?} differs from {known:?} only in letter case (Go's encoding/json reads it as {known:?})")
                })
            };
            if let Some(why) = ambiguous {
                let problem = JsonBodyError::DuplicateKey(why);
                return RequestResult {
                    api,
                    scanned: Scanned::Refused,
                    body: None,
                    state,
                    problem: Some(problem),
                    encoded_texts: 0,
                };
            }
            // Nothing the API's shape names as model-read text (an unknown API, or a known path with a
            // body of another shape): scan every string rather than none.
            // Keys: a client's placeholder look-alike in one is reserved like one in a text, and a key
            // that holds a value is masked below.
            let mut sensitive_keys = false;
            for_each_key(&v, &mut |k| {
                state.reserve_lookalikes(k.as_bytes());
                // A key of at most 30 lower-case letters and `_` (`model`, `max_tokens`: nearly every key)
                // holds nothing a built-in detector finds (no digit, `@`, `-` or capital; shorter than any
                // token made of letters and `_`, such as `sk_live_…`): not scanned.
                let plain =
                    !engine.has_custom() && k.len() <= 30 && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                sensitive_keys = sensitive_keys || (!plain && !engine.find(k.as_bytes()).is_empty());
            });
            // Text files sent base64-encoded (a CSV in Gemini `inline_data`, a `data:text/plain` file part):
            // the model reads their text, the body's strings show only base64. Before 2026-12-07 they left
            // unscanned. A file that is not UTF-8 (Latin-1, Windows-1252) is scanned and rewritten as bytes
            // (every built-in shape is ASCII; before 2026-12-08 such a file was left as sent).
            let encoded: Vec<EncodedText> = extract_encoded_texts(&v);
            for e in &encoded {
                state.reserve_lookalikes(e.bytes());
            }
            if spans.is_empty() {
                let mut copy = v.clone();
                rewrite_strings(&mut copy, &mut Reserve(&mut state));
                let mut edits = masked_strings(&v, &mut MaskAll { engine, state: &mut state });
                mask_encoded_texts(engine, &mut state, &encoded, &mut edits);
                let mut masked = if edits.is_empty() { None } else { rewrite_body_texts(body, &mut v, &edits) };
                if sensitive_keys {
                    masked = mask_keys(engine, &mut state, masked.as_deref().unwrap_or(body)).or(masked);
                }
                return RequestResult {
                    api,
                    scanned: Scanned::JsonAllStrings,
                    body: masked,
                    state,
                    problem: None,
                    encoded_texts: encoded.len(),
                };
            }
            for s in &spans {
                state.reserve_lookalikes(s.text.as_bytes());
            }
            // A look-alike cut across text parts (`"<EMA"`, `"IL_1> is mine"`) is one to the model, which reads
            // the parts of a message as one text: reserved like one, so it is never handed out (nor restored).
            let mut joined: Vec<u8> = Vec::new();
            for w in spans.windows(2) {
                if let [a, b] = w {
                    if next_text_part(&a.pointer, &b.pointer) {
                        if joined.is_empty() {
                            joined.extend_from_slice(a.text.as_bytes());
                        }
                        joined.extend_from_slice(b.text.as_bytes());
                    } else if !joined.is_empty() {
                        state.reserve_lookalikes(&joined);
                        joined.clear();
                    }
                }
            }
            state.reserve_lookalikes(&joined);
            let mut replacements = Vec::new();
            let mut k = 0;
            while let Some(s) = spans.get(k) {
                // Consecutive text parts of one message are read by the model as one text: masked together,
                // so a value cut across two parts is found (before 2026-12-07 each part was scanned alone).
                let run = spans.get(k..).unwrap_or(&[]);
                let n = 1 + run
                    .windows(2)
                    .take_while(|w| matches!(w, [a, b] if next_text_part(&a.pointer, &b.pointer)))
                    .count();
                if n > 1 {
                    let group = run.get(..n).unwrap_or(&[]);
                    let parts: Vec<&[u8]> = group.iter().map(|s| s.text.as_bytes()).collect();
                    for (s, out) in group.iter().zip(state.mask_parts(engine, &parts)) {
                        if let Some(text) = out.and_then(|o| String::from_utf8(o).ok()) {
                            replacements.push((s.pointer.clone(), text));
                        }
                    }
                    k += n;
                    continue;
                }
                k += 1;
                // Tool-call `arguments` strings are JSON text: a replacement must keep them JSON.
                let json_text = s.pointer.rsplit('/').next() == Some("arguments");
                let masked = if json_text {
                    state.mask_json(engine, s.text.as_bytes())
                } else {
                    state.mask(engine, s.text.as_bytes())
                };
                if let Some(out) = masked {
                    if let Ok(text) = String::from_utf8(out) {
                        // A chat message's `name` must stay a name the provider accepts: `<EMAIL_1>` has
                        // characters OpenAI refuses there (400). Spelled `_EMAIL_1_`, not restored.
                        let text = if is_message_name(&s.pointer) { participant_name(&text) } else { text };
                        replacements.push((s.pointer.clone(), text));
                    }
                }
            }
            mask_encoded_texts(engine, &mut state, &encoded, &mut replacements);
            let original = body;
            let mut body = if replacements.is_empty() { None } else { rewrite_body_texts(body, &mut v, &replacements) };
            if sensitive_keys {
                body = mask_keys(engine, &mut state, body.as_deref().unwrap_or(original)).or(body);
            }
            RequestResult { api, scanned: Scanned::Json, body, state, problem: None, encoded_texts: encoded.len() }
        }
        Err(JsonBodyError::Syntax(_)) => {
            let api = Api::from_path(path);
            if !raw_fallback {
                return RequestResult {
                    api,
                    scanned: Scanned::Skipped,
                    body: None,
                    state,
                    problem: None,
                    encoded_texts: 0,
                };
            }
            state.reserve_lookalikes(body);
            // JSON that serde_json refuses but a lenient upstream parser reads (`NaN`, lone surrogates,
            // nesting deeper than 128, ...) still has its strings' escapes decoded by that parser:
            // `jane.doe\u0040example.com` is an email to the model. Scan the decoded text, mask the
            // original spans (escapes included).
            let body = match decode_json_escapes(body) {
                Some((decoded, map)) => {
                    state.reserve_lookalikes(&decoded);
                    state.mask_mapped(engine, &decoded, body, Some(&map))
                }
                None => state.mask(engine, body),
            };
            RequestResult { api, scanned: Scanned::Raw, body, state, problem: None, encoded_texts: 0 }
        }
    }
}

/// Keys the extraction reads texts by (top level, messages / input items, content blocks).
const MODEL_READ_KEYS: &[&str] = &[
    "system",
    "messages",
    "prompt",
    "input",
    "instructions",
    "suffix",
    "template",
    "tools",
    "functions",
    "prediction",
    "toolConfig",
    "documents",
    "variables",
    "role",
    "name",
    "content",
    "tool_calls",
    "function_call",
    "function",
    "arguments",
    "custom",
    "type",
    "text",
    "output",
    "error",
    "source",
    "data",
    "thinking",
    "reasoning_content",
    "reasoning",
    "title",
    "context",
    "toolUse",
    "toolResult",
    "json",
    "guardContent",
    "reasoningContent",
    "reasoningText",
];

/// A key, at the top level, in a `messages` / `input` / `system` item or in one of their content blocks,
/// that is not one of [`MODEL_READ_KEYS`] but equals one under Go's case folding (`"Content"`), with the
/// key it stands for. Names inside tool schemas and tool inputs are not looked at: every string there is
/// scanned whatever its key.
fn misspelled_model_key(v: &Value) -> Option<(String, &'static str)> {
    let check = |o: &Value| -> Option<(String, &'static str)> {
        o.as_object()?.keys().find_map(|k| {
            if !k.bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii()) || MODEL_READ_KEYS.contains(&k.as_str()) {
                return None;
            }
            let folded = go_fold_key(k);
            MODEL_READ_KEYS.iter().find(|m| go_fold_key(m) == folded).map(|m| (k.clone(), *m))
        })
    };
    if let Some(found) = check(v) {
        return Some(found);
    }
    let obj = v.as_object()?;
    for list in ["messages", "input", "system"].iter().filter_map(|k| obj.get(*k)).filter_map(Value::as_array) {
        for item in list {
            if let Some(found) = check(item) {
                return Some(found);
            }
            for block in item.get("content").and_then(Value::as_array).into_iter().flatten() {
                if let Some(found) = check(block) {
                    return Some(found);
                }
            }
        }
    }
    None
}

fn hex4(b: &[u8], i: usize) -> Option<u32> {
    let h = std::str::from_utf8(b.get(i..i + 4)?).ok()?;
    if !h.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(h, 16).ok()
}

/// The raw body with JSON string escapes decoded (`\uXXXX` incl. surrogate pairs, a lone surrogate as
/// U+FFFD, `\n`, `\t`, `\/`, ...), wherever they occur, and per decoded byte the `(start, end)` of the
/// bytes it came from. `None` when the body has no backslash (nothing to decode). Decoding outside
/// strings, or in a body that is not JSON at all, can only find more, never less.
#[allow(clippy::type_complexity)]
pub fn decode_json_escapes(body: &[u8]) -> Option<(Vec<u8>, Vec<(usize, usize)>)> {
    let first = memchr::memchr(b'\\', body)?;
    let mut out = Vec::with_capacity(body.len());
    let mut map = Vec::with_capacity(body.len());
    out.extend_from_slice(body.get(..first).unwrap_or(&[]));
    map.extend((0..first).map(|k| (k, k + 1)));
    let mut i = first;
    while let Some(&b) = body.get(i) {
        if b != b'\\' {
            out.push(b);
            map.push((i, i + 1));
            i += 1;
            continue;
        }
        let simple = match body.get(i + 1) {
            Some(b'"') => Some(b'"'),
            Some(b'\\') => Some(b'\\'),
            Some(b'/') => Some(b'/'),
            Some(b'b') => Some(0x08),
            Some(b'f') => Some(0x0c),
            Some(b'n') => Some(b'\n'),
            Some(b'r') => Some(b'\r'),
            Some(b't') => Some(b'\t'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            map.push((i, i + 2));
            i += 2;
            continue;
        }
        let unit = if body.get(i + 1) == Some(&b'u') { hex4(body, i + 2) } else { None };
        let Some(u) = unit else {
            // Not an escape JSON knows: the backslash as it is.
            out.push(b);
            map.push((i, i + 1));
            i += 1;
            continue;
        };
        let (ch, len) = if (0xD800..0xDC00).contains(&u) {
            let low = if body.get(i + 6..i + 8) == Some(b"\\u") { hex4(body, i + 8) } else { None };
            match low {
                Some(l) if (0xDC00..0xE000).contains(&l) => {
                    (char::from_u32(0x10000 + ((u - 0xD800) << 10) + (l - 0xDC00)).unwrap_or('\u{fffd}'), 12)
                }
                _ => ('\u{fffd}', 6),
            }
        } else {
            (char::from_u32(u).unwrap_or('\u{fffd}'), 6)
        };
        let mut buf = [0u8; 4];
        for c in ch.encode_utf8(&mut buf).bytes() {
            out.push(c);
            map.push((i, i + len));
        }
        i += len;
    }
    Some((out, map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use meshwarden_shared::config::parse_config;
    use serde_json::{json, Value};

    fn engine() -> Engine {
        Engine::new(&parse_config::<Config>(b"{}").unwrap())
    }

    #[test]
    fn openai_and_anthropic_prompts_rewritten_rest_untouched() {
        let e = engine();
        let body = json!({"model":"m","metadata":{"owner":"ops@corp.io"},"messages":[
            {"role":"system","content":"user is a@b.io"},
            {"role":"user","content":[{"type":"text","text":"my card 4111 1111 1111 1111, mail a@b.io"}]}]});
        let r = process_request(&e, "/v1/chat/completions", body.to_string().as_bytes(), true);
        assert_eq!(r.scanned, Scanned::Json);
        let out: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        assert_eq!(out["messages"][0]["content"], "user is <EMAIL_1>");
        assert_eq!(out["messages"][1]["content"][0]["text"], "my card <CREDIT_CARD_1>, mail <EMAIL_1>");
        assert_eq!(out["metadata"]["owner"], "ops@corp.io", "not a prompt text");
        let a = json!({"model":"claude","max_tokens":5,"system":"ssn 536-22-8963","messages":[{"role":"user","content":"hi"}]});
        let r = process_request(&e, "/v1/messages", a.to_string().as_bytes(), true);
        let out: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        assert_eq!(out["system"], "ssn <US_SSN_1>");
    }

    /// Text files sent base64-encoded are decoded, masked and re-encoded, the same value under the same
    /// placeholder as in the prompt's text; binary files and other strings stay as sent. Before 2026-12-07
    /// a CSV of customers in Gemini `inline_data`, or a `data:text/plain` file part, left unmasked.
    #[test]
    fn base64_text_files_are_masked_and_reencoded() {
        use meshwarden_shared::encoding::{base64_decode, base64_encode};
        let e = engine();
        let b64 = |s: &str| base64_encode(s.as_bytes());
        let text_of = |s: &str| String::from_utf8(base64_decode(s).unwrap()).unwrap();
        let csv = "name,email,card\nJane,jane.doe@example.com,4111 1111 1111 1111\n";
        // Gemini (every string of an unknown shape is scanned; the base64 one as its text).
        let gemini = json!({"contents": [{"role": "user", "parts": [
            {"text": "Summarise for jane.doe@example.com"},
            {"inline_data": {"mime_type": "text/csv", "data": b64(csv)}},
            {"inline_data": {"mime_type": "image/png", "data": "iVBORw0KGgo="}}]}]});
        let r =
            process_request(&e, "/v1beta/models/gemini-2.5-flash:generateContent", gemini.to_string().as_bytes(), true);
        assert_eq!((r.scanned, r.encoded_texts), (Scanned::JsonAllStrings, 1));
        let out: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        assert_eq!(out["contents"][0]["parts"][0]["text"], "Summarise for <EMAIL_1>");
        let file = text_of(out["contents"][0]["parts"][1]["inline_data"]["data"].as_str().unwrap());
        assert_eq!(file, "name,email,card\nJane,<EMAIL_1>,<CREDIT_CARD_1>\n");
        assert_eq!(out["contents"][0]["parts"][2]["inline_data"]["data"], "iVBORw0KGgo=", "binary: as sent");
        // OpenAI chat file part (a data: URL), Anthropic text document, Bedrock csv document.
        let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "read it"},
            {"type": "file", "file": {"filename": "notes.txt", "file_data": format!("data:text/plain;base64,{}", b64("call +1 415 555 2671"))}}]}]});
        let r = process_request(&e, "/v1/chat/completions", chat.to_string().as_bytes(), true);
        assert_eq!((r.scanned, r.encoded_texts), (Scanned::Json, 1));
        let out: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        let url = out["messages"][0]["content"][1]["file"]["file_data"].as_str().unwrap();
        let payload = url.strip_prefix("data:text/plain;base64,").unwrap();
        assert_eq!(text_of(payload), "call <PHONE_1>");
        let anthropic = json!({"model": "claude", "max_tokens": 9, "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": b64("ssn 536-22-8963")}},
            {"type": "text", "text": "ok"}]}]});
        let r = process_request(&e, "/v1/messages", anthropic.to_string().as_bytes(), true);
        let out: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        assert_eq!(text_of(out["messages"][0]["content"][0]["source"]["data"].as_str().unwrap()), "ssn <US_SSN_1>");
        let bedrock = json!({"messages": [{"role": "user", "content": [{"text": "see file"},
            {"document": {"format": "csv", "name": "c", "source": {"bytes": b64("a,jane.doe@example.com")}}}]}]});
        let r =
            process_request(&e, "/model/anthropic.claude-3-5-sonnet/converse", bedrock.to_string().as_bytes(), true);
        let out: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        assert_eq!(
            text_of(out["messages"][0]["content"][1]["document"]["source"]["bytes"].as_str().unwrap()),
            "a,<EMAIL_1>"
        );
        // A look-alike a client put in a file is reserved like one in a text: never handed out.
        let lookalike = json!({"contents": [{"parts": [
            {"inline_data": {"mime_type": "text/plain", "data": b64("<EMAIL_1> is x@y.io")}}]}]});
        let r = process_request(&e, "/v1beta/models/g:generateContent", lookalike.to_string().as_bytes(), true);
        let out: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        let file = text_of(out["contents"][0]["parts"][0]["inline_data"]["data"].as_str().unwrap());
        assert!(file.starts_with("<EMAIL_1> is <EMAIL_") && !file.ends_with("<EMAIL_1>"), "{file}");
        // A reject action refuses a file's finding too.
        let strict = Engine::new(&parse_config::<Config>(br#"{"detectors":{"us_ssn":{"action":"reject"}}}"#).unwrap());
        let r = process_request(&strict, "/v1/messages", anthropic.to_string().as_bytes(), true);
        assert_eq!(r.state.rejected, vec!["us_ssn".to_string()]);
        // A Latin-1 (Windows-1252) file is masked as bytes and stays Latin-1 around the placeholders;
        // before 2026-12-08 it was left as sent.
        let latin1 = b"Name;E-Mail\nJ\xfcrgen M\xfcller;juergen.mueller@example.de\nCaf\xe9;+49 30 901820\n";
        let body = json!({"contents": [{"parts": [{"inline_data": {"mime_type": "text/csv", "data": base64_encode(latin1)}}]}]});
        let r = process_request(&e, "/v1beta/models/g:generateContent", body.to_string().as_bytes(), true);
        assert_eq!(r.encoded_texts, 1);
        let out: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        let file = base64_decode(out["contents"][0]["parts"][0]["inline_data"]["data"].as_str().unwrap()).unwrap();
        assert_eq!(file, b"Name;E-Mail\nJ\xfcrgen M\xfcller;<EMAIL_1>\nCaf\xe9;<PHONE_1>\n");
        assert_eq!(r.state.restore.get("<EMAIL_1>").map(String::as_str), Some("juergen.mueller@example.de"));
    }

    /// Text parts of one message are one text to the model: a value cut across two is masked whole, its
    /// placeholder where it starts and the rest removed from the next part; the restore map holds the whole
    /// value. Before 2026-12-07 each part was scanned alone and both halves left unmasked.
    #[test]
    fn a_value_cut_across_content_parts_is_masked_whole() {
        let e = engine();
        let body = json!({"model":"m","messages":[{"role":"user","content":[
            {"type":"text","text":"my card is 4111 1111"},{"type":"text","text":" 1111 1111 and mail jane.doe@exa"},
            {"type":"text","text":"mple.com"},{"type":"text","text":", again 4111 1111 1111 1111"}]}]});
        let r = process_request(&e, "/v1/chat/completions", body.to_string().as_bytes(), true);
        let out: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        let parts = &out["messages"][0]["content"];
        assert_eq!(parts[0]["text"], "my card is <CREDIT_CARD_1>");
        assert_eq!(parts[1]["text"], " and mail <EMAIL_1>");
        assert_eq!(parts[2]["text"], "");
        assert_eq!(parts[3]["text"], ", again <CREDIT_CARD_1>", "same value, same placeholder");
        assert_eq!(r.state.restore["<CREDIT_CARD_1>"], "4111 1111 1111 1111");
        assert_eq!(r.state.restore["<EMAIL_1>"], "jane.doe@example.com");
        // Anthropic and Bedrock content blocks alike; parts of two messages, or around an image, stay apart.
        let a = json!({"model":"c","max_tokens":5,"messages":[{"role":"user","content":[
            {"type":"text","text":"ssn 536-22"},{"type":"text","text":"-8963."}]}]});
        let r = process_request(&e, "/v1/messages", a.to_string().as_bytes(), true);
        let out: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        assert_eq!(out["messages"][0]["content"][0]["text"], "ssn <US_SSN_1>");
        assert_eq!(out["messages"][0]["content"][1]["text"], ".");
        let b = json!({"messages":[{"role":"user","content":[{"text":"card 4111 1111"},{"text":" 1111 1111"}]}]});
        let r = process_request(&e, "/model/m/converse", b.to_string().as_bytes(), true);
        let out: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        assert_eq!(out["messages"][0]["content"][0]["text"], "card <CREDIT_CARD_1>");
        let apart = json!({"model":"m","messages":[
            {"role":"user","content":[{"type":"text","text":"card 4111 1111"}]},
            {"role":"user","content":[{"type":"text","text":" 1111 1111"},
                {"type":"image_url","image_url":{"url":"data:x"}},{"type":"text","text":"4111 1111"}]}]});
        let r = process_request(&e, "/v1/chat/completions", apart.to_string().as_bytes(), true);
        assert!(r.body.is_none(), "nothing joined across messages or an image");
    }

    /// A client's placeholder look-alike cut across text parts is one to the model: never handed out, so
    /// the answer's `<EMAIL_1>` stays the client's own text and the real email gets `<EMAIL_2>`.
    #[test]
    fn a_look_alike_cut_across_content_parts_is_never_handed_out() {
        let e = engine();
        let body = json!({"model":"m","messages":[{"role":"user","content":[
            {"type":"text","text":"see <EM"},{"type":"text","text":"AI"},{"type":"text","text":"L_1> and mail jane@example.com"}]}]});
        let r = process_request(&e, "/v1/chat/completions", body.to_string().as_bytes(), true);
        let out: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        assert_eq!(out["messages"][0]["content"][2]["text"], "L_1> and mail <EMAIL_2>");
        assert!(!r.state.restore.contains_key("<EMAIL_1>"));
    }

    /// A body of unknown shape (Gemini's native API: every string is scanned) leaves as sent but for the
    /// masked strings: key order, numbers beyond 64 bits and whitespace kept. Before, it was re-serialised
    /// from a parsed `Value` as soon as one value was masked (keys sorted, the big integer a float).
    #[test]
    fn a_body_of_unknown_shape_is_spliced_not_reserialised() {
        let e = engine();
        let body = r#"{"contents": [{"role": "user", "parts": [{"text": "mail jane.doe@example.com"}]}],
 "generationConfig": {"temperature": 0.2, "seed": 123456789012345678901234567890},
 "tools": [{"functionDeclarations": [{"name": "f", "arguments": "{\"to\": \"a@b.io\"}"}]}], "a": 1}"#;
        let r = process_request(&e, "/v1beta/models/gemini-2.5-flash:generateContent", body.as_bytes(), true);
        assert_eq!(r.scanned, Scanned::JsonAllStrings);
        let want = body
            .replace("jane.doe@example.com", "<EMAIL_1>")
            .replace(r#"{\"to\": \"a@b.io\"}"#, r#"{\"to\": \"<EMAIL_2>\"}"#);
        assert_eq!(String::from_utf8(r.body.unwrap()).unwrap(), want);
    }

    /// A value used as an object key (a tool's input or result keyed by email, a map in a body of unknown
    /// shape) is masked like the value it is, with the same placeholder; before, only string values were
    /// read and the key left as it was.
    #[test]
    fn object_keys_holding_values_are_masked() {
        let e = engine();
        let body = json!({"model":"claude","max_tokens":5,"messages":[
            {"role":"user","content":"who is jane@corp.example?"},
            {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"lookup",
                "input":{"jane@corp.example":{"card":"4111 1111 1111 1111"}}}]}]});
        let r = process_request(&e, "/v1/messages", body.to_string().as_bytes(), true);
        let out = String::from_utf8(r.body.unwrap()).unwrap();
        assert!(!out.contains("jane@corp.example") && !out.contains("4111"), "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["messages"][0]["content"], "who is <EMAIL_1>?");
        assert_eq!(v["messages"][1]["content"][0]["input"]["<EMAIL_1>"]["card"], "<CREDIT_CARD_1>");
        assert_eq!(r.state.restore.get("<EMAIL_1>").map(String::as_str), Some("jane@corp.example"));
        // Unknown shape; with `redact` two keys that become one are kept apart; plain keys untouched.
        let r = process_request(&e, "/custom", br#"{"by_mail":{"a@b.io":1,"c@d.io":2},"n":1}"#, true);
        assert_eq!(r.body.unwrap(), br#"{"by_mail":{"<EMAIL_1>":1,"<EMAIL_2>":2},"n":1}"#.to_vec());
        let redact = Engine::new(&parse_config::<Config>(br#"{"detectors":{"email":{"action":"redact"}}}"#).unwrap());
        let r = process_request(&redact, "/custom", br#"{"m":{"a@b.io":1,"c@d.io":2,"[REDACTED]":3}}"#, true);
        let v: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        assert_eq!(v["m"].as_object().unwrap().len(), 3, "{v}");
        // A client's own look-alike key is reserved: a masked value does not take its placeholder.
        let r = process_request(&e, "/custom", br#"{"<EMAIL_1>":"x","y":"a@b.io"}"#, true);
        assert_eq!(r.body.unwrap(), br#"{"<EMAIL_1>":"x","y":"<EMAIL_2>"}"#.to_vec());
        // Nothing in any key: the body is spliced as before, not re-serialised.
        let chat = br#"{"model":"m","messages":[{"role":"user","content":"a@b.io"}],"z":1,"a":2}"#;
        let r = process_request(&e, "/v1/chat/completions", chat, true);
        assert_eq!(
            r.body.unwrap(),
            br#"{"model":"m","messages":[{"role":"user","content":"<EMAIL_1>"}],"z":1,"a":2}"#.to_vec()
        );
    }

    /// A body with a UTF-8 byte order mark (the JSON parse skips it, Python's `json.loads` reads such a
    /// body): a value used as a key is masked as in any body. Before, the key pass parsed the body again
    /// with serde_json, which refuses the mark, and the key left unmasked.
    #[test]
    fn object_keys_are_masked_in_a_body_with_a_byte_order_mark() {
        let e = engine();
        for (path, body) in [
            ("/custom", r#"{"by_mail":{"jane@corp.example":{"n":1}}}"#),
            (
                "/v1/messages",
                r#"{"model":"claude","max_tokens":5,"messages":[{"role":"user","content":"who is bob@corp.example?"},
                {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"lookup","input":{"jane@corp.example":{"n":1}}}]}]}"#,
            ),
        ] {
            let with_bom = [b"\xef\xbb\xbf".as_slice(), body.as_bytes()].concat();
            let r = process_request(&e, path, &with_bom, true);
            let out = String::from_utf8(r.body.expect("masked")).unwrap();
            assert!(!out.contains("corp.example"), "{path}: {out}");
            assert!(out.contains("\"<EMAIL_"), "{path}: {out}");
        }
    }

    /// Bedrock Converse with a prompt from Prompt management (the model id is the prompt's ARN):
    /// `promptVariables` values are put into the prompt, and `messages` may follow it. Before, such a body
    /// had its messages scanned and the variables sent as they came.
    #[test]
    fn bedrock_prompt_variables_are_masked() {
        let e = engine();
        let body = json!({"promptVariables":{"customer":{"text":"jane.doe@example.com"},"card":{"text":"4111 1111 1111 1111"}},
            "messages":[{"role":"user","content":[{"text":"and mail bob@corp.example"}]}]});
        let path = "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A111122223333%3Aprompt%2FPROMPT12345%3A1/converse";
        let r = process_request(&e, path, body.to_string().as_bytes(), true);
        let out: Value = serde_json::from_slice(&r.body.expect("masked")).unwrap();
        assert_eq!(out["promptVariables"]["customer"]["text"], "<EMAIL_2>", "{out}");
        assert_eq!(out["promptVariables"]["card"]["text"], "<CREDIT_CARD_1>", "{out}");
        assert_eq!(out["messages"][0]["content"][0]["text"], "and mail <EMAIL_1>");
    }

    /// A Responses client that keeps the conversation itself (`store: false`: Codex CLI, agents) sends the
    /// previous answer's output items back as `input`. The filter restored the user's values into every
    /// string of that answer (a reasoning summary, the code of a code interpreter call and its logs, the
    /// text a computer-use model types, the command of a local shell call, a web search query); those
    /// items were not read, so on the next turn the values left the gateway as they came.
    #[test]
    fn responses_history_items_the_model_wrote_are_masked() {
        let e = engine();
        let body = json!({"model":"o4-mini","store":false,"input":[
            {"role":"user","content":"I am jane.doe@example.com"},
            {"type":"reasoning","id":"rs_1","encrypted_content":"gAAAAB","summary":[{"type":"summary_text","text":"User is jane.doe@example.com"}]},
            {"type":"code_interpreter_call","id":"ci_1","container_id":"cntr_1","status":"completed",
             "code":"send('jane.doe@example.com')","outputs":[{"type":"logs","logs":"sent to jane.doe@example.com"}]},
            {"type":"computer_call","id":"cu_1","call_id":"call_1","status":"completed","pending_safety_checks":[],
             "action":{"type":"type","text":"jane.doe@example.com"}},
            {"type":"local_shell_call","id":"ls_1","call_id":"call_2","status":"completed",
             "action":{"type":"exec","command":["git","config","user.email","jane.doe@example.com"],"env":{}}},
            {"type":"shell_call","id":"sh_1","call_id":"call_3","status":"completed",
             "action":{"commands":["echo jane.doe@example.com"]}},
            {"type":"web_search_call","id":"ws_1","status":"completed","action":{"type":"search","query":"jane.doe@example.com"}},
            {"role":"user","content":"thanks"}]});
        let r = process_request(&e, "/v1/responses", body.to_string().as_bytes(), true);
        let out = String::from_utf8(r.body.expect("masked")).unwrap();
        assert!(!out.contains("jane.doe@example.com"), "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["input"][2]["code"], "send('<EMAIL_1>')", "{out}");
        assert_eq!(v["input"][3]["action"]["text"], "<EMAIL_1>", "{out}");
        assert_eq!(v["input"][1]["id"], "rs_1");
        assert_eq!(v["input"][1]["encrypted_content"], "gAAAAB");
    }

    /// More output items a client keeping the conversation itself sends back as `input`: file search queries
    /// and the retrieved chunks (`include: ["file_search_call.results"]`), `apply_patch` operations (the
    /// diff: a file's content, a config with its secrets) and their output, the reason given with an MCP
    /// approval, the tools an MCP server listed, a `web_search_call` `find` pattern. Before 2026-12-07 they
    /// were not read, so the values in them left the gateway on the next turn.
    #[test]
    fn responses_history_file_search_patch_and_mcp_items_are_masked() {
        let e = engine();
        let body = json!({"model":"gpt-5.1","store":false,"input":[
            {"role":"user","content":"find the contract of jane.doe@example.com and fix config.py"},
            {"type":"file_search_call","id":"fs_1","status":"completed","queries":["contract jane.doe@example.com"],
             "results":[{"file_id":"file-1","filename":"c.pdf","score":0.9,"text":"Signed by jane.doe@example.com, card 4111 1111 1111 1111","attributes":{}}]},
            {"type":"apply_patch_call","id":"ap_1","call_id":"call_1","status":"completed",
             "operation":{"type":"update_file","path":"config.py","diff":"@@\n-KEY = 'x'\n+KEY = 'AKIAIOSFODNN7EXAMPLE'\n"}},
            {"type":"apply_patch_call_output","call_id":"call_1","status":"completed","output":"patched for jane.doe@example.com"},
            {"type":"mcp_list_tools","id":"ml_1","server_label":"crm","tools":[{"name":"lookup","description":"owner jane.doe@example.com","input_schema":{}}]},
            {"type":"mcp_approval_response","approval_request_id":"mcpr_1","approve":false,"reason":"not for jane.doe@example.com"},
            {"type":"web_search_call","id":"ws_1","status":"completed","action":{"type":"find","url":"https://x.example","pattern":"jane.doe@example.com"}},
            {"role":"user","content":"thanks"}]});
        let r = process_request(&e, "/v1/responses", body.to_string().as_bytes(), true);
        let out = String::from_utf8(r.body.expect("masked")).unwrap();
        assert!(!out.contains("jane.doe@example.com"), "{out}");
        assert!(!out.contains("4111") && !out.contains("AKIA"), "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["input"][1]["queries"][0], "contract <EMAIL_1>", "{out}");
        assert_eq!(v["input"][1]["results"][0]["filename"], "c.pdf");
        assert_eq!(v["input"][2]["operation"]["path"], "config.py");
        assert_eq!(v["input"][2]["operation"]["diff"], "@@\n-KEY = 'x'\n+KEY = '<AWS_KEY_1>'\n", "{out}");
        assert_eq!(v["input"][4]["tools"][0]["name"], "lookup");
        assert_eq!(v["input"][6]["action"]["url"], "https://x.example");
    }

    /// Refusals and citations the filter restored into an answer come back with the history: a chat
    /// assistant message's `refusal` (a string, or a `refusal` content part; Responses output messages
    /// alike) and an Anthropic text block's `citations[].cited_text` (quoted from the user's documents).
    /// They were not read, so the user's values left the gateway on the next turn.
    #[test]
    fn refusals_and_citations_sent_back_are_masked() {
        let e = engine();
        let chat = json!({"model":"m","messages":[
            {"role":"user","content":"records of jane.doe@example.com"},
            {"role":"assistant","content":null,"refusal":"I can't share records of jane.doe@example.com"},
            {"role":"assistant","content":[{"type":"refusal","refusal":"Not for jane.doe@example.com"}]},
            {"role":"user","content":"ok"}]});
        let responses = json!({"model":"m","input":[
            {"role":"user","content":"records of jane.doe@example.com"},
            {"type":"message","role":"assistant","id":"msg_1","status":"completed",
             "content":[{"type":"refusal","refusal":"I can't share records of jane.doe@example.com"}]}]});
        let anthropic = json!({"model":"m","max_tokens":10,"messages":[
            {"role":"user","content":[{"type":"document","source":{"type":"text","media_type":"text/plain","data":"Contact: jane.doe@example.com"},"citations":{"enabled":true}}]},
            {"role":"assistant","content":[{"type":"text","text":"The contact is",
             "citations":[{"type":"char_location","cited_text":"Contact: jane.doe@example.com","document_index":0,"start_char_index":0,"end_char_index":29}]}]},
            {"role":"user","content":"thanks"}]});
        for (path, body) in [("/v1/chat/completions", chat), ("/v1/responses", responses), ("/v1/messages", anthropic)]
        {
            let r = process_request(&e, path, body.to_string().as_bytes(), true);
            let out = String::from_utf8(r.body.expect("masked")).unwrap();
            assert!(!out.contains("jane.doe@example.com"), "{path}: {out}");
            assert!(out.contains("<EMAIL_1>"), "{path}: {out}");
        }
    }

    /// Bedrock Converse answers with citations hold the model's text in `citationsContent` blocks
    /// (`content[].text`, and `citations[].sourceContent[].text` quoting the user's documents); the
    /// filter restored the user's values into them, and a multi-turn client sends that assistant message
    /// back. Those blocks were not read, so the values left the gateway on the next turn.
    #[test]
    fn bedrock_citations_content_sent_back_is_masked() {
        let e = engine();
        let body = json!({"messages":[
            {"role":"user","content":[{"text":"Who is the contact? I am bob@corp.example"}]},
            {"role":"assistant","content":[{"citationsContent":{
                "content":[{"text":"The contact is jane.doe@example.com"}],
                "citations":[{"title":"doc","sourceContent":[{"text":"Contact: jane.doe@example.com"}],
                              "location":{"documentChar":{"documentIndex":0,"start":0,"end":29}}}]}}]},
            {"role":"user","content":[{"text":"thanks"}]}]});
        let path = "/model/anthropic.claude-sonnet-4-5/converse";
        let r = process_request(&e, path, body.to_string().as_bytes(), true);
        let out = String::from_utf8(r.body.expect("masked")).unwrap();
        assert!(!out.contains("jane.doe@example.com") && !out.contains("bob@corp.example"), "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["messages"][1]["content"][0]["citationsContent"]["content"][0]["text"],
            "The contact is <EMAIL_2>"
        );
    }

    #[test]
    fn unknown_json_raw_text_and_nothing_found() {
        let e = engine();
        let r = process_request(&e, "/custom", br#"{"doc":{"note":"call 415-555-2671"}}"#, true);
        assert_eq!(r.scanned, Scanned::JsonAllStrings);
        assert_eq!(r.body.unwrap(), br#"{"doc":{"note":"call <PHONE_1>"}}"#.to_vec());
        let r = process_request(&e, "/v1/chat/completions", b"{broken a@b.io", true);
        assert_eq!((r.scanned, r.body.unwrap()), (Scanned::Raw, b"{broken <EMAIL_1>".to_vec()));
        // (Not at the start: a body starting with FF FE is UTF-16 by its byte order mark, and refused.)
        let r = process_request(&e, "/x", b"mail \xff\xfe a@b.io \xff", true);
        assert_eq!(r.body.unwrap(), b"mail \xff\xfe <EMAIL_1> \xff".to_vec());
        let r = process_request(&e, "/x", b"text a@b.io", false);
        assert_eq!((r.scanned, r.body), (Scanned::Skipped, None));
        let r =
            process_request(&e, "/v1/chat/completions", br#"{"messages":[{"role":"user","content":"hello"}]}"#, true);
        assert!(r.body.is_none());
        // A known path with a body of another shape (nothing it names as model text): every string is
        // scanned, not none.
        let r = process_request(&e, "/v1/chat/completions", br#"{"model":"m","query":"mail a@b.io"}"#, true);
        assert_eq!(r.scanned, Scanned::JsonAllStrings);
        assert_eq!(r.body.unwrap(), br#"{"model":"m","query":"mail <EMAIL_1>"}"#.to_vec());
    }

    #[test]
    fn raw_fallback_decodes_json_escapes() {
        let e = engine();
        // serde_json refuses NaN and lone surrogates; Python's json.loads reads them and decodes the escapes.
        let body = br#"{"model":"m","temperature":NaN,"messages":[{"role":"user","content":"mail jane.doe\u0040example.com or call \u002B44 20 7946 0958, card 4111\u00201111\u00a01111\t1111 \ud800"}]}"#;
        assert!(serde_json::from_slice::<Value>(body).is_err());
        let r = process_request(&e, "/v1/chat/completions", body, true);
        assert_eq!(r.scanned, Scanned::Raw);
        let out = String::from_utf8(r.body.unwrap()).unwrap();
        assert_eq!(
            out,
            r#"{"model":"m","temperature":NaN,"messages":[{"role":"user","content":"mail <EMAIL_1> or call <PHONE_1>, card <CREDIT_CARD_1> \ud800"}]}"#
        );
        assert_eq!(r.state.restore["<EMAIL_1>"], "jane.doe@example.com");
        assert_eq!(r.state.restore["<PHONE_1>"], "+44 20 7946 0958");
        // Every escape spelled in full, a surrogate pair, an escaped placeholder look-alike (reserved).
        let body = br#"{"x":NaN,"prompt":"\u006a\u0061ne\u0040ex\u0061mple.com \ud83d\ude00 \u003cEMAIL_1\u003e"}"#;
        let r = process_request(&e, "/v1/completions", body, true);
        let out = String::from_utf8(r.body.unwrap()).unwrap();
        assert_eq!(out, r#"{"x":NaN,"prompt":"<EMAIL_2> \ud83d\ude00 \u003cEMAIL_1\u003e"}"#);
        // Nesting deeper than serde_json's limit.
        let deep = format!("{}\"a\\u0040b.io\"{}", "[".repeat(200), "]".repeat(200));
        let r = process_request(&e, "/x", deep.as_bytes(), true);
        assert_eq!(r.scanned, Scanned::Raw);
        assert!(String::from_utf8(r.body.unwrap()).unwrap().contains("\"<EMAIL_1>\""));
        // Plain text without backslashes: unchanged behaviour; a stray backslash is kept.
        let r = process_request(&e, "/x", b"path C:\\dir\\ a@b.io \\", true);
        assert_eq!(r.body.unwrap(), b"path C:\\dir\\ <EMAIL_1> \\".to_vec());
        let (d, m) = decode_json_escapes(br"a\u00e9\n\q").unwrap();
        assert_eq!(d, "a\u{e9}\n\\q".as_bytes());
        assert_eq!(m, vec![(0, 1), (1, 7), (1, 7), (7, 9), (9, 10), (10, 11)]);
    }

    #[test]
    fn duplicate_keys_are_not_scanned_or_rewritten() {
        let e = engine();
        // The scan would see "hi" (serde_json keeps the last copy); a first-wins upstream would read the card.
        let body = br#"{"model":"m","messages":[{"role":"user","content":"4111 1111 1111 1111","content":"hi"}]}"#;
        let r = process_request(&e, "/v1/chat/completions", body, true);
        assert_eq!((r.scanned, r.body), (Scanned::Refused, None));
        assert!(r.problem.unwrap().to_string().contains("duplicate key \"content\""));
        assert!(r.state.counts.is_empty());
        // UTF-16 JSON: a byte scan finds nothing in `j\0a\0n\0e\0@...`; a Python server reads it.
        let utf16: Vec<u8> = r#"{"model":"m","messages":[{"role":"user","content":"mail jane.doe@example.com"}]}"#
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        for raw_fallback in [true, false] {
            let r = process_request(&e, "/v1/chat/completions", &utf16, raw_fallback);
            assert_eq!((r.scanned, r.problem), (Scanned::Refused, Some(JsonBodyError::NotUtf8("UTF-16BE"))));
        }
    }

    /// Go's `encoding/json` (Ollama, LocalAI, Go gateways) matches object keys to fields ignoring letter
    /// case (Unicode simple folding: `ſ` is `s`, `K` is `k`) and keeps the last copy: `"Content"` after
    /// `"content"` is what a Go upstream reads, while the extraction scanned `"content"` only.
    #[test]
    fn keys_equal_but_for_letter_case_are_refused_like_duplicates() {
        let e = engine();
        for (path, body) in [
            (
                "/api/chat",
                r#"{"model":"llama3","messages":[{"role":"user","content":"hi","Content":"card 4111 1111 1111 1111"}]}"#,
            ),
            (
                "/api/generate",
                r#"{"model":"llama3","prompt":"hi","system":"be brief","ſystem":"user is jane.doe@example.com"}"#,
            ),
        ] {
            let r = process_request(&e, path, body.as_bytes(), true);
            assert_eq!((r.scanned, &r.body), (Scanned::Refused, &None), "{body}");
            let problem = r.problem.unwrap();
            assert_eq!(problem.code(), "duplicate_json_key", "{problem}");
        }
        // Different keys, camelCase beside snake_case, and the same key in different objects are fine.
        let ok = r#"{"model":"m","messages":[{"role":"user","content":"mail a@b.io"}],"toolConfig":{"a":1},"tool_config":{"A":1}}"#;
        let r = process_request(&e, "/v1/chat/completions", ok.as_bytes(), true);
        assert_eq!(r.scanned, Scanned::Json);
        assert!(String::from_utf8(r.body.unwrap()).unwrap().contains("mail <EMAIL_1>"));
    }

    /// A key spelled in another letter case than a key the extraction reads, with no copy in the right
    /// case: Python upstreams ignore it, Go's `encoding/json` reads it as that key (Ollama: the user
    /// message's content is the card), and the extraction skipped it.
    #[test]
    fn a_model_read_key_in_another_letter_case_is_refused() {
        let e = engine();
        for body in [
            r#"{"model":"llama3","messages":[{"role":"system","content":"be brief"},{"role":"user","Content":"card 4111 1111 1111 1111"}]}"#,
            r#"{"model":"llama3","messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"text","TEXT":"mail jane.doe@example.com"}]}]}"#,
            r#"{"model":"llama3","messages":[{"role":"user","content":"hi"}],"Tools":[{"description":"mail jane.doe@example.com"}]}"#,
        ] {
            let r = process_request(&e, "/api/chat", body.as_bytes(), true);
            assert_eq!((r.scanned, &r.body), (Scanned::Refused, &None), "{body}");
            assert_eq!(r.problem.unwrap().code(), "duplicate_json_key");
        }
        // Names in tool schemas and tool inputs are the user's own (every string there is scanned anyway).
        let ok = json!({"model":"m","messages":[{"role":"user","content":"mail a@b.io"},
            {"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f","input":{"Text":"c@d.io","Content":"x"}}]}],
            "max_tokens":5,"system":"s",
            "tools":[{"name":"f","input_schema":{"type":"object","properties":{"Text":{"type":"string"},"Content":{"type":"string"}}}}]});
        let r = process_request(&e, "/v1/messages", ok.to_string().as_bytes(), true);
        assert_eq!(r.scanned, Scanned::Json, "{:?}", r.problem);
        let out = String::from_utf8(r.body.unwrap()).unwrap();
        assert!(out.contains("mail <EMAIL_1>") && out.contains(r#""Text":"<EMAIL_2>""#), "{out}");
    }

    /// A chat-shaped body whose messages hold no text the extraction knows is still scanned whole: the
    /// texts read beside the extraction (documents here) do not turn that into a partial scan.
    #[test]
    fn a_body_with_only_texts_beside_the_extraction_is_still_scanned_whole() {
        let e = engine();
        let body = json!({"messages":[{"role":"user","message":"mail jane.doe@example.com"}],"documents":["from bob@corp.example"]});
        let r = process_request(&e, "/v1/chat", body.to_string().as_bytes(), true);
        assert_eq!(r.scanned, Scanned::JsonAllStrings);
        let out = String::from_utf8(r.body.unwrap()).unwrap();
        assert!(!out.contains("example.com") && !out.contains("corp.example"), "{out}");
    }

    /// Anthropic server-side code execution results sent back with the history (`code_execution`,
    /// `bash_code_execution`, `text_editor_code_execution`): the model reads their stdout, stderr and
    /// file contents.
    #[test]
    fn anthropic_code_execution_results_are_masked() {
        let e = engine();
        let body = json!({"model":"claude","max_tokens":50,"messages":[
            {"role":"user","content":"list the customers"},
            {"role":"assistant","content":[
                {"type":"server_tool_use","id":"srvtoolu_1","name":"bash_code_execution","input":{"command":"cat c.csv"}},
                {"type":"bash_code_execution_tool_result","tool_use_id":"srvtoolu_1","content":{
                    "type":"bash_code_execution_result","stdout":"jane.doe@example.com,415-555-2671\n","stderr":"","return_code":0,"content":[]}},
                {"type":"code_execution_tool_result","tool_use_id":"srvtoolu_2","content":{
                    "type":"code_execution_result","stdout":"","stderr":"KeyError: bob@corp.example","return_code":1,"content":[]}},
                {"type":"text_editor_code_execution_tool_result","tool_use_id":"srvtoolu_3","content":{
                    "type":"text_editor_code_execution_view_result","file_type":"text","content":"owner: eve@corp.example","num_lines":1}}]},
            {"role":"user","content":"thanks"}]});
        let r = process_request(&e, "/v1/messages", body.to_string().as_bytes(), true);
        let out = String::from_utf8(r.body.expect("masked")).unwrap();
        assert!(!out.contains("example.com") && !out.contains("corp.example") && !out.contains("555-2671"), "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["messages"][1]["content"][1]["content"]["stdout"], "<EMAIL_1>,<PHONE_1>\n");
        assert_eq!(v["messages"][1]["content"][1]["tool_use_id"], "srvtoolu_1", "ids untouched");
    }

    /// A chat message's `name` is put into the prompt by chat templates: scanned (before 2026-12-07 it was
    /// forwarded as sent). A masked name stays a name OpenAI accepts (`^[a-zA-Z0-9_-]+$`, at most 64):
    /// `<CREDIT_CARD_1>` is spelled `_CREDIT_CARD_1_` there; the same value in a text keeps its placeholder.
    #[test]
    fn chat_message_names_are_masked_as_valid_names() {
        let e = engine();
        let body = json!({"model":"gpt-4o","messages":[
            {"role":"user","name":"4111111111111111","content":"hi"},
            {"role":"user","name":"jane.doe@example.com","content":"I am jane.doe@example.com"},
            {"role":"assistant","name":"helper_bot","content":"ok"}]});
        let r = process_request(&e, "/v1/chat/completions", body.to_string().as_bytes(), true);
        assert_eq!(r.scanned, Scanned::Json);
        let out = String::from_utf8(r.body.expect("masked")).unwrap();
        assert!(!out.contains("4111111111111111") && !out.contains("example.com"), "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["messages"][0]["name"], "_CREDIT_CARD_1_");
        assert_eq!(v["messages"][1]["name"], "_EMAIL_1_");
        assert_eq!(v["messages"][1]["content"], "I am <EMAIL_1>");
        assert_eq!(v["messages"][2]["name"], "helper_bot", "nothing found: as sent");
        // Every other action keeps the name valid too.
        for (action, want) in [("redact", "_REDACTED_"), ("partial", "____________1111")] {
            let cfg = format!(r#"{{"default_action":"{action}"}}"#);
            let e = Engine::new(&parse_config::<Config>(cfg.as_bytes()).unwrap());
            let r = process_request(&e, "/v1/chat/completions", body.to_string().as_bytes(), true);
            let v: Value = serde_json::from_slice(&r.body.expect("masked")).unwrap();
            assert_eq!(v["messages"][0]["name"], want, "{action}");
        }
        let e = Engine::new(
            &parse_config::<Config>(br#"{"default_action":"hash","hash_salt":"0123456789abcdef"}"#).unwrap(),
        );
        let r = process_request(&e, "/v1/chat/completions", body.to_string().as_bytes(), true);
        let v: Value = serde_json::from_slice(&r.body.expect("masked")).unwrap();
        let name = v["messages"][1]["name"].as_str().unwrap();
        assert!(
            name.starts_with("_EMAIL_") && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "{name}"
        );
        // A long name with several values is cut at 64 characters.
        let many = (0..8).map(|i| format!("u{i}@corp.example")).collect::<Vec<_>>().join(" ");
        let body = json!({"messages":[{"role":"user","name":many,"content":"hi"}]});
        let r = process_request(&engine(), "/v1/chat/completions", body.to_string().as_bytes(), true);
        let v: Value = serde_json::from_slice(&r.body.expect("masked")).unwrap();
        let name = v["messages"][0]["name"].as_str().unwrap();
        assert!(name.len() == 64 && name.starts_with("_EMAIL_1___EMAIL_2_") && !name.contains("corp"), "{name}");
    }

    /// Ollama `/api/generate` renders `template` into the prompt (before 2026-12-07 it was not scanned); its
    /// Go template actions are left as they are.
    #[test]
    fn ollama_generate_template_is_masked() {
        let body = json!({"model":"llama3","prompt":"hi","raw":false,
            "template":"Support for jane.doe@example.com. {{ if .System }}{{ .System }}{{ end }} {{ .Prompt }}"});
        let r = process_request(&engine(), "/api/generate", body.to_string().as_bytes(), true);
        assert_eq!(r.scanned, Scanned::Json);
        let v: Value = serde_json::from_slice(&r.body.expect("masked")).unwrap();
        assert_eq!(v["template"], "Support for <EMAIL_1>. {{ if .System }}{{ .System }}{{ end }} {{ .Prompt }}");
        assert_eq!(v["prompt"], "hi");
    }

    /// Chat bodies with retrieval documents beside `messages` (Cohere v2 `/v2/chat`, vLLM's
    /// `/v1/chat/completions` for RAG chat templates): the model reads the documents, strings or objects.
    /// The body has `messages`, so it is read as an OpenAI chat and not scanned whole.
    #[test]
    fn chat_documents_are_masked() {
        let e = engine();
        let body = json!({"model":"command-r-plus","messages":[{"role":"user","content":"Who wrote the memo?"}],
            "documents":[{"id":"doc_1","data":{"title":"Memo","snippet":"Written by jane.doe@example.com"}},
                "plain doc from bob@corp.example"]});
        for path in ["/v2/chat", "/v1/chat/completions"] {
            let r = process_request(&e, path, body.to_string().as_bytes(), true);
            let out = String::from_utf8(r.body.expect("masked")).unwrap();
            assert!(!out.contains("example.com") && !out.contains("corp.example"), "{path}: {out}");
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["documents"][0]["data"]["snippet"], "Written by <EMAIL_1>");
            assert_eq!(v["documents"][1], "plain doc from <EMAIL_2>");
            assert_eq!(v["documents"][0]["id"], "doc_1");
        }
    }

    /// Earlier tool calls go back to the model with the history, whatever the shape of their arguments:
    /// an object in Ollama's `/api/chat`, `custom.input` for OpenAI custom tools.
    #[test]
    fn tool_call_history_with_object_arguments_or_custom_input_is_masked() {
        let e = engine();
        let body = json!({"model":"llama3.1","messages":[
            {"role":"user","content":"mail my landlord"},
            {"role":"assistant","content":"","tool_calls":[{"function":{"name":"send_mail",
                "arguments":{"to":"jane.doe@example.com","cc":["bob@corp.example"],"n":1}}}]},
            {"role":"tool","content":"sent"}]});
        let r = process_request(&e, "/api/chat", body.to_string().as_bytes(), true);
        let out: Value = serde_json::from_slice(&r.body.expect("masked")).unwrap();
        let args = &out["messages"][1]["tool_calls"][0]["function"]["arguments"];
        assert_eq!(args, &json!({"to":"<EMAIL_2>","cc":["<EMAIL_1>"],"n":1}));
        assert_eq!(r.state.restore["<EMAIL_2>"], "jane.doe@example.com");
        let body = json!({"model":"gpt-5","messages":[
            {"role":"user","content":"note it"},
            {"role":"assistant","tool_calls":[{"id":"call_1","type":"custom","custom":{"name":"notes","input":"call jane.doe@example.com"}}]},
            {"role":"tool","tool_call_id":"call_1","content":"ok"}]});
        let r = process_request(&e, "/v1/chat/completions", body.to_string().as_bytes(), true);
        let out: Value = serde_json::from_slice(&r.body.expect("masked")).unwrap();
        assert_eq!(out["messages"][1]["tool_calls"][0]["custom"]["input"], "call <EMAIL_1>");
        assert_eq!(out["messages"][1]["tool_calls"][0]["id"], "call_1", "ids untouched");
    }

    /// `partial` inside JSON text (tool-call `arguments`, a raw-fallback body): the value's JSON escapes
    /// are characters, not letters. Before, `\n` in a private key came out `\*` (its `n` starred), an
    /// invalid escape: the arguments (or the body) were no longer JSON.
    #[test]
    fn partial_inside_json_text_keeps_it_json() {
        let e = Engine::new(&parse_config::<Config>(br#"{"default_action":"partial"}"#).unwrap());
        let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n-----END RSA PRIVATE KEY-----";
        let args = json!({"path":"id_rsa","content":key}).to_string();
        let body = json!({"model":"gpt-4o","messages":[
            {"role":"user","content":"save it"},
            {"role":"assistant","tool_calls":[{"id":"call_1","type":"function","function":{"name":"write","arguments":args}}]},
            {"role":"tool","tool_call_id":"call_1","content":"ok"}]});
        let r = process_request(&e, "/v1/chat/completions", body.to_string().as_bytes(), true);
        let out: Value = serde_json::from_slice(&r.body.expect("masked")).unwrap();
        let a = out["messages"][1]["tool_calls"][0]["function"]["arguments"].as_str().unwrap();
        let a: Value = serde_json::from_str(a).unwrap_or_else(|err| panic!("{err}: {a}"));
        let content = a["content"].as_str().unwrap();
        assert!(!content.contains("MIIEow") && content.contains('\n'), "{content}");
        // A raw-fallback body (JSON a lenient parser reads: NaN) with the key in a string.
        let raw = format!("{{\"model\":\"m\",\"t\":NaN,\"prompt\":{}}}", serde_json::to_string(key).unwrap());
        let r = process_request(&e, "/v1/completions", raw.as_bytes(), true);
        let out = String::from_utf8(r.body.expect("masked")).unwrap();
        let fixed: Value = serde_json::from_str(&out.replace("NaN", "0")).unwrap_or_else(|err| panic!("{err}: {out}"));
        let prompt = fixed["prompt"].as_str().unwrap();
        assert!(!prompt.contains("MIIEow") && prompt.contains('\n'), "{prompt}");
    }
}
