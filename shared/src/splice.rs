//! Change a few values of a JSON body in the client's own bytes instead of re-serialising the document.
//!
//! Why: a filter that masked a prompt or added `stream_options.include_usage` used to change a parsed
//! `Value` and serialise it again, which changes more than it should: keys come out sorted (serde_json's
//! map), integers beyond 64 bits as floats (`123456789012345678901234567890` as `1.2345678901234568e+29`,
//! a different request), whitespace dropped. Splicing copies the client's bytes and replaces only the
//! edited values: one pass that skips strings with `memchr`. Speed: for a 128 KB prompt with two masked
//! values, natively 40 µs instead of 72-105 µs for the serialisation (whole pii-redactor request 340 ->
//! 275 µs); inside Envoy's V8 both take ~60 µs (walk ~31, escape and copy ~29 µs), so there it is about
//! fidelity, not time.
//!
//! The body must be one the caller has parsed (so it is valid JSON); anything the walker does not expect,
//! a pointer it cannot find or whose value is not of the edit's kind, a pointer found twice, overlapping
//! edits, or a repeated key in an object on the way to a pointer, gives `None` and the caller falls back
//! to the `Value` rewrite.

use std::borrow::Cow;

/// Deeper documents are left to the `Value` rewrite (serde_json refuses nesting beyond 128 anyway).
const MAX_DEPTH: usize = 128;

/// `body` with the JSON string at each pointer replaced by the paired text (JSON-escaped as serde_json
/// escapes it). For a pointer given twice the last text wins, as with `llm::replace_texts`. `None` when
/// the strings cannot all be located (see the module documentation).
pub fn splice_strings(body: &[u8], replacements: &[(String, String)]) -> Option<Vec<u8>> {
    let edits: Vec<(&str, Edit<'_>)> = replacements.iter().map(|(p, t)| (p.as_str(), Edit::String(t))).collect();
    splice(body, &edits)
}

/// One change to a JSON document, at a pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit<'a> {
    /// The string at the pointer becomes this text (escaped here).
    String(&'a str),
    /// The value at the pointer, of any type, becomes this JSON text (given valid by the caller).
    Value(&'a str),
    /// The object at the pointer gets the member `"key": value` (value as JSON text), first; the caller
    /// knows the key is not there yet.
    Insert { key: &'a str, value: &'a str },
}

/// `body` with `edits` applied to its bytes, everything else kept as sent. For a pointer given twice
/// the last edit wins. `None` when an edit's target cannot be located, is not of the edit's kind (a
/// `String` edit on a number, an `Insert` into an array), or two edits overlap (a value replaced and
/// also edited inside): the caller then rewrites a parsed `Value`.
pub fn splice(body: &[u8], edits: &[(&str, Edit<'_>)]) -> Option<Vec<u8>> {
    // Unique pointers, sorted (the walker finds a path's targets by prefix), each with its last edit.
    let mut targets: Vec<(&str, Edit<'_>)> = edits.iter().rev().copied().collect();
    targets.sort_by(|a, b| a.0.cmp(b.0)); // stable: for equal pointers the last given comes first
    targets.dedup_by(|later, first| later.0 == first.0);
    let mut walker =
        Walker { b: body, i: 0, targets: &targets, path: String::new(), found: vec![None; targets.len()], depth: 0 };
    if body.starts_with(b"\xef\xbb\xbf") {
        walker.i = 3;
    }
    walker.ws();
    walker.value()?;
    walker.ws();
    if walker.i != body.len() {
        return None;
    }
    // Each edit as (start, end, what replaces body[start..end]).
    let mut changes: Vec<(usize, usize, Vec<u8>)> = Vec::with_capacity(targets.len());
    for (found, (_, edit)) in walker.found.iter().zip(&targets) {
        let (start, end) = (*found)?;
        let first = *body.get(start)?;
        match *edit {
            Edit::String(text) if first == b'"' => {
                let mut out = Vec::with_capacity(text.len() + 2);
                write_json_string(&mut out, text);
                changes.push((start, end, out));
            }
            Edit::Value(json) => changes.push((start, end, json.as_bytes().to_vec())),
            Edit::Insert { key, value } if first == b'{' => {
                let mut out = Vec::with_capacity(key.len() + value.len() + 4);
                write_json_string(&mut out, key);
                out.push(b':');
                out.extend_from_slice(value.as_bytes());
                let inner = body.get(start + 1..end.saturating_sub(1))?;
                if inner.iter().any(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r')) {
                    out.push(b',');
                }
                changes.push((start + 1, start + 1, out));
            }
            _ => return None,
        }
    }
    changes.sort_unstable_by_key(|c| (c.0, c.1));
    let added: usize = changes.iter().map(|c| c.2.len()).sum();
    let mut out = Vec::with_capacity(body.len() + added);
    let mut at = 0;
    for (start, end, bytes) in changes {
        if start < at {
            return None; // overlapping edits
        }
        out.extend_from_slice(body.get(at..start)?);
        out.extend_from_slice(&bytes);
        at = end;
    }
    out.extend_from_slice(body.get(at..)?);
    Some(out)
}

struct Walker<'a> {
    b: &'a [u8],
    i: usize,
    /// Sorted unique pointers and their edits.
    targets: &'a [(&'a str, Edit<'a>)],
    /// The escaped JSON pointer of the value at `i`.
    path: String,
    /// Per target, the byte range of its value (quotes and brackets included).
    found: Vec<Option<(usize, usize)>>,
    depth: usize,
}

impl<'a> Walker<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// The target equal to the current path, if any.
    fn exact(&self) -> Option<usize> {
        self.targets.binary_search_by(|t| t.0.cmp(self.path.as_str())).ok()
    }

    /// Whether a target lies below the current path (`path` + `/...`).
    fn leads_to_target(&self) -> bool {
        let p = self.path.as_str();
        let from = self.targets.partition_point(|t| t.0 < p);
        self.targets
            .get(from..)
            .unwrap_or_default()
            .iter()
            .take_while(|t| t.0.starts_with(p))
            .any(|t| t.0.as_bytes().get(p.len()) == Some(&b'/'))
    }

    fn value(&mut self) -> Option<()> {
        let start = self.i;
        let exact = self.exact();
        match self.peek()? {
            b'"' => {
                self.skip_string()?;
            }
            b'{' if self.leads_to_target() => self.object()?,
            b'[' if self.leads_to_target() => self.array()?,
            b'{' | b'[' => self.skip_container()?,
            _ => self.skip_scalar()?,
        }
        if let Some(k) = exact {
            let slot = self.found.get_mut(k)?;
            if slot.is_some() {
                return None; // the same pointer twice: a repeated key somewhere on its path
            }
            *slot = Some((start, self.i));
        }
        Some(())
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    fn object(&mut self) -> Option<()> {
        self.enter()?;
        self.i += 1;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            self.depth -= 1;
            return Some(());
        }
        let b: &'a [u8] = self.b;
        let mut keys: Vec<Cow<'a, str>> = Vec::new();
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            let key_start = self.i;
            let key_end = self.skip_string()?;
            let literal = b.get(key_start..key_end)?;
            let raw = literal.get(1..literal.len().saturating_sub(1))?;
            let key: Cow<'a, str> = if raw.contains(&b'\\') {
                Cow::Owned(serde_json::from_slice::<String>(literal).ok()?)
            } else {
                Cow::Borrowed(std::str::from_utf8(raw).ok()?)
            };
            if keys.contains(&key) {
                return None;
            }
            self.ws();
            if self.peek()? != b':' {
                return None;
            }
            self.i += 1;
            self.ws();
            let len = self.path.len();
            push_token(&mut self.path, &key);
            keys.push(key);
            self.value()?;
            self.path.truncate(len);
            if self.member_end(b'}')? {
                return Some(());
            }
        }
    }

    /// After a member or element: past a `,` (false) or the container's `close` (true, depth restored).
    fn member_end(&mut self, close: u8) -> Option<bool> {
        self.ws();
        let c = self.peek()?;
        self.i += 1;
        if c == close {
            self.depth -= 1;
            return Some(true);
        }
        if c != b',' {
            return None;
        }
        self.ws();
        Some(false)
    }

    fn array(&mut self) -> Option<()> {
        self.enter()?;
        self.i += 1;
        self.ws();
        if self.peek()? == b']' {
            self.i += 1;
            self.depth -= 1;
            return Some(());
        }
        let mut index = 0usize;
        loop {
            let len = self.path.len();
            self.path.push('/');
            self.path.push_str(&index.to_string());
            self.value()?;
            self.path.truncate(len);
            index += 1;
            if self.member_end(b']')? {
                return Some(());
            }
        }
    }

    /// At an opening quote: move past the closing one; returns the end (exclusive).
    fn skip_string(&mut self) -> Option<usize> {
        let mut i = self.i + 1;
        loop {
            let at = i + memchr::memchr2(b'"', b'\\', self.b.get(i..)?)?;
            if self.b.get(at) == Some(&b'\\') {
                i = at + 2;
            } else {
                self.i = at + 1;
                return Some(self.i);
            }
        }
    }

    /// An object or array no target lies in: its brackets counted, its strings skipped.
    fn skip_container(&mut self) -> Option<()> {
        let mut depth = 0usize;
        loop {
            match self.peek()? {
                b'"' => {
                    self.skip_string()?;
                    continue;
                }
                b'{' | b'[' => {
                    depth += 1;
                    if self.depth + depth > MAX_DEPTH {
                        return None;
                    }
                }
                b'}' | b']' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        self.i += 1;
                        return Some(());
                    }
                }
                _ => {}
            }
            self.i += 1;
        }
    }

    /// A number, `true`, `false` or `null`: up to the next delimiter.
    fn skip_scalar(&mut self) -> Option<()> {
        let start = self.i;
        while let Some(c) = self.peek() {
            if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                break;
            }
            self.i += 1;
        }
        (self.i > start).then_some(())
    }
}

/// `s` as a JSON string literal, escaped exactly as serde_json escapes it (`\"`, `\\`, the short forms
/// `\b \f \n \r \t`, other control characters as `\u00xx`), eight bytes at a time: the text of a masked
/// 128 KB prompt is written here, and serde_json's byte-by-byte escaping took as long as the whole
/// re-serialisation this module avoids.
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte of `w` is zero: the classic SWAR test (exact for the lowest such byte, which is what is used).
    let zero_byte = |w: u64| w.wrapping_sub(ONES) & !w & HIGH;
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0; // bytes[start..i] are copied as they are
    let mut i = 0;
    while i < bytes.len() {
        if let Some(word) = bytes.get(i..i + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            let w = u64::from_le_bytes(word);
            // Bytes < 0x20 (high bit clear and below 0x20), '"' and '\\'.
            let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
            if control | zero_byte(w ^ (ONES * u64::from(b'"'))) | zero_byte(w ^ (ONES * u64::from(b'\\'))) == 0 {
                i += 8;
                continue;
            }
        }
        let Some(&c) = bytes.get(i) else { break };
        let short = match c {
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            b'\n' => Some(b'n'),
            b'\r' => Some(b'r'),
            b'\t' => Some(b't'),
            0x08 => Some(b'b'),
            0x0c => Some(b'f'),
            c if c < 0x20 => None,
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        match short {
            Some(e) => out.extend_from_slice(&[b'\\', e]),
            None => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let hex = |n: u8| HEX.get(usize::from(n & 0xf)).copied().unwrap_or(b'0');
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', hex(c >> 4), hex(c)]);
            }
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
    out.push(b'"');
}

/// Append `/token` to a JSON pointer, escaped as RFC 6901 says (`~` as `~0`, `/` as `~1`).
fn push_token(path: &mut String, token: &str) {
    path.push('/');
    if !token.contains(['~', '/']) {
        path.push_str(token);
        return;
    }
    for c in token.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;
    use crate::llm::replace_texts;
    use serde_json::{json, Value};
    use wasm_bindgen_test::wasm_bindgen_test;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect()
    }

    /// What the `Value` rewrite gives, for comparison.
    fn by_value(body: &str, r: &[(String, String)]) -> Value {
        let mut v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(replace_texts(&mut v, r), 0);
        v
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn only_the_named_strings_change_and_the_rest_keeps_its_bytes() {
        let body = r#"{ "z": 1.0e3, "model":"m", "big": 123456789012345678901234567890,
            "messages": [ {"role":"user","content":"mail jane@example.com"}, {"role":"assistant","content":"ok"} ] }"#;
        let r = pairs(&[("/messages/0/content", "mail <EMAIL_1> \"quoted\" \\ \u{1}")]);
        let out = String::from_utf8(splice_strings(body.as_bytes(), &r).unwrap()).unwrap();
        let expected = body.replace(
            r#""mail jane@example.com""#,
            &serde_json::to_string("mail <EMAIL_1> \"quoted\" \\ \u{1}").unwrap(),
        );
        assert_eq!(out, expected, "key order, number notation and whitespace are the client's");
        // The same document as the Value rewrite gives (numbers compared as serde_json reads them).
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), by_value(body, &r));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn pointers_with_escapes_unicode_keys_and_nested_arrays() {
        let body = r#"{"a/b":{"c~d":["x",["y","z"]]},"é":"v","k\u0065y":"w","n":[1,[2,{"t":"deep"}]]}"#;
        let r = pairs(&[("/a~1b/c~0d/1/0", "Y"), ("/é", "V"), ("/key", "W"), ("/n/1/1/t", "D"), ("/a~1b/c~0d/0", "X")]);
        let out = splice_strings(body.as_bytes(), &r).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), by_value(body, &r));
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            json!({"a/b":{"c~d":["X",["Y","z"]]},"é":"V","key":"W","n":[1,[2,{"t":"D"}]]})
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn strings_are_escaped_exactly_as_serde_json_escapes_them() {
        let mut cases: Vec<String> = vec![String::new(), "plain".into(), "é€😀 <EMAIL_1>".into()];
        // Every byte class at every offset of a word, and runs longer than a word.
        for special in [
            '"', '\\', '\n', '\r', '\t', '\u{8}', '\u{c}', '\u{0}', '\u{1f}', '\u{7f}', ' ', '!', '#', '[', ']',
            '\u{80}', 'é',
        ] {
            for at in 0..17 {
                let mut s: String = "abcdefghijklmnopq".chars().take(at).collect();
                s.push(special);
                s.push_str("xyz0123456789");
                cases.push(s.clone());
                cases.push(s.repeat(3));
            }
        }
        for s in cases {
            let mut out = Vec::new();
            write_json_string(&mut out, &s);
            assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap(), "{s:?}");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn values_replaced_and_members_inserted() {
        let body = br#"{"a": [1, 2], "o": { }, "p": {"x": 1}, "s": "t"}"#;
        let edits = [
            ("/a", Edit::Value("null")),
            ("/o", Edit::Insert { key: "k", value: "true" }),
            ("/p", Edit::Insert { key: "q\"", value: r#"{"n":[]}"# }),
            ("", Edit::Insert { key: "first", value: "0" }),
            ("/s", Edit::String("u")),
        ];
        let out = String::from_utf8(splice(body, &edits).unwrap()).unwrap();
        assert_eq!(out, r#"{"first":0,"a": null, "o": {"k":true }, "p": {"q\"":{"n":[]},"x": 1}, "s": "u"}"#);
        // Kinds must match, and edits must not overlap.
        assert!(splice(body, &[("/a", Edit::Insert { key: "k", value: "1" })]).is_none());
        assert!(splice(body, &[("/a", Edit::String("x"))]).is_none());
        assert!(splice(body, &[("/p", Edit::Value("1")), ("/p/x", Edit::Value("2"))]).is_none());
        assert_eq!(splice(b"{}", &[("", Edit::Insert { key: "k", value: "1" })]).unwrap(), br#"{"k":1}"#);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn stream_usage_edits_agree_with_the_value_rewrite() {
        use crate::llm::{ensure_stream_usage, stream_usage_change, Api};
        for body in [
            r#"{"model":"m","stream":true,"messages":[]}"#,
            r#" { "stream" : true , "stream_options" : "x" } "#,
            r#"{"stream":true,"stream_options":{}}"#,
            r#"{"stream":true,"stream_options":{ "other": 1 }}"#,
            r#"{"stream":true,"stream_options":{"include_usage":false,"o":2}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":"yes"}}"#,
        ] {
            let mut v: Value = serde_json::from_str(body).unwrap();
            let change = stream_usage_change(Api::OpenAiChat, &v).unwrap();
            assert!(ensure_stream_usage(Api::OpenAiChat, &mut v));
            let out = splice(body.as_bytes(), &[change.edit()]).unwrap();
            assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), v, "{body}");
        }
        let done: Value = serde_json::from_str(r#"{"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(stream_usage_change(Api::OpenAiChat, &done), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_pointer_given_twice_takes_the_last_text() {
        let body = r#"{"p":"a"}"#;
        let r = pairs(&[("/p", "first"), ("/p", "last")]);
        assert_eq!(splice_strings(body.as_bytes(), &r).unwrap(), br#"{"p":"last"}"#);
        assert_eq!(by_value(body, &r), json!({"p":"last"}));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn what_cannot_be_located_safely_is_left_to_the_value_rewrite() {
        let none = |body: &str, p: &str| splice_strings(body.as_bytes(), &pairs(&[(p, "x")]));
        assert!(none(r#"{"a":"b"}"#, "/missing").is_none());
        assert!(none(r#"{"a":1}"#, "/a").is_none(), "not a string");
        assert!(none(r#"{"a":["b"]}"#, "/a/00").is_none(), "not a canonical index");
        // A repeated key on the way: the copy a first-wins parser reads would keep the original text.
        assert!(none(r#"{"m":[{"c":"secret"}],"m":[{"c":"secret"}]}"#, "/m/0/c").is_none());
        assert!(none(r#"{"m":{"c":"s","c":"t"}}"#, "/m/c").is_none());
        assert!(none(r#"{"m":[],"m":[{"c":"secret"}]}"#, "/m/0/c").is_none());
        // Broken or trailing input.
        for body in [r#"{"a":"b"#, r#"{"a":"b"} x"#, r#"{"a" "b"}"#, r#"{"a":"b",}"#, "", r#"["a",]"#] {
            assert!(none(body, "/a").is_none(), "{body}");
        }
        let deep = format!("{}\"s\"{}", "[".repeat(200), "]".repeat(200));
        assert!(none(&deep, &"/0".repeat(200)).is_none(), "deeper than serde_json reads");
        let deep_sibling = format!(r#"{{"a":"s","b":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        assert!(none(&deep_sibling, "/a").is_none());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn byte_order_mark_root_string_and_empty_list() {
        let bom = b"\xef\xbb\xbf {\"a\":\"b\"}";
        assert_eq!(splice_strings(bom, &pairs(&[("/a", "c")])).unwrap(), b"\xef\xbb\xbf {\"a\":\"c\"}");
        assert_eq!(splice_strings(br#" "root" "#, &pairs(&[("", "new")])).unwrap(), br#" "new" "#);
        assert_eq!(splice_strings(br#"{"a":"b"}"#, &[]).unwrap(), br#"{"a":"b"}"#);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn every_extracted_text_of_many_shapes_agrees_with_the_value_rewrite() {
        use crate::llm::{extract_request_texts, Api};
        let bodies = [
            json!({"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"t1"},{"type":"image_url","image_url":{"url":"u"}},{"type":"text","text":"t\"2\\"}]},
                {"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{\"q\":\"x\"}"}}]}],
                "tools":[{"type":"function","function":{"name":"f","description":"d","parameters":{"type":"object"}}}]}),
            json!({"model":"m","system":[{"type":"text","text":"sys"}],"messages":[{"role":"user","content":"hi"}],"max_tokens":5}),
            json!({"model":"m","input":[{"role":"user","content":[{"type":"input_text","text":"r"}]}],"instructions":"i"}),
            json!({"model":"m","prompt":["a","b"]}),
        ];
        for (body, api) in
            bodies.iter().zip([Api::OpenAiChat, Api::AnthropicMessages, Api::OpenAiResponses, Api::OpenAiCompletions])
        {
            let text = serde_json::to_string_pretty(body).unwrap();
            let spans = extract_request_texts(api, body);
            assert!(!spans.is_empty());
            let r: Vec<(String, String)> = spans.iter().map(|s| (s.pointer.clone(), format!("<{}>", s.text))).collect();
            let out = splice_strings(text.as_bytes(), &r).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), by_value(&text, &r), "{text}");
        }
    }
}
