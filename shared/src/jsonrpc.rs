//! JSON-RPC 2.0 as MCP and A2A use it: requests, notifications, responses, batches.

use serde_json::{json, Value};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
/// MCP 2026-07-28: an `Mcp-*` header disagrees with the body.
pub const MCP_HEADER_MISMATCH: i64 = -32020;

/// A request or response id: a string or a number (kept as its JSON value so it is echoed exactly).
pub type Id = Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Request {
        id: Id,
        method: String,
        params: Option<Value>,
    },
    Notification {
        method: String,
        params: Option<Value>,
    },
    /// A response, e.g. a client answering a server's `sampling/createMessage`.
    Response {
        id: Id,
        result: Option<Value>,
        error: Option<Value>,
    },
}

impl Message {
    pub fn method(&self) -> Option<&str> {
        match self {
            Message::Request { method, .. } | Message::Notification { method, .. } => Some(method),
            Message::Response { .. } => None,
        }
    }

    pub fn params(&self) -> Option<&Value> {
        match self {
            Message::Request { params, .. } | Message::Notification { params, .. } => params.as_ref(),
            Message::Response { .. } => None,
        }
    }

    pub fn id(&self) -> Option<&Id> {
        match self {
            Message::Request { id, .. } | Message::Response { id, .. } => Some(id),
            Message::Notification { .. } => None,
        }
    }
}

/// Why one element is not valid JSON-RPC; `id` is echoed in the error when it could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub id: Option<Id>,
    pub reason: &'static str,
}

/// What a POST body holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Single(Result<Message, Invalid>),
    /// A batch (MCP 2025-03-26 only); every element is checked on its own.
    Batch(Vec<Result<Message, Invalid>>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Not JSON at all: answer -32700.
    NotJson,
    /// JSON but not an object or array, or an empty batch: answer -32600.
    InvalidRequest,
    /// JSON with an object key given twice (the parser's message names it): answer -32600. A policy
    /// decided on one copy while the server's parser reads the other would be no policy
    /// (`{"name":"search","name":"delete_all"}`; see `crate::json`).
    DuplicateKey(String),
}

pub fn parse(body: &[u8]) -> Result<Payload, ParseError> {
    let value = crate::json::parse_strict(body).map_err(|e| match e {
        // UTF-16/32 text is not JSON here (-32700), whatever another parser would make of it.
        crate::json::JsonBodyError::Syntax(_) | crate::json::JsonBodyError::NotUtf8(_) => ParseError::NotJson,
        crate::json::JsonBodyError::DuplicateKey(m) => ParseError::DuplicateKey(m),
    })?;
    parse_value(value)
}

pub fn parse_value(value: Value) -> Result<Payload, ParseError> {
    match value {
        Value::Array(items) if items.is_empty() => Err(ParseError::InvalidRequest),
        Value::Array(items) => Ok(Payload::Batch(items.into_iter().map(parse_message).collect())),
        v @ Value::Object(_) => Ok(Payload::Single(parse_message(v))),
        _ => Err(ParseError::InvalidRequest),
    }
}

fn valid_id(id: &Value) -> bool {
    matches!(id, Value::String(_) | Value::Number(_))
}

pub fn parse_message(v: Value) -> Result<Message, Invalid> {
    let Value::Object(mut obj) = v else {
        return Err(Invalid { id: None, reason: "not an object" });
    };
    let id = obj.remove("id");
    let id_for_error = id.clone().filter(valid_id);
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(Invalid { id: id_for_error, reason: "jsonrpc must be \"2.0\"" });
    }
    let params = obj.remove("params");
    if let Some(p) = &params {
        if !(p.is_object() || p.is_array()) {
            return Err(Invalid { id: id_for_error, reason: "params must be an object or array" });
        }
    }
    match obj.remove("method") {
        Some(Value::String(method)) => match id {
            None => Ok(Message::Notification { method, params }),
            Some(id) if valid_id(&id) => Ok(Message::Request { id, method, params }),
            Some(_) => Err(Invalid { id: None, reason: "id must be a string or a number" }),
        },
        Some(_) => Err(Invalid { id: id_for_error, reason: "method must be a string" }),
        None => {
            let result = obj.remove("result");
            let error = obj.remove("error");
            match (id, result.is_some() ^ error.is_some()) {
                (Some(id), true) if valid_id(&id) || id.is_null() => Ok(Message::Response { id, result, error }),
                _ => Err(Invalid { id: id_for_error, reason: "neither a request nor a response" }),
            }
        }
    }
}

/// `{"jsonrpc":"2.0","id":id,"error":{"code":..,"message":..}}`; a missing id becomes `null`, as the
/// specification requires when the id could not be read.
pub fn error_response(id: Option<&Id>, code: i64, message: &str) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id.cloned().unwrap_or(Value::Null),
        "error": {"code": code, "message": message},
    })
}

pub fn result_response(id: &Id, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn kinds_of_messages() {
        let p = parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#).unwrap();
        let Payload::Single(Ok(m)) = p else { panic!("{p:?}") };
        assert_eq!(m.method(), Some("tools/call"));
        assert_eq!(m.id(), Some(&json!(1)));
        let n = parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert!(matches!(n, Payload::Single(Ok(Message::Notification { .. }))));
        let r = parse(br#"{"jsonrpc":"2.0","id":"s1","result":{}}"#).unwrap();
        assert!(matches!(r, Payload::Single(Ok(Message::Response { .. }))));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn invalid_messages_and_batches() {
        assert_eq!(parse(b"{not json"), Err(ParseError::NotJson));
        assert_eq!(parse(b"[]"), Err(ParseError::InvalidRequest));
        assert_eq!(parse(b"42"), Err(ParseError::InvalidRequest));
        let twice = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_all","name":"search"}}"#;
        assert!(matches!(parse(twice), Err(ParseError::DuplicateKey(m)) if m.contains("duplicate key \"name\"")));
        let p = parse(br#"[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"1.0","id":2,"method":"b"},{"id":{},"jsonrpc":"2.0","method":"c"}]"#).unwrap();
        let Payload::Batch(items) = p else { panic!() };
        assert!(items[0].is_ok());
        assert_eq!(items[1].as_ref().unwrap_err().id, Some(json!(2)));
        assert_eq!(items[2].as_ref().unwrap_err().id, None);
        let bad = parse(br#"{"jsonrpc":"2.0","id":1,"method":"a","params":3}"#).unwrap();
        assert!(matches!(bad, Payload::Single(Err(_))));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn error_bodies_echo_the_id() {
        assert_eq!(
            error_response(Some(&json!("abc")), INVALID_PARAMS, "Unknown tool: x"),
            json!({"jsonrpc":"2.0","id":"abc","error":{"code":-32602,"message":"Unknown tool: x"}})
        );
        assert_eq!(error_response(None, PARSE_ERROR, "Parse error")["id"], Value::Null);
    }
}
