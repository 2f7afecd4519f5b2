//! Rate-limit state for token-limiter: `POST /v1/ratelimit/reserve` and `POST /v1/ratelimit/settle`
//! (wire format in `meshwarden_shared::ratelimit`, documented in `docs/sidecar-api.md`), over a storage
//! backend: [`memory::MemoryBackend`] (default) or [`redis::RedisBackend`] (`--redis-url`).

pub mod memory;
pub mod redis;

use crate::server::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use meshwarden_shared::callout::LogThrottle;
use meshwarden_shared::ratelimit::{ReserveRequest, ReserveResponse, SettleItem, SettleRequest};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The storage behind the API. One semantics: both implement the GCRA of
/// `meshwarden_shared::ratelimit` (Redis as a transcription into Lua), tested against the same cases.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    fn reserve(&self, req: ReserveRequest)
        -> impl std::future::Future<Output = anyhow::Result<ReserveResponse>> + Send;
    fn settle(&self, items: Vec<SettleItem>) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

impl Backend for memory::MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }
    async fn reserve(&self, req: ReserveRequest) -> anyhow::Result<ReserveResponse> {
        Ok(memory::MemoryBackend::reserve(self, &req)?)
    }
    async fn settle(&self, items: Vec<SettleItem>) -> anyhow::Result<()> {
        memory::MemoryBackend::settle(self, &items);
        Ok(())
    }
}

impl Backend for redis::RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }
    async fn reserve(&self, req: ReserveRequest) -> anyhow::Result<ReserveResponse> {
        Ok(redis::RedisBackend::reserve(self, &req).await?)
    }
    async fn settle(&self, items: Vec<SettleItem>) -> anyhow::Result<()> {
        Ok(redis::RedisBackend::settle(self, &items).await?)
    }
}

/// The configured backend.
pub enum AnyBackend {
    Memory(memory::MemoryBackend),
    /// Boxed: its client (with the TLS settings of `rediss://`) is several times the memory backend's size.
    Redis(Box<redis::RedisBackend>),
}

impl AnyBackend {
    pub fn name(&self) -> &'static str {
        match self {
            AnyBackend::Memory(b) => b.name(),
            AnyBackend::Redis(b) => b.name(),
        }
    }
    pub async fn reserve(&self, req: ReserveRequest) -> anyhow::Result<ReserveResponse> {
        match self {
            AnyBackend::Memory(b) => Backend::reserve(b, req).await,
            AnyBackend::Redis(b) => Backend::reserve(&**b, req).await,
        }
    }
    /// Whether the storage answers (a Redis `PING` within the backend's timeout).
    pub async fn ping(&self) -> anyhow::Result<()> {
        match self {
            AnyBackend::Memory(_) => Ok(()),
            AnyBackend::Redis(b) => Ok(b.ping().await?),
        }
    }
    pub async fn settle(&self, items: Vec<SettleItem>) -> anyhow::Result<()> {
        match self {
            AnyBackend::Memory(b) => Backend::settle(b, items).await,
            AnyBackend::Redis(b) => Backend::settle(&**b, items).await,
        }
    }
}

pub struct RateLimitMetrics {
    /// Decisions by result (`allowed`, `denied_tokens`, `denied_concurrency`).
    pub decisions: IntCounterVec,
    /// Backend latency by operation, seconds.
    pub latency: HistogramVec,
    /// Backend errors by operation.
    pub backend_errors: IntCounterVec,
    /// Memory backend: entries held (one per key and window, one per key holding leases).
    pub memory_keys: IntGauge,
    /// Memory backend: reserves refused because the state held `--memory-max-keys` live entries.
    pub memory_full_refusals: IntCounter,
}

impl RateLimitMetrics {
    pub fn new(registry: &Registry) -> anyhow::Result<Self> {
        let decisions =
            IntCounterVec::new(Opts::new("ratelimit_decisions_total", "rate-limit decisions"), &["result"])?;
        let latency = HistogramVec::new(
            HistogramOpts::new("ratelimit_backend_duration_seconds", "rate-limit backend latency")
                .buckets(vec![0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05]),
            &["op", "backend"],
        )?;
        let backend_errors =
            IntCounterVec::new(Opts::new("ratelimit_backend_errors_total", "rate-limit backend errors"), &["op"])?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(backend_errors.clone()))?;
        let memory_keys = IntGauge::new(
            "ratelimit_memory_keys",
            "memory backend: entries held (one per key and window, one per key holding leases)",
        )?;
        let memory_full_refusals = IntCounter::new(
            "ratelimit_memory_full_refusals_total",
            "memory backend: reserves refused 503 because --memory-max-keys live entries were held",
        )?;
        registry.register(Box::new(memory_keys.clone()))?;
        registry.register(Box::new(memory_full_refusals.clone()))?;
        Ok(Self { decisions, latency, backend_errors, memory_keys, memory_full_refusals })
    }
}

pub struct RateLimiter {
    pub backend: AnyBackend,
    pub metrics: RateLimitMetrics,
    /// The `authorization` value every rate-limit call must carry (`Bearer <--api-token>`), if set.
    pub required_authorization: Option<String>,
    /// Backend failures are logged once per [`FAILURE_LOG_INTERVAL_MS`], not once per call: with Redis
    /// down every call fails, and a line per call (thousands a second) buried the logs.
    pub failure_log: std::sync::Mutex<LogThrottle>,
    /// Refusals of a full memory backend, logged at most once per [`FAILURE_LOG_INTERVAL_MS`].
    pub full_log: std::sync::Mutex<LogThrottle>,
}

/// At most one log line per this interval for backend failures (each is counted in
/// `ratelimit_backend_errors_total`), with the number of failures since the last line.
pub const FAILURE_LOG_INTERVAL_MS: u64 = 60_000;

impl RateLimiter {
    /// The memory backend's entry count, into its gauge.
    fn update_memory_keys(&self) {
        if let AnyBackend::Memory(m) = &self.backend {
            self.metrics.memory_keys.set(i64::try_from(m.len()).unwrap_or(i64::MAX));
        }
    }

    /// A reserve refused by a full memory backend: counted always, logged at most once per interval.
    fn memory_full(&self, full: &memory::Full) {
        self.metrics.memory_full_refusals.inc();
        let now_ms = now_us() / 1000;
        let suppressed = match self.full_log.lock() {
            Ok(mut t) => t.should_log(now_ms),
            Err(p) => p.into_inner().should_log(now_ms),
        };
        if let Some(suppressed) = suppressed {
            tracing::warn!(max_keys = full.max_keys, suppressed, "{full}: reserves of new keys are refused (503, the filter's failure_mode); {suppressed} more since the last line");
        }
    }

    /// A backend call failed: counted always, logged at most once per interval.
    fn backend_failed(&self, op: &str, e: &anyhow::Error) {
        self.metrics.backend_errors.with_label_values(&[op]).inc();
        let now_ms = now_us() / 1000;
        let suppressed = match self.failure_log.lock() {
            Ok(mut t) => t.should_log(now_ms),
            Err(p) => p.into_inner().should_log(now_ms),
        };
        if let Some(suppressed) = suppressed {
            tracing::warn!(op, error = %e, suppressed, "rate-limit backend failed; {suppressed} more failures since the last line");
        }
    }
}

/// Whether a call may use the rate-limit API: without a configured token, every call; with one, only
/// calls whose `authorization` is `Bearer <token>` (compared in constant time: the answer's timing must
/// not tell how much of a guess was right).
fn authorized(required: Option<&str>, headers: &HeaderMap) -> bool {
    let Some(required) = required else {
        return true;
    };
    let given = headers.get(axum::http::header::AUTHORIZATION).map_or(&b""[..], |v| v.as_bytes());
    let (a, b) = (required.as_bytes(), given);
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Build the backend from the flags and attach it to the app state (called once by the binary).
pub fn install(state: &AppState, config: &crate::config::Config) -> anyhow::Result<()> {
    let backend = match config.redis_url.as_deref() {
        Some(url) if !url.is_empty() => {
            AnyBackend::Redis(Box::new(redis::RedisBackend::new(url, Duration::from_millis(config.redis_timeout_ms))?))
        }
        _ => AnyBackend::Memory(memory::MemoryBackend::new(config.memory_max_keys)),
    };
    tracing::info!(backend = backend.name(), "rate-limit backend");
    let required_authorization = match config.api_token.as_deref().map(str::trim) {
        Some("") => anyhow::bail!("--api-token must not be empty"),
        Some(t) => Some(format!("Bearer {t}")),
        None => {
            if !config.listen.ip().is_loopback() {
                tracing::warn!(
                    listen = %config.listen,
                    "no --api-token: anyone who reaches this port can refund or spend any token budget"
                );
            }
            None
        }
    };
    let rl = Arc::new(RateLimiter {
        backend,
        metrics: RateLimitMetrics::new(&state.metrics.registry)?,
        required_authorization,
        failure_log: std::sync::Mutex::new(LogThrottle::new(FAILURE_LOG_INTERVAL_MS)),
        full_log: std::sync::Mutex::new(LogThrottle::new(FAILURE_LOG_INTERVAL_MS)),
    });
    if let AnyBackend::Memory(_) = rl.backend {
        let weak = Arc::downgrade(&rl);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let Some(rl) = weak.upgrade() else { break };
                if let AnyBackend::Memory(m) = &rl.backend {
                    m.prune();
                }
                rl.update_memory_keys();
            }
        });
    }
    state.ratelimit.set(rl).map_err(|_| anyhow::anyhow!("rate limiter installed twice"))
}

/// The routes, merged into the sidecar's router.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/v1/ratelimit/reserve", post(reserve)).route("/v1/ratelimit/settle", post(settle))
}

fn error(status: StatusCode, msg: &str) -> Response {
    (status, [("content-type", "application/json")], serde_json::json!({"error": msg}).to_string()).into_response()
}

async fn reserve(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(rl) = state.ratelimit.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "rate limiter not configured");
    };
    if !authorized(rl.required_authorization.as_deref(), &headers) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token (--api-token)");
    }
    let req: ReserveRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid reserve request: {e}")),
    };
    if let Err(e) = req.validate() {
        return error(StatusCode::BAD_REQUEST, &format!("invalid reserve request: {e}"));
    }
    let start = Instant::now();
    let r = rl.backend.reserve(req).await;
    rl.metrics.latency.with_label_values(&["reserve", rl.backend.name()]).observe(start.elapsed().as_secs_f64());
    match r {
        Ok(resp) => {
            let result = if resp.allowed {
                "allowed"
            } else {
                match resp.denied_group.and_then(|g| resp.groups.get(g)).and_then(|g| g.reason) {
                    Some(meshwarden_shared::ratelimit::DenyReason::Concurrency) => "denied_concurrency",
                    _ => "denied_tokens",
                }
            };
            rl.metrics.decisions.with_label_values(&[result]).inc();
            rl.update_memory_keys();
            axum::Json(resp).into_response()
        }
        Err(e) => {
            if let Some(full) = e.downcast_ref::<memory::Full>() {
                rl.memory_full(full);
                return error(StatusCode::SERVICE_UNAVAILABLE, &full.to_string());
            }
            rl.backend_failed("reserve", &e);
            error(StatusCode::SERVICE_UNAVAILABLE, "rate-limit backend unavailable")
        }
    }
}

async fn settle(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(rl) = state.ratelimit.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "rate limiter not configured");
    };
    if !authorized(rl.required_authorization.as_deref(), &headers) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token (--api-token)");
    }
    let req: SettleRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid settle request: {e}")),
    };
    if let Err(e) = req.validate() {
        return error(StatusCode::BAD_REQUEST, &format!("invalid settle request: {e}"));
    }
    let start = Instant::now();
    let r = rl.backend.settle(req.items).await;
    rl.metrics.latency.with_label_values(&["settle", rl.backend.name()]).observe(start.elapsed().as_secs_f64());
    match r {
        Ok(()) => {
            rl.update_memory_keys();
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => {
            rl.backend_failed("settle", &e);
            error(StatusCode::SERVICE_UNAVAILABLE, "rate-limit backend unavailable")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::authorized;
    use axum::http::HeaderMap;

    #[test]
    fn the_rate_limit_api_needs_the_token_when_one_is_set() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("authorization", v.parse().unwrap());
            h
        };
        assert!(authorized(None, &HeaderMap::new()), "no token configured: open, as before");
        let required = Some("Bearer s3cret");
        assert!(authorized(required, &with("Bearer s3cret")));
        for wrong in ["Bearer s3cre", "Bearer s3cret2", "bearer s3cret", "s3cret", ""] {
            assert!(!authorized(required, &with(wrong)), "{wrong:?}");
        }
        assert!(!authorized(required, &HeaderMap::new()));
    }
}
