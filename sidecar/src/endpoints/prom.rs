//! A small, allocation-light parser for the Prometheus text exposition format (what `/metrics` of vLLM,
//! SGLang and TensorRT-LLM serve). Only what endpoint picking needs: metric name, labels, value.
//! Unknown lines, comments, exemplars and timestamps are skipped; a malformed line is skipped, never
//! an error, so one odd metric cannot hide the others.

/// One sample. `labels` is the raw `{...}` content; use [`Sample::label`] to read one.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    labels: &'a str,
    pub value: f64,
}

impl<'a> Sample<'a> {
    /// The unescaped value of label `key`, if present.
    pub fn label(&self, key: &str) -> Option<String> {
        let mut rest = self.labels;
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if rest.is_empty() {
                return None;
            }
            let eq = rest.find('=')?;
            let k = rest.get(..eq)?.trim();
            rest = rest.get(eq + 1..)?.trim_start();
            rest = rest.strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, other)) => value.push(other),
                        None => return None,
                    },
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    c => value.push(c),
                }
            }
            let end = end?;
            if k == key {
                return Some(value);
            }
            rest = rest.get(end + 1..)?;
        }
    }
}

/// Samples whose metric name satisfies `want`. Names are checked before labels and values are parsed,
/// so the (large) histogram sections of a model server's page cost a line scan only.
pub fn samples<'a>(text: &'a str, want: impl Fn(&str) -> bool + 'a) -> impl Iterator<Item = Sample<'a>> + 'a {
    text.lines().filter_map(move |line| {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let name_end = line.find(|c: char| c == '{' || c.is_ascii_whitespace())?;
        let name = line.get(..name_end)?;
        if !want(name) {
            return None;
        }
        let rest = line.get(name_end..)?;
        let (labels, rest) = if let Some(r) = rest.strip_prefix('{') {
            let close = find_label_end(r)?;
            (r.get(..close)?, r.get(close + 1..)?)
        } else {
            ("", rest)
        };
        let value = rest.split_whitespace().next()?;
        let value = match value {
            "+Inf" | "Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse::<f64>().ok()?,
        };
        Some(Sample { name, labels, value })
    })
}

/// Index of the `}` closing a label set, honouring quoted values with escapes.
fn find_label_end(s: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn parses_names_labels_values() {
        let text = "# HELP x y\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\\\"1\",engine=\"0\"} 3.0\nplain 7 1700000000\nweird{a=\"}\"} +Inf\nbad line here\nnovalue{a=\"1\"}\n";
        let all: Vec<_> = samples(text, |_| true).collect();
        assert_eq!(all.len(), 3, "{all:?}");
        assert_eq!(all[0].name, "vllm:num_requests_waiting");
        assert_eq!(all[0].value, 3.0);
        assert_eq!(all[0].label("model_name").as_deref(), Some("m\"1"));
        assert_eq!(all[0].label("engine").as_deref(), Some("0"));
        assert_eq!(all[0].label("nope"), None);
        assert_eq!(all[1].value, 7.0);
        assert_eq!(all[2].label("a").as_deref(), Some("}"));
        assert!(all[2].value.is_infinite());
    }

    #[test]
    fn filter_skips_unwanted_names() {
        let text = "a 1\nb 2\na{x=\"1\"} 3\n";
        let v: Vec<f64> = samples(text, |n| n == "a").map(|s| s.value).collect();
        assert_eq!(v, vec![1.0, 3.0]);
    }

    #[test]
    fn garbage_never_panics() {
        for t in ["{", "a{", "a{b=\"", "a{b=\"\\", "\u{0}\u{1}", "a{b=c} 1", "a NaN", "é{é=\"é\"} 1"] {
            for s in samples(t, |_| true) {
                let _ = s.label("b");
            }
        }
    }
}
