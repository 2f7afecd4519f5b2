//! Request bodies as JSON, strictly: serde_json's `Value`, except that an object holding the same key
//! twice is an error.
//!
//! Why: RFC 8259 leaves duplicate keys to the parser, and parsers disagree. serde_json (like Python,
//! Go and JavaScript) keeps the last value; simdjson's on-demand API, several C and C++ parsers and
//! hand-written scanners take the first. A filter that decides on one copy and forwards the body
//! unchanged lets a client hide a second copy from it: `{"model":"cheap","model":"expensive"}` past a
//! per-model budget, `"content"` twice past the PII scanner or the injection guard,
//! `{"name":"search","name":"delete_all"}` past a tool policy. No SDK produces duplicate keys, so every
//! filter that reads a request body answers them with a 400 naming the key instead of guessing which
//! copy the upstream will read (docs/reliability.md).
//!
//! The same holds for the text encoding. RFC 8259 requires UTF-8, but Python's `json.loads` (FastAPI,
//! vLLM and most Python model servers) also reads UTF-16 and UTF-32 bodies, with or without a byte order
//! mark: a filter that reads only UTF-8 would see no JSON (no model, no prompt, no tool name) where the
//! upstream sees a request, and a byte scanner sees no `jane@example.com` in `j\0a\0n\0e\0@\0...`. Such
//! bodies are refused as well (`NotUtf8`, found by the same first-bytes test Python uses). A UTF-8 byte
//! order mark is skipped, as RFC 8259 allows and Python does.
//!
//! The parse is serde_json's own (same recursion limit, same numbers, same errors for broken JSON) with
//! a visitor that builds the same `Value` and checks each key once as it inserts it: no second pass.

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Number, Value};
use std::fmt;

/// Why a body is not acceptable JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonBodyError {
    /// Not JSON at all (or truncated, or trailing bytes): serde_json's message.
    Syntax(String),
    /// Valid JSON with an object key given twice: `duplicate key "model" at line 1 column 33`.
    DuplicateKey(String),
    /// Text in UTF-16 or UTF-32 (the encoding's name), which Python's `json.loads` would read.
    NotUtf8(&'static str),
}

impl JsonBodyError {
    /// The error code filters answer with (`invalid_json`, `duplicate_json_key`).
    pub fn code(&self) -> &'static str {
        match self {
            JsonBodyError::Syntax(_) => "invalid_json",
            JsonBodyError::DuplicateKey(_) => "duplicate_json_key",
            JsonBodyError::NotUtf8(_) => "json_not_utf8",
        }
    }
}

impl fmt::Display for JsonBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonBodyError::Syntax(m) => write!(f, "the body is not valid JSON: {m}"),
            JsonBodyError::DuplicateKey(m) => write!(f, "the body's JSON is ambiguous: {m}"),
            JsonBodyError::NotUtf8(enc) => write!(f, "the body is {enc} text; JSON must be UTF-8 (RFC 8259)"),
        }
    }
}

/// `body` as a `Value`, refusing duplicate object keys at any depth and UTF-16/32 text.
pub fn parse_strict(body: &[u8]) -> Result<Value, JsonBodyError> {
    let body = match text_encoding(body) {
        Encoding::Utf8 => body,
        Encoding::Utf8Bom => body.get(3..).unwrap_or_default(),
        Encoding::Other(name) => return Err(JsonBodyError::NotUtf8(name)),
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = StrictValue.deserialize(&mut de).map_err(classify)?;
    de.end().map_err(classify)?;
    Ok(value)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Utf8,
    Utf8Bom,
    Other(&'static str),
}

/// The encoding Python's `json.detect_encoding` would pick: byte order marks, else the NUL pattern of
/// the first bytes (JSON text starts with ASCII, so UTF-16/32 put NULs beside it; RFC 4627 section 3).
fn text_encoding(b: &[u8]) -> Encoding {
    if b.starts_with(&[0, 0, 0xfe, 0xff]) || b.starts_with(&[0xff, 0xfe, 0, 0]) {
        return Encoding::Other("UTF-32");
    }
    if b.starts_with(&[0xfe, 0xff]) || b.starts_with(&[0xff, 0xfe]) {
        return Encoding::Other("UTF-16");
    }
    if b.starts_with(&[0xef, 0xbb, 0xbf]) {
        return Encoding::Utf8Bom;
    }
    match *b {
        [0, b1, _, _, ..] => Encoding::Other(if b1 != 0 { "UTF-16BE" } else { "UTF-32BE" }),
        [_, 0, b2, b3, ..] => Encoding::Other(if b2 != 0 || b3 != 0 { "UTF-16LE" } else { "UTF-32LE" }),
        [0, _] => Encoding::Other("UTF-16BE"),
        [_, 0] => Encoding::Other("UTF-16LE"),
        _ => Encoding::Utf8,
    }
}

/// The visitor raises data errors only for duplicate keys; everything else serde_json reports is syntax.
fn classify(e: serde_json::Error) -> JsonBodyError {
    if e.is_data() {
        JsonBodyError::DuplicateKey(e.to_string())
    } else {
        JsonBodyError::Syntax(e.to_string())
    }
}

/// Builds a `Value` exactly as serde_json's own visitor does, with the duplicate-key check.
#[derive(Clone, Copy)]
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(Number::from_f64(n).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(v) = seq.next_element_seed(StrictValue)? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            // The value first, so that broken JSON after a repeated key is reported as broken JSON.
            let value = map.next_value_seed(StrictValue)?;
            match obj.entry(key) {
                Entry::Occupied(e) => return Err(A::Error::custom(format_args!("duplicate key {:?}", e.key()))),
                Entry::Vacant(e) => {
                    e.insert(value);
                }
            }
        }
        Ok(Value::Object(obj))
    }
}

/// `Value::pointer` (RFC 6901) without its allocations: serde_json un-escapes every token into a new
/// `String` (two per token), which made the dozen constant paths a request is read by (`/max_tokens`,
/// `/generationConfig/maxOutputTokens`, ...) cost ~2 µs of allocator work per request inside the VM.
/// Same answers as `Value::pointer` for every input; a pointer with an escape (`~0`, `~1`) goes to it.
pub fn pointer<'a>(value: &'a Value, pointer: &str) -> Option<&'a Value> {
    if pointer.contains('~') {
        return value.pointer(pointer);
    }
    if pointer.is_empty() {
        return Some(value);
    }
    pointer.strip_prefix('/')?.split('/').try_fold(value, |target, token| match target {
        Value::Object(map) => map.get(token),
        Value::Array(list) => array_index(token).and_then(|i| list.get(i)),
        _ => None,
    })
}

/// `Value::pointer_mut` without its allocations; see [`pointer`].
pub fn pointer_mut<'a>(value: &'a mut Value, pointer: &str) -> Option<&'a mut Value> {
    if pointer.contains('~') {
        return value.pointer_mut(pointer);
    }
    if pointer.is_empty() {
        return Some(value);
    }
    pointer.strip_prefix('/')?.split('/').try_fold(value, |target, token| match target {
        Value::Object(map) => map.get_mut(token),
        Value::Array(list) => array_index(token).and_then(move |i| list.get_mut(i)),
        _ => None,
    })
}

/// An RFC 6901 array index, as serde_json reads it: decimal digits, no sign, no leading zero.
fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
        return None;
    }
    token.parse().ok()
}

/// One character as Go's `encoding/json` folds object keys before matching them to struct fields
/// (`unicode.ToUpper(unicode.ToLower(r))`, simple mappings): ASCII letters to upper case, `ſ` (U+017F) to
/// `S`, the Kelvin sign to `K`, `ı` and `İ` to `I`. Where Rust's full mapping has several characters
/// (`ß` → `SS`) Go's simple one keeps the character; `İ` lowers to `i` then a combining dot, of which
/// Go's simple mapping keeps the `i`.
pub fn go_fold_char(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_uppercase();
    }
    let lower = c.to_lowercase().next().unwrap_or(c);
    let mut upper = lower.to_uppercase();
    match (upper.next(), upper.next()) {
        (Some(u), None) => u,
        _ => lower,
    }
}

/// Whether two object keys are one key to Go's `encoding/json`, which matches keys to struct fields
/// ignoring case and keeps the last match: Go servers (MCP and A2A servers built on it, Ollama, LocalAI,
/// Go gateways) read `{"name":"search","Name":"delete_all"}` as `delete_all`, so a filter that reads one
/// spelling must refuse such bodies as it refuses a key given twice.
pub fn go_fold_eq(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(b);
    }
    a.chars().map(go_fold_char).eq(b.chars().map(go_fold_char))
}

/// A key as [`go_fold_eq`] compares it: two keys are one key to Go exactly when their folds are equal.
pub fn go_fold_key(k: &str) -> String {
    k.chars().map(go_fold_char).collect()
}

/// A key of `map` that another key of the same object equals under Go's case folding (ASCII letters and
/// Unicode simple folding: `Content` is `content`, `ſystem` is `system`): Go's `encoding/json` (Ollama,
/// LocalAI, Go gateways) matches keys to fields that way and keeps the last copy, so such an object is
/// as ambiguous as one with a key given twice. This object only, not the ones inside it.
pub fn case_folded_duplicate_key(map: &serde_json::Map<String, Value>) -> Option<String> {
    // Keys without capitals or non-ASCII bytes fold to distinct keys: the common case costs a scan.
    let foldable = |k: &String| k.bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii());
    if map.len() < 2 || !map.keys().any(foldable) {
        return None;
    }
    let mut seen = std::collections::HashSet::with_capacity(map.len());
    map.keys().find(|k| !seen.insert(go_fold_key(k))).cloned()
}

/// [`case_folded_duplicate_key`] in any object of `v`, at any depth.
pub fn case_folded_duplicate(v: &Value) -> Option<String> {
    match v {
        Value::Array(items) => items.iter().find_map(case_folded_duplicate),
        Value::Object(map) => case_folded_duplicate_key(map).or_else(|| map.values().find_map(case_folded_duplicate)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;
    use serde_json::json;
    use wasm_bindgen_test::wasm_bindgen_test;

    /// Go's `encoding/json` key folding (simple case mappings): the pairs it reads as one key.
    #[wasm_bindgen_test(unsupported = test)]
    fn keys_fold_as_go_reads_them() {
        for (a, b) in [
            ("name", "NAME"),
            ("params", "param\u{17f}"),
            ("id", "\u{131}d"),
            ("kind", "\u{212a}ind"),
            ("ID", "\u{130}D"),
        ] {
            assert!(go_fold_eq(a, b), "{a} {b}");
            assert_eq!(go_fold_key(a), go_fold_key(b), "{a} {b}");
        }
        for (a, b) in [("name", "names"), ("stra\u{df}e", "STRASSE"), ("id", "i_d")] {
            assert!(!go_fold_eq(a, b), "{a} {b}");
            assert_ne!(go_fold_key(a), go_fold_key(b), "{a} {b}");
        }
    }

    /// Same answers as serde_json's `Value::pointer`, escapes, indices and misses included.
    #[wasm_bindgen_test(unsupported = test)]
    fn pointer_answers_like_serde_json() {
        let v = json!({"a": {"b": [10, {"c": true}], "x/y": 1, "m~n": 2, "": {"": 3}, "01": 4, "1": 5},
                       "s": "t", "n": null});
        for p in [
            "",
            "/",
            "//",
            "/a",
            "/a/b",
            "/a/b/0",
            "/a/b/1/c",
            "/a/b/2",
            "/a/b/01",
            "/a/b/+1",
            "/a/b/-",
            "/a/b/00",
            "/a/b/1/c/d",
            "/a/x~1y",
            "/a/m~0n",
            "/a/x/y",
            "/a/",
            "/a//",
            "/a/01",
            "/a/1",
            "a",
            "/s/0",
            "/n",
            "/n/x",
            "/missing",
            "/a/b/18446744073709551616",
            "/a/b/ 1",
            "/a/b/1 ",
        ] {
            assert_eq!(pointer(&v, p), v.pointer(p), "{p:?}");
            let (mut a, mut b) = (v.clone(), v.clone());
            assert_eq!(pointer_mut(&mut a, p), b.pointer_mut(p), "{p:?}");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn same_value_as_serde_json_for_valid_json() {
        let docs: Vec<&[u8]> = vec![
            br#"{"model":"m","messages":[{"role":"user","content":"hi \u00e9 \"q\" \\ \ud83d\ude00"}],"stream":true}"#,
            br#"[1, -2, 3.5, -0, 18446744073709551615, -9223372036854775808, 1.0e-7, null, true, false]"#,
            br#"  {"a":{"b":{"c":[[],{},""]}}, "":0, "A":1, "a ":2}  "#,
            b"\"just a string\"",
            b"12",
            br#"{"x":[{"k":1},{"k":2}]}"#,
        ];
        for d in docs {
            assert_eq!(
                parse_strict(d).unwrap(),
                serde_json::from_slice::<Value>(d).unwrap(),
                "{}",
                String::from_utf8_lossy(d)
            );
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn generated_documents_parse_like_serde_json() {
        // Deterministic pseudo-random trees (objects, arrays, escapes, numbers of every kind).
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        fn gen(depth: u32, next: &mut dyn FnMut() -> u64) -> Value {
            let r = next();
            match if depth == 0 { r % 5 } else { r % 7 } {
                0 => Value::Null,
                1 => Value::Bool(r & 8 == 0),
                2 => json!((r >> 8) as i64 - (1 << 40)),
                3 => json!(((r >> 11) as f64) / 7.0),
                4 => Value::String(
                    ["", "a\"b", "\\", "\u{1F600}", "tab\t", "ü", "<EMAIL_1>"][(r >> 5) as usize % 7]
                        .repeat((r >> 9) as usize % 3),
                ),
                5 => Value::Array((0..(r >> 4) % 4).map(|_| gen(depth - 1, next)).collect()),
                _ => {
                    let mut m = Map::new();
                    for i in 0..(r >> 4) % 5 {
                        m.insert(format!("k{i}{}", ["", "é", "\"", "/"][(r >> 12) as usize % 4]), gen(depth - 1, next));
                    }
                    Value::Object(m)
                }
            }
        }
        for _ in 0..2000 {
            let v = gen(4, &mut next);
            let compact = serde_json::to_vec(&v).unwrap();
            let pretty = serde_json::to_vec_pretty(&v).unwrap();
            // Against serde_json's parse, not `v`: float text does not round-trip bit for bit.
            assert_eq!(parse_strict(&compact).unwrap(), serde_json::from_slice::<Value>(&compact).unwrap());
            assert_eq!(parse_strict(&pretty).unwrap(), serde_json::from_slice::<Value>(&pretty).unwrap());
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn duplicate_keys_refused_at_any_depth_and_named() {
        for (body, key) in [
            (&br#"{"model":"cheap","model":"expensive"}"#[..], "model"),
            (br#"{"messages":[{"role":"user","content":"4111 1111 1111 1111","content":"hi"}]}"#, "content"),
            (
                br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","name":"delete_all"}}"#,
                "name",
            ),
            (br#"[{"a":1},{"b":{"c":{"d":1,"d":1}}}]"#, "d"),
            // The same key spelled with an escape is the same key.
            (br#"{"model":"a","mod\u0065l":"b"}"#, "model"),
        ] {
            match parse_strict(body) {
                Err(JsonBodyError::DuplicateKey(m)) => {
                    assert!(m.contains(&format!("duplicate key {key:?}")), "{m}");
                    assert!(m.contains("line 1"), "{m}");
                }
                other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
            }
            assert_eq!(parse_strict(body).unwrap_err().code(), "duplicate_json_key");
        }
        // Same key in different objects, or differing only in case, is fine.
        assert!(parse_strict(br#"{"a":{"k":1},"b":{"k":2},"K":3,"k":4}"#).is_ok());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn utf16_and_utf32_refused_utf8_bom_skipped() {
        let text = r#"{"model":"m","messages":[{"role":"user","content":"mail jane@example.com"}]}"#;
        let utf16le: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let utf16be: Vec<u8> = text.encode_utf16().flat_map(u16::to_be_bytes).collect();
        let utf32le: Vec<u8> = text.chars().flat_map(|c| u32::from(c).to_le_bytes()).collect();
        let utf32be: Vec<u8> = text.chars().flat_map(|c| u32::from(c).to_be_bytes()).collect();
        let with_bom = |bom: &[u8], body: &[u8]| [bom, body].concat();
        for (body, name) in [
            (utf16le.clone(), "UTF-16LE"),
            (utf16be.clone(), "UTF-16BE"),
            (utf32le.clone(), "UTF-32LE"),
            (utf32be.clone(), "UTF-32BE"),
            (with_bom(&[0xff, 0xfe], &utf16le), "UTF-16"),
            (with_bom(&[0xfe, 0xff], &utf16be), "UTF-16"),
            (with_bom(&[0xff, 0xfe, 0, 0], &utf32le), "UTF-32"),
            (with_bom(&[0, 0, 0xfe, 0xff], &utf32be), "UTF-32"),
            // leading whitespace keeps the pattern; two-byte bodies too
            (" {}".encode_utf16().flat_map(u16::to_le_bytes).collect(), "UTF-16LE"),
            (vec![0, b'1'], "UTF-16BE"),
        ] {
            assert_eq!(parse_strict(&body), Err(JsonBodyError::NotUtf8(name)), "{body:?}");
        }
        assert_eq!(JsonBodyError::NotUtf8("UTF-16LE").code(), "json_not_utf8");
        let bom = with_bom(&[0xef, 0xbb, 0xbf], text.as_bytes());
        assert_eq!(parse_strict(&bom).unwrap(), serde_json::from_str::<Value>(text).unwrap());
        // UTF-8 with non-ASCII text is UTF-8.
        assert!(parse_strict("{\"k\":\"ü€😀\"}".as_bytes()).is_ok());
        assert!(parse_strict(b"1").is_ok());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn broken_json_is_a_syntax_error() {
        for body in [&b""[..], b"{", b"{\"a\":}", b"{} {}", b"[1,]", b"\xff", b"{\"a\":1,\"a\"", b"nul", b"1e400"] {
            let e = parse_strict(body).unwrap_err();
            assert!(matches!(e, JsonBodyError::Syntax(_)), "{}: {e:?}", String::from_utf8_lossy(body));
            assert_eq!(e.code(), "invalid_json");
            assert!(serde_json::from_slice::<Value>(body).is_err());
        }
        // Nesting deeper than serde_json's limit is refused the same way, without overflowing the stack.
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(matches!(parse_strict(deep.as_bytes()), Err(JsonBodyError::Syntax(_))));
    }
}
