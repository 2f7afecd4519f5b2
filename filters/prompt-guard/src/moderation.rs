//! The optional moderation callout: an OpenAI-moderation-compatible request body and the verdict read
//! from its answer (`results[].category_scores` against a threshold, else `results[].flagged`).

use serde_json::{json, Value};

/// `{"input": "...", "model": "..."}`.
pub fn request_body(model: Option<&str>, input: &str) -> Vec<u8> {
    let mut v = json!({ "input": input });
    if let (Some(m), Some(o)) = (model, v.as_object_mut()) {
        o.insert("model".to_string(), Value::String(m.to_string()));
    }
    v.to_string().into_bytes()
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Clean,
    /// The category (or `flagged` when the service gives no scores) and its score.
    Flagged {
        category: String,
        score: f64,
    },
}

/// Read the service's answer. `Err` means it could not be understood (counts as a callout failure).
pub fn parse_verdict(body: &[u8], threshold: f64) -> Result<Verdict, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let results = v.get("results").and_then(Value::as_array).ok_or("no `results` array")?;
    let mut best: Option<(String, f64)> = None;
    let mut flagged = false;
    for r in results {
        flagged |= r.get("flagged").and_then(Value::as_bool).unwrap_or(false);
        if let Some(scores) = r.get("category_scores").and_then(Value::as_object) {
            for (k, s) in scores {
                if let Some(s) = s.as_f64() {
                    if best.as_ref().is_none_or(|(_, b)| s > *b) {
                        best = Some((k.clone(), s));
                    }
                }
            }
        }
    }
    Ok(match best {
        Some((category, score)) if score >= threshold => Verdict::Flagged { category, score },
        Some(_) => Verdict::Clean,
        None if flagged => Verdict::Flagged { category: "flagged".to_string(), score: 1.0 },
        None => Verdict::Clean,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let b = br#"{"results":[{"flagged":false,"category_scores":{"violence":0.2,"self-harm":0.7}}]}"#;
        assert_eq!(parse_verdict(b, 0.5).unwrap(), Verdict::Flagged { category: "self-harm".into(), score: 0.7 });
        assert_eq!(parse_verdict(b, 0.8).unwrap(), Verdict::Clean);
        assert_eq!(
            parse_verdict(br#"{"results":[{"flagged":true}]}"#, 0.5).unwrap(),
            Verdict::Flagged { category: "flagged".into(), score: 1.0 }
        );
        assert!(parse_verdict(b"{}", 0.5).is_err());
        assert!(parse_verdict(b"<html>", 0.5).is_err());
        let body: Value = serde_json::from_slice(&request_body(Some("omni"), "hi \"x\"")).unwrap();
        assert_eq!(body, json!({"input":"hi \"x\"","model":"omni"}));
    }
}
