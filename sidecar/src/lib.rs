//! meshwarden sidecar: the state filters cannot keep inside one Envoy.
//!
//! - global token-budget state for token-limiter (in memory, or Redis for many replicas);
//! - model-server endpoint metrics for inference-router.
//!
//! Library/binary split: [`server::build_router`] assembles the HTTP API from the feature modules, the
//! binary only parses flags, sets up logging and serves with graceful shutdown. The API is versioned
//! under `/v1/` and documented in `docs/sidecar-api.md`.

pub mod config;
pub mod endpoints;
pub mod metrics;
pub mod ratelimit;
pub mod serve;
pub mod server;
