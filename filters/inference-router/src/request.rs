//! From a request body to the picker's input.

use crate::config::Config;
use crate::picker::RequestFeatures;
use crate::prefix::{block_hashes, prompt_text};
use meshwarden_shared::llm::Api;
use serde_json::Value;

/// `model` and the prompt's block hashes from a JSON body. A body that is not JSON (or not an object)
/// yields no model and no blocks: the request is routed on load only, never rejected.
pub fn features(cfg: &Config, path: &str, body: &[u8], priority: i32) -> RequestFeatures {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return RequestFeatures { priority, ..Default::default() };
    };
    let model = v.get("model").and_then(Value::as_str).map(str::to_string);
    let api = Api::detect(path, &v);
    let text = prompt_text(api, &v);
    let blocks = block_hashes(text.as_bytes(), cfg.prefix.block_chars, cfg.prefix.max_blocks);
    RequestFeatures { model, blocks, priority }
}

/// Whether `v` may be sent as an HTTP header value (RFC 9110 field-value, as Envoy checks it before
/// sending: tab, visible ASCII, obs-text; no other control byte, no DEL). A `model` with a CR/LF
/// (`"m\r\nx-injected: 1"`) put into the model header made Envoy answer its own 503 ("invalid header
/// value") instead of routing; such a model is not copied into the header.
pub fn is_header_value(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn header_values_refuse_control_bytes() {
        assert!(is_header_value("llama-3.1-8b-instruct:lora/a b"));
        assert!(is_header_value("caf\u{e9}\tx"));
        for bad in ["m\r\nx-injected: 1", "m\n", "m\0", "m\u{7f}", "\u{1b}[31m"] {
            assert!(!is_header_value(bad), "{bad:?}");
        }
    }

    #[test]
    fn reads_model_and_prefix() {
        let cfg = Config::default();
        let body = serde_json::json!({"model":"m1","messages":[{"role":"system","content":"s".repeat(1000)},{"role":"user","content":"q"}]});
        let f = features(&cfg, "/v1/chat/completions", body.to_string().as_bytes(), 0);
        assert_eq!(f.model.as_deref(), Some("m1"));
        assert_eq!(f.blocks.len(), 15);
    }

    #[test]
    fn garbage_body_is_load_only() {
        let cfg = Config::default();
        for body in [&b"not json"[..], b"", b"[1,2]", &[0xff, 0xfe, 0x00]] {
            let f = features(&cfg, "/v1/chat/completions", body, -1);
            assert!(f.model.is_none() && f.blocks.is_empty());
            assert_eq!(f.priority, -1);
        }
    }
}
