//! Text files inside a request, base64-encoded: a CSV, a log, a JSON export attached to a prompt. The
//! model reads them as text, but a filter scanning the body's strings sees only base64. Where they are:
//!
//! - Gemini `contents[].parts[]` / `systemInstruction.parts[]`: `{"inline_data": {"mime_type": "text/csv",
//!   "data": "<base64>"}}` (or `inlineData` / `mimeType`): Gemini reads text/plain, text/csv, text/html,
//!   text/markdown, application/json, ... files this way;
//! - Anthropic `document` blocks: `{"source": {"type": "base64", "media_type": ..., "data": "<base64>"}}`
//!   (PDFs in practice; a text media type is read as text);
//! - Bedrock Converse `{"document": {"format": "txt"|"csv"|"md"|"html", "source": {"bytes": "<base64>"}}}`;
//! - any `data:` URL with a text media type (`data:text/plain;base64,...`): OpenAI chat `file.file_data`,
//!   Responses `input_file.file_data`, and wherever else a client puts one.
//!
//! Binary files (PDF, images, office documents) are not reported: their content cannot be read without a
//! parser for the format. A text file that is not UTF-8 (Latin-1, Windows-1252, Shift JIS) is reported
//! with its text decoded lossily, [`EncodedText::utf8`] false and its bytes in [`EncodedText::raw`] (to
//! scan and rewrite it byte for byte).

use crate::encoding::{base64_decode, base64_encode};
use crate::llm::Role;
use serde_json::Value;

/// A base64 text file in a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedText {
    /// The role of the message holding it ([`Role::User`] outside any message).
    pub role: Role,
    /// RFC 6901 pointer to the JSON string holding the base64 (or the `data:` URL).
    pub pointer: String,
    /// What precedes the base64 in that string: `data:text/csv;base64,` for a `data:` URL, else empty.
    pub prefix: String,
    /// The decoded text (lossy when [`EncodedText::utf8`] is false).
    pub text: String,
    /// The file is UTF-8: `text` is exactly its content.
    pub utf8: bool,
    /// The file's bytes when it is not UTF-8 (`None` when it is: `text` holds them).
    pub raw: Option<Vec<u8>>,
}

impl EncodedText {
    /// The string to put at [`EncodedText::pointer`] for a rewritten `text`: the same prefix, standard
    /// base64 with padding (what every provider accepts).
    pub fn encode(&self, text: &str) -> String {
        self.encode_bytes(text.as_bytes())
    }

    /// As [`EncodedText::encode`], for a file that is not UTF-8.
    pub fn encode_bytes(&self, bytes: &[u8]) -> String {
        format!("{}{}", self.prefix, base64_encode(bytes))
    }

    /// The file's content: its bytes as sent, UTF-8 or not.
    pub fn bytes(&self) -> &[u8] {
        self.raw.as_deref().unwrap_or(self.text.as_bytes())
    }
}

/// Whether a media type (`text/csv; charset=utf-8`, any case) names a text format a model reads as text.
pub fn is_text_media_type(media_type: &str) -> bool {
    let m = media_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    const TEXT_APPLICATION: &[&str] = &[
        "application/json",
        "application/x-ndjson",
        "application/jsonl",
        "application/xml",
        "application/yaml",
        "application/x-yaml",
        "application/csv",
        "application/sql",
        "application/javascript",
        "application/x-javascript",
        "application/typescript",
        "application/x-python",
        "application/x-sh",
        "application/toml",
        "application/rtf",
    ];
    m.starts_with("text/") || m.ends_with("+json") || m.ends_with("+xml") || TEXT_APPLICATION.contains(&m.as_str())
}

/// Bedrock Converse document formats that are text.
fn is_text_document_format(format: &str) -> bool {
    ["txt", "csv", "md", "html"].iter().any(|f| format.eq_ignore_ascii_case(f))
}

/// The decoded bytes of base64 (ASCII whitespace, as MIME line breaks, ignored).
fn decode_bytes(b64: &str) -> Option<Vec<u8>> {
    let compact: String;
    let b64 = if b64.bytes().any(|b| b.is_ascii_whitespace()) {
        compact = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        compact.as_str()
    } else {
        b64
    };
    base64_decode(b64).ok()
}

/// One step of the path to a value: an object key or an array index.
#[derive(Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// The RFC 6901 pointer of `path` (built only for a file found: most requests hold none, and the walk
/// runs on every request of three filters).
fn pointer(path: &[Step<'_>]) -> String {
    let mut out = String::new();
    for step in path {
        out.push('/');
        match step {
            Step::Key(k) => out.push_str(&k.replace('~', "~0").replace('/', "~1")),
            Step::Index(i) => out.push_str(&i.to_string()),
        }
    }
    out
}

struct Walk {
    out: Vec<EncodedText>,
}

impl Walk {
    fn push(&mut self, role: Role, pointer: String, prefix: &str, b64: &str) {
        if let Some(bytes) = decode_bytes(b64) {
            let (text, raw) = match String::from_utf8(bytes) {
                Ok(t) => (t, None),
                Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), Some(e.into_bytes())),
            };
            let utf8 = raw.is_none();
            self.out.push(EncodedText { role, pointer, prefix: prefix.to_string(), text, utf8, raw });
        }
    }

    fn value<'a>(&mut self, v: &'a Value, role: Role, path: &mut Vec<Step<'a>>) {
        match v {
            Value::String(s) => {
                // `data:<media type>[;params];base64,<data>`
                if let Some(rest) = s.strip_prefix("data:") {
                    if let Some((meta, data)) = rest.split_once(',') {
                        if let Some(media) = meta.strip_suffix(";base64") {
                            if is_text_media_type(media) {
                                let prefix = s.get(..s.len() - data.len()).unwrap_or("");
                                self.push(role, pointer(path), prefix, data);
                            }
                        }
                    }
                }
            }
            Value::Array(items) => {
                for (i, x) in items.iter().enumerate() {
                    path.push(Step::Index(i));
                    self.value(x, role, path);
                    path.pop();
                }
            }
            Value::Object(obj) => {
                let role = match obj.get("role").and_then(Value::as_str) {
                    Some(r) => Role::parse(r),
                    None => role,
                };
                if self.block(obj, role, path) {
                    return;
                }
                for (k, x) in obj {
                    path.push(Step::Key(k));
                    self.value(x, role, path);
                    path.pop();
                }
            }
            _ => {}
        }
    }

    /// A base64 holder of a known shape: reported (when text) and `true`; anything else `false`.
    fn block<'a>(&mut self, obj: &'a serde_json::Map<String, Value>, role: Role, path: &mut Vec<Step<'a>>) -> bool {
        let at = |path: &mut Vec<Step<'a>>, tail: &[&'a str]| {
            let depth = path.len();
            path.extend(tail.iter().map(|k| Step::Key(k)));
            let p = pointer(path);
            path.truncate(depth);
            p
        };
        // Gemini inline data.
        for key in ["inline_data", "inlineData"] {
            let Some(inline) = obj.get(key).and_then(Value::as_object) else { continue };
            let media = ["mime_type", "mimeType"].iter().find_map(|k| inline.get(*k).and_then(Value::as_str));
            if let Some(data) = inline.get("data").and_then(Value::as_str) {
                if is_text_media_type(media.unwrap_or("")) {
                    let p = at(path, &[key, "data"]);
                    self.push(role, p, "", data);
                }
                return true;
            }
        }
        // Anthropic base64 source (inside a `document` block: `path` is the source object's).
        if obj.get("type").and_then(Value::as_str) == Some("base64") {
            if let Some(data) = obj.get("data").and_then(Value::as_str) {
                if is_text_media_type(obj.get("media_type").and_then(Value::as_str).unwrap_or("")) {
                    let p = at(path, &["data"]);
                    self.push(role, p, "", data);
                }
                return true;
            }
        }
        // Bedrock Converse document bytes.
        if let Some(doc) = obj.get("document").and_then(Value::as_object) {
            let format = doc.get("format").and_then(Value::as_str).unwrap_or("");
            if let Some(bytes) = doc.get("source").and_then(|s| s.get("bytes")).and_then(Value::as_str) {
                if is_text_document_format(format) {
                    let p = at(path, &["document", "source", "bytes"]);
                    self.push(role, p, "", bytes);
                }
                return true;
            }
        }
        false
    }
}

/// Every base64 text file in `body` (see the module documentation), in document order.
pub fn extract_encoded_texts(body: &Value) -> Vec<EncodedText> {
    let mut walk = Walk { out: Vec::new() };
    walk.value(body, Role::User, &mut Vec::new());
    walk.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn b64(s: &str) -> String {
        base64_encode(s.as_bytes())
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn text_files_of_every_api_are_found_and_binary_ones_are_not() {
        let csv = "name,email\nJane,jane@example.com\n";
        let body = json!({
            "contents": [{"role": "user", "parts": [
                {"text": "summarise"},
                {"inline_data": {"mime_type": "text/csv", "data": b64(csv)}},
                {"inlineData": {"mimeType": "application/json; charset=utf-8", "data": b64("{\"a\":1}")}},
                {"inline_data": {"mime_type": "image/png", "data": "iVBORw0KGgo="}},
                {"inline_data": {"mime_type": "text/plain", "data": base64_encode(b"caf\xe9")}}
            ]}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": b64("doc")}},
                    {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
                    {"type": "file", "file": {"filename": "a.txt", "file_data": format!("data:text/plain;base64,{}", b64("chat file"))}},
                    {"type": "input_file", "file_data": format!("data:application/pdf;base64,JVBERi0=")},
                    {"document": {"format": "csv", "name": "d", "source": {"bytes": b64("bedrock,csv")}}},
                    {"document": {"format": "pdf", "name": "p", "source": {"bytes": "JVBERi0="}}}
                ]},
                {"role": "tool", "content": format!("data:text/markdown;charset=utf-8;base64,{}", b64("# tool md"))}
            ]
        });
        let found = extract_encoded_texts(&body);
        let got: Vec<(&str, &str, &str, Role)> = found
            .iter()
            .filter(|e| e.utf8)
            .map(|e| (e.pointer.as_str(), e.prefix.as_str(), e.text.as_str(), e.role))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/contents/0/parts/1/inline_data/data", "", csv, Role::User),
                ("/contents/0/parts/2/inlineData/data", "", "{\"a\":1}", Role::User),
                ("/messages/0/content/0/source/data", "", "doc", Role::User),
                ("/messages/0/content/2/file/file_data", "data:text/plain;base64,", "chat file", Role::User),
                ("/messages/0/content/4/document/source/bytes", "", "bedrock,csv", Role::User),
                ("/messages/1/content", "data:text/markdown;charset=utf-8;base64,", "# tool md", Role::Tool),
            ]
        );
        // A Latin-1 file: reported lossily, not UTF-8.
        let latin1 = found.iter().find(|e| !e.utf8).unwrap();
        assert_eq!(
            (latin1.pointer.as_str(), latin1.text.as_str()),
            ("/contents/0/parts/4/inline_data/data", "caf\u{fffd}")
        );
        assert_eq!(latin1.bytes(), b"caf\xe9");
        assert_eq!(latin1.encode_bytes(latin1.bytes()), base64_encode(b"caf\xe9"));
        assert!(found.iter().filter(|e| e.utf8).all(|e| e.raw.is_none() && e.bytes() == e.text.as_bytes()));
        // Re-encoding keeps the prefix; the result decodes to the new text.
        let chat = found.get(4).unwrap();
        let enc = chat.encode("masked <EMAIL_1>");
        assert_eq!(enc, format!("data:text/plain;base64,{}", b64("masked <EMAIL_1>")));
        assert_eq!(decode_bytes(enc.strip_prefix(&chat.prefix).unwrap()), Some(b"masked <EMAIL_1>".to_vec()));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn media_types_and_line_broken_base64() {
        for t in [
            "text/plain",
            "TEXT/CSV",
            "text/markdown; charset=utf-8",
            "application/json",
            "application/ld+json",
            "application/x-yaml",
            "image/svg+xml",
        ] {
            assert!(is_text_media_type(t), "{t}");
        }
        for t in ["application/pdf", "image/png", "application/octet-stream", "", "application/zip"] {
            assert!(!is_text_media_type(t), "{t}");
        }
        let wrapped = "amFuZUBl\r\neGFtcGxl\nLmNvbQ==";
        assert_eq!(decode_bytes(wrapped), Some(b"jane@example.com".to_vec()));
        assert_eq!(decode_bytes("not base64!"), None);
        // A key with `/` or `~` is escaped in the pointer.
        let body = json!({"a/b~c": format!("data:text/plain;base64,{}", b64("x"))});
        assert_eq!(extract_encoded_texts(&body)[0].pointer, "/a~1b~0c");
    }
}
