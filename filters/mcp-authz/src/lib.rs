//! mcp-authz: fine-grained authorization of MCP and A2A JSON-RPC traffic.
//!
//! Pure core (no proxy-wasm types, unit-tested natively): `config` (the plugin configuration),
//! `identity` (claims from jwt_authn metadata, an unverified bearer in development, SPIFFE, trusted
//! headers), `policy` (rules and their evaluation order), `engine` (request decisions, answers to
//! bad input, list / SSE / agent card filtering), `onepass` (list filtering in a single scan), `binding` (sessions and
//! tasks bound to their creator), `event_id` (stream resumption bound to the caller). `filter` is the thin proxy-wasm adapter, compiled
//! only for wasm32 (and for clippy).

pub mod binding;
pub mod config;
pub mod engine;
pub mod event_id;
pub mod identity;
mod onepass;
pub mod policy;

#[cfg(any(target_arch = "wasm32", clippy))]
mod filter;
