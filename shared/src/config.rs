//! Filter configuration parsing.
//!
//! Istio hands a WasmPlugin's `pluginConfig` to `on_configure` as JSON bytes; plain Envoy hands the
//! `configuration` string. Every filter parses it once, with `#[serde(deny_unknown_fields)]` on its
//! config structs, through [`parse_config`], so a typo is rejected at load time with the JSON path of the
//! bad field instead of being silently ignored.

use serde::de::DeserializeOwned;
use std::fmt;

/// A configuration error that names where in the JSON document it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// JSON path of the offending value, `$` for the document itself, e.g. `$.rules[0].limits.tokens_per_minute`.
    pub path: String,
    /// What was wrong or expected.
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }

    /// Prefix a relative path (`rules[0].model`) with the document root.
    pub fn at(path: &str, message: impl Into<String>) -> Self {
        let path = if path.is_empty() || path == "." {
            "$".to_string()
        } else if path.starts_with('$') {
            path.to_string()
        } else if path.starts_with('[') {
            format!("${path}")
        } else {
            format!("$.{path}")
        };
        Self::new(path, message)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration at {}: {}", self.path, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Semantic checks that serde cannot express (ranges, cross-field rules). Implemented by each
/// filter's top-level config; report the first problem with its JSON path.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Parse a filter configuration. Empty input (or only whitespace) means "all defaults" and is parsed as
/// `{}`, because Envoy passes an empty configuration when none is set.
pub fn parse_config<T: DeserializeOwned + Validate>(bytes: &[u8]) -> Result<T, ConfigError> {
    let trimmed = trim_ascii(bytes);
    let input: &[u8] = if trimmed.is_empty() { b"{}" } else { trimmed };
    let mut de = serde_json::Deserializer::from_slice(input);
    let value: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => v,
        Err(err) => {
            // serde_path_to_error writes `?` for a segment it could not read (syntax errors).
            let full = err.path().to_string();
            let path = full.trim_end_matches('?').trim_end_matches('.');
            let inner = err.into_inner();
            return Err(ConfigError::at(path, describe_serde_error(&inner)));
        }
    };
    if let Err(err) = de.end() {
        return Err(ConfigError::at("", format!("trailing characters after the JSON document ({err})")));
    }
    value.validate()?;
    Ok(value)
}

fn describe_serde_error(err: &serde_json::Error) -> String {
    // serde_json appends " at line L column C"; the path is more useful to a platform engineer, but the
    // position helps with syntax errors, so keep it for those only.
    let text = err.to_string();
    if err.is_syntax() || err.is_eof() {
        format!("malformed JSON: {text}")
    } else {
        match text.rfind(" at line ") {
            Some(idx) => text.get(..idx).unwrap_or(&text).to_string(),
            None => text,
        }
    }
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or(&[])
}

/// Helpers for range checks in `Validate` implementations.
pub fn check_range<T: PartialOrd + fmt::Display + Copy>(
    path: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::at(path, format!("must be between {min} and {max}, got {value}")));
    }
    Ok(())
}

/// A glob over names (models, tools, methods): `*` matches any run of characters, `?` one character.
/// Matching is on characters, case-sensitive. Kept here because every filter matches names this way.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    glob_chars(&p, &t)
}

/// [`glob_match`] with both sides lower-cased first (Unicode lower case): for names an upstream may
/// compare without case, such as model names (Ollama, Azure deployments), where a case-sensitive match
/// would let `GPT-4O` walk past the rules written for `gpt-4o`.
pub fn glob_match_ignore_case(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().flat_map(char::to_lowercase).collect();
    let t: Vec<char> = text.chars().flat_map(char::to_lowercase).collect();
    glob_chars(&p, &t)
}

fn glob_chars(p: &[char], t: &[char]) -> bool {
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || Some(&c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    while p.get(pi) == Some(&'*') {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Limits {
        tokens_per_minute: u64,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Rule {
        name: String,
        limits: Limits,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Doc {
        rules: Vec<Rule>,
        max_body_bytes: u64,
    }

    impl Validate for Doc {
        fn validate(&self) -> Result<(), ConfigError> {
            check_range("max_body_bytes", self.max_body_bytes, 0, 1 << 20)?;
            for (i, r) in self.rules.iter().enumerate() {
                if r.name.is_empty() {
                    return Err(ConfigError::at(&format!("rules[{i}].name"), "must not be empty"));
                }
            }
            Ok(())
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn empty_config_means_defaults() {
        let doc: Doc = parse_config(b"  ").unwrap();
        assert!(doc.rules.is_empty());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn unknown_field_is_named_with_its_path() {
        let err = parse_config::<Doc>(br#"{"rules":[{"name":"a","limits":{"tokens_per_minut":5}}]}"#).unwrap_err();
        assert_eq!(err.path, "$.rules[0].limits.tokens_per_minut");
        assert!(err.message.contains("unknown field `tokens_per_minut`"), "{}", err.message);
        assert!(err.message.contains("tokens_per_minute"), "expected fields are listed: {}", err.message);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn wrong_type_is_named_with_its_path() {
        let err =
            parse_config::<Doc>(br#"{"rules":[{"name":"a","limits":{"tokens_per_minute":"many"}}]}"#).unwrap_err();
        assert_eq!(err.path, "$.rules[0].limits.tokens_per_minute");
        assert!(err.message.contains("expected u64"), "{}", err.message);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn malformed_json_is_reported() {
        let err = parse_config::<Doc>(br#"{"rules": ["#).unwrap_err();
        assert!(err.message.starts_with("malformed JSON"), "{}", err.message);
        assert_eq!(err.path, "$.rules");
        let err = parse_config::<Doc>(b"{not json").unwrap_err();
        assert_eq!(err.path, "$");
        let err = parse_config::<Doc>(br#"{} {}"#).unwrap_err();
        assert!(err.message.contains("trailing"), "{}", err.message);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn semantic_validation_runs_after_parsing() {
        let err = parse_config::<Doc>(br#"{"max_body_bytes": 99999999}"#).unwrap_err();
        assert_eq!(err.path, "$.max_body_bytes");
        let err = parse_config::<Doc>(br#"{"rules":[{"name":"","limits":{"tokens_per_minute":1}}]}"#).unwrap_err();
        assert_eq!(err.to_string(), "invalid configuration at $.rules[0].name: must not be empty");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn globs() {
        assert!(glob_match("gpt-4*", "gpt-4o-mini"));
        assert!(glob_match("*", ""));
        assert!(glob_match("claude-?-sonnet", "claude-3-sonnet"));
        assert!(!glob_match("gpt-4*", "gpt-3.5"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("tools/*", "tools/call"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(!glob_match("gpt-4o", "GPT-4o"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn globs_ignoring_case() {
        assert!(glob_match_ignore_case("gpt-4o", "GPT-4O"));
        assert!(glob_match_ignore_case("GPT-4o*", "gpt-4o-MINI"));
        assert!(glob_match_ignore_case("llama?", "LLAMA3"));
        assert!(glob_match_ignore_case("ÉCLAIR-*", "éclair-7b"));
        assert!(!glob_match_ignore_case("gpt-4o", "gpt-4o-mini"));
        assert!(!glob_match_ignore_case("gpt-4*", "gpt-3.5"));
    }
}
