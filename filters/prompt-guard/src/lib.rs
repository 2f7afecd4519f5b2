//! prompt-guard: blocks prompt injection, jailbreaks and banned content in prompts and answers.
//!
//! Pure core (no proxy-wasm types, unit-tested natively): [`normalize`] (evasion folding with an offset
//! map), [`decode`] (base64 payloads), [`packs`] (built-in rule families), [`engine`] (multi-pattern matching), [`inspect`] (request /
//! response / stream decisions), [`realtime`] (a Realtime session's client events, ending a blocked one), [`moderation`] (callout body and verdict), [`config`].
//! `filter` is the thin proxy-wasm adapter, compiled only for wasm32 (and for clippy).

pub mod config;
pub mod decode;
pub mod engine;
pub mod inspect;
pub mod moderation;
pub mod normalize;
pub mod packs;
pub mod realtime;

#[cfg(any(target_arch = "wasm32", clippy))]
mod filter;
