//! Sidecar configuration: flags, each with an environment variable (`MESHWARDEN_SIDECAR_*`).

use clap::{Parser, ValueEnum};
use std::net::SocketAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (for log pipelines).
    Json,
    /// Human-readable lines.
    Text,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "meshwarden-sidecar",
    version,
    about = "meshwarden sidecar: global rate-limit state and endpoint metrics"
)]
pub struct Config {
    /// Address to listen on. Port 0 picks a free port (printed at startup).
    #[arg(long, env = "MESHWARDEN_SIDECAR_LISTEN", default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,

    /// Log format.
    #[arg(long, env = "MESHWARDEN_SIDECAR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `meshwarden_sidecar=debug`.
    #[arg(long, env = "MESHWARDEN_SIDECAR_LOG", default_value = "info")]
    pub log: String,

    /// Runtime worker threads. One answers fastest where the sidecar shares a pod's cores with Envoy (no
    /// cross-thread wake-ups; one thread serves >60,000 decisions/s); raise it for a sidecar shared by
    /// many gateways on a large node.
    #[arg(long, env = "MESHWARDEN_SIDECAR_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: u16,

    /// Seconds to wait for in-flight requests on shutdown.
    #[arg(long, env = "MESHWARDEN_SIDECAR_SHUTDOWN_GRACE_SECS", default_value_t = 5)]
    pub shutdown_grace_secs: u64,

    /// Seconds the sidecar keeps serving after SIGTERM, `/readyz` answering 503, before it stops
    /// accepting connections and drains: the time Kubernetes takes to remove the pod's endpoint and the
    /// gateways' Envoys to learn it (or, as a container of the gateway pod, for Envoy's own drain). 0
    /// closes the port at once.
    #[arg(long, env = "MESHWARDEN_SIDECAR_SHUTDOWN_DELAY_SECS", default_value_t = 5)]
    pub shutdown_delay_secs: u64,

    /// Milliseconds a client has to send a request's headers: from the accept for a connection's first
    /// request, from its first byte for a later one. A client that sends nothing, or trickles its headers,
    /// is disconnected.
    #[arg(long, env = "MESHWARDEN_SIDECAR_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_ms: u64,

    /// Milliseconds a client has to send a request's body, from the end of its headers. A client that
    /// trickles a body is answered 408 and disconnected.
    #[arg(long, env = "MESHWARDEN_SIDECAR_BODY_READ_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_read_timeout_ms: u64,

    /// Seconds a keep-alive connection may wait for its next request before the sidecar closes it (0:
    /// never). Keep it above the gateways' upstream idle timeout (Envoy's and Istio's default: 1 hour), so
    /// that Envoy closes an idle connection first and never sends a call on one the sidecar is closing.
    #[arg(long, env = "MESHWARDEN_SIDECAR_IDLE_TIMEOUT_SECS", default_value_t = 3900)]
    pub idle_timeout_secs: u64,

    /// Redis for rate-limit state shared by many sidecars (`redis://host:6379/0`); memory when unset.
    #[arg(long, env = "MESHWARDEN_SIDECAR_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Memory backend: most entries held (one per key and window, one per key holding concurrency leases).
    /// A reserve that needs a new entry when this many live ones are held is answered 503 (the filter's
    /// `failure_mode`); live budgets are never evicted. The default takes about 200 MB.
    #[arg(long, env = "MESHWARDEN_SIDECAR_MEMORY_MAX_KEYS", default_value_t = crate::ratelimit::memory::DEFAULT_MAX_KEYS, value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_max_keys: u64,

    /// Timeout of one Redis operation, in milliseconds.
    #[arg(long, env = "MESHWARDEN_SIDECAR_REDIS_TIMEOUT_MS", default_value_t = 40)]
    pub redis_timeout_ms: u64,

    /// Token the rate-limit API (`/v1/ratelimit/*`) requires as `authorization: Bearer <token>`
    /// (token-limiter's `sidecar_token`). Without it, whoever reaches the port can refund or spend any
    /// budget and release any concurrency slot.
    #[arg(long, env = "MESHWARDEN_SIDECAR_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Model-server pools to scrape for inference-router (JSON file; see docs/sidecar-api.md).
    #[arg(long, env = "MESHWARDEN_SIDECAR_POOLS_CONFIG")]
    pub pools_config: Option<std::path::PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn worker_threads_default_and_bounds() {
        assert_eq!(Config::try_parse_from(["s"]).unwrap().worker_threads, 1);
        assert_eq!(Config::try_parse_from(["s", "--worker-threads", "8"]).unwrap().worker_threads, 8);
        let err = Config::try_parse_from(["s", "--worker-threads", "0"]).unwrap_err().to_string();
        assert!(err.contains("--worker-threads"), "{err}");
    }

    #[test]
    fn shutdown_delay_default_and_zero() {
        assert_eq!(Config::try_parse_from(["s"]).unwrap().shutdown_delay_secs, 5);
        let c = Config::try_parse_from(["s", "--shutdown-delay-secs", "0"]).unwrap();
        assert_eq!(c.shutdown_delay_secs, 0);
    }

    #[test]
    fn connection_timeouts_default_and_bounds() {
        let c = Config::try_parse_from(["s"]).unwrap();
        assert_eq!((c.header_read_timeout_ms, c.idle_timeout_secs), (10_000, 3900));
        assert!(Config::try_parse_from(["s", "--header-read-timeout-ms", "0"]).is_err());
        assert_eq!(Config::try_parse_from(["s", "--idle-timeout-secs", "0"]).unwrap().idle_timeout_secs, 0);
        assert_eq!(c.body_read_timeout_ms, 10_000);
        assert!(Config::try_parse_from(["s", "--body-read-timeout-ms", "0"]).is_err());
        assert_eq!(Config::try_parse_from(["s", "--body-read-timeout-ms", "250"]).unwrap().body_read_timeout_ms, 250);
    }

    #[test]
    fn memory_max_keys_default_and_bounds() {
        assert_eq!(Config::try_parse_from(["s"]).unwrap().memory_max_keys, 1_000_000);
        assert_eq!(Config::try_parse_from(["s", "--memory-max-keys", "10"]).unwrap().memory_max_keys, 10);
        for bad in ["--memory-max-keys=0", "--memory-max-keys=-1", "--memory-max-keys=many"] {
            let err = Config::try_parse_from(["s", bad]).unwrap_err().to_string();
            assert!(err.contains("--memory-max-keys"), "{err}");
        }
    }
}
