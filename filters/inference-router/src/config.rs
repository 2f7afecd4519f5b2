//! inference-router configuration (JSON), validated at load time with the JSON path of a bad field.

use meshwarden_shared::config::{check_range, ConfigError, Validate};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Pool name in the sidecar (`GET /v1/pools/{pool}/endpoints`).
    pub pool: String,
    /// Where the sidecar is. Failures never fail a request: see `fallback`.
    pub sidecar: SidecarConfig,
    /// How often the root context refreshes the snapshot (conditional GET, 304 when unchanged).
    pub refresh_interval_ms: u64,
    /// A snapshot older than this (sidecar down or slow) is not used for scoring; `fallback` applies.
    pub max_snapshot_age_ms: u64,
    pub weights: Weights,
    pub saturation: Saturation,
    pub prefix: PrefixConfig,
    /// Header the picked `ip:port` goes into (Gateway API Inference Extension protocol). Any value the
    /// client sent is removed first.
    pub destination_header: String,
    /// Header set to the request's `model` so routes can match on it.
    pub model_header: String,
    /// Header carrying the request priority: an integer (negative = sheddable, 0 = standard,
    /// positive = critical) or `sheddable` / `standard` / `critical`.
    pub priority_header: String,
    /// Priority of requests without the header.
    pub default_priority: i32,
    /// What to do without a usable snapshot.
    pub fallback: Fallback,
    /// Model names that are base models (never LoRA adapters), in addition to the `model_name`s the
    /// servers report.
    pub base_models: Vec<String>,
    /// Own picks younger than this are added to an endpoint's reported load (the metrics lag behind
    /// by up to scrape interval + refresh interval).
    pub pending_window_ms: u64,
    /// Largest request body inspected for `model` and the prompt; larger bodies are routed on load only.
    pub max_body_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pool: "default".to_string(),
            sidecar: SidecarConfig::default(),
            refresh_interval_ms: 50,
            max_snapshot_age_ms: 1000,
            weights: Weights::default(),
            saturation: Saturation::default(),
            prefix: PrefixConfig::default(),
            destination_header: "x-gateway-destination-endpoint".to_string(),
            model_header: "x-gateway-model-name".to_string(),
            priority_header: "x-gateway-inference-priority".to_string(),
            default_priority: 0,
            fallback: Fallback::LeastInFlight,
            base_models: Vec::new(),
            pending_window_ms: 150,
            max_body_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarConfig {
    /// Envoy cluster of the sidecar (in Istio `outbound|PORT||FQDN`).
    pub cluster: String,
    /// `:authority` of the snapshot request; defaults to the cluster name.
    pub authority: Option<String>,
    pub timeout_ms: u64,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        Self { cluster: "meshwarden_sidecar".to_string(), authority: None, timeout_ms: 200 }
    }
}

impl SidecarConfig {
    pub fn authority(&self) -> &str {
        self.authority.as_deref().unwrap_or(&self.cluster)
    }
}

/// Scorer weights; a score is the weighted mean of the scorers' values in 0..=1.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    /// Outstanding requests (waiting + running + own recent picks, at least own in-flight), min-max normalised.
    pub queue: f64,
    /// 1 - KV-cache utilisation.
    pub kv: f64,
    /// Adapter loaded 1.0, free slot 0.8, adapter waiting 0.6, otherwise 0.
    pub lora: f64,
    /// Share of the prompt's blocks this endpoint recently served (longest chained prefix).
    pub prefix: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self { queue: 2.0, kv: 2.0, lora: 2.0, prefix: 3.0 }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Saturation {
    /// An endpoint with more waiting requests (plus own picks since the last snapshot) is saturated.
    pub queue: u32,
    /// An endpoint with a higher KV-cache utilisation is saturated.
    pub kv: f64,
}

impl Default for Saturation {
    fn default() -> Self {
        Self { queue: 5, kv: 0.8 }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrefixConfig {
    /// Characters (bytes of UTF-8) per block; 64 is about 16 tokens.
    pub block_chars: usize,
    /// Blocks hashed at most (from the start of the prompt).
    pub max_blocks: usize,
    /// Block hashes remembered per endpoint (least recently used evicted).
    pub lru_blocks_per_endpoint: usize,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        Self { block_chars: 64, max_blocks: 256, lru_blocks_per_endpoint: 16384 }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Pick the endpoint of the last known list with the fewest requests this proxy has in flight.
    /// Without any known endpoint, behave like `passthrough`.
    LeastInFlight,
    /// Set no destination header: Envoy's route without the header (a normal load-balanced cluster)
    /// decides.
    Passthrough,
}

fn check_weight(path: &str, w: f64) -> Result<(), ConfigError> {
    if !w.is_finite() {
        return Err(ConfigError::at(path, "must be a finite number"));
    }
    check_range(path, w, 0.0, 100.0)
}

fn check_header(path: &str, h: &str) -> Result<(), ConfigError> {
    if h.is_empty() || !h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
        return Err(ConfigError::at(path, "must be a non-empty lower-case header name"));
    }
    Ok(())
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.pool.trim().is_empty() || self.pool.contains(['/', '?', '#', ' ']) {
            return Err(ConfigError::at("pool", "must be a non-empty name without '/', '?', '#' or spaces"));
        }
        if self.sidecar.cluster.trim().is_empty() {
            return Err(ConfigError::at("sidecar.cluster", "must name an Envoy cluster"));
        }
        check_range("sidecar.timeout_ms", self.sidecar.timeout_ms, 1, 60_000)?;
        check_range("refresh_interval_ms", self.refresh_interval_ms, 10, 60_000)?;
        check_range("max_snapshot_age_ms", self.max_snapshot_age_ms, self.refresh_interval_ms, 600_000)?;
        check_weight("weights.queue", self.weights.queue)?;
        check_weight("weights.kv", self.weights.kv)?;
        check_weight("weights.lora", self.weights.lora)?;
        check_weight("weights.prefix", self.weights.prefix)?;
        if self.weights.queue + self.weights.kv + self.weights.lora + self.weights.prefix <= 0.0 {
            return Err(ConfigError::at("weights", "at least one weight must be positive"));
        }
        check_range("saturation.queue", self.saturation.queue, 0, 100_000)?;
        if !self.saturation.kv.is_finite() {
            return Err(ConfigError::at("saturation.kv", "must be a finite number"));
        }
        check_range("saturation.kv", self.saturation.kv, 0.0, 1.0)?;
        check_range("prefix.block_chars", self.prefix.block_chars, 8, 4096)?;
        check_range("prefix.max_blocks", self.prefix.max_blocks, 0, 4096)?;
        check_range("prefix.lru_blocks_per_endpoint", self.prefix.lru_blocks_per_endpoint, 0, 1 << 20)?;
        check_range("pending_window_ms", self.pending_window_ms, 0, 60_000)?;
        check_header("destination_header", &self.destination_header)?;
        check_header("model_header", &self.model_header)?;
        check_header("priority_header", &self.priority_header)?;
        check_range("max_body_bytes", self.max_body_bytes, 1, 64 << 20)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use meshwarden_shared::config::parse_config;

    #[test]
    fn defaults_are_valid() {
        let c: Config = parse_config(b"{}").unwrap();
        assert_eq!(c.weights, Weights { queue: 2.0, kv: 2.0, lora: 2.0, prefix: 3.0 });
        assert_eq!(c.fallback, Fallback::LeastInFlight);
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_config::<Config>(br#"{"weights":{"kv":-1}}"#).unwrap_err();
        assert!(e.to_string().contains("weights.kv"), "{e}");
        let e = parse_config::<Config>(br#"{"saturation":{"kv":1.5}}"#).unwrap_err();
        assert!(e.to_string().contains("saturation.kv"), "{e}");
        let e = parse_config::<Config>(br#"{"prefix":{"block":64}}"#).unwrap_err();
        assert!(e.to_string().contains("prefix"), "{e}");
        let e = parse_config::<Config>(br#"{"destination_header":"X Bad"}"#).unwrap_err();
        assert!(e.to_string().contains("destination_header"), "{e}");
        let e = parse_config::<Config>(br#"{"fallback":"random"}"#).unwrap_err();
        assert!(e.to_string().contains("fallback"), "{e}");
        let e = parse_config::<Config>(br#"{"weights":{"queue":0,"kv":0,"lora":0,"prefix":0}}"#).unwrap_err();
        assert!(e.to_string().contains("weights"), "{e}");
    }
}
