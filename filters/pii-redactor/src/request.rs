//! The request side: scan the texts the model reads and rewrite the body.
//!
//! JSON bodies of a known API are scanned through the shared extraction (`llm::extract_request_texts`)
//! and rewritten with `llm::replace_texts`, so only the prompt strings change and the body stays valid
//! JSON. JSON of an unknown shape has every string value scanned. Anything else (or JSON that does not
//! parse) is scanned as raw bytes when `raw_fallback` is on. JSON with a key given twice, and UTF-16/32
//! text, are not scanned at all (`Scanned::Refused`): which copy the upstream reads is up to its parser,
//! and a byte scanner cannot read UTF-16/32 (which Python servers parse as JSON).

use crate::engine::{Engine, MaskState};
use meshwarden_shared::json::{parse_strict, JsonBodyError};
use meshwarden_shared::llm::{extract_request_texts, replace_texts, Api};
use meshwarden_shared::stream_rewrite::{rewrite_strings, TextRewrite};

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

pub fn process_request(engine: &Engine, path: &str, body: &[u8], raw_fallback: bool) -> RequestResult {
    let mut state = MaskState::default();
    match parse_strict(body) {
        Err(e @ (JsonBodyError::DuplicateKey(_) | JsonBodyError::NotUtf8(_))) => {
            RequestResult { api: Api::from_path(path), scanned: Scanned::Refused, body: None, state, problem: Some(e) }
        }
        Ok(mut v) => {
            let api = Api::detect(path, &v);
            let spans = extract_request_texts(api, &v);
            if spans.is_empty() && api == Api::Unknown {
                let mut copy = v.clone();
                rewrite_strings(&mut copy, &mut Reserve(&mut state));
                let changed = rewrite_strings(&mut v, &mut MaskAll { engine, state: &mut state });
                let body = if changed { serde_json::to_vec(&v).ok() } else { None };
                return RequestResult { api, scanned: Scanned::JsonAllStrings, body, state, problem: None };
            }
            for s in &spans {
                state.reserve_lookalikes(s.text.as_bytes());
            }
            let mut replacements = Vec::new();
            for s in &spans {
                if let Some(out) = state.mask(engine, s.text.as_bytes()) {
                    if let Ok(text) = String::from_utf8(out) {
                        replacements.push((s.pointer.clone(), text));
                    }
                }
            }
            let body = if replacements.is_empty() {
                None
            } else {
                replace_texts(&mut v, &replacements);
                serde_json::to_vec(&v).ok()
            };
            RequestResult { api, scanned: Scanned::Json, body, state, problem: None }
        }
        Err(JsonBodyError::Syntax(_)) => {
            let api = Api::from_path(path);
            if !raw_fallback {
                return RequestResult { api, scanned: Scanned::Skipped, body: None, state, problem: None };
            }
            state.reserve_lookalikes(body);
            let body = state.mask(engine, body);
            RequestResult { api, scanned: Scanned::Raw, body, state, problem: None }
        }
    }
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
}
