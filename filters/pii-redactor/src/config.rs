//! Configuration: which detectors, what each does, where to scan, what to do with what cannot be scanned.

use crate::detect::{Builtin, Confidence};
use meshwarden_shared::config::{check_range, ConfigError, Validate};
use serde::Deserialize;
use std::collections::BTreeMap;

/// What happens to a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Reversible placeholder `<EMAIL_1>`, restored in the answer.
    Mask,
    /// Irreversible `redact_text`.
    Redact,
    /// Keep the last `keep_last` letters/digits, `*` for the others, separators kept.
    Partial,
    /// `[EMAIL:3f2a9c1b04de]`: salted SipHash, stable across requests and gateways with the same salt.
    Hash,
    /// Refuse the request (400) naming the types found (never the values).
    Reject,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Mask => "mask",
            Action::Redact => "redact",
            Action::Partial => "partial",
            Action::Hash => "hash",
            Action::Reject => "reject",
        }
    }
}

/// Bodies that cannot be scanned: compressed (`content-encoding`), larger than `max_body_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unscannable {
    /// Answer 415 (compressed) or 413 (too large): nothing unscanned leaves (fail closed, the default).
    Reject,
    /// Forward unchanged and count it (fail open).
    Pass,
}

/// See [`Config::on_upgrade`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeMode {
    /// Every upgrade is unscannable: refused or passed as `on_unscannable` says.
    Unscannable,
    /// An OpenAI Realtime session (`GET` on a path ending in `/realtime`) is masked and restored (see
    /// `realtime.rs`); other upgrades are unscannable.
    Mask,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Validator {
    #[default]
    None,
    Luhn,
    Mod97,
}

/// Per built-in detector settings; everything optional (the top-level defaults apply).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    pub enabled: bool,
    pub action: Option<Action>,
    pub min_confidence: Option<Confidence>,
    pub keep_last: Option<usize>,
    /// Replaces the built-in context words (lower case, matched case-insensitively near the candidate).
    pub context_words: Option<Vec<String>>,
}

fn enabled_by_default() -> bool {
    true
}

impl CustomDetector {
    /// The confidence of a match with no context word near it.
    pub fn base_confidence(&self) -> Confidence {
        self.confidence.unwrap_or(if self.context_words.is_empty() { Confidence::Medium } else { Confidence::Low })
    }
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self { enabled: true, action: None, min_confidence: None, keep_last: None, context_words: None }
    }
}

/// A user-defined detector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomDetector {
    /// `[a-z0-9_]`, unique; the placeholder label is its upper case (`employee_id` -> `<EMPLOYEE_ID_1>`).
    pub name: String,
    /// Regular expression (Rust `regex-lite` syntax: no look-around, no Unicode classes).
    pub pattern: String,
    /// A disabled detector is still validated (its pattern must compile) but never run, so a shared
    /// base configuration can carry it and an overlay switch it on.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    #[serde(default)]
    pub validator: Validator,
    /// Words that raise a match's confidence one level when one appears within `context_window` bytes
    /// before or after it.
    #[serde(default)]
    pub context_words: Vec<String>,
    /// Confidence of a match with no context word near it. Default `low` when `context_words` are given
    /// (so, at the default `min_confidence` of `medium`, a context word is required), `medium` otherwise.
    #[serde(default)]
    pub confidence: Option<Confidence>,
    /// Reported at or above this; default the top-level `min_confidence`.
    #[serde(default)]
    pub min_confidence: Option<Confidence>,
    #[serde(default)]
    pub action: Option<Action>,
    #[serde(default)]
    pub keep_last: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Largest request body (and non-streamed response body) buffered for inspection.
    pub max_body_bytes: u64,
    /// Action for detectors that do not set one.
    pub default_action: Action,
    /// Minimum confidence for detectors that do not set one.
    pub min_confidence: Confidence,
    /// Per built-in detector (`email`, `phone`, `credit_card`, ...). Absent detectors are enabled.
    pub detectors: BTreeMap<String, DetectorConfig>,
    pub custom_detectors: Vec<CustomDetector>,
    /// Bytes before and after a candidate searched for context words.
    pub context_window: usize,
    /// Restore `mask` placeholders in the answer (JSON and SSE).
    pub restore: bool,
    /// Also scan what the model writes (PII it produces on its own) and apply `response_action`.
    pub scan_responses: bool,
    /// `redact`, `partial` or `hash` (a placeholder in an answer could never be restored).
    pub response_action: Action,
    /// Secret for `hash`; required when any detector hashes.
    pub hash_salt: String,
    pub redact_text: String,
    /// Default `keep_last` for `partial`.
    pub partial_keep_last: usize,
    pub on_unscannable: Unscannable,
    /// WebSocket upgrades: `unscannable` (as `on_unscannable` says), or `mask`: an OpenAI Realtime
    /// session has its client events masked and the placeholders restored in its server events.
    pub on_upgrade: UpgradeMode,
    /// Scan non-JSON request bodies (and JSON that does not parse) as plain text.
    pub raw_fallback: bool,
    /// Decode base64 written into the texts (a pasted Kubernetes Secret, a Basic credential) and mask
    /// what it encodes, re-encoded the same way.
    pub scan_base64_in_text: bool,
    /// Response header carrying counts per type (`email=2,phone=1`) for the access log (`%RESP(...)%`);
    /// never values. Empty disables it.
    pub counts_header: String,
    /// How often (ms) a worker hands its counters to Envoy (they are summed in the VM in between).
    pub stats_flush_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            default_action: Action::Mask,
            min_confidence: Confidence::Medium,
            detectors: BTreeMap::new(),
            custom_detectors: Vec::new(),
            context_window: 48,
            restore: true,
            scan_responses: false,
            response_action: Action::Redact,
            hash_salt: String::new(),
            redact_text: "[REDACTED]".to_string(),
            partial_keep_last: 4,
            on_unscannable: Unscannable::Reject,
            on_upgrade: UpgradeMode::Unscannable,
            raw_fallback: true,
            scan_base64_in_text: true,
            counts_header: "x-meshwarden-pii".to_string(),
            stats_flush_interval_ms: 20,
        }
    }
}

impl Config {
    pub fn action_of(&self, b: Builtin) -> Action {
        self.detector(b).and_then(|d| d.action).unwrap_or(self.default_action)
    }

    pub fn detector(&self, b: Builtin) -> Option<&DetectorConfig> {
        self.detectors.get(b.name())
    }

    fn uses_hash(&self) -> bool {
        self.default_action == Action::Hash
            || self.detectors.values().any(|d| d.action == Some(Action::Hash))
            || self.custom_detectors.iter().any(|d| d.action == Some(Action::Hash))
            || (self.scan_responses && self.response_action == Action::Hash)
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        check_range("max_body_bytes", self.max_body_bytes, 1, 64 << 20)?;
        check_range("context_window", self.context_window, 0, 1024)?;
        check_range("stats_flush_interval_ms", self.stats_flush_interval_ms, 1, 10_000)?;
        check_range("partial_keep_last", self.partial_keep_last, 0, 64)?;
        for (name, d) in &self.detectors {
            if !Builtin::ALL.iter().any(|b| b.name() == name) {
                let known: Vec<&str> = Builtin::ALL.iter().map(|b| b.name()).collect();
                return Err(ConfigError::at(
                    &format!("detectors.{name}"),
                    format!("unknown detector, expected one of {}", known.join(", ")),
                ));
            }
            if let Some(k) = d.keep_last {
                check_range(&format!("detectors.{name}.keep_last"), k, 0, 64)?;
            }
        }
        if matches!(self.response_action, Action::Mask | Action::Reject) {
            return Err(ConfigError::at(
                "response_action",
                "must be redact, partial or hash (a placeholder in an answer cannot be restored, and an answer cannot be rejected once streaming)",
            ));
        }
        if self.uses_hash() && self.hash_salt.len() < 16 {
            return Err(ConfigError::at(
                "hash_salt",
                "a secret of at least 16 bytes is required when an action is hash",
            ));
        }
        if self.redact_text.len() > 64 {
            return Err(ConfigError::at("redact_text", "at most 64 bytes"));
        }
        if !self.counts_header.is_empty()
            && !self.counts_header.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        {
            return Err(ConfigError::at("counts_header", "a lower-case header name ([a-z0-9-]) or empty"));
        }
        check_range("custom_detectors.length", self.custom_detectors.len(), 0, 32)?;
        let mut seen = std::collections::BTreeSet::new();
        for (i, d) in self.custom_detectors.iter().enumerate() {
            let at = |f: &str| format!("custom_detectors[{i}].{f}");
            // A letter first: placeholders are `<[A-Z][A-Z0-9_]*_n>`, and a client's look-alike of one is
            // only recognised (and never reused) in that shape.
            if d.name.len() > 32
                || !d.name.starts_with(|c: char| c.is_ascii_lowercase())
                || !d.name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
            {
                return Err(ConfigError::at(&at("name"), "1-32 characters of [a-z0-9_], starting with a letter"));
            }
            if Builtin::ALL.iter().any(|b| b.name() == d.name) || !seen.insert(d.name.clone()) {
                return Err(ConfigError::at(&at("name"), format!("duplicate detector name `{}`", d.name)));
            }
            match regex_lite::Regex::new(&d.pattern) {
                Ok(re) => {
                    if re.is_match("") {
                        return Err(ConfigError::at(&at("pattern"), "must not match the empty string"));
                    }
                }
                Err(e) => return Err(ConfigError::at(&at("pattern"), format!("invalid regex: {e}"))),
            }
            if let Some(k) = d.keep_last {
                check_range(&at("keep_last"), k, 0, 64)?;
            }
            // A detector whose matches can never reach its threshold is a configuration mistake, not a
            // silent no-op.
            let min = d.min_confidence.unwrap_or(self.min_confidence);
            // Only a word that can be found raises a match: not an empty one, not in a 0-byte window.
            let findable = self.context_window > 0 && d.context_words.iter().any(|w| !w.is_empty());
            let best = if findable { d.base_confidence().raised() } else { d.base_confidence() };
            if best < min {
                let field = if d.confidence.is_some() { "confidence" } else { "min_confidence" };
                let why = if !findable && !d.context_words.is_empty() {
                    "and no context word can be found (empty words, or context_window 0) to raise it"
                } else if d.context_words.is_empty() {
                    "and no context_words to raise it"
                } else {
                    "even with a context word"
                };
                return Err(ConfigError::at(
                    &at(field),
                    format!(
                        "matches are {:?} {why}, below min_confidence {:?}: the detector could never report",
                        d.base_confidence(),
                        min
                    )
                    .to_lowercase(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwarden_shared::config::parse_config;

    /// Every configuration in `docs/pii-redactor.md` (a ```json block) and the one in the filter's README
    /// is valid.
    #[test]
    fn documented_configurations_load() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let doc = std::fs::read_to_string(format!("{dir}/../../docs/pii-redactor.md")).unwrap();
        let mut configs: Vec<String> =
            doc.split("```json").skip(1).map(|b| b.split("```").next().unwrap_or_default().to_string()).collect();
        let readme = std::fs::read_to_string(format!("{dir}/README.md")).unwrap();
        let inline = readme.split("value: |").nth(1).and_then(|b| b.split("- name:").next()).unwrap_or_default();
        configs.push(inline.to_string());
        for text in &configs {
            let r = parse_config::<Config>(text.as_bytes());
            assert!(r.is_ok(), "{:?} in\n{text}", r.err());
        }
        assert!(configs.len() >= 2 && configs.iter().all(|c| c.contains("custom_detectors")), "{configs:?}");
    }

    #[test]
    fn defaults_and_errors_with_paths() {
        let c: Config = parse_config(b"").unwrap();
        assert_eq!(c.default_action, Action::Mask);
        assert!(c.restore);
        let e = parse_config::<Config>(br#"{"detectors":{"email":{"action":"maks"}}}"#).unwrap_err();
        assert_eq!(e.path, "$.detectors.email.action", "{e}");
        let e = parse_config::<Config>(br#"{"detectors":{"emial":{}}}"#).unwrap_err();
        assert_eq!(e.path, "$.detectors.emial", "{e}");
        let e = parse_config::<Config>(br#"{"default_action":"hash"}"#).unwrap_err();
        assert_eq!(e.path, "$.hash_salt");
        let e = parse_config::<Config>(br#"{"custom_detectors":[{"name":"x","pattern":"("}]}"#).unwrap_err();
        assert_eq!(e.path, "$.custom_detectors[0].pattern");
        let e = parse_config::<Config>(br#"{"custom_detectors":[{"name":"email","pattern":"a"}]}"#).unwrap_err();
        assert_eq!(e.path, "$.custom_detectors[0].name");
        for name in ["1st_id", "_id", "", "Id"] {
            let cfg = format!(r#"{{"custom_detectors":[{{"name":"{name}","pattern":"a"}}]}}"#);
            let e = parse_config::<Config>(cfg.as_bytes()).unwrap_err();
            assert_eq!(e.path, "$.custom_detectors[0].name", "{name:?}: {e}");
        }
        let e = parse_config::<Config>(br#"{"response_action":"mask"}"#).unwrap_err();
        assert_eq!(e.path, "$.response_action");
        // thresholds a detector can never reach are refused, naming the field to change
        let e = parse_config::<Config>(br#"{"custom_detectors":[{"name":"x","pattern":"a","confidence":"low"}]}"#)
            .unwrap_err();
        assert_eq!(e.path, "$.custom_detectors[0].confidence", "{e}");
        let e = parse_config::<Config>(
            br#"{"min_confidence":"high","custom_detectors":[{"name":"x","pattern":"a","context_words":["w"]}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.path, "$.custom_detectors[0].min_confidence", "{e}");
        assert!(e.to_string().contains("even with a context word"), "{e}");
        let ok = br#"{"custom_detectors":[{"name":"x","pattern":"a","confidence":"low","min_confidence":"low","enabled":false}]}"#;
        assert!(parse_config::<Config>(ok).is_ok());
        // Context words that can never be found (only empty ones, or a context window of 0 bytes) cannot
        // raise a match either: the detector could never report, and is refused like the cases above.
        for cfg in [
            r#"{"custom_detectors":[{"name":"x","pattern":"EMP-[0-9]{6}","context_words":[""]}]}"#,
            r#"{"context_window":0,"custom_detectors":[{"name":"x","pattern":"EMP-[0-9]{6}","context_words":["employee"]}]}"#,
        ] {
            let e = parse_config::<Config>(cfg.as_bytes()).unwrap_err();
            assert_eq!(e.path, "$.custom_detectors[0].min_confidence", "{cfg}: {e}");
        }
        let e = parse_config::<Config>(br#"{"custom_detectors":[{"name":"x","pattern":"a*"}]}"#).unwrap_err();
        assert!(e.message.contains("empty"), "{e}");
        for bad in ["0", "10001"] {
            let cfg = format!(r#"{{"stats_flush_interval_ms":{bad}}}"#);
            assert_eq!(parse_config::<Config>(cfg.as_bytes()).unwrap_err().path, "$.stats_flush_interval_ms");
        }
        assert_eq!(
            parse_config::<Config>(br#"{"stats_flush_interval_ms":1000}"#).unwrap().stats_flush_interval_ms,
            1000
        );
    }
}
