//! token-limiter: token budgets per team and model, with concurrency limits, model fallback and
//! OpenAI/Anthropic-shaped 429s.
//!
//! Pure core (no proxy-wasm types, unit-tested natively): `config`, `context_memory` (the context a
//! Responses request names but does not carry), `keys` (who is charged), `request`
//! (what the body says), `limiter` (admission state machine), `meter` (what the response cost),
//! `realtime` (an OpenAI Realtime session's frames: usage per response, ending a session whose
//! budget is spent), `state` (the `local` shared-data value format), `usage_chunk` (the added usage chunk hidden from
//! a client that did not ask for it).
//! `filter` is the thin proxy-wasm adapter, compiled only for wasm32 (and for clippy); the GCRA itself
//! and the sidecar wire format are in `meshwarden_shared::ratelimit`.

pub mod config;
pub mod context_memory;
pub mod keys;
pub mod limiter;
pub mod meter;
pub mod realtime;
pub mod request;
pub mod state;
pub mod usage_chunk;

#[cfg(any(target_arch = "wasm32", clippy))]
mod filter;
