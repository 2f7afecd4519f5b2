//! A vLLM-like model-server simulator for inference-router tests and the simulation benchmark.
//!
//! Each [`SimServer`] listens on its own loopback port and runs a continuous-batching engine in real
//! time (scaled down): a FIFO queue, a batch limit, prefill cost per *uncached* prompt token (the
//! batch stalls while a request prefills, like vLLM without chunked prefill), decode cost per step
//! (one output token for every running request), a KV-cache block budget shared by running requests
//! and a prefix cache of chained 16-token blocks (LRU, shrinks as running requests need blocks), LoRA
//! adapter slots with a load penalty, and a speed factor for heterogeneous GPUs.
//!
//! HTTP: `POST /v1/chat/completions` and `/v1/completions` (OpenAI-compatible JSON or SSE with one
//! chunk per token, so TTFT can be measured), `GET /metrics` (vLLM names: `vllm:num_requests_waiting`,
//! `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` or the older `vllm:gpu_cache_usage_perc`,
//! `vllm:lora_requests_info`, prefix-cache counters). Every response carries `x-sim-endpoint: <id>`.
//! `model` equal to [`SimConfig::base_model`] is the base model; any other name is a LoRA adapter.
//!
//! Test hooks: [`SimServer::set_override`] reports fixed metric values instead of the real state,
//! [`SimServer::set_metrics_mode`] makes `/metrics` fail or hang (to test staleness).

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Notify};

/// Tokens per KV block (vLLM's default) and characters per token (the usual estimate).
pub const BLOCK_TOKENS: usize = 16;
pub const CHARS_PER_TOKEN: usize = 4;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub id: usize,
    /// 1.0 = nominal; 0.5 = every cost doubled.
    pub speed: f64,
    pub batch_limit: usize,
    /// Microseconds per uncached prompt token at speed 1.
    pub prefill_us_per_token: f64,
    /// Microseconds per decode step at speed 1, plus per running sequence.
    pub decode_step_us: f64,
    pub decode_us_per_seq: f64,
    /// KV-cache budget in 16-token blocks.
    pub kv_blocks: usize,
    /// LoRA adapter slots (vLLM `max_lora`); 0 disables LoRA info.
    pub max_lora: usize,
    /// Milliseconds to load an adapter into a slot (at speed 1).
    pub lora_load_ms: f64,
    pub base_model: String,
    /// Output tokens when the request has no `max_tokens`.
    pub default_output_tokens: u32,
    /// Report KV use under vLLM's older name `vllm:gpu_cache_usage_perc`.
    pub old_kv_metric_name: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            id: 0,
            speed: 1.0,
            batch_limit: 8,
            prefill_us_per_token: 80.0,
            decode_step_us: 16_000.0,
            decode_us_per_seq: 1_000.0,
            kv_blocks: 1024,
            max_lora: 4,
            lora_load_ms: 60.0,
            base_model: "base".to_string(),
            default_output_tokens: 16,
            old_kv_metric_name: false,
        }
    }
}

/// Counters of one server since start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimStats {
    pub requests: u64,
    pub completed: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    pub lora_loads: u64,
}

/// Metric values to report instead of the real state.
#[derive(Debug, Clone, Default)]
pub struct MetricsOverride {
    pub waiting: u32,
    pub running: u32,
    pub kv: f64,
    pub lora_running: Vec<String>,
    pub lora_waiting: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsMode {
    Normal,
    /// `/metrics` answers 503.
    Fail,
    /// `/metrics` never answers (until the mode changes).
    Hang,
}

enum Event {
    Token,
    Done { prompt_tokens: usize, cached_tokens: usize },
}

struct SimRequest {
    blocks: Vec<u64>,
    prompt_tokens: usize,
    output_tokens: u32,
    adapter: Option<String>,
    generated: u32,
    kv_need: usize,
    tx: mpsc::UnboundedSender<Event>,
    cached_tokens: usize,
}

struct Engine {
    cfg: SimConfig,
    waiting: VecDeque<SimRequest>,
    running: Vec<SimRequest>,
    used_blocks: usize,
    cache: HashMap<u64, u64>,
    clock: u64,
    /// Loaded adapters and when each was last used.
    loras: Vec<(String, u64)>,
    stats: SimStats,
}

impl Engine {
    fn cache_capacity(&self) -> usize {
        self.cfg.kv_blocks.saturating_sub(self.used_blocks)
    }

    fn evict_cache(&mut self) {
        let cap = self.cache_capacity();
        if self.cache.len() <= cap {
            return;
        }
        let mut stamps: Vec<u64> = self.cache.values().copied().collect();
        let drop = stamps.len() - cap;
        stamps.select_nth_unstable(drop.saturating_sub(1));
        let cutoff = stamps.get(drop.saturating_sub(1)).copied().unwrap_or(0);
        self.cache.retain(|_, s| *s > cutoff);
    }

    /// Can the adapter be served now? Loads it (evicting the least recently used idle adapter) if
    /// needed; returns the load cost in µs, or None when every slot is busy.
    fn ensure_adapter(&mut self, name: &str) -> Option<f64> {
        self.clock += 1;
        let now = self.clock;
        if let Some(slot) = self.loras.iter_mut().find(|(n, _)| n == name) {
            slot.1 = now;
            return Some(0.0);
        }
        if self.loras.len() >= self.cfg.max_lora {
            let busy: Vec<&str> = self.running.iter().filter_map(|r| r.adapter.as_deref()).collect();
            let victim = self
                .loras
                .iter()
                .enumerate()
                .filter(|(_, (n, _))| !busy.contains(&n.as_str()))
                .min_by_key(|(_, (_, t))| *t)
                .map(|(i, _)| i)?;
            self.loras.remove(victim);
        }
        self.loras.push((name.to_string(), now));
        self.stats.lora_loads += 1;
        Some(self.cfg.lora_load_ms * 1000.0)
    }

    /// Move waiting requests into the batch; returns the prefill (and adapter load) cost in µs.
    fn admit(&mut self) -> f64 {
        let mut cost = 0.0;
        let mut i = 0;
        while self.running.len() < self.cfg.batch_limit && i < self.waiting.len() {
            let Some(req) = self.waiting.get(i) else { break };
            if self.used_blocks + req.kv_need > self.cfg.kv_blocks {
                break; // KV full: FIFO waits
            }
            let adapter = req.adapter.clone();
            if let Some(a) = adapter {
                if self.cfg.max_lora == 0 {
                    // No LoRA support: served as the base model.
                } else if let Some(load) = self.ensure_adapter(&a) {
                    cost += load;
                } else {
                    i += 1; // every slot busy with running adapters: try the next request
                    continue;
                }
            }
            let Some(mut req) = self.waiting.remove(i) else { break };
            let hits = req.blocks.iter().take_while(|b| self.cache.contains_key(b)).count();
            let cached = (hits * BLOCK_TOKENS).min(req.prompt_tokens);
            req.cached_tokens = cached;
            cost += (req.prompt_tokens - cached) as f64 * self.cfg.prefill_us_per_token;
            self.used_blocks += req.kv_need;
            for b in &req.blocks {
                self.clock += 1;
                self.cache.insert(*b, self.clock);
            }
            self.stats.prompt_tokens += req.prompt_tokens as u64;
            self.stats.cached_tokens += cached as u64;
            self.running.push(req);
        }
        self.evict_cache();
        cost
    }

    /// One decode step: a token for every running request; finished ones leave the batch.
    fn emit(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let Some(r) = self.running.get_mut(i) else { break };
            r.generated += 1;
            let alive = r.tx.send(Event::Token).is_ok();
            self.stats.output_tokens += 1;
            if r.generated >= r.output_tokens || !alive {
                let r = self.running.swap_remove(i);
                self.used_blocks = self.used_blocks.saturating_sub(r.kv_need);
                let _ = r.tx.send(Event::Done { prompt_tokens: r.prompt_tokens, cached_tokens: r.cached_tokens });
                self.stats.completed += 1;
            } else {
                i += 1;
            }
        }
    }
}

struct Inner {
    cfg: SimConfig,
    engine: Mutex<Engine>,
    wake: Notify,
    overrides: Mutex<Option<MetricsOverride>>,
    mode: Mutex<MetricsMode>,
    ids: AtomicU64,
}

/// One simulated model server. Dropping it stops the server.
pub struct SimServer {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl SimServer {
    /// Start on a free loopback port.
    pub async fn start(cfg: SimConfig) -> anyhow::Result<SimServer> {
        Self::start_on("127.0.0.1:0".parse()?, cfg).await
    }

    pub async fn start_on(addr: SocketAddr, cfg: SimConfig) -> anyhow::Result<SimServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let engine = Engine {
            cfg: cfg.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            used_blocks: 0,
            cache: HashMap::new(),
            clock: 0,
            loras: Vec::new(),
            stats: SimStats::default(),
        };
        let inner = Arc::new(Inner {
            cfg,
            engine: Mutex::new(engine),
            wake: Notify::new(),
            overrides: Mutex::new(None),
            mode: Mutex::new(MetricsMode::Normal),
            ids: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/v1/chat/completions", post(complete))
            .route("/v1/completions", post(complete))
            .with_state(inner.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let (stop_engine_tx, stop_engine_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            let _ = stop_engine_tx.send(());
        });
        tokio::spawn(run_engine(inner.clone(), stop_engine_rx));
        Ok(SimServer { addr, inner, shutdown: Some(tx) })
    }

    pub fn id(&self) -> usize {
        self.inner.cfg.id
    }

    /// `ip:port`, as inference-router puts it in `x-gateway-destination-endpoint`.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    pub fn stats(&self) -> SimStats {
        self.inner.engine.lock().map(|e| e.stats.clone()).unwrap_or_default()
    }

    pub fn set_override(&self, o: Option<MetricsOverride>) {
        if let Ok(mut g) = self.inner.overrides.lock() {
            *g = o;
        }
    }

    pub fn set_metrics_mode(&self, m: MetricsMode) {
        if let Ok(mut g) = self.inner.mode.lock() {
            *g = m;
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn run_engine(inner: Arc<Inner>, mut stop: oneshot::Receiver<()>) {
    let speed = inner.cfg.speed.max(0.01);
    let mut next = tokio::time::Instant::now();
    loop {
        let (idle, cost_us) = {
            let Ok(mut e) = inner.engine.lock() else { return };
            let prefill = e.admit();
            if e.running.is_empty() {
                (true, 0.0)
            } else {
                let n = e.running.len() as f64;
                (false, prefill + e.cfg.decode_step_us + e.cfg.decode_us_per_seq * n)
            }
        };
        if idle {
            tokio::select! {
                _ = inner.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = &mut stop => return,
            }
            next = tokio::time::Instant::now();
            continue;
        }
        // Deadline-based so timer overshoot does not accumulate; never run ahead of real time.
        next = next.max(tokio::time::Instant::now() - Duration::from_millis(2))
            + Duration::from_micros((cost_us / speed) as u64);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = &mut stop => return,
        }
        if let Ok(mut e) = inner.engine.lock() {
            e.emit();
        }
    }
}

/// Chained hashes of the prompt's full 16-token (64-character) blocks: the simulated prefix cache.
pub fn prompt_blocks(text: &str) -> Vec<u64> {
    let mut prev = 0u64;
    text.as_bytes()
        .chunks_exact(BLOCK_TOKENS * CHARS_PER_TOKEN)
        .map(|b| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            prev.hash(&mut h);
            b.hash(&mut h);
            prev = h.finish();
            prev
        })
        .collect()
}

fn prompt_of(body: &Value) -> String {
    let mut out = String::new();
    if let Some(msgs) = body.get("messages").and_then(Value::as_array) {
        for m in msgs {
            out.push_str(m.get("role").and_then(Value::as_str).unwrap_or(""));
            out.push(':');
            match m.get("content") {
                Some(Value::String(s)) => out.push_str(s),
                Some(other) => out.push_str(&other.to_string()),
                None => {}
            }
            out.push('\n');
        }
    } else if let Some(p) = body.get("prompt").and_then(Value::as_str) {
        out.push_str(p);
    }
    out
}

fn sim_header(inner: &Inner) -> (&'static str, String) {
    ("x-sim-endpoint", inner.cfg.id.to_string())
}

async fn complete(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, [sim_header(&inner)], "{\"error\":{\"message\":\"invalid JSON\"}}")
            .into_response();
    };
    let model = v.get("model").and_then(Value::as_str).unwrap_or(&inner.cfg.base_model).to_string();
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let chat = v.get("messages").is_some();
    let output_tokens = ["max_tokens", "max_completion_tokens"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_u64))
        .map_or(inner.cfg.default_output_tokens, |n| n.clamp(1, 4096) as u32);
    let text = prompt_of(&v);
    let prompt_tokens = text.len().div_ceil(CHARS_PER_TOKEN).max(1);
    let kv_need = (prompt_tokens + output_tokens as usize).div_ceil(BLOCK_TOKENS);
    let adapter = (model != inner.cfg.base_model).then(|| model.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let req = SimRequest {
        blocks: prompt_blocks(&text),
        prompt_tokens,
        output_tokens,
        adapter,
        generated: 0,
        kv_need: kv_need.min(inner.cfg.kv_blocks),
        tx,
        cached_tokens: 0,
    };
    if let Ok(mut e) = inner.engine.lock() {
        e.stats.requests += 1;
        e.waiting.push_back(req);
    }
    inner.wake.notify_one();
    let id = format!("sim-{}-{}", inner.cfg.id, inner.ids.fetch_add(1, Ordering::Relaxed));
    let object = if chat { "chat.completion" } else { "text_completion" };
    if stream {
        let body_stream = async_stream(rx, id, model, chat, object);
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/event-stream")
            .header("x-sim-endpoint", inner.cfg.id.to_string())
            .body(Body::from_stream(body_stream))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    let mut n = 0u32;
    let mut usage = (prompt_tokens, 0usize);
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token => n += 1,
            Event::Done { prompt_tokens, cached_tokens } => {
                usage = (prompt_tokens, cached_tokens);
                break;
            }
        }
    }
    let answer = "tok ".repeat(n as usize);
    let choice = if chat {
        json!({"index":0,"message":{"role":"assistant","content":answer},"finish_reason":"length"})
    } else {
        json!({"index":0,"text":answer,"finish_reason":"length"})
    };
    let body = json!({"id":id,"object":object,"model":model,"choices":[choice],
        "usage":{"prompt_tokens":usage.0,"completion_tokens":n,"total_tokens":usage.0 as u32 + n,
                 "prompt_tokens_details":{"cached_tokens":usage.1}}});
    (StatusCode::OK, [("content-type", "application/json".to_string()), sim_header(&inner)], body.to_string())
        .into_response()
}

fn async_stream(
    rx: mpsc::UnboundedReceiver<Event>,
    id: String,
    model: String,
    chat: bool,
    object: &'static str,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let chunk_object = if chat { "chat.completion.chunk" } else { object };
    futures_util::stream::unfold((rx, 0u32, false), move |(mut rx, n, done)| {
        let id = id.clone();
        let model = model.clone();
        async move {
            if done {
                return None;
            }
            match rx.recv().await {
                Some(Event::Token) => {
                    let choice = if chat {
                        json!({"index":0,"delta":{"content":"tok "},"finish_reason":null})
                    } else {
                        json!({"index":0,"text":"tok ","finish_reason":null})
                    };
                    let ev = json!({"id":id,"object":chunk_object,"model":model,"choices":[choice]});
                    Some((Ok(Bytes::from(format!("data: {ev}\n\n"))), (rx, n + 1, false)))
                }
                Some(Event::Done { prompt_tokens, cached_tokens }) => {
                    let ev = json!({"id":id,"object":chunk_object,"model":model,"choices":[],
                        "usage":{"prompt_tokens":prompt_tokens,"completion_tokens":n,"total_tokens":prompt_tokens as u32 + n,
                                 "prompt_tokens_details":{"cached_tokens":cached_tokens}}});
                    Some((Ok(Bytes::from(format!("data: {ev}\n\ndata: [DONE]\n\n"))), (rx, n, true)))
                }
                None => None,
            }
        }
    })
}

async fn metrics(State(inner): State<Arc<Inner>>) -> Response {
    let mode = inner.mode.lock().map(|m| *m).unwrap_or(MetricsMode::Normal);
    match mode {
        MetricsMode::Normal => {}
        MetricsMode::Fail => return (StatusCode::SERVICE_UNAVAILABLE, "unavailable").into_response(),
        MetricsMode::Hang => loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if inner.mode.lock().map(|m| *m != MetricsMode::Hang).unwrap_or(true) {
                break;
            }
        },
    }
    let (waiting, running, kv, loaded, waiting_adapters, stats) = {
        let Ok(e) = inner.engine.lock() else { return StatusCode::INTERNAL_SERVER_ERROR.into_response() };
        let loaded: Vec<String> = e.loras.iter().map(|(n, _)| n.clone()).collect();
        let mut wa: Vec<String> = Vec::new();
        for r in &e.waiting {
            if let Some(a) = &r.adapter {
                if !loaded.contains(a) && !wa.contains(a) {
                    wa.push(a.clone());
                }
            }
        }
        let kv = e.used_blocks as f64 / e.cfg.kv_blocks.max(1) as f64;
        (e.waiting.len() as u32, e.running.len() as u32, kv, loaded, wa, e.stats.clone())
    };
    let o = inner.overrides.lock().ok().and_then(|o| o.clone());
    let (waiting, running, kv, loaded, waiting_adapters) = match o {
        Some(o) => (o.waiting, o.running, o.kv, o.lora_running, o.lora_waiting),
        None => (waiting, running, kv, loaded, waiting_adapters),
    };
    let m = &inner.cfg.base_model;
    let kv_name = if inner.cfg.old_kv_metric_name { "vllm:gpu_cache_usage_perc" } else { "vllm:kv_cache_usage_perc" };
    let mut out = String::with_capacity(4096);
    out.push_str("# HELP vllm:num_requests_running Number of requests in model execution batches.\n# TYPE vllm:num_requests_running gauge\n");
    out.push_str(&format!("vllm:num_requests_running{{engine=\"0\",model_name=\"{m}\"}} {running}.0\n"));
    out.push_str("# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n# TYPE vllm:num_requests_waiting gauge\n");
    out.push_str(&format!("vllm:num_requests_waiting{{engine=\"0\",model_name=\"{m}\"}} {waiting}.0\n"));
    out.push_str(&format!("# HELP {kv_name} KV-cache usage. 1 means 100 percent usage.\n# TYPE {kv_name} gauge\n"));
    out.push_str(&format!("{kv_name}{{engine=\"0\",model_name=\"{m}\"}} {kv}\n"));
    if inner.cfg.max_lora > 0 {
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        out.push_str(
            "# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge\n",
        );
        out.push_str(&format!(
            "vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {ts}\n",
            inner.cfg.max_lora,
            loaded.join(","),
            waiting_adapters.join(",")
        ));
    }
    out.push_str("# TYPE vllm:prefix_cache_queries counter\n");
    out.push_str(&format!(
        "vllm:prefix_cache_queries_total{{engine=\"0\",model_name=\"{m}\"}} {}\n",
        stats.prompt_tokens
    ));
    out.push_str(&format!("vllm:prefix_cache_hits_total{{engine=\"0\",model_name=\"{m}\"}} {}\n", stats.cached_tokens));
    out.push_str(&format!("vllm:generation_tokens_total{{engine=\"0\",model_name=\"{m}\"}} {}\n", stats.output_tokens));
    // A latency histogram like the real page has (the scraper must skip it cheaply).
    out.push_str("# TYPE vllm:e2e_request_latency_seconds histogram\n");
    for le in [
        "0.3", "0.5", "0.8", "1.0", "1.5", "2.0", "2.5", "5.0", "10.0", "15.0", "20.0", "30.0", "40.0", "50.0", "60.0",
        "+Inf",
    ] {
        out.push_str(&format!(
            "vllm:e2e_request_latency_seconds_bucket{{engine=\"0\",le=\"{le}\",model_name=\"{m}\"}} {}\n",
            stats.completed
        ));
    }
    out.push_str(&format!(
        "vllm:e2e_request_latency_seconds_count{{engine=\"0\",model_name=\"{m}\"}} {}\n",
        stats.completed
    ));
    ([("content-type", "text/plain; version=0.0.4"), ("x-sim-endpoint", "metrics")], out).into_response()
}

/// `lb_endpoints` of an Envoy cluster over `addrs`, as a YAML flow list (for `POOL_LB_ENDPOINTS`).
pub fn lb_endpoints_yaml(addrs: &[SocketAddr]) -> String {
    let items: Vec<String> = addrs
        .iter()
        .map(|a| {
            format!(
                "{{endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {}}}}}}}}}",
                a.ip(),
                a.port()
            )
        })
        .collect();
    format!("[{}]", items.join(", "))
}

/// A sidecar `--pools-config` file with one vLLM pool over `endpoints`; kept alive by the returned handle.
pub fn pools_config_file(pool: &str, endpoints: &[String], extra: Value) -> anyhow::Result<tempfile::NamedTempFile> {
    let mut p =
        json!({"name": pool, "kind": "vllm", "endpoints": endpoints, "scrape_interval_ms": 50, "stale_after_ms": 300});
    if let (Some(obj), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            obj.insert(k.clone(), v.clone());
        }
    }
    let f = tempfile::Builder::new().prefix("meshwarden-pools-").suffix(".json").tempfile()?;
    std::fs::write(f.path(), json!({ "pools": [p] }).to_string())?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    #[tokio::test]
    async fn prefix_cache_hits_on_repeat_and_metrics_reflect_state() {
        let s =
            SimServer::start(SimConfig { prefill_us_per_token: 10.0, decode_step_us: 1000.0, ..Default::default() })
                .await
                .unwrap();
        let body = json!({"model":"base","messages":[{"role":"system","content":"x".repeat(4000)},{"role":"user","content":"hi"}],"max_tokens":3});
        for _ in 0..2 {
            let r = client().post(format!("http://{}/v1/chat/completions", s.addr)).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["usage"]["completion_tokens"], 3);
        }
        let st = s.stats();
        assert_eq!(st.completed, 2);
        assert!(st.cached_tokens >= 900, "{st:?}");
        let m = client().get(format!("http://{}/metrics", s.addr)).send().await.unwrap().text().await.unwrap();
        assert!(m.contains("vllm:num_requests_waiting{engine=\"0\",model_name=\"base\"} 0.0"), "{m}");
        assert!(m.contains("vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"\""), "{m}");
    }

    #[tokio::test]
    async fn adapters_take_slots_and_stream_counts_tokens() {
        let s =
            SimServer::start(SimConfig { max_lora: 1, lora_load_ms: 1.0, decode_step_us: 500.0, ..Default::default() })
                .await
                .unwrap();
        for a in ["a", "b", "a"] {
            let body = json!({"model":a,"prompt":"hello","max_tokens":2,"stream":true});
            let text = client()
                .post(format!("http://{}/v1/completions", s.addr))
                .json(&body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert_eq!(text.matches("\"text\":\"tok \"").count(), 2, "{text}");
            assert!(text.ends_with("data: [DONE]\n\n"));
        }
        assert_eq!(s.stats().lora_loads, 3);
    }
}
