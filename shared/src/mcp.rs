//! MCP (Model Context Protocol) facts a gateway needs, for revisions 2025-03-26, 2025-06-18,
//! 2025-11-25 and 2026-07-28: which methods name a target (tool, prompt, resource), which answers are
//! lists, and the 2026-07-28 Streamable HTTP headers (`Mcp-Method`, `Mcp-Name`, `MCP-Protocol-Version`)
//! that must agree with the body (else HTTP 400 with JSON-RPC error -32020, HeaderMismatch).

use crate::encoding::base64_decode;
use serde_json::Value;

pub const REV_2025_03_26: &str = "2025-03-26";
pub const REV_2025_06_18: &str = "2025-06-18";
pub const REV_2025_11_25: &str = "2025-11-25";
pub const REV_2026_07_28: &str = "2026-07-28";

/// `_meta` key carrying the protocol version on every 2026-07-28 request.
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

pub const HEADER_METHOD: &str = "mcp-method";
pub const HEADER_NAME: &str = "mcp-name";
pub const HEADER_PROTOCOL_VERSION: &str = "mcp-protocol-version";
pub const HEADER_SESSION_ID: &str = "mcp-session-id";

/// Every client-to-server method of the four revisions (for bounded stat labels and docs).
pub const CLIENT_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "server/discover",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "resources/subscribe",
    "resources/unsubscribe",
    "subscriptions/listen",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "tasks/get",
    "tasks/result",
    "tasks/list",
    "tasks/cancel",
    "notifications/initialized",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/roots/list_changed",
];

/// A list answer a gateway may filter per caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Tools,
    Prompts,
    Resources,
    ResourceTemplates,
}

impl ListKind {
    pub fn from_method(method: &str) -> Option<ListKind> {
        match method {
            "tools/list" => Some(ListKind::Tools),
            "prompts/list" => Some(ListKind::Prompts),
            "resources/list" => Some(ListKind::Resources),
            "resources/templates/list" => Some(ListKind::ResourceTemplates),
            _ => None,
        }
    }

    /// The array in `result` holding the items.
    pub fn result_key(self) -> &'static str {
        match self {
            ListKind::Tools => "tools",
            ListKind::Prompts => "prompts",
            ListKind::Resources => "resources",
            ListKind::ResourceTemplates => "resourceTemplates",
        }
    }

    /// The item field naming it.
    pub fn item_name_key(self) -> &'static str {
        match self {
            ListKind::Tools | ListKind::Prompts => "name",
            ListKind::Resources => "uri",
            ListKind::ResourceTemplates => "uriTemplate",
        }
    }

    /// The method that uses a listed item (what a caller must be allowed to see it).
    pub fn use_method(self) -> &'static str {
        match self {
            ListKind::Tools => "tools/call",
            ListKind::Prompts => "prompts/get",
            ListKind::Resources | ListKind::ResourceTemplates => "resources/read",
        }
    }
}

/// The name a request acts on: `params.name` for `tools/call` and `prompts/get`, `params.uri` for
/// `resources/read|subscribe|unsubscribe`, `params.ref.name` or `params.ref.uri` for `completion/complete`.
pub fn target(method: &str, params: Option<&Value>) -> Option<String> {
    let p = params?;
    let s = match method {
        "tools/call" | "prompts/get" => p.get("name"),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => p.get("uri"),
        "completion/complete" => p.get("ref").and_then(|r| r.get("name").or_else(|| r.get("uri"))),
        _ => None,
    }?;
    s.as_str().map(str::to_string)
}

/// Whether `Mcp-Name` is required for this method in 2026-07-28.
pub fn method_requires_name_header(method: &str) -> bool {
    matches!(method, "tools/call" | "resources/read" | "prompts/get")
}

/// The value `Mcp-Name` must carry: `params.name`, else `params.uri`.
pub fn name_header_value(params: Option<&Value>) -> Option<&str> {
    let p = params?;
    p.get("name").and_then(Value::as_str).or_else(|| p.get("uri").and_then(Value::as_str))
}

/// The `_meta` protocol version of a 2026-07-28 request, if present.
pub fn meta_protocol_version(params: Option<&Value>) -> Option<&str> {
    params?.get("_meta")?.get(META_PROTOCOL_VERSION)?.as_str()
}

/// Decode an MCP header value: `=?base64?<standard base64>?=` wraps non-ASCII values; anything else is
/// literal. An undecodable wrapped value is an error (HeaderMismatch).
pub fn decode_header_value(raw: &str) -> Result<String, &'static str> {
    match raw.strip_prefix("=?base64?").and_then(|r| r.strip_suffix("?=")) {
        Some(b64) => {
            let bytes = base64_decode(b64)?;
            String::from_utf8(bytes).map_err(|_| "base64 value is not UTF-8")
        }
        None => Ok(raw.to_string()),
    }
}

/// Whether the revision is 2026-07-28 or newer (dates compare as strings).
pub fn is_modern(version: &str) -> bool {
    version.len() == 10 && version >= REV_2026_07_28
}

/// The gateway-relevant request headers of one POST.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestHeaders {
    pub method: Option<String>,
    pub name: Option<String>,
    pub protocol_version: Option<String>,
}

/// Check the 2026-07-28 mirrored headers against one message (request or notification). A header that
/// is present must agree with the body whatever the revision (a gateway may have routed on it). When the
/// message is 2026-07-28 or newer (`MCP-Protocol-Version` header or `_meta`), `Mcp-Method` is required,
/// and `Mcp-Name` for `tools/call`, `resources/read`, `prompts/get`. `Err` is the -32020 message.
pub fn check_headers(method: &str, params: Option<&Value>, headers: &RequestHeaders) -> Result<(), String> {
    let meta_version = meta_protocol_version(params);
    if let (Some(h), Some(m)) = (headers.protocol_version.as_deref(), meta_version) {
        if h.trim() != m {
            return Err(format!("MCP-Protocol-Version header {h:?} does not match _meta protocolVersion {m:?}"));
        }
    }
    let modern = headers.protocol_version.as_deref().map(str::trim).or(meta_version).is_some_and(is_modern);
    match headers.method.as_deref() {
        Some(raw) => {
            let h = decode_header_value(raw.trim()).map_err(|e| format!("Mcp-Method header: {e}"))?;
            if h != method {
                return Err(format!("Mcp-Method header {h:?} does not match the body method {method:?}"));
            }
        }
        None if modern => return Err("Mcp-Method header is required".to_string()),
        None => {}
    }
    let body_name = name_header_value(params);
    match headers.name.as_deref() {
        Some(raw) => {
            let h = decode_header_value(raw.trim()).map_err(|e| format!("Mcp-Name header: {e}"))?;
            if Some(h.as_str()) != body_name {
                return Err(format!("Mcp-Name header {h:?} does not match the body ({body_name:?})"));
            }
        }
        None if modern && method_requires_name_header(method) => {
            return Err(format!("Mcp-Name header is required for {method}"));
        }
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn hdr(m: Option<&str>, n: Option<&str>, v: Option<&str>) -> RequestHeaders {
        RequestHeaders { method: m.map(Into::into), name: n.map(Into::into), protocol_version: v.map(Into::into) }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn targets() {
        let p = json!({"name": "search", "arguments": {}});
        assert_eq!(target("tools/call", Some(&p)).as_deref(), Some("search"));
        assert_eq!(target("resources/read", Some(&json!({"uri": "file:///a"}))).as_deref(), Some("file:///a"));
        assert_eq!(
            target("completion/complete", Some(&json!({"ref": {"type": "ref/prompt", "name": "p"}}))).as_deref(),
            Some("p")
        );
        assert_eq!(target("tools/list", Some(&p)), None);
        assert_eq!(target("tools/call", Some(&json!({"name": 3}))), None);
        assert_eq!(
            ListKind::from_method("resources/templates/list").map(ListKind::result_key),
            Some("resourceTemplates")
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn header_values_and_base64() {
        assert_eq!(decode_header_value("plain").unwrap(), "plain");
        assert_eq!(decode_header_value("=?base64?w6lsw6h2ZQ==?=").unwrap(), "\u{e9}l\u{e8}ve");
        assert!(decode_header_value("=?base64?***?=").is_err());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn header_checks() {
        let p = json!({"name": "search"});
        assert!(check_headers("tools/call", Some(&p), &hdr(None, None, None)).is_ok(), "old revisions need none");
        assert!(check_headers("tools/call", Some(&p), &hdr(Some("tools/call"), Some("search"), Some(REV_2026_07_28)))
            .is_ok());
        assert!(check_headers("tools/call", Some(&p), &hdr(Some("tools/list"), None, None)).is_err());
        assert!(check_headers("tools/call", Some(&p), &hdr(Some("tools/call"), Some("other"), None)).is_err());
        assert!(check_headers("tools/call", Some(&p), &hdr(Some("tools/call"), None, Some(REV_2026_07_28))).is_err());
        assert!(check_headers("tools/call", Some(&p), &hdr(None, Some("search"), Some(REV_2026_07_28))).is_err());
        assert!(check_headers("tools/list", None, &hdr(Some("tools/list"), None, Some(REV_2026_07_28))).is_ok());
        let meta = json!({"name": "s\u{e9}", "_meta": {META_PROTOCOL_VERSION: REV_2026_07_28}});
        assert!(
            check_headers("tools/call", Some(&meta), &hdr(Some("tools/call"), None, None)).is_err(),
            "_meta makes it modern"
        );
        assert!(
            check_headers("tools/call", Some(&meta), &hdr(Some("tools/call"), Some("=?base64?c8Op?="), None)).is_ok()
        );
        assert!(
            check_headers(
                "tools/call",
                Some(&meta),
                &hdr(Some("tools/call"), Some("=?base64?c8Op?="), Some(REV_2025_11_25))
            )
            .is_err(),
            "version header vs _meta"
        );
    }
}
