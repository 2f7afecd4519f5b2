//! Context a request names but does not carry: an OpenAI Responses request with `previous_response_id`
//! (or `conversation`) makes the model read the stored conversation, often far more than its new
//! `input`; a Gemini request with `cachedContent` makes it read the cache created before
//! (`POST .../cachedContents`, whose answer gives its size as `usageMetadata.totalTokenCount`). Without a memory of those conversations, `{"previous_response_id": "resp_1", "input": "go
//! on"}` is admitted on a handful of tokens and the budget overshoots by the whole conversation. So each
//! answered Responses request leaves behind how large its context became (the reported input plus output
//! tokens: what the next turn reads again), under its response id and its conversation id, and a request
//! naming one of them is admitted on that figure plus its own estimate.
//!
//! Where: Envoy shared data of this Envoy process (every worker sees it; another replica does not: a
//! request landing there is admitted on its own estimate, as before). Bounded: a fixed number of slots,
//! chosen by a hash of the id (a direct-mapped cache: a newer id in the same slot replaces the older,
//! whose requests then fall back to their own estimate). The figure is only the admission's estimate; the
//! charge is always the usage the provider reports.

/// An id longer than this is not remembered (OpenAI's are ~50 bytes).
pub const MAX_ID_BYTES: usize = 200;

/// What a request names: the key its context is remembered under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextRef {
    /// `previous_response_id`.
    Response(String),
    /// `conversation` (a string id, or an object with `id`).
    Conversation(String),
    /// Gemini `cachedContent` (`cachedContents/...`, or a Vertex AI resource name).
    GeminiCache(String),
}

impl ContextRef {
    /// The id as remembered (`resp:<id>` / `conv:<id>`), if it is not too long.
    pub fn key(&self) -> Option<String> {
        let (kind, id) = match self {
            ContextRef::Response(id) => ("resp", id),
            ContextRef::Conversation(id) => ("conv", id),
            ContextRef::GeminiCache(name) => ("gcache", name),
        };
        (!id.is_empty() && id.len() <= MAX_ID_BYTES).then(|| format!("{kind}:{id}"))
    }
}

/// The contexts a request body names: OpenAI Responses `previous_response_id` and `conversation`, Gemini
/// `cachedContent` (`cached_content` as protobuf's JSON mapping also accepts).
pub fn referenced(json: &serde_json::Value) -> Vec<ContextRef> {
    let mut out = Vec::new();
    for key in ["cachedContent", "cached_content"] {
        if let Some(name) = json.get(key).and_then(serde_json::Value::as_str) {
            out.push(ContextRef::GeminiCache(name.to_string()));
        }
    }
    if let Some(id) = json.get("previous_response_id").and_then(serde_json::Value::as_str) {
        out.push(ContextRef::Response(id.to_string()));
    }
    match json.get("conversation") {
        Some(serde_json::Value::String(id)) => out.push(ContextRef::Conversation(id.clone())),
        Some(serde_json::Value::Object(o)) => {
            if let Some(id) = o.get("id").and_then(serde_json::Value::as_str) {
                out.push(ContextRef::Conversation(id.to_string()));
            }
        }
        _ => {}
    }
    out
}

/// A Gemini context cache created by `answer` (the JSON answer of `POST .../cachedContents`): its name and
/// size in tokens.
pub fn created_gemini_cache(answer: &[u8]) -> Option<(String, u64)> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Usage {
        total_token_count: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Cache {
        name: Option<String>,
        usage_metadata: Option<Usage>,
    }
    let cache: Cache = serde_json::from_slice(answer).ok()?;
    let name = cache.name.filter(|n| n.contains("cachedContents/"))?;
    Some((name, cache.usage_metadata?.total_token_count?))
}

/// Whether a request creates a Gemini context cache (`POST .../cachedContents`, Gemini API or Vertex AI).
pub fn creates_gemini_cache(method: &str, path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or("").trim_end_matches('/');
    method.eq_ignore_ascii_case("POST") && path.ends_with("/cachedContents")
}

/// The shared-data key of the slot `key` lives in, with `slots` slots.
pub fn slot_key(key: &str, slots: u64) -> String {
    // FNV-1a: ids are chosen by the provider, not by clients of this gateway (a client can only name
    // ids; one that floods slots with its own answers evicts entries and gets estimates, never a
    // lower charge).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("meshwarden.tl.ctx.{}", h % slots.max(1))
}

/// A slot's value: the context size (8 bytes, little-endian), then the key it belongs to.
pub fn encode(key: &str, tokens: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + key.len());
    v.extend_from_slice(&tokens.to_le_bytes());
    v.extend_from_slice(key.as_bytes());
    v
}

/// The context size remembered for `key`, if the slot holds it (and not another key).
pub fn decode(value: &[u8], key: &str) -> Option<u64> {
    let (size, rest) = value.split_first_chunk::<8>()?;
    (rest == key.as_bytes()).then(|| u64::from_le_bytes(*size))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_keys_and_slots() {
        let refs = referenced(&json!({"model": "gpt-4o", "previous_response_id": "resp_1", "input": "go on"}));
        assert_eq!(refs, vec![ContextRef::Response("resp_1".into())]);
        assert_eq!(refs[0].key().unwrap(), "resp:resp_1");
        let refs = referenced(&json!({"conversation": {"id": "conv_9"}, "input": "x"}));
        assert_eq!(refs[0].key().unwrap(), "conv:conv_9");
        assert_eq!(referenced(&json!({"conversation": "conv_9"}))[0].key().unwrap(), "conv:conv_9");
        assert!(referenced(&json!({"previous_response_id": null, "conversation": 3})).is_empty());
        let refs = referenced(&json!({"cachedContent": "cachedContents/abc", "contents": []}));
        assert_eq!(refs[0].key().unwrap(), "gcache:cachedContents/abc");
        assert!(ContextRef::Response("r".repeat(MAX_ID_BYTES + 1)).key().is_none());
        assert!(ContextRef::Response(String::new()).key().is_none());
        // Slots spread and stay in range.
        let slots: std::collections::HashSet<String> =
            (0..1000).map(|i| slot_key(&format!("resp:resp_{i}"), 64)).collect();
        assert_eq!(slots.len(), 64);
        assert!(slot_key("resp:x", 0).starts_with("meshwarden.tl.ctx."));
    }

    #[test]
    fn gemini_cache_creation_answers() {
        let answer = br#"{"name":"cachedContents/x1y2","model":"models/gemini-2.5-flash","usageMetadata":{"totalTokenCount":31000},"expireTime":"2026-12-08T00:00:00Z"}"#;
        assert_eq!(created_gemini_cache(answer), Some(("cachedContents/x1y2".to_string(), 31000)));
        assert_eq!(created_gemini_cache(br#"{"name":"models/x","usageMetadata":{"totalTokenCount":3}}"#), None);
        assert_eq!(created_gemini_cache(br#"{"name":"cachedContents/x"}"#), None);
        assert_eq!(created_gemini_cache(br#"{"error":{"code":400}}"#), None);
        assert!(creates_gemini_cache("POST", "/v1beta/cachedContents?key=k"));
        assert!(creates_gemini_cache("post", "/v1/projects/p/locations/us-central1/cachedContents"));
        assert!(!creates_gemini_cache("GET", "/v1beta/cachedContents"));
        assert!(!creates_gemini_cache("POST", "/v1beta/cachedContents/x1y2"));
    }

    #[test]
    fn a_slot_answers_only_for_its_own_key() {
        let v = encode("resp:resp_1", 6010);
        assert_eq!(decode(&v, "resp:resp_1"), Some(6010));
        assert_eq!(decode(&v, "resp:resp_2"), None, "another id in the same slot");
        assert_eq!(decode(&v, "conv:resp_1"), None);
        assert_eq!(decode(b"short", "resp:resp_1"), None);
        assert_eq!(decode(&[], ""), None);
    }
}
