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

    /// Who owns a session or task this caller creates: the subject together with the claim it came from
    /// (`sub` "spiffe://td/ns/a/sa/b" is not the workload whose `spiffe.id` that is, and a token whose
    /// `sub` is "anonymous" is not the anonymous callers); `None` for an anonymous caller.
    pub fn owner_key(&self, subject_claims: &[String]) -> Option<String> {
        subject_claims.iter().find_map(|c| self.claim(c).and_then(Value::as_str).map(|v| format!("{c}\0{v}")))
    }
}

/// The raw inputs the adapter reads from the host. The peer certificate is not among them: reading it
/// is a host call (~1 µs in the VM) that most policies do not need, so [`resolve`] asks for it only when
/// the `spiffe` claim can change an answer ([`spiffe_matters`]).
#[derive(Debug, Default)]
pub struct Sources<'a> {
    /// The decoded `jwt_authn` metadata namespace (a JSON object), if any.
    pub jwt_metadata: Option<Map<String, Value>>,
    pub authorization: Option<&'a str>,
    /// (header name, value) for the configured trusted headers.
    pub headers: Vec<(&'a TrustedHeader, String)>,
}

/// Whether a claim name reads the `spiffe` claim: `spiffe` itself or a dotted path inside it.
pub fn is_spiffe_claim(name: &str) -> bool {
    name.split('.').next() == Some("spiffe")
}

/// Whether adding the `spiffe` claim to `without_spiffe` can change a decision or the audit subject:
/// the policy reads it, or the subject claims reach a `spiffe` path before one that is already a string.
pub fn spiffe_matters(policy_reads_spiffe: bool, subject_claims: &[String], without_spiffe: &Identity) -> bool {
    if policy_reads_spiffe {
        return true;
    }
    for c in subject_claims {
        if is_spiffe_claim(c) {
            return true;
        }
        if without_spiffe.claim(c).is_some_and(Value::is_string) {
            return false;
        }
    }
    false
}

/// The caller's identity. `peer_uri_san` is called at most once, with the identity so far (every other
/// source applied), and only when `cfg.spiffe` is on and no trusted header set the `spiffe` claim; it
/// answers the mTLS peer's URI SAN if the caller wants it read. The result is the same as applying the
/// sources in the documented order (token claims, `spiffe`, trusted headers).
pub fn resolve(cfg: &IdentityConfig, src: Sources, peer_uri_san: impl FnOnce(&Identity) -> Option<String>) -> Identity {
    let mut id = Identity { claims: Map::new(), source: "none" };
    if let (Some(jc), Some(ns)) = (&cfg.jwt_authn, src.jwt_metadata) {
        let payload = match &jc.payload_key {
            Some(k) => ns.get(k).and_then(Value::as_object).cloned(),
            None => ns.values().filter_map(Value::as_object).find(|o| !is_jose_header(o)).cloned(),
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
        // Workload identity comes from the mTLS peer alone (below): no token claim `spiffe`, nor one
        // named by a path inside it (`"spiffe.namespace": "payments"`), which [`Identity::claim`] reads
        // before the path, so it stood in for the certificate's namespace, with or without one.
        id.claims.retain(|k, _| !is_spiffe_claim(k));
    }
    // Trusted headers come after `spiffe` in the documented order, so one that sets the `spiffe` claim
    // overrides the peer's: then the certificate is not read at all.
    let header_sets_spiffe = src.headers.iter().any(|(h, _)| h.claim == "spiffe");
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
    if cfg.spiffe && !header_sets_spiffe {
        // Workload identity comes from the mTLS peer alone: a token claim named `spiffe` (which an
        // identity provider should never issue, and which anyone can put in an unverified token) must
        // not stand in for the certificate when the connection has none.
        id.claims.remove("spiffe");
        if let Some(s) = peer_uri_san(&id).as_deref().and_then(parse_spiffe) {
            id.claims.insert("spiffe".into(), s);
        }
    }
    id
}

/// Whether a `jwt_authn` metadata object is a token's JOSE header, which `jwt_authn` writes next to the
/// payload when `header_in_metadata` is set (`{"alg": "RS256", "kid": …}`): every JWS header has a
/// string `alg`, a payload practically never. Without a `payload_key` the claims are the first object
/// that is no header: keys sort, and `jwt_header` comes before `jwt_payload`.
fn is_jose_header(o: &Map<String, Value>) -> bool {
    o.get("alg").is_some_and(Value::is_string)
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

    /// A binding's owner is the subject and the claim it came from: a token whose `sub` reads like
    /// another caller's subject (a workload's SPIFFE ID, the anonymous callers' `anonymous`) is not them.
    #[test]
    fn owners_keep_the_claim_of_their_subject() {
        let claims = ["sub".to_string(), "spiffe.id".to_string()];
        let of = |v: Value| Identity::from_claims(v.as_object().cloned().unwrap_or_default());
        let sub_anon = of(json!({"sub": "anonymous"}));
        assert_eq!(sub_anon.subject(&claims), Identity::default().subject(&claims), "the audit subject is the same");
        assert_ne!(sub_anon.owner_key(&claims), Identity::default().owner_key(&claims));
        assert_eq!(Identity::default().owner_key(&claims), None);
        let id = "spiffe://td/ns/a/sa/b";
        let token = of(json!({"sub": id}));
        let workload = of(json!({"spiffe": {"id": id}}));
        assert_eq!(token.subject(&claims), workload.subject(&claims));
        assert_ne!(token.owner_key(&claims), workload.owner_key(&claims));
        assert_eq!(
            of(json!({"sub": "bob", "groups": ["x"]})).owner_key(&claims),
            of(json!({"sub": "bob"})).owner_key(&claims)
        );
    }

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
                headers: vec![(&th, "finance, ops".into())],
            },
            |_| Some("spiffe://cluster.local/ns/agents/sa/planner".into()),
        );
        assert_eq!(id.source, "jwt_authn", "verified claims win over the unverified token");
        assert_eq!(id.claim("sub"), Some(&json!("alice")));
        assert_eq!(id.claim("groups"), Some(&json!(["finance", "ops"])));
        assert_eq!(id.claim("spiffe.namespace"), Some(&json!("agents")));
        assert_eq!(id.subject(&["sub".into()]), "alice");
        let dev = resolve(&cfg, Sources { authorization: Some(&token), ..Sources::default() }, |_| None);
        assert_eq!((dev.source, dev.subject(&["sub".into()])), ("unverified_bearer", "mallory".to_string()));
        let off =
            resolve(&IdentityConfig::default(), Sources { authorization: Some(&token), ..Sources::default() }, |_| {
                None
            });
        assert_eq!(off.subject(&["sub".into()]), "anonymous", "no dev switch, no claims");
        // A `spiffe` claim in a token never stands in for the peer certificate (none here).
        let forged = json!({"jwt_payload": {"sub": "eve", "spiffe": {"namespace": "payments"}}});
        let src = || Sources { jwt_metadata: forged.as_object().cloned(), ..Sources::default() };
        assert_eq!(resolve(&IdentityConfig::default(), src(), |_| None).claim("spiffe.namespace"), None);
        let peer = resolve(&IdentityConfig::default(), src(), |_| Some("spiffe://td/ns/agents/sa/x".into()));
        assert_eq!(peer.claim("spiffe.namespace"), Some(&json!("agents")));
        // With `spiffe: false` the filter reads no workload identity: the token's claims are all there is.
        let off = IdentityConfig { spiffe: false, ..IdentityConfig::default() };
        assert_eq!(resolve(&off, src(), |_| None).claim("spiffe.namespace"), Some(&json!("payments")));
        // Nor does a token claim named by a path inside it, which `claim` reads before the path.
        let dotted = json!({"jwt_payload": {"sub": "eve", "spiffe.namespace": "payments", "spiffe.id": "x"}});
        let src = || Sources { jwt_metadata: dotted.as_object().cloned(), ..Sources::default() };
        let none = resolve(&IdentityConfig::default(), src(), |_| None);
        assert_eq!((none.claim("spiffe.namespace"), none.claim("spiffe.id")), (None, None));
        let peer = resolve(&IdentityConfig::default(), src(), |_| Some("spiffe://td/ns/agents/sa/x".into()));
        assert_eq!(peer.claim("spiffe.namespace"), Some(&json!("agents")));
        assert_eq!(resolve(&off, src(), |_| None).claim("spiffe.namespace"), Some(&json!("payments")));
    }

    /// The peer certificate is read only when it can change something, and skipping it never changes
    /// a decision input or the audit subject: every case is resolved lazily and eagerly and compared.
    #[test]
    fn the_peer_certificate_is_read_only_when_it_matters_and_skipping_it_changes_nothing() {
        use crate::policy::Policy;
        let peer = "spiffe://cluster.local/ns/agents/sa/planner";
        let spiffe_th = TrustedHeader { header: "x-spiffe".into(), claim: "spiffe".into(), list: false };
        let sub_th = TrustedHeader { header: "x-user".into(), claim: "sub".into(), list: false };
        let policy = |claim: Option<&str>| {
            let rules = match claim {
                Some(c) => json!([{"name": "r", "effect": "allow", "identity": [{"claim": c, "present": true}]}]),
                None => json!([{"name": "r", "effect": "allow", "targets": ["x"]}]),
            };
            let cfg: crate::config::PolicyConfig = serde_json::from_value(json!({"rules": rules})).unwrap();
            Policy::compile(&cfg).unwrap()
        };
        let std_subject: Vec<String> = vec!["sub".into(), "spiffe.id".into()];
        let sub_only: Vec<String> = vec!["sub".into()];
        let spiffe_first: Vec<String> = vec!["spiffe.namespace".into(), "sub".into()];
        let mut read_somewhere = false;
        let mut skipped_somewhere = false;
        for policy_claim in [None, Some("groups"), Some("spiffe.namespace"), Some("spiffe")] {
            let pol = policy(policy_claim);
            assert_eq!(pol.reads_spiffe(), policy_claim.is_some_and(is_spiffe_claim));
            for subject_claims in [&std_subject, &sub_only, &spiffe_first] {
                for jwt_sub in [None, Some("alice")] {
                    for header in [None, Some((&sub_th, "bob")), Some((&spiffe_th, "from-header"))] {
                        let cfg = IdentityConfig::default();
                        assert!(cfg.spiffe && cfg.jwt_authn.is_some(), "the defaults read both");
                        let src = || Sources {
                            jwt_metadata: jwt_sub.map(|s| json!({"p": {"sub": s}}).as_object().unwrap().clone()),
                            headers: header.map(|(h, v)| vec![(h, v.to_string())]).unwrap_or_default(),
                            ..Sources::default()
                        };
                        let eager = resolve(&cfg, src(), |_| Some(peer.into()));
                        let mut asked = false;
                        let lazy = resolve(&cfg, src(), |without| {
                            asked = true;
                            spiffe_matters(pol.reads_spiffe(), subject_claims, without).then(|| peer.to_string())
                        });
                        let header_sets_spiffe = header.is_some_and(|(h, _)| h.claim == "spiffe");
                        assert_eq!(asked, !header_sets_spiffe, "asked once unless a header set the claim");
                        let case = format!("{policy_claim:?} {subject_claims:?} {jwt_sub:?} {header:?}");
                        assert_eq!(lazy.subject(subject_claims), eager.subject(subject_claims), "{case}");
                        let call = crate::policy::Call {
                            protocol: crate::config::Protocol::Mcp,
                            method: "tools/call",
                            method_names: &[],
                            target: Some("x"),
                            arguments: None,
                        };
                        assert_eq!(pol.evaluate(&lazy, &call).allowed, pol.evaluate(&eager, &call).allowed, "{case}");
                        if lazy.claim("spiffe") == eager.claim("spiffe") {
                            read_somewhere |= eager.claim("spiffe.id") == Some(&json!(peer));
                        } else {
                            skipped_somewhere = true;
                            assert!(!spiffe_matters(pol.reads_spiffe(), subject_claims, &lazy), "{case}");
                        }
                    }
                }
            }
        }
        assert!(read_somewhere && skipped_somewhere, "both paths are exercised");
    }

    #[test]
    fn the_payload_is_found_next_to_the_jwt_header() {
        // `header_in_metadata: jwt_header` sorts before `payload_in_metadata: jwt_payload`.
        let ns = json!({"jwt_header": {"alg": "RS256", "typ": "JWT", "kid": "k1"},
                        "jwt_payload": {"sub": "alice", "groups": ["finance"]}});
        let cfg = IdentityConfig::default();
        assert!(cfg.jwt_authn.as_ref().is_some_and(|j| j.payload_key.is_none()));
        let src = || Sources { jwt_metadata: Some(ns.as_object().unwrap().clone()), ..Sources::default() };
        let id = resolve(&cfg, src(), |_| None);
        assert_eq!((id.source, id.claim("sub")), ("jwt_authn", Some(&json!("alice"))));
        let only_header = json!({"jwt_header": {"alg": "RS256"}});
        let src = Sources { jwt_metadata: Some(only_header.as_object().unwrap().clone()), ..Sources::default() };
        assert_eq!(resolve(&cfg, src, |_| None).source, "none");
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
