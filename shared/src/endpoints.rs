//! The endpoint-metrics snapshot the sidecar serves and inference-router reads
//! (`GET /v1/pools/{pool}/endpoints`, see `docs/sidecar-api.md`). One definition for both sides.
//!
//! Kept compact on purpose: short field names, KV use rounded to 1/100, no timestamps in the body (a
//! timestamp would change the body, and so the version, on every scrape even when nothing else did).
//! Freshness is one flag per endpoint, decided by the sidecar; the reader adds its own snapshot age.

use serde::{Deserialize, Serialize};

/// One pool's endpoints as last scraped. `version` changes exactly when the serialized content changes;
/// it is also the HTTP `ETag`, so an unchanged snapshot is answered with `304 Not Modified`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PoolSnapshot {
    pub pool: String,
    pub version: u64,
    #[serde(rename = "eps", default)]
    pub endpoints: Vec<EndpointState>,
}

/// One model server, as the picker needs it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EndpointState {
    /// `ip:port`, the value for `x-gateway-destination-endpoint`.
    #[serde(rename = "a")]
    pub address: String,
    /// Last scrape succeeded within the pool's staleness bound. When false the other fields are the
    /// last known values and must not be trusted for saturation decisions.
    #[serde(rename = "f", default)]
    pub fresh: bool,
    /// Requests waiting in the server's queue.
    #[serde(rename = "w", default)]
    pub waiting: u32,
    /// Requests in the running batch.
    #[serde(rename = "r", default)]
    pub running: u32,
    /// KV-cache utilisation, 0..=1.
    #[serde(rename = "kv", default)]
    pub kv: f32,
    /// LoRA adapter slots (vLLM `max_lora`); 0 = no LoRA information.
    #[serde(rename = "ml", default, skip_serializing_if = "is_zero")]
    pub max_lora: u32,
    /// Adapters loaded and running.
    #[serde(rename = "lr", default, skip_serializing_if = "Vec::is_empty")]
    pub lora_running: Vec<String>,
    /// Adapters requested but waiting for a slot.
    #[serde(rename = "lw", default, skip_serializing_if = "Vec::is_empty")]
    pub lora_waiting: Vec<String>,
    /// Base model names the server reports (vLLM `model_name` label).
    #[serde(rename = "m", default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Round a utilisation to 1/100 so that noise in the last digits does not produce a new version.
pub fn quantize_kv(v: f64) -> f32 {
    if !v.is_finite() {
        return 0.0;
    }
    ((v.clamp(0.0, 1.0) * 100.0).round() / 100.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn round_trip_is_compact() {
        let s = PoolSnapshot {
            pool: "p".into(),
            version: 3,
            endpoints: vec![EndpointState {
                address: "10.0.0.1:8000".into(),
                fresh: true,
                waiting: 2,
                running: 5,
                kv: quantize_kv(0.4567),
                ..Default::default()
            }],
        };
        let json = serde_json::to_string(&s).unwrap_or_default();
        assert_eq!(json, r#"{"pool":"p","version":3,"eps":[{"a":"10.0.0.1:8000","f":true,"w":2,"r":5,"kv":0.46}]}"#);
        let back: PoolSnapshot = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, s);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn quantize_clamps_and_handles_nan() {
        assert_eq!(quantize_kv(f64::NAN), 0.0);
        assert_eq!(quantize_kv(7.0), 1.0);
        assert_eq!(quantize_kv(-1.0), 0.0);
    }
}
