//! mcp-authz: fine-grained authorization of MCP and A2A JSON-RPC traffic.
//!
//! `config` is the pure core (no proxy-wasm types, unit-tested natively); `filter` is the thin
//! proxy-wasm adapter, compiled only for wasm32 (and for clippy).

pub mod config;

#[cfg(any(target_arch = "wasm32", clippy))]
mod filter;
