//! inference-router: picks the model-server endpoint that will answer a request fastest, inside the
//! proxy, from live metrics the sidecar scrapes (no per-request callout).
//!
//! Pure core (no proxy-wasm types, unit-tested natively): [`config`], [`prefix`] (chained block hashes,
//! per-endpoint LRU), [`picker`] (scorers, saturation, shedding, fallbacks), [`request`] (what a request
//! body tells the picker). `filter` is the thin proxy-wasm adapter, compiled only for wasm32 (and clippy).

pub mod config;
pub mod picker;
pub mod prefix;
pub mod request;

#[cfg(any(target_arch = "wasm32", clippy))]
mod filter;
