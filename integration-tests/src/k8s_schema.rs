//! Validate Kubernetes manifests against a CRD's structural OpenAPI v3 schema, the way the API server
//! would, plus the one thing it does silently: **unknown fields are errors here**, because the API server
//! prunes them without a word (a typo such as `pluginconfig` would otherwise vanish and the plugin run
//! with defaults). The CRD's CEL rules (`x-kubernetes-validations`) are checked by a hand-written
//! implementation per rule message; a rule we do not know fails validation rather than being skipped.

use anyhow::{Context, Result};
use serde_json::Value;

/// The `openAPIV3Schema` of `version` in a CRD document.
pub fn crd_schema(crd: &Value, version: &str) -> Result<Value> {
    let versions = crd.pointer("/spec/versions").and_then(Value::as_array).context("CRD has no versions")?;
    let v = versions
        .iter()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(version))
        .with_context(|| format!("CRD has no version {version}"))?;
    v.pointer("/schema/openAPIV3Schema").cloned().context("version has no openAPIV3Schema")
}

/// Errors (with JSON paths) of `doc` against `schema`; empty means valid.
pub fn validate(schema: &Value, doc: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    check(schema, doc, "$", &mut errors);
    errors
}

fn type_ok(schema: &Value, v: &Value) -> bool {
    if schema.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true) {
        return v.is_i64() || v.is_u64() || v.is_string();
    }
    if v.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true) {
        return true;
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    }
}

fn check(schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
    if !type_ok(schema, v) {
        errors.push(format!("{path}: expected {}, got {v}", schema.get("type").and_then(Value::as_str).unwrap_or("?")));
        return;
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(v) {
            errors.push(format!("{path}: {v} is not one of {}", Value::Array(options.clone())));
        }
    }
    if let Some(s) = v.as_str() {
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
            if s.chars().count() as u64 > max {
                errors.push(format!("{path}: longer than {max}"));
            }
        }
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
            if (s.chars().count() as u64) < min {
                errors.push(format!("{path}: shorter than {min}"));
            }
        }
        if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
            match regex_lite::Regex::new(p) {
                Ok(re) if !re.is_match(s) => errors.push(format!("{path}: {s:?} does not match {p}")),
                Ok(_) => {}
                Err(e) => errors.push(format!("{path}: schema pattern {p} does not compile: {e}")),
            }
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            if n < min {
                errors.push(format!("{path}: {n} < minimum {min}"));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            if n > max {
                errors.push(format!("{path}: {n} > maximum {max}"));
            }
        }
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        let preserve = schema.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool) == Some(true);
        let additional = schema.get("additionalProperties");
        if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64) {
            if obj.len() as u64 > max {
                errors.push(format!("{path}: more than {max} properties"));
            }
        }
        for (k, child) in obj {
            let child_path = format!("{path}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(s, child, &child_path, errors),
                None => match additional {
                    Some(s) if s.is_object() => check(s, child, &child_path, errors),
                    _ if preserve => {}
                    _ => errors.push(format!(
                        "{child_path}: unknown field (the API server would silently drop it); known: {}",
                        props.map(|p| p.keys().cloned().collect::<Vec<_>>().join(", ")).unwrap_or_default()
                    )),
                },
            }
        }
        if let Some(req) = schema.get("required").and_then(Value::as_array) {
            for r in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    errors.push(format!("{path}: missing required field {r}"));
                }
            }
        }
    }
    if let Some(items) = v.as_array() {
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
            if items.len() as u64 > max {
                errors.push(format!("{path}: more than {max} items"));
            }
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                check(item_schema, item, &format!("{path}[{i}]"), errors);
            }
        }
        if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut seen = std::collections::HashSet::new();
            for item in items {
                let key: Vec<String> =
                    keys.iter().map(|k| item.get(*k).map(Value::to_string).unwrap_or_default()).collect();
                if !seen.insert(key.clone()) {
                    errors.push(format!("{path}: duplicate list-map key {key:?}"));
                }
            }
        }
    }
    if let Some(rules) = schema.get("x-kubernetes-validations").and_then(Value::as_array) {
        for rule in rules {
            let message = rule.get("message").and_then(Value::as_str).unwrap_or("");
            match cel_rule(message, v) {
                Some(true) => {}
                Some(false) => errors.push(format!("{path}: {message}")),
                None => errors.push(format!("{path}: unsupported CEL rule {message:?}: teach k8s_schema.rs")),
            }
        }
    }
}

/// The CEL rules of Istio's WasmPlugin CRD, implemented by hand. `None` = unknown rule.
fn cel_rule(message: &str, v: &Value) -> Option<bool> {
    let has = |k: &str| v.get(k).is_some();
    Some(match message {
        "only one of targetRefs or selector can be set" => {
            usize::from(has("selector")) + usize::from(has("targetRef")) + usize::from(has("targetRefs")) <= 1
        }
        "wildcard not allowed in label value match" => !v.as_str().unwrap_or("").contains('*'),
        "wildcard not allowed in label key match" => v.as_object().is_none_or(|o| o.keys().all(|k| !k.contains('*'))),
        "key must not be empty" => v.as_object().is_none_or(|o| o.keys().all(|k| !k.is_empty())),
        "cross namespace referencing is not currently supported" => v.as_str().is_none_or(str::is_empty),
        "url must have schema one of [http, https, file, oci]" => {
            let s = v.as_str().unwrap_or("");
            match s.split_once("://") {
                Some((scheme, _)) => ["http", "https", "oci", "file"].contains(&scheme),
                None => true, // no scheme: Istio treats it as oci://
            }
        }
        "value may only be set when valueFrom is INLINE" => {
            v.get("valueFrom").and_then(Value::as_str) != Some("HOST") || !has("value")
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_and_cel_rules() {
        let schema = json!({"type":"object","properties":{"spec":{"type":"object","properties":{
            "url":{"type":"string","x-kubernetes-validations":[{"message":"url must have schema one of [http, https, file, oci]","rule":"..."}]},
            "phase":{"type":"string","enum":["AUTHN","AUTHZ"]},
            "pluginConfig":{"type":"object","x-kubernetes-preserve-unknown-fields":true}},
            "required":["url"],
            "x-kubernetes-validations":[{"message":"only one of targetRefs or selector can be set","rule":"..."}]}}});
        let ok = json!({"spec":{"url":"oci://r/x@sha256:00","phase":"AUTHZ","pluginConfig":{"anything":1}}});
        assert!(validate(&schema, &ok).is_empty(), "{:?}", validate(&schema, &ok));
        let bad = json!({"spec":{"url":"ftp://x","phase":"LATE","pluginconfig":{},"selector":{},"targetRefs":[]}});
        let errs = validate(&schema, &bad).join("\n");
        assert!(errs.contains("$.spec.pluginconfig: unknown field"), "{errs}");
        assert!(errs.contains("url must have schema"), "{errs}");
        assert!(errs.contains("\"LATE\" is not one of"), "{errs}");
        assert!(errs.contains("only one of targetRefs or selector"), "{errs}");
        let unknown_rule = json!({"type":"string","x-kubernetes-validations":[{"message":"new rule","rule":"x"}]});
        assert!(!validate(&unknown_rule, &json!("a")).is_empty());
        let missing = json!({"spec":{}});
        assert!(validate(&schema, &missing).join("").contains("missing required field url"));
    }
}
