// Test tooling, not shipped code: JSON indexing (`v["a"]`) is clearer here and never panics on serde_json::Value.
#![allow(clippy::indexing_slicing)]

//! meshwarden's test harness: real Envoy loading our real `.wasm`, real HTTP upstreams.
//!
//! - [`envoy`]: render a config from `envoy-configs/`, start Envoy on free loopback ports, wait until
//!   ready, stop on drop (printing the Envoy log when a test fails).
//! - [`mock_llm`]: an OpenAI/Anthropic-compatible upstream (JSON and SSE) with configurable usage,
//!   latency and errors, and a record of every request it received (what left the gateway).
//! - [`python`]: real Python servers / SDK clients from `integration-tests/python/`, on free ports.
//! - [`paths`]: where the built `.wasm` files and the `envoy` binary are.
//! - [`faulty`]: servers that misbehave on purpose (answers cut mid-body).
//! - [`crowd`]: many concurrent clients against a rate limit.
//! - [`pki`]: throw-away CA, server and SPIFFE client certificates for mTLS tests.
//! - [`upgrade`]: WebSocket upgrades through Envoy (configs with upgrades on, an echo upstream, a client).

pub mod bench;
pub mod crowd;
pub mod envoy;
pub mod faulty;
pub mod gateway;
pub mod k8s_schema;
pub mod mock_llm;
pub mod mock_mcp;
pub mod model_sim;
pub mod paths;
pub mod pki;
pub mod python;
pub mod redis_server;
pub mod sidecar;
pub mod upgrade;
