//! Envoy stat names with bounded cardinality.
//!
//! Filters label stats with values that come from traffic (model names, rule names, MCP methods). A
//! client that sends a million distinct model names must not create a million stats in every worker's
//! VM and in Envoy's stat store, so each label dimension admits at most `max_values` distinct values and
//! folds the rest into `other`. Label values are sanitised to `[A-Za-z0-9_-]`, because `.` separates
//! stat name segments in Envoy. Envoy shows Wasm-defined stats with the `wasmcustom.` prefix.

use std::collections::HashMap;

pub const OVERFLOW_LABEL: &str = "other";

/// Longest raw value [`BoundedLabels::label`] remembers; longer ones are labelled `other`.
pub const MAX_REMEMBERED_BYTES: usize = 256;

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
        // A value no configuration names (a client's 1 MiB "model") is not remembered: 32 of them would
        // pin 32 MiB per worker.
        if self.known.len() >= self.max_values || raw.len() > MAX_REMEMBERED_BYTES {
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

/// Counter increments held in the VM and handed to Envoy together, once per flush interval, instead of
/// one host call per increment on the request path.
///
/// Why: a stat update is a host call, and inside Envoy each one costs the worker thread more than the
/// filter's own arithmetic (see docs/benchmarks.md); a request that updates nine counters pays for nine
/// calls. Batched, a busy worker pays one call per counter per interval, whatever its request rate. The
/// price is that Envoy's counters lag by up to one interval (and an interval's increments are lost if
/// the VM goes away before its next flush), which no scrape interval can see.
#[derive(Debug, Default)]
pub struct CounterBatch {
    /// `(metric id, pending increment)`, one entry per id. A filter updates a handful of ids per
    /// request, so a linear search beats hashing.
    pending: Vec<(u32, u64)>,
}

impl CounterBatch {
    /// Add `n` to the pending increment of counter `id` (saturating; a zero is not recorded).
    pub fn add(&mut self, id: u32, n: u64) {
        if n == 0 {
            return;
        }
        match self.pending.iter_mut().find(|(i, _)| *i == id) {
            Some((_, pending)) => *pending = pending.saturating_add(n),
            None => self.pending.push((id, n)),
        }
    }

    /// Every pending increment, leaving the batch empty (its memory is kept for the next interval).
    pub fn drain(&mut self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.pending.drain(..)
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
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
        // A huge value is labelled `other` and not remembered, even with room left.
        let mut l = BoundedLabels::new(4);
        assert_eq!(l.label(&"m".repeat(MAX_REMEMBERED_BYTES + 1)), OVERFLOW_LABEL);
        assert_eq!(l.len(), 0);
        assert_eq!(l.label(&"m".repeat(MAX_REMEMBERED_BYTES)), "m".repeat(64));
        assert_eq!(l.len(), 1);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn preloaded_values_keep_their_labels() {
        let mut l = BoundedLabels::new(0);
        l.preload(["rule-a"]);
        assert_eq!(l.label("rule-a"), "rule-a");
        assert_eq!(l.label("x"), OVERFLOW_LABEL);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn counter_batch_sums_per_id_and_drains() {
        let mut b = CounterBatch::default();
        assert!(b.is_empty());
        b.add(7, 1);
        b.add(9, 100);
        b.add(7, 2);
        b.add(11, 0);
        b.add(9, u64::MAX);
        let mut drained: Vec<(u32, u64)> = b.drain().collect();
        drained.sort_unstable();
        assert_eq!(drained, vec![(7, 3), (9, u64::MAX)]);
        assert!(b.is_empty());
        b.add(7, 5);
        assert_eq!(b.drain().collect::<Vec<_>>(), vec![(7, 5)]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn names() {
        assert_eq!(sanitize(""), "none");
        assert_eq!(sanitize(&"x".repeat(100)).len(), 64);
        assert_eq!(stat_name("guard", &[("rule", "r1")], "blocked"), "meshwarden.guard.rule.r1.blocked");
    }
}
