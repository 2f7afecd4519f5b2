//! Budget keys: who is charged. Raw values (API keys, subjects) never leave this module unhashed.

use crate::config::{KeySource, SpiffePart};
use sha2::{Digest, Sha256};

/// A short, stable, non-reversible key for a raw value: 32 hex digits of SHA-256.
pub fn hash_key(raw: &str) -> String {
    let d = Sha256::digest(raw.as_bytes());
    let mut s = String::with_capacity(32);
    for b in d.iter().take(16) {
        for nibble in [b >> 4, b & 0xf] {
            s.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
        }
    }
    s
}

/// Identities at most this long are remembered by [`hash_key_memo`], at most this many of them.
const HASH_MEMO_MAX_KEY: usize = 256;
const HASH_MEMO_MAX_ENTRIES: usize = 1024;

thread_local! {
    static MEMO: std::cell::RefCell<std::collections::HashMap<String, String>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// [`hash_key`], remembered per VM for the identities seen lately: SHA-256 runs in software in Wasm (no
/// SHA instructions; ~0.23 µs hot in V8, several times that with the caches Envoy leaves cold between
/// requests), and a worker sees the same few teams' keys request after request. Bounded: identities over
/// 256 bytes are not remembered, and the memo is emptied when it holds 1024, so a caller sending a new
/// key per request costs one hash each, as without it, and the memo stays under ~300 KB. It holds the
/// raw identities, which the VM holds anyway while their requests run.
pub fn hash_key_memo(raw: &str) -> String {
    if raw.len() > HASH_MEMO_MAX_KEY {
        return hash_key(raw);
    }
    MEMO.with(|memo| {
        let mut memo = memo.borrow_mut();
        if let Some(h) = memo.get(raw) {
            return h.clone();
        }
        let h = hash_key(raw);
        if memo.len() >= HASH_MEMO_MAX_ENTRIES {
            memo.clear();
        }
        memo.insert(raw.to_string(), h.clone());
        h
    })
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>` -> the namespace or service account (`ns/sa` for the latter,
/// since service account names are only unique within a namespace).
pub fn spiffe_part(uri: &str, part: SpiffePart) -> Option<String> {
    let rest = uri.strip_prefix("spiffe://")?;
    let mut segs = rest.split('/');
    let _trust_domain = segs.next()?;
    let mut ns = None;
    let mut sa = None;
    while let Some(k) = segs.next() {
        let v = segs.next()?;
        match k {
            "ns" => ns = Some(v),
            "sa" => sa = Some(v),
            _ => {}
        }
    }
    match part {
        SpiffePart::Namespace => ns.filter(|s| !s.is_empty()).map(str::to_string),
        SpiffePart::ServiceAccount => match (ns, sa) {
            (Some(n), Some(s)) if !n.is_empty() && !s.is_empty() => Some(format!("{n}/{s}")),
            _ => None,
        },
    }
}

/// A claim of an unverified JWT in an `Authorization: Bearer <jwt>` (or bare token) header value.
/// String claims are used as is; numbers and booleans as their JSON text.
pub fn unverified_jwt_claim(header_value: &str, claim: &str) -> Option<String> {
    let v = header_value.trim();
    let token = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v).trim();
    let payload = token.split('.').nth(1)?;
    if payload.len() > 16 * 1024 {
        return None;
    }
    let bytes = meshwarden_shared::encoding::base64_decode(payload).ok()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claim_value(&json, claim)
}

/// A claim from a JSON object (a decoded JWT payload or `jwt_authn` metadata); `a.b` reads nested claims.
/// A claim whose name holds dots is read by its name: namespaced claims are URLs
/// (`https://example.com/team`, the form Auth0 requires for custom claims), and split at every dot they
/// were never found, so every caller was charged to the one budget of a missing key.
pub fn claim_value(payload: &serde_json::Value, claim: &str) -> Option<String> {
    match claim_at(payload, claim, 0)? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => Some(v.to_string()),
        _ => None,
    }
}

/// Claim nesting read at most this deep (a path of more dots is read as names holding dots past it).
const MAX_CLAIM_DEPTH: usize = 8;

/// The value at `path` in `cur`: the whole path as one name first, then every split at a dot, the
/// shortest first name first (`a.b.c`: `a.b.c`, then `a` + `b.c`, then `a.b` + `c`).
fn claim_at<'v>(cur: &'v serde_json::Value, path: &str, depth: usize) -> Option<&'v serde_json::Value> {
    if let Some(v) = cur.get(path) {
        return Some(v);
    }
    if depth >= MAX_CLAIM_DEPTH {
        return None;
    }
    path.match_indices('.').find_map(|(i, _)| {
        let (head, rest) = (path.get(..i)?, path.get(i + 1..)?);
        claim_at(cur.get(head)?, rest, depth + 1)
    })
}

/// The state key of a rule for a resolved raw identity. `None` identity = the key is missing.
pub fn budget_key(rule: &str, source: &KeySource, identity: Option<&str>) -> String {
    budget_key_hashed(rule, source, identity.map(hash_key).as_deref())
}

/// [`budget_key`] for an identity already passed through [`hash_key`] (so that several rules keyed on
/// the same value hash it once).
pub fn budget_key_hashed(rule: &str, source: &KeySource, hashed_identity: Option<&str>) -> String {
    let kind = match source {
        KeySource::Header(_) => "h",
        KeySource::JwtClaim { .. } => "j",
        KeySource::UnverifiedJwtClaim { .. } => "u",
        KeySource::Spiffe(_) => "s",
        KeySource::Constant(_) => "c",
    };
    match hashed_identity {
        Some(h) => format!("{rule}:{kind}:{h}"),
        None => format!("{rule}:{kind}:missing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_hashes_are_the_hashes_and_the_memo_stays_bounded() {
        assert_eq!(hash_key_memo("team-a"), hash_key("team-a"));
        assert_eq!(hash_key_memo("team-a"), hash_key("team-a"), "from the memo");
        let long = "k".repeat(HASH_MEMO_MAX_KEY + 1);
        assert_eq!(hash_key_memo(&long), hash_key(&long));
        for i in 0..3 * HASH_MEMO_MAX_ENTRIES {
            let raw = format!("key-{i}");
            assert_eq!(hash_key_memo(&raw), hash_key(&raw));
        }
        assert!(MEMO.with(|m| m.borrow().len()) <= HASH_MEMO_MAX_ENTRIES);
        assert!(MEMO.with(|m| !m.borrow().contains_key(&long)), "long identities are not remembered");
        assert_ne!(hash_key_memo("team-a"), hash_key_memo("team-b"));
    }

    #[test]
    fn spiffe() {
        let id = "spiffe://cluster.local/ns/team-a/sa/chatbot";
        assert_eq!(spiffe_part(id, SpiffePart::Namespace).as_deref(), Some("team-a"));
        assert_eq!(spiffe_part(id, SpiffePart::ServiceAccount).as_deref(), Some("team-a/chatbot"));
        assert_eq!(spiffe_part("https://x/ns/a", SpiffePart::Namespace), None);
        assert_eq!(spiffe_part("spiffe://td/ns", SpiffePart::Namespace), None);
    }

    #[test]
    fn unverified_jwt() {
        // {"alg":"none"} . {"sub":"alice","org":{"team":"ml"},"n":7}
        let tok = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsIm9yZyI6eyJ0ZWFtIjoibWwifSwibiI6N30.";
        assert_eq!(unverified_jwt_claim(&format!("Bearer {tok}"), "sub").as_deref(), Some("alice"));
        assert_eq!(unverified_jwt_claim(tok, "org.team").as_deref(), Some("ml"));
        assert_eq!(unverified_jwt_claim(tok, "n").as_deref(), Some("7"));
        assert_eq!(unverified_jwt_claim(tok, "missing"), None);
        assert_eq!(unverified_jwt_claim("Bearer not-a-jwt", "sub"), None);
        assert_eq!(unverified_jwt_claim("Bearer a.!!!.c", "sub"), None);
    }

    /// Namespaced claims (Auth0 requires URLs as custom claim names) are read by their name; before,
    /// the name was split at its dots, never found, and every caller shared the missing key's budget.
    #[test]
    fn claim_names_with_dots_are_read() {
        let payload = serde_json::json!({
            "https://example.com/team": "ml",
            "https://example.com/org": {"id": 42},
            "org": {"team": "infra", "a.b": "dotted"},
            "groups": ["x"]
        });
        assert_eq!(claim_value(&payload, "https://example.com/team").as_deref(), Some("ml"));
        assert_eq!(claim_value(&payload, "https://example.com/org.id").as_deref(), Some("42"));
        assert_eq!(claim_value(&payload, "org.team").as_deref(), Some("infra"));
        assert_eq!(claim_value(&payload, "org.a.b").as_deref(), Some("dotted"));
        assert_eq!(claim_value(&payload, "groups"), None, "lists count as missing");
        assert_eq!(claim_value(&payload, "https://example.com/other"), None);
        assert_eq!(claim_value(&payload, &"a.".repeat(10_000)), None, "bounded work");
    }

    #[test]
    fn keys_are_hashed() {
        let k = budget_key("team", &KeySource::Header("x-api-key".into()), Some("sk-secret"));
        assert!(!k.contains("secret"));
        assert_eq!(k.len(), "team:h:".len() + 32);
        assert_eq!(k, budget_key("team", &KeySource::Header("x-api-key".into()), Some("sk-secret")));
        assert_ne!(k, budget_key("team", &KeySource::Header("x-api-key".into()), Some("sk-other")));
        assert_eq!(budget_key("r", &KeySource::Constant("g".into()), None), "r:c:missing");
    }
}
