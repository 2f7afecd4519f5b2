//! prompt-guard configuration (JSON), validated at load time with the JSON path of a bad field.

use crate::packs::Pack;
use meshwarden_shared::callout::CalloutConfig;
use meshwarden_shared::config::{check_range, ConfigError, Validate};
use meshwarden_shared::llm::Role;
use serde::Deserialize;
use std::collections::BTreeMap;

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Refuse the request (or end the response / stream with an error).
    #[default]
    Reject,
    /// Replace the matched text with `mask_text` and let the request through.
    Mask,
    /// Count and log only.
    Log,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Reject => "reject",
            Action::Mask => "mask",
            Action::Log => "log",
        }
    }
}

/// Which direction a rule scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ApplyTo {
    #[default]
    Request,
    Response,
    Both,
}

impl ApplyTo {
    pub fn request(self) -> bool {
        matches!(self, ApplyTo::Request | ApplyTo::Both)
    }
    pub fn response(self) -> bool {
        matches!(self, ApplyTo::Response | ApplyTo::Both)
    }
}

/// What to do with a request the filter cannot inspect (too large, malformed, encoded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Answer with an error (413 / 400 / 415).
    Reject,
    /// Let it through unscanned and count it.
    Pass,
}

/// See [`Config::on_upgrade`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeMode {
    /// 403 `upgrade_refused` before anything reaches the upstream.
    Reject,
    /// Through, uninspected both ways.
    Pass,
    /// An OpenAI Realtime session (a path ending in `/realtime`): the client's events are scanned by
    /// the request rules, and a blocking rule ends the session. Other upgrades are refused.
    Inspect,
}

fn default_roles() -> Vec<Role> {
    vec![Role::User]
}

/// A built-in pack, enabled by name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackConfig {
    pub name: Pack,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub apply_to: ApplyTo,
    /// Request roles scanned (`user`, `system`, `developer`, `assistant`, `tool`, `other`).
    #[serde(default = "default_roles")]
    pub roles: Vec<Role>,
}

/// A user rule: a regular expression or a list of words / phrases.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// Regular expression matched (case-insensitively) against the normalised text.
    #[serde(default)]
    pub regex: Option<String>,
    /// Words or phrases, matched case-insensitively on word boundaries after normalisation.
    #[serde(default)]
    pub phrases: Option<Vec<String>>,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub apply_to: ApplyTo,
    #[serde(default = "default_roles")]
    pub roles: Vec<Role>,
    /// Overrides `reject.status` for this rule.
    #[serde(default)]
    pub status: Option<u16>,
    /// Overrides `reject.message` for this rule.
    #[serde(default)]
    pub message: Option<String>,
}

/// A named set of packs and rules, selected per request by `profile_header`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Replaces the top-level `packs` when present.
    #[serde(default)]
    pub packs: Option<Vec<PackConfig>>,
    /// Replaces the top-level `rules` when present.
    #[serde(default)]
    pub rules: Option<Vec<RuleConfig>>,
    /// Overrides the top-level `monitor`.
    #[serde(default)]
    pub monitor: Option<bool>,
    /// Whether the moderation callout runs for this profile (default: as configured at the top level).
    #[serde(default)]
    pub moderation: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RejectConfig {
    pub status: u16,
    /// `{rule}` is replaced by the rule name.
    pub message: String,
    /// Response header naming the rule that fired (also set on masked / logged requests).
    pub rule_header: String,
}

impl Default for RejectConfig {
    fn default() -> Self {
        Self {
            status: 403,
            message: "The request was blocked by the prompt guard (rule: {rule}).".to_string(),
            rule_header: "x-prompt-guard-rule".to_string(),
        }
    }
}

/// Optional external classifier (OpenAI-moderation-compatible), called only when local rules pass.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModerationConfig {
    /// Cluster, authority, timeout and `failure_mode` (`allow` = fail open, `deny` = fail closed).
    pub service: CalloutConfig,
    #[serde(default = "default_moderation_path")]
    pub path: String,
    #[serde(default)]
    pub model: Option<String>,
    /// A category score at or above this flags the request; without scores, the service's `flagged`.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Request roles sent to the classifier.
    #[serde(default = "default_roles")]
    pub roles: Vec<Role>,
    /// Text beyond this many bytes is not sent.
    #[serde(default = "default_moderation_bytes")]
    pub max_input_bytes: usize,
    /// `authorization` header value sent to the service, if any.
    #[serde(default)]
    pub authorization: Option<String>,
}

fn default_moderation_path() -> String {
    "/v1/moderations".to_string()
}
fn default_threshold() -> f64 {
    0.5
}
fn default_moderation_bytes() -> usize {
    32 * 1024
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Largest request or JSON response body buffered for inspection.
    pub max_body_bytes: u64,
    pub on_too_large: Fallback,
    pub on_malformed: Fallback,
    /// Requests with a `content-encoding` other than identity.
    pub on_encoded_body: Fallback,
    /// gRPC and other length-framed binary request bodies (protobuf, MessagePack, CBOR, Avro, Thrift):
    /// not text the rules can read or rewrite, and a gRPC stream never ends its body while it waits.
    pub on_binary_body: Fallback,
    /// WebSocket upgrades and CONNECT tunnels (OpenAI's Realtime API, Gemini Live): refused, passed
    /// uninspected, or (`inspect`, a Realtime session) its client events scanned (see `realtime.rs`).
    pub on_upgrade: UpgradeMode,
    /// Scan bodies that are not JSON as one user text.
    pub scan_non_json: bool,
    /// Run everything, act on nothing: count and log what would have happened.
    pub monitor: bool,
    pub packs: Vec<PackConfig>,
    pub rules: Vec<RuleConfig>,
    pub profiles: BTreeMap<String, ProfileConfig>,
    /// Request header whose value names a profile (set it from a trusted filter, e.g. after authn).
    pub profile_header: String,
    /// Envoy attribute path whose string value names a profile, checked before the header, e.g.
    /// `["metadata", "filter_metadata", "meshwarden", "tier"]` (dynamic metadata set by jwt_authn, Lua,
    /// header_to_metadata, ...).
    pub profile_property: Option<Vec<String>>,
    pub reject: RejectConfig,
    pub mask_text: String,
    /// Streamed answers: text held back so a match split across events can still be masked or stopped.
    pub stream_holdback_bytes: usize,
    pub moderation: Option<ModerationConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            on_too_large: Fallback::Reject,
            on_malformed: Fallback::Reject,
            on_encoded_body: Fallback::Reject,
            on_binary_body: Fallback::Reject,
            on_upgrade: UpgradeMode::Reject,
            scan_non_json: true,
            monitor: false,
            packs: Pack::ALL
                .iter()
                .map(|&p| PackConfig {
                    name: p,
                    action: Action::Reject,
                    apply_to: ApplyTo::Request,
                    roles: default_roles(),
                })
                .collect(),
            rules: Vec::new(),
            profiles: BTreeMap::new(),
            profile_header: "x-prompt-guard-profile".to_string(),
            profile_property: None,
            reject: RejectConfig::default(),
            mask_text: "[REDACTED]".to_string(),
            stream_holdback_bytes: 256,
            moderation: None,
        }
    }
}

fn validate_rules(base: &str, packs: &[PackConfig], rules: &[RuleConfig]) -> Result<(), ConfigError> {
    let mut names: Vec<&str> = Vec::new();
    for (i, p) in packs.iter().enumerate() {
        if p.roles.is_empty() && p.apply_to.request() {
            return Err(ConfigError::at(&format!("{base}packs[{i}].roles"), "must list at least one role"));
        }
        if names.contains(&p.name.name()) {
            return Err(ConfigError::at(&format!("{base}packs[{i}].name"), "pack listed twice"));
        }
        names.push(p.name.name());
    }
    for (i, r) in rules.iter().enumerate() {
        let at = |f: &str| format!("{base}rules[{i}].{f}");
        if r.name.trim().is_empty() || r.name.len() > 64 {
            return Err(ConfigError::at(&at("name"), "must be 1 to 64 characters"));
        }
        if names.contains(&r.name.as_str()) {
            return Err(ConfigError::at(&at("name"), "duplicate rule name (pack names are taken too)"));
        }
        names.push(&r.name);
        match (&r.regex, &r.phrases) {
            (Some(re), None) => {
                if let Err(e) = crate::engine::compile_user_regex(re) {
                    return Err(ConfigError::at(&at("regex"), format!("invalid regular expression: {e}")));
                }
            }
            (None, Some(p)) => {
                if p.is_empty() || p.iter().any(|s| s.trim().is_empty()) {
                    return Err(ConfigError::at(&at("phrases"), "must be a non-empty list of non-empty phrases"));
                }
            }
            _ => return Err(ConfigError::at(&at("regex"), "set exactly one of `regex` and `phrases`")),
        }
        if r.roles.is_empty() && r.apply_to.request() {
            return Err(ConfigError::at(&at("roles"), "must list at least one role"));
        }
        if let Some(s) = r.status {
            check_range(&at("status"), s, 400, 599)?;
        }
    }
    Ok(())
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        check_range("max_body_bytes", self.max_body_bytes, 1, 64 << 20)?;
        check_range("reject.status", self.reject.status, 400, 599)?;
        check_range("stream_holdback_bytes", self.stream_holdback_bytes, 0, 64 * 1024)?;
        if self.reject.rule_header.trim().is_empty()
            || !self.reject.rule_header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::at("reject.rule_header", "must be a header name"));
        }
        if self.mask_text.len() > 256 {
            return Err(ConfigError::at("mask_text", "at most 256 bytes"));
        }
        validate_rules("", &self.packs, &self.rules)?;
        if self.profile_property.as_ref().is_some_and(|p| p.is_empty() || p.iter().any(String::is_empty)) {
            return Err(ConfigError::at("profile_property", "must be a non-empty list of non-empty path segments"));
        }
        for (name, p) in &self.profiles {
            let base = format!("profiles.{name}.");
            if name.is_empty() || name.len() > 64 {
                return Err(ConfigError::at(&format!("profiles.{name}"), "profile names are 1 to 64 characters"));
            }
            validate_rules(
                &base,
                p.packs.as_deref().unwrap_or(&self.packs),
                p.rules.as_deref().unwrap_or(&self.rules),
            )?;
            if p.moderation == Some(true) && self.moderation.is_none() {
                return Err(ConfigError::at(&format!("{base}moderation"), "needs a top-level `moderation` block"));
            }
        }
        if let Some(m) = &self.moderation {
            m.service.validate("moderation.service")?;
            if !m.path.starts_with('/') {
                return Err(ConfigError::at("moderation.path", "must start with /"));
            }
            if !(0.0..=1.0).contains(&m.threshold) {
                return Err(ConfigError::at("moderation.threshold", "must be between 0 and 1"));
            }
            check_range("moderation.max_input_bytes", m.max_input_bytes, 1, 1 << 20)?;
            if m.roles.is_empty() {
                return Err(ConfigError::at("moderation.roles", "must list at least one role"));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The request header that may name the profile: none when `profile_property` is set (the profile
    /// then comes from that attribute alone, e.g. dynamic metadata written after authentication, and a
    /// client cannot pick a laxer one by sending the header) or when `profile_header` is `""`.
    pub fn profile_header_in_use(&self) -> Option<&str> {
        (self.profile_property.is_none() && !self.profile_header.is_empty()).then_some(self.profile_header.as_str())
    }
}

/// The rule header on an answer: `None` = leave it (a local reply of this filter already names its
/// rule), `Some(Some(v))` = set it to the rules that fired here, `Some(None)` = remove it (nothing fired,
/// or monitor mode): the upstream cannot put rule names into the answer.
pub fn rule_header_value(replied_locally: bool, monitor: bool, fired: &[&str]) -> Option<Option<String>> {
    if replied_locally {
        return None;
    }
    Some((!monitor && !fired.is_empty()).then(|| fired.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwarden_shared::config::parse_config;

    #[test]
    fn profile_header_is_ignored_when_the_profile_comes_from_a_property() {
        let c: Config = parse_config(b"{}").unwrap();
        assert_eq!(c.profile_header_in_use(), Some("x-prompt-guard-profile"));
        let c: Config = parse_config(br#"{"profile_header": ""}"#).unwrap();
        assert_eq!(c.profile_header_in_use(), None);
        let c: Config = parse_config(br#"{"profile_property": ["metadata", "filter_metadata", "m", "tier"]}"#).unwrap();
        assert_eq!(c.profile_header_in_use(), None);
    }

    #[test]
    fn rule_header_is_ours_or_removed() {
        assert_eq!(rule_header_value(true, false, &["a"]), None, "a local reply keeps the rule it names");
        assert_eq!(rule_header_value(false, false, &["a", "b"]), Some(Some("a,b".to_string())));
        assert_eq!(rule_header_value(false, false, &[]), Some(None), "nothing fired: an upstream copy is removed");
        assert_eq!(rule_header_value(false, true, &["a"]), Some(None), "monitor mode adds no header");
    }

    #[test]
    fn defaults_enable_every_pack() {
        let c: Config = parse_config(b"").unwrap();
        assert_eq!(c.packs.len(), 5);
        assert_eq!(c.reject.status, 403);
    }

    #[test]
    fn bad_fields_are_named() {
        let e = parse_config::<Config>(br#"{"rules":[{"name":"x","regex":"(unclosed"}]}"#).unwrap_err();
        assert_eq!(e.path, "$.rules[0].regex");
        let e = parse_config::<Config>(br#"{"packs":[{"name":"nope"}]}"#).unwrap_err();
        assert_eq!(e.path, "$.packs[0].name");
        let e = parse_config::<Config>(br#"{"rules":[{"name":"x","regex":"a","phrases":["b"]}]}"#).unwrap_err();
        assert_eq!(e.path, "$.rules[0].regex");
        let e = parse_config::<Config>(br#"{"rules":[{"name":"x","phrases":["a"],"action":"drop"}]}"#).unwrap_err();
        assert_eq!(e.path, "$.rules[0].action");
        let e =
            parse_config::<Config>(br#"{"profiles":{"strict":{"rules":[{"name":"","phrases":["a"]}]}}}"#).unwrap_err();
        assert_eq!(e.path, "$.profiles.strict.rules[0].name");
        let e = parse_config::<Config>(br#"{"moderation":{"service":{"cluster":""}}}"#).unwrap_err();
        assert_eq!(e.path, "$.moderation.service.cluster");
        let e = parse_config::<Config>(br#"{"reject":{"status":200}}"#).unwrap_err();
        assert_eq!(e.path, "$.reject.status");
    }
}
