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

/// The first event of the legacy HTTP+SSE transport's stream (2024-11-05, kept by later revisions for
/// backwards compatibility): `event: endpoint`, whose data is the URI the client POSTs its messages to
/// (`/messages/?session_id=…`), not a JSON-RPC message. Clients read JSON-RPC messages from `message`
/// events only.
pub const LEGACY_ENDPOINT_EVENT: &str = "endpoint";

/// Every client-to-server method of the four revisions and of the 2026-07-28 Tasks extension
/// (`tasks/update`), for bounded stat labels and docs.
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
    "tasks/update",
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
        // A `ref/resource` reference is the resource its `uri` names, whatever else it carries (a `name`
        // next to the `uri` must not stand in for it); other references by `name`, else `uri`.
        "completion/complete" => p.get("ref").and_then(|r| {
            if r.get("type").and_then(Value::as_str) == Some("ref/resource") {
                r.get("uri")
            } else {
                r.get("name").or_else(|| r.get("uri"))
            }
        }),
        _ => None,
    }?;
    s.as_str().map(str::to_string)
}

/// The resource URIs a request names: `params.uri` for `resources/read|subscribe|unsubscribe`,
/// `params.ref.uri` for `completion/complete`.
pub fn request_uri<'a>(method: &str, params: Option<&'a Value>) -> Option<&'a str> {
    let p = params?;
    match method {
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => p.get("uri"),
        "completion/complete" => p.get("ref").and_then(|r| r.get("uri")),
        _ => None,
    }?
    .as_str()
}

/// Whether a resource URI holds a `.` or `..` segment, as sent or once percent escapes are decoded (up
/// to three rounds: `%2e`, `%2E`, double-encoded `%252e`), with `\` read as `/`, `;` segment
/// parameters ignored (`..;x`), ASCII tabs and newlines removed and C0 controls and spaces trimmed from
/// both ends (a WHATWG URL parser, such as JavaScript's `URL` that the TypeScript MCP SDK reads resource
/// URIs with, does both: `file:///public/\t../private` is `file:///private` to it). A glob such as
/// `file:///public/*` matches `file:///public/../private/keys` as text while a server resolving the path
/// reads `/private/keys`: such URIs are refused, not resolved.
pub fn uri_has_dot_segments(uri: &str) -> bool {
    let mut bytes = uri.as_bytes().to_vec();
    for round in 0..4 {
        let text: String = String::from_utf8_lossy(&bytes)
            .chars()
            .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
            .map(|c| if c == '\\' { '/' } else { c })
            .collect();
        let text = text.trim_matches(|c: char| c <= ' ');
        let dotted = text.split('/').any(|seg| {
            let seg = seg.split(';').next().unwrap_or(seg);
            seg == "." || seg == ".."
        });
        if dotted {
            return true;
        }
        if round == 3 {
            break;
        }
        let decoded = percent_decode(&bytes);
        if decoded == bytes {
            break;
        }
        bytes = decoded;
    }
    false
}

/// A resource URI as a WHATWG URL parser serializes it (JavaScript's `URL`, with which the TypeScript
/// MCP SDK looks resources up), for the parts that change which text a glob sees: ASCII tabs and
/// newlines removed, C0 controls and spaces trimmed at the ends, the scheme in lowercase; for the
/// special schemes (`http`, `https`, `ws`, `wss`, `ftp`, `file`) `\` read as `/` before the query,
/// the slashes before the host normalized, the host in lowercase, a default port dropped, an empty path
/// as `/`; for `file:` a `localhost` host dropped and a missing `//` added (`file:/x` is `file:///x`).
/// `FILE:///private/keys`, `file://localhost/private/keys` and ` file:///private/keys` are all
/// `file:///private/keys` to such a server. Not applied: percent-encoding, IDNA, dot segments (refused
/// on their own, [`uri_has_dot_segments`]). Text without a valid scheme is only cleaned and trimmed.
pub fn uri_as_url_parsers_read(uri: &str) -> String {
    let cleaned: String = uri.chars().filter(|c| !matches!(c, '\t' | '\n' | '\r')).collect();
    let text = cleaned.trim_matches(|c: char| c <= ' ');
    let Some((scheme, rest)) = text.split_once(':') else {
        return text.to_string();
    };
    let valid_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !valid_scheme {
        return text.to_string();
    }
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" | "ws" => "80",
        "https" | "wss" => "443",
        "ftp" => "21",
        "file" => "",
        _ => return format!("{scheme}:{rest}"),
    };
    let (before_query, query) =
        rest.split_at_checked(rest.find(['?', '#']).unwrap_or(rest.len())).unwrap_or((rest, ""));
    let before_query = before_query.replace('\\', "/");
    let (authority, path) = if scheme == "file" {
        match before_query.strip_prefix("//") {
            Some(r) => r.split_at_checked(r.find('/').unwrap_or(r.len())).unwrap_or((r, "")),
            None => ("", before_query.as_str()),
        }
    } else {
        let r = before_query.trim_start_matches('/');
        r.split_at_checked(r.find('/').unwrap_or(r.len())).unwrap_or((r, ""))
    };
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (host_port, None),
    };
    let mut host = host.to_ascii_lowercase();
    if scheme == "file" && host == "localhost" {
        host.clear();
    }
    let mut out = format!("{scheme}://");
    if let Some(u) = userinfo {
        out.push_str(u);
        out.push('@');
    }
    out.push_str(&host);
    if let Some(p) = port.filter(|p| !p.is_empty() && *p != default_port) {
        out.push(':');
        out.push_str(p);
    }
    if !path.starts_with('/') {
        out.push('/');
    }
    out.push_str(path);
    out.push_str(query);
    out
}

/// Every other spelling in which a server may read a resource URI: as a URL parser serializes it
/// ([`uri_as_url_parsers_read`]), and each of these percent-decoded, up to three rounds (the MCP Python
/// SDK decodes escapes in the values of a resource template: `file:///public/{name}` reads
/// `file:///public/%73ecret` as name `secret`; a server may decode twice). Invalid UTF-8 after decoding
/// reads as U+FFFD, as Python's `unquote` does. The URI itself is not among them; no duplicates.
pub fn uri_spellings(uri: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let add = |s: String, out: &mut Vec<String>| {
        if s != uri && !out.contains(&s) {
            out.push(s);
        }
    };
    let parsed = uri_as_url_parsers_read(uri);
    for start in [uri.to_string(), parsed.clone()] {
        let mut current = start;
        for _ in 0..3 {
            if !current.contains('%') {
                break;
            }
            let decoded = String::from_utf8_lossy(&percent_decode(current.as_bytes())).into_owned();
            if decoded == current {
                break;
            }
            add(decoded.clone(), &mut out);
            current = decoded;
        }
    }
    add(parsed, &mut out);
    out
}

/// A legacy transport URI names its session more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepeatedSessionId;

/// The session id in the query of a legacy HTTP+SSE transport URI (`/messages/?session_id=…`, the POST
/// target its `endpoint` event names, or a request path), decoded as the server's query parser decodes
/// it (percent escapes, `+` for a space: the MCP Python SDK reads `request.query_params`). `Err` when the
/// query names a session more than once: servers differ in which copy they take (Starlette the last).
pub fn legacy_session_id(uri: &str) -> Result<Option<String>, RepeatedSessionId> {
    let Some((_, query)) = uri.split_once('?') else { return Ok(None) };
    let query = query.split('#').next().unwrap_or("");
    let decode = |s: &str| String::from_utf8_lossy(&percent_decode(s.replace('+', " ").as_bytes())).into_owned();
    let mut found = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if decode(k) == "session_id" {
            if found.is_some() {
                return Err(RepeatedSessionId);
            }
            found = Some(decode(v));
        }
    }
    Ok(found)
}

/// Decode `%XX` escapes (invalid ones are kept as they are).
pub fn percent_decode(b: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let escaped = (c == b'%').then(|| Some(hex(*b.get(i + 1)?)? * 16 + hex(*b.get(i + 2)?)?)).flatten();
        match escaped {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Whether `Mcp-Name` is required for this method in 2026-07-28.
pub fn method_requires_name_header(method: &str) -> bool {
    matches!(method, "tools/call" | "resources/read" | "prompts/get")
}

/// The methods of tasks (2025-11-25 core; 2026-07-28 the Tasks extension `io.modelcontextprotocol/tasks`,
/// which drops `tasks/result` and `tasks/list` and adds `tasks/update`) that name one task by
/// `params.taskId`.
pub const TASK_METHODS: &[&str] = &["tasks/get", "tasks/result", "tasks/update", "tasks/cancel"];

/// The Tasks extension's identifier (2026-07-28), declared in a request's `_meta` client capabilities.
pub const TASKS_EXTENSION: &str = "io.modelcontextprotocol/tasks";
/// `_meta` key carrying a 2026-07-28 request's client capabilities.
pub const META_CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";

/// Whether the answer to this request may create a task: a `tools/call` (the one client request tasks
/// augment) that declares the Tasks extension in its `_meta` client capabilities (2026-07-28: a server
/// must not answer with a task otherwise) or carries `params.task` (2025-11-25 task augmentation).
pub fn may_create_task(method: &str, params: Option<&Value>) -> bool {
    let Some(p) = params.filter(|_| method == "tools/call") else {
        return false;
    };
    let declared = p
        .get("_meta")
        .and_then(|m| m.get(META_CLIENT_CAPABILITIES))
        .and_then(|c| c.get("extensions"))
        .and_then(|e| e.get(TASKS_EXTENSION))
        .is_some();
    declared || p.get("task").is_some_and(|t| !t.is_null())
}

/// The task an answer (one JSON-RPC response) creates: 2026-07-28 `result.taskId` of a
/// `resultType: "task"` result (`CreateTaskResult`), 2025-11-25 `result.task.taskId`.
pub fn answer_task_id(response: &Value) -> Option<&str> {
    let result = response.get("result")?;
    if result.get("resultType").and_then(Value::as_str) == Some("task") {
        return result.get("taskId")?.as_str();
    }
    result.get("task")?.get("taskId")?.as_str()
}

/// The value `Mcp-Name` must carry: `params.uri` for `resources/read` (what the server reads, even if a
/// `name` rides along), `params.name` for `tools/call` and `prompts/get`, `params.taskId` for the task
/// methods (the Tasks extension: "the client MUST set the `Mcp-Name` header to the value of
/// `params.taskId`" on `tasks/get`, `tasks/update`, `tasks/cancel`, so that routers can send a task's
/// requests to the instance holding it); for any other method `name`, else `uri`.
pub fn name_header_value<'a>(method: &str, params: Option<&'a Value>) -> Option<&'a str> {
    let p = params?;
    let field = |k: &str| p.get(k).and_then(Value::as_str);
    match method {
        "resources/read" => field("uri"),
        "tools/call" | "prompts/get" => field("name"),
        m if TASK_METHODS.contains(&m) => field("taskId"),
        _ => field("name").or_else(|| field("uri")),
    }
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
    let body_name = name_header_value(method, params);
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
    fn resource_refs_and_dot_segments() {
        // A ref/resource is its uri, even with a name next to it.
        let r = json!({"ref": {"type": "ref/resource", "name": "x", "uri": "file:///private/k"}});
        assert_eq!(target("completion/complete", Some(&r)).as_deref(), Some("file:///private/k"));
        assert_eq!(request_uri("completion/complete", Some(&r)), Some("file:///private/k"));
        assert_eq!(request_uri("resources/subscribe", Some(&json!({"uri": "a://b"}))), Some("a://b"));
        assert_eq!(request_uri("tools/call", Some(&json!({"uri": "a://b"}))), None);
        for bad in [
            "file:///public/../private/keys",
            "file:///public/./x",
            "file:///public/..",
            "file:///public/%2e%2e/private/keys",
            "file:///public/%2E%2E/private/keys",
            "file:///public/.%2e/private/keys",
            "file:///public/%252e%252e/private/keys",
            "file:///public/%25252e%25252e/private/keys",
            "file:///public/%2e%2e%2fprivate",
            "file:///public\\..\\private",
            "file:///public/..;x/private",
            "..",
            // What a WHATWG URL parser (JavaScript's `URL`) reads as `..`: tabs and newlines removed
            // anywhere, C0 controls and spaces trimmed at the ends.
            "file:///public/\t../private/keys",
            "file:///public/.\n./private/keys",
            "file:///public/.\r\n.\t/private/keys",
            "file:///public/x/.. ",
            "file:///public/x/..\u{0}",
            "file:///public/%09../private/keys",
        ] {
            assert!(uri_has_dot_segments(bad), "{bad}");
        }
        for ok in
            ["file:///public/readme", "file:///public/a..b", "file:///public/.hidden", "https://h/x.y/..z", "db://t"]
        {
            assert!(!uri_has_dot_segments(ok), "{ok}");
        }
        assert_eq!(percent_decode(b"%41%zz%4"), b"A%zz%4");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn uris_as_url_parsers_read_them() {
        // Expected values: `new URL(u).toString()` in Node 22 (less percent-encoding, see the doc).
        for (sent, parsed) in [
            ("file:///private/keys", "file:///private/keys"),
            ("FILE:///private/keys", "file:///private/keys"),
            ("FILE://LOCALHOST/private/keys", "file:///private/keys"),
            (" file:///private/keys\n", "file:///private/keys"),
            ("file:///pri\tvate/keys", "file:///private/keys"),
            ("file:/private/keys", "file:///private/keys"),
            ("file:x/y", "file:///x/y"),
            ("file://Host/x", "file://host/x"),
            ("file:\\\\\\private\\keys", "file:///private/keys"),
            ("HTTPS://EXAMPLE.com:443/a", "https://example.com/a"),
            ("http:\\\\example.com\\a", "http://example.com/a"),
            ("http:example.com/a", "http://example.com/a"),
            ("https://u:p@EXAMPLE.com", "https://u:p@example.com/"),
            ("http://h:8080/a?X=\\", "http://h:8080/a?X=\\"),
            ("db://Table/X", "db://Table/X"),
            ("DB:x", "db:x"),
            ("no scheme", "no scheme"),
        ] {
            assert_eq!(uri_as_url_parsers_read(sent), parsed, "{sent:?}");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn legacy_session_ids_are_read_as_servers_read_them() {
        assert_eq!(legacy_session_id("/messages/?session_id=abc123"), Ok(Some("abc123".into())));
        assert_eq!(legacy_session_id("http://h/messages/?x=1&session%5Fid=%61bc+d#f"), Ok(Some("abc d".into())));
        assert_eq!(legacy_session_id("/messages/?session_id=a&session_id=b"), Err(RepeatedSessionId));
        assert_eq!(legacy_session_id("/messages/"), Ok(None));
        assert_eq!(legacy_session_id("/sse?other=1"), Ok(None));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn header_values_and_base64() {
        assert_eq!(decode_header_value("plain").unwrap(), "plain");
        assert_eq!(decode_header_value("=?base64?w6lsw6h2ZQ==?=").unwrap(), "\u{e9}l\u{e8}ve");
        assert!(decode_header_value("=?base64?***?=").is_err());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn task_creating_calls_and_answers() {
        let ext = json!({"name": "t", "_meta": {META_CLIENT_CAPABILITIES: {"extensions": {TASKS_EXTENSION: {}}}}});
        assert!(may_create_task("tools/call", Some(&ext)));
        assert!(may_create_task("tools/call", Some(&json!({"name": "t", "task": {"ttl": 60000}}))));
        assert!(!may_create_task("tools/call", Some(&json!({"name": "t"}))));
        assert!(!may_create_task("tools/call", Some(&json!({"name": "t", "task": null}))));
        assert!(!may_create_task("prompts/get", Some(&ext)));
        let modern =
            json!({"jsonrpc": "2.0", "id": 1, "result": {"resultType": "task", "taskId": "a", "status": "working"}});
        assert_eq!(answer_task_id(&modern), Some("a"));
        assert_eq!(answer_task_id(&json!({"id": 1, "result": {"task": {"taskId": "b"}}})), Some("b"));
        let polled = json!({"id": 1, "result": {"resultType": "complete", "taskId": "c", "status": "completed"}});
        assert_eq!(answer_task_id(&polled), None, "a tasks/get answer creates no task");
        assert_eq!(answer_task_id(&json!({"id": 1, "result": {"content": []}})), None);
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
        // Tasks extension (2026-07-28): `Mcp-Name` is the task id on tasks/get, tasks/update, tasks/cancel.
        let task = json!({"taskId": "786512e2"});
        for m in ["tasks/get", "tasks/update", "tasks/cancel"] {
            let h = |n: &str| hdr(Some(m), Some(n), Some(REV_2026_07_28));
            assert!(check_headers(m, Some(&task), &h("786512e2")).is_ok(), "{m}");
            assert!(check_headers(m, Some(&task), &h("other-task")).is_err(), "{m}: another task");
            let named = json!({"taskId": "786512e2", "name": "x"});
            assert!(check_headers(m, Some(&named), &h("x")).is_err(), "{m}: a name riding along is not the task");
        }
        // resources/read: the header names the URI the server reads, not a `name` riding along.
        let read = json!({"uri": "file:///private/keys", "name": "readme"});
        let modern = |n: &str| hdr(Some("resources/read"), Some(n), Some(REV_2026_07_28));
        assert!(check_headers("resources/read", Some(&read), &modern("file:///private/keys")).is_ok());
        assert!(check_headers("resources/read", Some(&read), &modern("readme")).is_err());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn uri_spellings_a_server_may_read() {
        assert!(uri_spellings("file:///public/notes").is_empty());
        assert_eq!(uri_spellings("file:///public/%73ecret"), ["file:///public/secret"]);
        assert_eq!(uri_spellings("file:///public/%2573ecret"), ["file:///public/%73ecret", "file:///public/secret"]);
        assert_eq!(uri_spellings("FILE:///x/%41"), ["FILE:///x/A", "file:///x/A", "file:///x/%41"]);
        assert_eq!(uri_spellings("file:///x/%ff"), ["file:///x/\u{fffd}"]);
        assert_eq!(uri_spellings("file:///x/%zz"), Vec::<String>::new(), "invalid escapes stay");
    }
}
