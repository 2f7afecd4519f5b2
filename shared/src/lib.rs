//! Protocol knowledge written once for every meshwarden filter.
//!
//! Everything here except [`host`] is plain Rust with no proxy-wasm types, so it is unit-tested natively
//! and, with `make test-wasm`, compiled to wasm32 and run under `wasm-bindgen-test` (32-bit `usize`).
//!
//! | module | what it knows |
//! |---|---|
//! | [`config`] | parsing a filter's JSON config with errors that name the JSON path of the bad field |
//! | [`llm`] | OpenAI (chat, completions, Responses, embeddings) and Anthropic request fields, text extraction and rewrite, usage from every provider |
//! | [`sse`] | an incremental Server-Sent Events parser that accepts chunks cut at any byte |
//! | [`jsonrpc`] | JSON-RPC 2.0 messages (MCP, A2A) |
//! | [`attachments`] | text files sent base64-encoded in a request (Gemini inline data, Anthropic and Bedrock documents, `data:` URLs), decoded for scanning and re-encoded |
//! | [`binary`] | gRPC and other length-framed binary bodies, opaque answers: what a text filter must not read or rewrite |
//! | [`media`] | what images and files in a request cost at admission: OpenAI / Anthropic image billing rules, image sizes from base64 headers, PDF pages |
//! | [`mcp`] | MCP methods, targets, list answers, 2026-07-28 `Mcp-*` header checks |
//! | [`a2a`] | A2A v0.3/v1.0 method names, agent card paths and skill filtering |
//! | [`encoding`] | Base64 (standard and URL-safe) |
//! | [`eventstream`] | the AWS event-stream framing of Bedrock streamed answers, decoded chunk by chunk (CRC-checked, bounded) |
//! | [`pbstruct`] | decoding a binary `google.protobuf.Struct` (Envoy metadata properties) into JSON |
//! | [`errors`] | OpenAI- and Anthropic-shaped error bodies SDKs understand |
//! | [`usage_scan`] | usage from a JSON answer read chunk by chunk (any size, top-level fields only) |
//! | [`splice`] | a few values of a JSON body changed in the client's bytes, without re-serialising the document |
//! | [`stream_rewrite`] | rewriting streamed answer text (SSE deltas) with hold-back of pieces split across events and chunks |
//! | [`stats`] | stat names with bounded label cardinality |
//! | [`websocket`] | WebSocket frames (RFC 6455) read from chunks cut at any byte: messages, control frames, frame boundaries; frames built |
//! | [`realtime`] | OpenAI's Realtime API events: the session's model, each response's usage, the texts of client events, the `error` event |
//! | [`ratelimit`] | GCRA token budgets with reservations; the sidecar rate-limit wire format |
//! | [`endpoints`] | the sidecar endpoint-snapshot wire format inference-router reads |
//! | [`callout`] | fail-open / fail-closed policy and rate-limited failure logging for callouts |
//! | [`host`] | (feature `host`) the thin proxy-wasm glue: metrics, callouts, local replies |

pub mod a2a;
pub mod access_log;
pub mod attachments;
pub mod binary;
pub mod callout;
pub mod config;
pub mod encoding;
pub mod endpoints;
pub mod errors;
pub mod eventstream;
pub mod json;
pub mod jsonrpc;
pub mod llm;
pub mod mcp;
pub mod media;
pub mod pbstruct;
pub mod ratelimit;
pub mod realtime;
pub mod splice;
pub mod sse;
pub mod stats;
pub mod stream_rewrite;
#[doc(hidden)]
pub mod testing;
pub mod upgrade;
pub mod usage_scan;
pub mod websocket;

#[cfg(feature = "host")]
pub mod host;
