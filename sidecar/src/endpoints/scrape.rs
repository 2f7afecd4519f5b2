//! Endpoint discovery and scrape loops. One task per endpoint (a slow server never delays the others),
//! one task per pool that re-resolves DNS names and publishes the pool's snapshot every scrape period.

use super::mapping::{extract, ServerKind, ServerMetrics};
use super::{Family, PoolConfig, PoolsConfig};
use crate::server::AppState;
use meshwarden_shared::endpoints::{quantize_kv, EndpointState};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

#[derive(Clone)]
struct ScrapeMetrics {
    scrapes: IntCounterVec,
    duration: HistogramVec,
    endpoints: IntGaugeVec,
    version: IntGaugeVec,
}

impl ScrapeMetrics {
    fn register(state: &AppState) -> anyhow::Result<Self> {
        let scrapes = IntCounterVec::new(
            Opts::new("endpoint_scrapes_total", "Model-server /metrics scrapes by pool and result"),
            &["pool", "result"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new("endpoint_scrape_duration_seconds", "Model-server /metrics scrape latency")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]),
            &["pool"],
        )?;
        let endpoints =
            IntGaugeVec::new(Opts::new("pool_endpoints", "Endpoints per pool by freshness"), &["pool", "state"])?;
        let version = IntGaugeVec::new(Opts::new("pool_snapshot_version", "Current snapshot version"), &["pool"])?;
        let r = &state.metrics.registry;
        r.register(Box::new(scrapes.clone()))?;
        r.register(Box::new(duration.clone()))?;
        r.register(Box::new(endpoints.clone()))?;
        r.register(Box::new(version.clone()))?;
        Ok(Self { scrapes, duration, endpoints, version })
    }
}

#[derive(Debug, Default, Clone)]
struct Record {
    last_ok: Option<Instant>,
    metrics: ServerMetrics,
}

type Records = Arc<Mutex<HashMap<String, Record>>>;

/// Load `--pools-config` (if given) and start scraping. Must run inside the Tokio runtime.
pub fn start(state: &Arc<AppState>, path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let cfg = PoolsConfig::parse(&text)?;
    let metrics = ScrapeMetrics::register(state)?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(2)
        .tcp_nodelay(true)
        .build()?;
    for pool in cfg.pools {
        state.endpoints.publish(&pool.name, Vec::new());
        tracing::info!(pool = %pool.name, endpoints = pool.endpoints.len(), dns = pool.dns.len(), "scraping pool");
        tokio::spawn(run_pool(state.clone(), pool, metrics.clone(), client.clone()));
    }
    Ok(())
}

async fn resolve(pool: &PoolConfig, previous: &HashMap<String, BTreeSet<String>>) -> HashMap<String, BTreeSet<String>> {
    let mut out = HashMap::new();
    for t in &pool.dns {
        let key = format!("{}:{}", t.host, t.port);
        match tokio::net::lookup_host((t.host.as_str(), t.port)).await {
            Ok(addrs) => {
                let set: BTreeSet<String> = addrs
                    .filter(|a: &SocketAddr| match t.family {
                        Family::Any => true,
                        Family::Ipv4 => a.is_ipv4(),
                        Family::Ipv6 => a.is_ipv6(),
                    })
                    .map(|a| a.to_string())
                    .collect();
                out.insert(key, set);
            }
            Err(e) => {
                // Keep the last good answer: a DNS hiccup must not empty the pool.
                tracing::warn!(pool = %pool.name, host = %t.host, error = %e, "DNS resolution failed; keeping previous addresses");
                out.insert(key.clone(), previous.get(&key).cloned().unwrap_or_default());
            }
        }
    }
    out
}

async fn run_pool(state: Arc<AppState>, pool: PoolConfig, metrics: ScrapeMetrics, client: reqwest::Client) {
    let records: Records = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut resolved: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut next_resolve = Instant::now();
    let stale_after = Duration::from_millis(pool.stale_after_ms);
    // Publish at twice the scrape rate so a scrape waits at most half an interval to be served.
    let mut tick = tokio::time::interval(Duration::from_millis((pool.scrape_interval_ms / 2).max(5)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if Instant::now() >= next_resolve {
            if !pool.dns.is_empty() {
                resolved = resolve(&pool, &resolved).await;
            }
            next_resolve = Instant::now() + Duration::from_millis(pool.resolve_interval_ms);
            let members: BTreeSet<String> =
                pool.endpoints.iter().cloned().chain(resolved.values().flatten().cloned()).collect();
            tasks.retain(|addr, h| {
                let keep = members.contains(addr);
                if !keep {
                    h.abort();
                    if let Ok(mut r) = records.lock() {
                        r.remove(addr);
                    }
                    tracing::info!(pool = %pool.name, %addr, "endpoint removed");
                }
                keep
            });
            for addr in members {
                if let std::collections::hash_map::Entry::Vacant(slot) = tasks.entry(addr.clone()) {
                    if let Ok(mut r) = records.lock() {
                        r.insert(addr.clone(), Record::default());
                    }
                    slot.insert(tokio::spawn(run_endpoint(
                        addr,
                        pool.clone(),
                        client.clone(),
                        records.clone(),
                        metrics.clone(),
                    )));
                }
            }
        }
        let eps: Vec<EndpointState> = {
            let Ok(r) = records.lock() else { continue };
            let mut v: Vec<EndpointState> = r
                .iter()
                .map(|(addr, rec)| {
                    let m = &rec.metrics;
                    EndpointState {
                        address: addr.clone(),
                        fresh: rec.last_ok.is_some_and(|t| t.elapsed() <= stale_after),
                        waiting: m.waiting.round().clamp(0.0, u32::MAX as f64) as u32,
                        running: m.running.round().clamp(0.0, u32::MAX as f64) as u32,
                        kv: quantize_kv(m.kv.unwrap_or(0.0)),
                        max_lora: m.max_lora,
                        lora_running: m.lora_running.clone(),
                        lora_waiting: m.lora_waiting.clone(),
                        models: m.models.clone(),
                    }
                })
                .collect();
            v.sort_by(|a, b| a.address.cmp(&b.address));
            v
        };
        let fresh = eps.iter().filter(|e| e.fresh).count() as i64;
        metrics.endpoints.with_label_values(&[pool.name.as_str(), "fresh"]).set(fresh);
        metrics.endpoints.with_label_values(&[pool.name.as_str(), "stale"]).set(eps.len() as i64 - fresh);
        let version = state.endpoints.publish(&pool.name, eps);
        metrics.version.with_label_values(&[pool.name.as_str()]).set(i64::try_from(version).unwrap_or(i64::MAX));
    }
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<String, &'static str> {
    let resp = client.get(url).send().await.map_err(|_| "connect")?;
    if !resp.status().is_success() {
        return Err("status");
    }
    resp.text().await.map_err(|_| "body")
}

async fn run_endpoint(addr: String, pool: PoolConfig, client: reqwest::Client, records: Records, m: ScrapeMetrics) {
    let host = match addr.parse::<SocketAddr>() {
        Ok(a) => a.to_string(),
        Err(_) => addr.clone(),
    };
    let url = format!("http://{host}{}", pool.metrics_path);
    let kind: ServerKind = pool.kind;
    let timeout = Duration::from_millis(pool.scrape_timeout_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(pool.scrape_interval_ms));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_error_log: Option<Instant> = None;
    loop {
        tick.tick().await;
        let start = Instant::now();
        let result = match tokio::time::timeout(timeout, fetch(&client, &url)).await {
            Err(_) => Err("timeout"),
            Ok(Err(e)) => Err(e),
            Ok(Ok(text)) => extract(kind, &text).ok_or("bad_page"),
        };
        m.duration.with_label_values(&[pool.name.as_str()]).observe(start.elapsed().as_secs_f64());
        match result {
            Ok(metrics) => {
                m.scrapes.with_label_values(&[pool.name.as_str(), "ok"]).inc();
                if let Ok(mut r) = records.lock() {
                    r.insert(addr.clone(), Record { last_ok: Some(Instant::now()), metrics });
                }
            }
            Err(why) => {
                m.scrapes.with_label_values(&[pool.name.as_str(), why]).inc();
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(pool = %pool.name, %addr, error = why, "scrape failed (logged once a minute)");
                    last_error_log = Some(Instant::now());
                }
            }
        }
    }
}
