//! Who is calling: claims gathered from (in this order, later sources adding or overriding):
//! 1. Envoy `jwt_authn` dynamic metadata (verified; the production path), else, only with the
//!    development switch `identity.unverified_bearer_dev_only`, the bearer token's payload unverified;
//! 2. the mTLS peer's SPIFFE ID as claim `spiffe` {`id`, `trust_domain`, `namespace`, `service_account`};
//! 3. headers set by earlier trusted filters (`identity.trusted_headers`).

use crate::config::{IdentityConfig, TrustedHeader};
use meshwarden_shared::encoding::base64_decode;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Identity {
    claims: Map<String, Value>,
    /// Where the token claims came from: `jwt_authn`, `unverified_bearer` or `none`.
    pub source: &'static str,
}

impl Identity {
    pub fn from_claims(claims: Map<String, Value>) -> Identity {
        Identity { claims, source: "none" }
    }

    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    /// A claim by name; a name that is not a top-level claim is read as a dotted path
    /// (`realm_access.roles`, `spiffe.namespace`).
    pub fn claim(&self, name: &str) -> Option<&Value> {
        if let Some(v) = self.claims.get(name) {
            return Some(v);
        }
        let mut parts = name.split('.');
        let mut cur = self.claims.get(parts.next()?)?;
        for p in parts {
            cur = cur.get(p)?;
        }
        Some(cur)
    }

    /// The audit subject: the first configured subject claim that is a string, else `anonymous`.
    pub fn subject(&self, subject_claims: &[String]) -> String {
        subject_claims
            .iter()
            .find_map(|c| self.claim(c).and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| "anonymous".to_string())
    }
}

/// The raw inputs the adapter reads from the host.
#[derive(Debug, Default)]
pub struct Sources<'a> {
    /// The decoded `jwt_authn` metadata namespace (a JSON object), if any.
    pub jwt_metadata: Option<Map<String, Value>>,
    pub authorization: Option<&'a str>,
    pub peer_uri_san: Option<&'a str>,
    /// (header name, value) for the configured trusted headers.
    pub headers: Vec<(&'a TrustedHeader, String)>,
}

pub fn resolve(cfg: &IdentityConfig, src: Sources) -> Identity {
    let mut id = Identity { claims: Map::new(), source: "none" };
    if let (Some(jc), Some(ns)) = (&cfg.jwt_authn, src.jwt_metadata) {
        let payload = match &jc.payload_key {
            Some(k) => ns.get(k).and_then(Value::as_object).cloned(),
            None => ns.values().find_map(|v| v.as_object().cloned()),
        };
        if let Some(p) = payload {
            id.claims = p;
            id.source = "jwt_authn";
        }
    }
    if id.source == "none" && cfg.unverified_bearer_dev_only {
        if let Some(claims) = src.authorization.and_then(unverified_bearer_claims) {
            id.claims = claims;
            id.source = "unverified_bearer";
        }
    }
    if cfg.spiffe {
        if let Some(s) = src.peer_uri_san.and_then(parse_spiffe) {
            id.claims.insert("spiffe".into(), s);
        }
    }
    for (h, value) in src.headers {
        let v = if h.list {
            Value::Array(
                value
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_string()))
                    .collect(),
            )
        } else {
            Value::String(value)
        };
        id.claims.insert(h.claim.clone(), v);
    }
    id
}

/// The payload of `Authorization: Bearer <header>.<payload>.<signature>`, NOT verified.
pub fn unverified_bearer_claims(authorization: &str) -> Option<Map<String, Value>> {
    let token = authorization.trim();
    let (scheme, token) = token.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut parts = token.trim().split('.');
    let (_h, p, _s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64_decode(p).ok()?;
    match serde_json::from_slice::<Value>(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` (Istio's form); other SPIFFE IDs keep
/// only `id` and `trust_domain`.
pub fn parse_spiffe(uri: &str) -> Option<Value> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
    if td.is_empty() {
        return None;
    }
    let mut m = Map::new();
    m.insert("id".into(), Value::String(uri.to_string()));
    m.insert("trust_domain".into(), Value::String(td.to_string()));
    let segs: Vec<&str> = path.split('/').collect();
    if let [ns_key, ns, sa_key, sa] = segs.as_slice() {
        if *ns_key == "ns" && *sa_key == "sa" {
            m.insert("namespace".into(), Value::String((*ns).to_string()));
            m.insert("service_account".into(), Value::String((*sa).to_string()));
        }
    }
    Some(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64url(s: &str) -> String {
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &x)| acc | (u32::from(x) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn sources_merge_in_order() {
        let th = TrustedHeader { header: "x-groups".into(), claim: "groups".into(), list: true };
        let cfg = IdentityConfig { unverified_bearer_dev_only: true, ..IdentityConfig::default() };
        let token = format!("Bearer {}.{}.sig", b64url("{}"), b64url(r#"{"sub":"mallory","groups":["admin"]}"#));
        let jwt = json!({"jwt_payload": {"sub": "alice", "groups": ["eng"]}}).as_object().unwrap().clone();
        let id = resolve(
            &cfg,
            Sources {
                jwt_metadata: Some(jwt),
                authorization: Some(&token),
                peer_uri_san: Some("spiffe://cluster.local/ns/agents/sa/planner"),
                headers: vec![(&th, "finance, ops".into())],
            },
        );
        assert_eq!(id.source, "jwt_authn", "verified claims win over the unverified token");
        assert_eq!(id.claim("sub"), Some(&json!("alice")));
        assert_eq!(id.claim("groups"), Some(&json!(["finance", "ops"])));
        assert_eq!(id.claim("spiffe.namespace"), Some(&json!("agents")));
        assert_eq!(id.subject(&["sub".into()]), "alice");
        let dev = resolve(&cfg, Sources { authorization: Some(&token), ..Sources::default() });
        assert_eq!((dev.source, dev.subject(&["sub".into()])), ("unverified_bearer", "mallory".to_string()));
        let off = resolve(&IdentityConfig::default(), Sources { authorization: Some(&token), ..Sources::default() });
        assert_eq!(off.subject(&["sub".into()]), "anonymous", "no dev switch, no claims");
    }

    #[test]
    fn bad_tokens_and_spiffe_ids() {
        assert!(unverified_bearer_claims("Basic abc").is_none());
        assert!(unverified_bearer_claims("Bearer a.b").is_none());
        assert!(unverified_bearer_claims("Bearer a.!!!.c").is_none());
        assert!(unverified_bearer_claims(&format!("Bearer x.{}.y", b64url("[1]"))).is_none());
        assert_eq!(
            parse_spiffe("spiffe://td/workload"),
            Some(json!({"id": "spiffe://td/workload", "trust_domain": "td"}))
        );
        assert!(parse_spiffe("https://x").is_none());
        assert!(parse_spiffe("spiffe:///ns/a").is_none());
    }
}
