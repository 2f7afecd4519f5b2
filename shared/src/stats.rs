//! Envoy stat names with bounded cardinality.
//!
//! Filters label stats with values that come from traffic (model names, rule names, MCP methods). A
//! client that sends a million distinct model names must not create a million stats in every worker's
//! VM and in Envoy's stat store, so each label dimension admits at most `max_values` distinct values and
//! folds the rest into `other`. Label values are sanitised to `[A-Za-z0-9_-]`, because `.` separates
//! stat name segments in Envoy. Envoy shows Wasm-defined stats with the `wasmcustom.` prefix.

use std::collections::HashMap;

pub const OVERFLOW_LABEL: &str = "other";

/// A bounded set of label values for one dimension.
#[derive(Debug, Clone)]
pub struct BoundedLabels {
    max_values: usize,
    known: HashMap<String, String>,
}

impl BoundedLabels {
    pub fn new(max_values: usize) -> Self {
        Self { max_values, known: HashMap::new() }
    }

    /// The label to use for `raw`: its sanitised self while fewer than `max_values` are known, else
    /// `other`. Values configured up front ([`preload`](Self::preload)) always keep their own label.
    pub fn label(&mut self, raw: &str) -> String {
        if let Some(l) = self.known.get(raw) {
            return l.clone();
        }
        if self.known.len() >= self.max_values {
            return OVERFLOW_LABEL.to_string();
        }
        let l = sanitize(raw);
        self.known.insert(raw.to_string(), l.clone());
        l
    }

    /// Reserve labels for values from the configuration (rule names, configured models).
    pub fn preload<'a>(&mut self, values: impl IntoIterator<Item = &'a str>) {
        for v in values {
            self.known.insert(v.to_string(), sanitize(v));
        }
        self.max_values = self.max_values.max(self.known.len());
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

/// Make a string safe as one Envoy stat name segment (at most 64 characters, never empty).
pub fn sanitize(raw: &str) -> String {
    let s: String =
        raw.chars().take(64).map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    if s.is_empty() {
        "none".to_string()
    } else {
        s
    }
}

/// `meshwarden.<filter>.<name>` with `key.value` label pairs appended, e.g.
/// `meshwarden.token_limiter.model.gpt-4o.input_tokens`.
pub fn stat_name(filter: &str, labels: &[(&str, &str)], name: &str) -> String {
    let mut out = format!("meshwarden.{filter}");
    for (k, v) in labels {
        out.push('.');
        out.push_str(k);
        out.push('.');
        out.push_str(v);
    }
    out.push('.');
    out.push_str(name);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn cardinality_is_bounded() {
        let mut l = BoundedLabels::new(2);
        assert_eq!(l.label("gpt-4o"), "gpt-4o");
        assert_eq!(l.label("claude.3/opus"), "claude_3_opus");
        assert_eq!(l.label("third"), OVERFLOW_LABEL);
        assert_eq!(l.label("gpt-4o"), "gpt-4o");
        assert_eq!(l.len(), 2);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn preloaded_values_keep_their_labels() {
        let mut l = BoundedLabels::new(0);
        l.preload(["rule-a"]);
        assert_eq!(l.label("rule-a"), "rule-a");
        assert_eq!(l.label("x"), OVERFLOW_LABEL);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn names() {
        assert_eq!(sanitize(""), "none");
        assert_eq!(sanitize(&"x".repeat(100)).len(), 64);
        assert_eq!(stat_name("guard", &[("rule", "r1")], "blocked"), "meshwarden.guard.rule.r1.blocked");
    }
}
