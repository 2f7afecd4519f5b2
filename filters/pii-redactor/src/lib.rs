//! pii-redactor: masks PII and secrets before a prompt leaves the network and restores them in the answer.
//!
//! Pure core (no proxy-wasm types, unit-tested natively):
//! - [`detect`]: the built-in detectors in one pass over the text, with validators;
//! - [`engine`]: built-ins + user regex detectors, actions, the per-request placeholder map;
//! - [`request`]: scanning the texts the model reads and rewriting the body;
//! - [`restore`]: putting values back into JSON, SSE and raw answers, split-safe;
//! - [`eventstream`]: the same in Bedrock binary event streams (frames decoded, rewritten, re-encoded).
//!
//! `filter` is the thin proxy-wasm adapter, compiled only for wasm32 (and for clippy).

pub mod base64_runs;
pub mod config;
pub mod detect;
pub mod engine;
pub mod eventstream;
pub mod realtime;
pub mod request;
pub mod restore;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code
mod quality_tests;

#[cfg(any(target_arch = "wasm32", clippy))]
mod filter;
