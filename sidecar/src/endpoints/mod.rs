//! Model-server endpoint metrics for inference-router: scrape each server's Prometheus `/metrics` on
//! an interval, keep one compact snapshot per pool, serve it with a version/ETag.
//!
//! - [`prom`]: Prometheus text parser; [`mapping`]: vLLM / SGLang / TensorRT-LLM names;
//! - [`scrape`]: endpoint discovery (static list, DNS names re-resolved on an interval) and the scrape
//!   loops; [`api`]: `GET /v1/pools`, `GET /v1/pools/{pool}/endpoints` (ETag, `304`).
//!
//! Configured with `--pools-config FILE` (JSON, see `docs/sidecar-api.md`).

pub mod api;
pub mod mapping;
pub mod prom;
pub mod scrape;

use mapping::ServerKind;
use meshwarden_shared::endpoints::EndpointState;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// The `--pools-config` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolsConfig {
    pub pools: Vec<PoolConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    /// Metric names to read.
    #[serde(default)]
    pub kind: ServerKind,
    /// `ip:port` endpoints.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// DNS names (e.g. a Kubernetes headless Service) resolved every `resolve_interval_ms`; every
    /// address is an endpoint.
    #[serde(default)]
    pub dns: Vec<DnsTarget>,
    #[serde(default = "d_metrics_path")]
    pub metrics_path: String,
    /// Scrape period per endpoint (50-100 ms recommended).
    #[serde(default = "d_scrape_interval")]
    pub scrape_interval_ms: u64,
    /// A scrape slower than this fails.
    #[serde(default = "d_scrape_timeout")]
    pub scrape_timeout_ms: u64,
    /// An endpoint whose last good scrape is older than this is marked stale (`"f": false`).
    #[serde(default = "d_stale_after")]
    pub stale_after_ms: u64,
    #[serde(default = "d_resolve_interval")]
    pub resolve_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsTarget {
    pub host: String,
    pub port: u16,
    /// `any` (default), `ipv4` or `ipv6`.
    #[serde(default)]
    pub family: Family,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Any,
    Ipv4,
    Ipv6,
}

fn d_metrics_path() -> String {
    "/metrics".to_string()
}
fn d_scrape_interval() -> u64 {
    50
}
fn d_scrape_timeout() -> u64 {
    200
}
fn d_stale_after() -> u64 {
    500
}
fn d_resolve_interval() -> u64 {
    5000
}

impl PoolsConfig {
    /// Parse and validate; errors name the JSON path of the bad field.
    pub fn parse(text: &str) -> anyhow::Result<PoolsConfig> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: PoolsConfig = serde_path_to_error::deserialize(de)
            .map_err(|e| anyhow::anyhow!("pools config: {}: {}", e.path(), e.inner()))?;
        let mut names = std::collections::HashSet::new();
        for (i, p) in cfg.pools.iter().enumerate() {
            let at = |f: &str| format!("pools[{i}].{f}");
            if p.name.is_empty() || p.name.contains(['/', '?', '#', ' ']) {
                anyhow::bail!("pools config: {}: must be a non-empty name without '/', '?', '#' or spaces", at("name"));
            }
            if !names.insert(p.name.clone()) {
                anyhow::bail!("pools config: {}: duplicate pool name {:?}", at("name"), p.name);
            }
            for (j, e) in p.endpoints.iter().enumerate() {
                if e.parse::<std::net::SocketAddr>().is_err() {
                    anyhow::bail!("pools config: {}[{j}]: {e:?} is not ip:port", at("endpoints"));
                }
            }
            if !p.metrics_path.starts_with('/') {
                anyhow::bail!("pools config: {}: must start with '/'", at("metrics_path"));
            }
            let ranges = [
                ("scrape_interval_ms", p.scrape_interval_ms, 10, 60_000),
                ("scrape_timeout_ms", p.scrape_timeout_ms, 10, 60_000),
                ("stale_after_ms", p.stale_after_ms, p.scrape_interval_ms, 600_000),
                ("resolve_interval_ms", p.resolve_interval_ms, 100, 3_600_000),
            ];
            for (f, v, lo, hi) in ranges {
                if v < lo || v > hi {
                    anyhow::bail!("pools config: {}: must be between {lo} and {hi}, got {v}", at(f));
                }
            }
        }
        Ok(cfg)
    }
}

/// A snapshot as served: version and the serialized body.
#[derive(Debug, Clone, Default)]
pub struct Served {
    pub version: u64,
    pub endpoints: Vec<EndpointState>,
    pub body: Arc<str>,
}

/// Every pool's current snapshot. Cheap to read: the API clones an `Arc`.
#[derive(Debug, Default)]
pub struct EndpointsState {
    pools: RwLock<BTreeMap<String, Arc<Served>>>,
}

impl EndpointsState {
    pub fn get(&self, pool: &str) -> Option<Arc<Served>> {
        self.pools.read().ok()?.get(pool).cloned()
    }

    pub fn list(&self) -> Vec<(String, Arc<Served>)> {
        self.pools.read().map(|p| p.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
    }

    /// Store `endpoints` for `pool`; the version changes only if they differ from the current ones.
    pub fn publish(&self, pool: &str, endpoints: Vec<EndpointState>) -> u64 {
        let Ok(mut pools) = self.pools.write() else { return 0 };
        let cur = pools.get(pool);
        if let Some(c) = cur {
            if c.endpoints == endpoints && c.version > 0 {
                return c.version;
            }
        }
        let version = cur.map_or(1, |c| c.version + 1);
        let snap = meshwarden_shared::endpoints::PoolSnapshot { pool: pool.to_string(), version, endpoints };
        let body: Arc<str> = serde_json::to_string(&snap).unwrap_or_default().into();
        pools.insert(pool.to_string(), Arc::new(Served { version, endpoints: snap.endpoints, body }));
        version
    }
}

pub use scrape::start;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn config_errors_name_the_field() {
        let e = PoolsConfig::parse(r#"{"pools":[{"name":"a","endpoints":["nope"]}]}"#).unwrap_err();
        assert!(e.to_string().contains("pools[0].endpoints[0]"), "{e}");
        let e = PoolsConfig::parse(r#"{"pools":[{"name":"a","kind":"tgi"}]}"#).unwrap_err();
        assert!(e.to_string().contains("pools[0].kind"), "{e}");
        let e = PoolsConfig::parse(r#"{"pools":[{"name":"a","scrape_interval_ms":1}]}"#).unwrap_err();
        assert!(e.to_string().contains("scrape_interval_ms"), "{e}");
        let e = PoolsConfig::parse(r#"{"pools":[{"name":"a"},{"name":"a"}]}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
        let e = PoolsConfig::parse(r#"{"pools":[{"name":"a","extra":1}]}"#).unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        let ok =
            PoolsConfig::parse(r#"{"pools":[{"name":"a","endpoints":["127.0.0.1:1"],"dns":[{"host":"x","port":1}]}]}"#)
                .unwrap();
        assert_eq!(ok.pools[0].scrape_interval_ms, 50);
    }

    #[test]
    fn version_changes_only_with_content() {
        let s = EndpointsState::default();
        let e = |w| vec![EndpointState { address: "a:1".into(), fresh: true, waiting: w, ..Default::default() }];
        assert_eq!(s.publish("p", e(1)), 1);
        assert_eq!(s.publish("p", e(1)), 1);
        assert_eq!(s.publish("p", e(2)), 2);
        assert!(s.get("p").unwrap().body.contains("\"version\":2"));
        assert!(s.get("q").is_none());
    }
}
