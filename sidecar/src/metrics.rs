//! Prometheus metrics of the sidecar itself, served on `/metrics`.

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

pub struct SidecarMetrics {
    pub registry: Registry,
    /// HTTP requests by route and status class.
    pub http_requests: IntCounterVec,
    /// Request latency by route, in seconds.
    pub http_latency: HistogramVec,
    /// Requests answered 408: their body did not arrive within `--body-read-timeout-ms`.
    pub body_read_timeouts: IntCounter,
}

impl SidecarMetrics {
    pub fn new() -> anyhow::Result<Self> {
        let registry = Registry::new_custom(Some("meshwarden_sidecar".to_string()), None)?;
        let http_requests =
            IntCounterVec::new(Opts::new("http_requests_total", "HTTP requests served"), &["route", "status"])?;
        let http_latency = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency")
                .buckets(vec![0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]),
            &["route"],
        )?;
        registry.register(Box::new(http_requests.clone()))?;
        let body_read_timeouts = IntCounter::new(
            "body_read_timeouts_total",
            "requests answered 408: the body did not arrive within --body-read-timeout-ms",
        )?;
        registry.register(Box::new(http_latency.clone()))?;
        registry.register(Box::new(body_read_timeouts.clone()))?;
        Ok(Self { registry, http_requests, http_latency, body_read_timeouts })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
