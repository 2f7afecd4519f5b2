//! Request decisions and answer filtering, with no proxy-wasm types (the adapter in `filter.rs` only
//! moves bytes and headers). Everything a client can send gets a documented answer:
//!
//! | input | answer |
//! |---|---|
//! | not JSON (incl. empty body, non-UTF-8) | 400, JSON-RPC -32700, id null |
//! | JSON but not a JSON-RPC message / empty batch | 400, -32600 (id echoed when readable) |
//! | a batch on MCP 2025-06-18 or newer (`MCP-Protocol-Version`) | 400, -32600 |
//! | `Mcp-Method` / `Mcp-Name` / `MCP-Protocol-Version` disagree with the body (or missing in 2026-07-28) | 400, -32020 |
//! | a denied request | `hide`: 200 with -32602 "Unknown tool: x" (-32602 "Unknown prompt", -32002 "Resource not found", -32601 otherwise); `forbid`: 403, -32000, `WWW-Authenticate: Bearer error="insufficient_scope"` |
//! | a denied notification | `hide`: 202 with no body (as if delivered); `forbid`: 403 |
//! | a batch with a denied or invalid element | nothing is forwarded; one error per request element |
//! | a batch with two requests sharing an id (under [`id_key`]) | 400, one error per request element (-32600 for the repeats) |
//! | keys that are one key to a case-insensitive parser (`method` and `Method`), a member misspelled so (`ID`) | 400, -32600 (`parse_body`) |
//! | a path that is one endpoint as sent and another normalized (`/mcp/../a2a`) | 400 ([`Endpoint::Ambiguous`]) |
//! | a resource URI with `.` / `..` segments (also `%2e`, `%252e`, `\t..`) | denied (rule `uri-dot-segments`), never resolved |
//! | a resource URI a URL parser reads otherwise (`FILE:`, `file://localhost/`) | must be allowed in both spellings |
//! | A2A keys that are one protobuf field (`contextId`, `context_id`) | 400, -32600, as duplicate keys |
//! | an answer (or SSE event) that cannot be read | replaced by -32603 (fail closed); GET streams are read by list shape |
//! | client responses (answers to server requests) | forwarded, no decision needed |

use crate::config::{Config, DenyAnswer, OtherPaths, Protocol};
use crate::event_id::EventIdTagger;
use crate::identity::Identity;
use crate::policy::{fold_eq, fold_key, Call, Decision, Policy, View};
use meshwarden_shared::a2a;
use meshwarden_shared::config::glob_match;
use meshwarden_shared::jsonrpc::{self, Message, ParseError, Payload};
use meshwarden_shared::mcp::{self, ListKind, RequestHeaders};
use meshwarden_shared::sse::{encode_event, SseBlockSplitter, SseEvent, SseParser};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::HashMap;

/// JSON-RPC code of the `forbid` answer (implementation-defined server error range, outside the
/// -32020..-32099 block MCP reserves).
pub const FORBIDDEN_CODE: i64 = -32000;
/// MCP "Resource not found".
pub const RESOURCE_NOT_FOUND: i64 = -32002;

/// Every list answer a gateway filters, and the `result` member holding each.
const LIST_KINDS: [ListKind; 4] =
    [ListKind::Tools, ListKind::Prompts, ListKind::Resources, ListKind::ResourceTemplates];
const LIST_KEYS: [&str; 4] = ["tools", "prompts", "resources", "resourceTemplates"];
/// The rule reported (audit log, access log) when a resource URI holding `.` / `..` segments is refused
/// before the policy is consulted (a reserved rule name).
pub const DOT_SEGMENTS_RULE: &str = "uri-dot-segments";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Mcp,
    A2a,
    Card,
    Other,
    /// One endpoint as sent, another once normalized (`/mcp/../a2a`): refused (400), since servers
    /// disagree on where it goes.
    Ambiguous,
}

/// A local answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    /// Empty for 202.
    pub body: String,
}

/// One decision, for the audit log, stats and access-log metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Audit {
    pub protocol: Protocol,
    pub method: String,
    pub target: Option<String>,
    pub allowed: bool,
    pub rule: String,
    pub answer: Option<DenyAnswer>,
    pub id: Option<Value>,
}

impl Audit {
    fn of(protocol: Protocol, method: &str, target: &Option<String>, d: &Decision, id: Option<Value>) -> Audit {
        Audit {
            protocol,
            method: method.to_string(),
            target: target.clone(),
            allowed: d.allowed,
            rule: d.rule.clone(),
            answer: (!d.allowed).then_some(d.answer),
            id,
        }
    }
}

/// How to filter the answer to a forwarded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind {
    List(ListKind),
    Card,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    /// `Some`: answer locally, never forward.
    pub reply: Option<Reply>,
    pub audits: Vec<Audit>,
    /// Answers to filter, by JSON-RPC id (its JSON text).
    pub filters: HashMap<String, FilterKind>,
    /// Bounded names of notable events, counted by the adapter (`invalid_json`, `header_mismatch`...).
    pub events: Vec<&'static str>,
    /// The existing tasks the allowed requests name (request id, task id), checked against the callers
    /// the tasks are bound to (`bind_tasks`): A2A tasks on an A2A endpoint, MCP tasks on an MCP one.
    pub tasks: Vec<(Option<Value>, String)>,
    /// A2A: the contexts the allowed messages continue (request id, context id), checked against the
    /// callers the contexts are bound to (`bind_tasks`).
    pub contexts: Vec<(Option<Value>, String)>,
    /// An allowed request whose answer may create a task: A2A `message/send`, `message/stream`; MCP a
    /// `tools/call` that may be answered with a task ([`mcp::may_create_task`]).
    pub creates_tasks: bool,
    /// A2A: an allowed `ListTasks`, whose answer lists tasks of every caller.
    pub lists_tasks: bool,
}

impl Outcome {
    /// Remember the tasks an allowed request names, and whether its answer may create one.
    fn note_tasks(&mut self, protocol: Protocol, id: Option<&Value>, method: &str, params: Option<&Value>) {
        if protocol == Protocol::Mcp {
            for task in mcp_task_refs(method, params) {
                self.tasks.push((id.cloned(), task.to_string()));
            }
            self.creates_tasks |= mcp::may_create_task(method, params);
            return;
        }
        for task in a2a::task_refs(method, params) {
            self.tasks.push((id.cloned(), task.to_string()));
        }
        if let Some(context) = a2a::context_ref(method, params) {
            self.contexts.push((id.cloned(), context.to_string()));
        }
        self.creates_tasks |= a2a::creates_tasks(method);
        self.lists_tasks |= a2a::lists_tasks(method);
    }

    /// Whether the request is forwarded (no local answer).
    pub fn forwarded(&self) -> bool {
        self.reply.is_none()
    }

    /// Refuse a forwarded request because the session or task it names is bound to another caller (or,
    /// with `unknown_sessions: deny`, to nobody this Envoy knows): every decision becomes a deny by `rule`.
    pub fn refuse_for_binding(&mut self, rule: &str, reply: Reply, event: &'static str) {
        for a in &mut self.audits {
            a.allowed = false;
            a.rule = rule.to_string();
            a.answer = None;
        }
        self.filters.clear();
        self.tasks.clear();
        self.contexts.clear();
        self.creates_tasks = false;
        self.lists_tasks = false;
        self.events.push(event);
        self.reply = Some(reply);
    }

    /// The JSON-RPC id to answer with: the one decided request's, else `null`.
    pub fn single_id(&self) -> Option<Value> {
        match self.audits.as_slice() {
            [a] => a.id.clone(),
            _ => None,
        }
    }
}

/// Rule names (reserved) of the refusals of [`Outcome::refuse_for_binding`].
pub const SESSION_BINDING_RULE: &str = "session-binding";
pub const UNKNOWN_SESSION_RULE: &str = "unknown-session";
pub const TASK_BINDING_RULE: &str = "task-binding";
pub const EVENT_ID_BINDING_RULE: &str = "event-id-binding";
pub const CONTEXT_BINDING_RULE: &str = "context-binding";
/// JSON-RPC code of the unknown-session answer (the MCP TypeScript SDK's -32001 "Session not found").
pub const SESSION_NOT_FOUND: i64 = -32001;

/// The answer to a request naming a session bound to another caller: what a server answers for a
/// session it does not know (HTTP 404, after which an MCP client starts a new session), so the session's
/// existence is not revealed.
pub fn session_not_found(id: Option<&Value>) -> Reply {
    json_reply(404, &jsonrpc::error_response(id, SESSION_NOT_FOUND, "Session not found"), vec![])
}

/// The answer to an A2A message continuing a context bound to another caller: invalid params, as an agent
/// that does not know the context would refuse it (A2A defines no error of its own for contexts), so the
/// context's existence is not revealed.
pub fn context_not_found(id: Option<&Value>) -> Reply {
    json_reply(200, &jsonrpc::error_response(id, jsonrpc::INVALID_PARAMS, "Invalid params: unknown contextId"), vec![])
}

/// The answer to a request whose `Last-Event-ID` this gateway did not hand to this caller in this
/// session (see `event_id`): 400, nothing is replayed. An MCP client gives up resuming after its retries
/// and fails the pending request instead of waiting for it.
pub fn unknown_event_id() -> Reply {
    json_reply(
        400,
        &jsonrpc::error_response(None, jsonrpc::INVALID_REQUEST, "Invalid Request: unknown Last-Event-ID"),
        vec![],
    )
}

/// The answer to an A2A request naming a task bound to another caller: A2A's `TaskNotFoundError`, as for
/// a task that does not exist.
pub fn task_not_found(id: Option<&Value>) -> Reply {
    json_reply(200, &jsonrpc::error_response(id, a2a::TASK_NOT_FOUND, "Task not found"), vec![])
}

/// The answer to an MCP request naming a task bound to another caller: what the Tasks extension has a
/// server answer for a task it does not know (-32602, "Failed to retrieve task: Task not found").
pub fn mcp_task_not_found(id: Option<&Value>) -> Reply {
    let body = jsonrpc::error_response(id, jsonrpc::INVALID_PARAMS, "Failed to retrieve task: Task not found");
    json_reply(200, &body, vec![])
}

/// The MCP tasks a request names: `params.taskId` of `tasks/get`, `tasks/result`, `tasks/update`,
/// `tasks/cancel`, and each id in a 2026-07-28 `subscriptions/listen`'s `notifications.taskIds` (the Tasks
/// extension's status notifications, which carry the task's result). Every key a server may read as the
/// member counts (`task_id`, any letter case), as for [`Engine::refused_subscription`].
fn mcp_task_refs<'a>(method: &str, params: Option<&'a Value>) -> Vec<&'a str> {
    let Some(p) = params.and_then(Value::as_object) else {
        return Vec::new();
    };
    let folded = |k: &str| fold_key(k).replace('_', "");
    let mut out = Vec::new();
    if mcp::TASK_METHODS.contains(&method) {
        let member = folded("taskId");
        out.extend(p.iter().filter(|(k, _)| folded(k) == member).filter_map(|(_, v)| v.as_str()));
    } else if method == "subscriptions/listen" {
        let member = folded("taskIds");
        let notifications = p.get("notifications").and_then(Value::as_object);
        for (_, v) in notifications.into_iter().flatten().filter(|(k, _)| folded(k) == member) {
            out.extend(v.as_array().into_iter().flatten().filter_map(Value::as_str));
        }
    }
    out
}

/// A batch element's id and, when it was itself refused, its error (code, message).
type Refused = (Option<Value>, Option<(i64, String)>);

/// The answer could not be read as JSON (the adapter withholds it: fail closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// A filtered body and how many items it lost.
pub type Filtered = Option<(Vec<u8>, usize)>;

/// Which answers to filter, and how.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    /// By JSON-RPC id ([`id_key`]): the answers to this POST's list / card requests.
    pub ids: HashMap<String, FilterKind>,
    /// MCP: every other response whose `result` has the shape of a list answer (a `tools`, `prompts`,
    /// `resources` or `resourceTemplates` member) is filtered as that list, and one whose shape cannot be
    /// read is replaced by a -32603 error for its id. On for GET streams (a server with an event store
    /// replays a stored `tools/list` answer there after `Last-Event-ID`) and for every MCP POST answer (a
    /// server may deliver another request's answer in it, see `incidental`).
    pub by_shape: bool,
    /// MCP POST answers to requests that asked for no list, read by shape only because servers route
    /// answers by request id across POSTs: the MCP Python SDK (`_request_streams[str(id)]`) and the
    /// TypeScript SDK (`_requestToStreamMapping`) deliver the answer to a `tools/list` with id 1 on the
    /// stream of whichever POST registered id 1 last, e.g. a concurrent `ping` with id 1 (or `"1"`) of
    /// the same session. What the filter cannot read here (not JSON, too large) passes, as it did before
    /// these answers were read: it is not a list answer the client could be shown filtered.
    pub incidental: bool,
}

impl Plan {
    /// Filter by id only.
    pub fn by_id(ids: HashMap<String, FilterKind>) -> Plan {
        Plan { ids, by_shape: false, incidental: false }
    }

    /// Nothing to filter: the answer is not read.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && !self.by_shape
    }

    /// The id to echo in an error replacing an answer that could not be read: the planned one when
    /// there is exactly one, else `null`.
    pub fn single_id(&self) -> Option<Value> {
        match (self.ids.len(), self.ids.keys().next()) {
            (1, Some(k)) => serde_json::from_str(k).ok(),
            _ => None,
        }
    }
}

/// The error that replaces an answer (or one message, or one SSE event) the filter could not read.
pub fn withheld_answer(id: Option<&Value>, why: &str) -> String {
    jsonrpc::error_response(id, jsonrpc::INTERNAL_ERROR, &format!("Gateway could not filter the answer: {why}"))
        .to_string()
}

pub struct Engine {
    pub config: Config,
    pub policy: Policy,
}

fn strip_query(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// Whether a server could route `p` (query already cut) differently from its spelling: a percent
/// escape, a backslash, an ASCII capital, a `;` path parameter, `//`, a `.` / `..` segment, or a
/// trailing `/`. Most paths have none, and skip the normalized second match.
fn needs_normalizing(p: &str) -> bool {
    let b = p.as_bytes();
    b.iter().any(|c| matches!(c, b'%' | b'\\' | b';' | b'A'..=b'Z'))
        || p.contains("//")
        || p.split('/').any(|seg| seg == "." || seg == "..")
        || (p.len() > 1 && p.ends_with('/'))
}

/// `p` (query already cut) as a normalizing server would route it: percent escapes decoded (all of
/// them, as uvicorn does, and again while any remain, up to three rounds: a stack may decode twice),
/// backslashes read as slashes, `;` path parameters cut from every segment (`/mcp;x=1` is `/mcp`,
/// `/x/..;/mcp` is `/mcp`, as Tomcat and Spring route them), empty and `.` segments dropped, `..`
/// resolved, ASCII lowercase.
pub fn normalized_path(p: &str) -> String {
    let mut bytes = p.as_bytes().to_vec();
    for _ in 0..3 {
        let decoded = mcp::percent_decode(&bytes);
        if decoded == bytes {
            break;
        }
        bytes = decoded;
    }
    let text = String::from_utf8_lossy(&bytes).replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        let seg = seg.split(';').next().unwrap_or(seg);
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(text.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (text.ends_with('/') && !segments.is_empty()) {
        out.push('/');
    }
    out.to_ascii_lowercase()
}

/// The key an answer is matched to its request by. A number with no fraction is keyed as the integer:
/// JavaScript servers (the TypeScript MCP SDK) parse `1.0` and `1e2` as the numbers 1 and 100 and echo
/// `1` / `100`, and an answer that matched no request would pass unfiltered. An integer beyond 2^53 is
/// keyed by the double it rounds to: a JavaScript server (the A2A JS SDK, the TypeScript MCP SDK) echoes
/// `9007199254740993` as `9007199254740992` and `1e19` as `10000000000000000000`, and a Python server
/// (Pydantic reading `1e19` as an int) the latter too, so every spelling of one double is one id (two
/// such requests in a batch share an id and are refused). Strings stay distinct from numbers (`"1"` is
/// not `1`), as JSON-RPC servers keep them.
pub fn id_key(id: &Value) -> String {
    if let Value::Number(n) = id {
        if let Some(f) = n.as_f64() {
            if f.is_finite() && f.fract() == 0.0 {
                // Up to 2^53 the double holds the integer exactly: its digits, as before any rounding.
                if f.abs() <= 9_007_199_254_740_992.0 {
                    return format!("{}", f as i64);
                }
                // Beyond: the double's integer digits (`Display` never uses an exponent).
                return format!("{f}");
            }
        }
    }
    id.to_string()
}

/// A POST body as JSON-RPC, refusing JSON that servers' parsers read differently: a key given twice
/// (the shared strict parse), and keys that are one key to a case-insensitive parser ([`fold_eq`]).
/// Go's `encoding/json` matches object keys to struct fields ignoring case, so a Go MCP / A2A server
/// built on it reads `{"method":"ping","Method":"tools/call"}` as a `tools/call` (the last of the two),
/// `{"name":"search","Name":"delete_all"}` as `delete_all`, `{"ID":1,"method":"tools/list"}` as a request
/// (here a notification, whose answer would not be filtered), and `"Params"` as the params. Refused as
/// duplicate keys are: two keys of one object that fold alike (any depth), and a JSON-RPC or MCP member
/// spelled otherwise than exactly.
fn parse_body(body: &[u8], protocol: Protocol) -> Result<Payload, ParseError> {
    let value = meshwarden_shared::json::parse_strict(body).map_err(|e| match e {
        meshwarden_shared::json::JsonBodyError::DuplicateKey(m) => ParseError::DuplicateKey(m),
        _ => ParseError::NotJson,
    })?;
    if let Some(why) = folded_duplicate(&value, protocol).or_else(|| misspelled_member(&value, protocol)) {
        return Err(ParseError::DuplicateKey(why));
    }
    jsonrpc::parse_value(value)
}

/// Two keys of one object (at any depth) that are one key to a case-insensitive parser, or, in A2A
/// bodies, to a protobuf JSON parser: the a2a-sdk reads params with protobuf's `ParseDict`, which takes
/// a field under its JSON name or its proto name (`contextId` or `context_id`, the last one winning).
fn folded_duplicate(v: &Value, protocol: Protocol) -> Option<String> {
    match v {
        Value::Object(m) => {
            let twice = |a: &String, b: &String| format!("keys {a:?} and {b:?} are one key to some parsers");
            if m.len() <= 16 {
                let keys: Vec<&String> = m.keys().collect();
                for (i, a) in keys.iter().enumerate() {
                    if let Some(b) = keys.iter().skip(i + 1).find(|b| same_key(a, b, protocol)) {
                        return Some(twice(a, b));
                    }
                }
            } else {
                // Linear for large objects (a hostile body may hold 100,000 keys).
                let mut seen: HashMap<String, &String> = HashMap::with_capacity(m.len());
                for k in m.keys() {
                    if let Some(earlier) = seen.insert(key_fold(k, protocol), k) {
                        return Some(twice(earlier, k));
                    }
                }
            }
            m.values().find_map(|v| folded_duplicate(v, protocol))
        }
        Value::Array(items) => items.iter().find_map(|v| folded_duplicate(v, protocol)),
        _ => None,
    }
}

/// Whether two keys of one object are one key to some server's parser (see [`folded_duplicate`]).
fn same_key(a: &str, b: &str, protocol: Protocol) -> bool {
    fold_eq(a, b) || (protocol == Protocol::A2a && key_fold(a, protocol) == key_fold(b, protocol))
}

/// A key as [`same_key`] compares it: Go's case folding, and in A2A without `_` (proto names).
fn key_fold(k: &str, protocol: Protocol) -> String {
    let folded = fold_key(k);
    if protocol == Protocol::A2a {
        folded.replace('_', "")
    } else {
        folded
    }
}

/// A JSON-RPC member (`method`, `id`, `params`...), or a `params` member the policy reads (`name`, `uri`,
/// `arguments`, `ref`, `notifications`; A2A `tenant`), spelled otherwise than exactly (`Method`, `ID`,
/// `paramſ`).
fn misspelled_member(v: &Value, protocol: Protocol) -> Option<String> {
    const MESSAGE: &[&str] = &["jsonrpc", "id", "method", "params", "result", "error"];
    const MCP_PARAMS: &[&str] = &["name", "uri", "arguments", "ref", "_meta", "notifications"];
    const A2A_PARAMS: &[&str] = &["tenant"];
    const REF: &[&str] = &["type", "name", "uri"];
    let check = |obj: &serde_json::Map<String, Value>, members: &[&str]| {
        obj.keys().find_map(|k| {
            let m = members.iter().find(|m| fold_eq(k, m))?;
            (k != m).then(|| format!("key {k:?} is {m:?} to case-insensitive parsers"))
        })
    };
    let messages = match v {
        Value::Array(items) => items.as_slice(),
        other => std::slice::from_ref(other),
    };
    messages.iter().filter_map(Value::as_object).find_map(|msg| {
        check(msg, MESSAGE).or_else(|| {
            let params = msg.get("params")?.as_object()?;
            let members = if protocol == Protocol::Mcp { MCP_PARAMS } else { A2A_PARAMS };
            check(params, members).or_else(|| check(params.get("ref")?.as_object()?, REF))
        })
    })
}

/// An A2A message without an `id` is a call with the id `null`: A2A has no notifications, and the
/// a2a-sdk executes and answers such a message like any request (`"id": null` in the answer). Decided
/// as a notification, its answer was not read: a `GetExtendedAgentCard` without an id returned the whole
/// extended card, every skill of it, to a caller allowed the method (before 2026-12-06).
fn a2a_call(protocol: Protocol, msg: Message) -> Message {
    match msg {
        Message::Notification { method, params } if protocol == Protocol::A2a => {
            Message::Request { id: Value::Null, method, params }
        }
        other => other,
    }
}

fn json_reply(status: u32, body: &Value, extra: Vec<(String, String)>) -> Reply {
    let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
    headers.extend(extra);
    Reply { status, headers, body: body.to_string() }
}

impl Engine {
    pub fn new(config: Config) -> Result<Engine, meshwarden_shared::config::ConfigError> {
        let policy = Policy::compile(&config.policy)?;
        Ok(Engine { config, policy })
    }

    /// Which endpoint `path` is. A path that does not match as sent is matched again as a server that
    /// normalizes paths would route it ([`normalized_path`]): `/%6Dcp`, `//mcp`, `/x/../mcp` or `/MCP`
    /// reach the MCP endpoint of such a server (uvicorn decodes escapes, Envoy's `normalize_path` resolves
    /// dot segments, some frameworks ignore case), so they are authorized as MCP, not passed as other.
    ///
    /// A path that matches as sent is matched normalized too: a server that routes as sent and one that
    /// normalizes may disagree. `/mcp/../.well-known/agent-card.json` matches `/mcp/*` as sent, and a
    /// normalizing server serves the card for it: authorized as an MCP GET, the card would pass
    /// unfiltered. Two different endpoints are [`Endpoint::Ambiguous`] (refused); an endpoint as sent that
    /// is no endpoint normalized (`/mcp/../admin`) stays that endpoint, unless other paths are denied.
    pub fn endpoint(&self, path: &str) -> Endpoint {
        let p = strip_query(path);
        let as_sent = self.endpoint_as_sent(p, false);
        if !needs_normalizing(p) {
            return as_sent;
        }
        match (as_sent, self.endpoint_normalized(p)) {
            (a, n) if a == n => a,
            (Endpoint::Other, n) => n,
            // A server routing as sent reaches the endpoint, a normalizing one another path.
            (_, Endpoint::Other) if self.config.other_paths == OtherPaths::Deny => Endpoint::Other,
            (a, Endpoint::Other) => a,
            _ => Endpoint::Ambiguous,
        }
    }

    /// The endpoint of `p` normalized ([`normalized_path`]), then (if none) without a trailing slash:
    /// Express (non-strict routing, its default; the A2A JS SDK and most TypeScript MCP servers), ASP.NET
    /// Core and Spring MVC 5 route `/a2a/` as `/a2a`.
    fn endpoint_normalized(&self, p: &str) -> Endpoint {
        let normalized = normalized_path(p);
        let e = self.endpoint_as_sent(&normalized, true);
        if e != Endpoint::Other {
            return e;
        }
        match normalized.strip_suffix('/') {
            Some(t) if !t.is_empty() => self.endpoint_as_sent(t, true),
            _ => e,
        }
    }

    /// `folded`: `p` is normalized (lowercase), so the configured paths are compared lowercased.
    fn endpoint_as_sent(&self, p: &str, folded: bool) -> Endpoint {
        let fold = |g: &str| if folded { g.to_ascii_lowercase() } else { g.to_string() };
        let glob = |g: &String| if folded { glob_match(&fold(g), p) } else { glob_match(g, p) };
        if self.config.mcp_paths.iter().any(glob) {
            Endpoint::Mcp
        } else if self.config.a2a_paths.iter().any(glob) {
            Endpoint::A2a
        } else if self.config.agent_card_paths.iter().any(|c| if folded { fold(c) == p } else { c == p }) {
            Endpoint::Card
        } else {
            Endpoint::Other
        }
    }

    /// [`endpoint`](Self::endpoint), then (with `detect_by_headers`) MCP / A2A headers on other paths that
    /// would pass: with `other_paths: deny` an other path is refused whatever it carries (authorized as
    /// MCP, a GET to any path with an `Mcp-Session-Id` would pass as the built-in `session/stream`).
    pub fn endpoint_with_headers(&self, path: &str, has_mcp_headers: bool, has_a2a_header: bool) -> Endpoint {
        self.endpoint_detected(path, has_mcp_headers, has_a2a_header).0
    }

    /// [`endpoint_with_headers`](Self::endpoint_with_headers), and whether the endpoint is A2A by its
    /// `A2A-Version` header alone (the path is no endpoint): see [`a2a_by_header_may_be_json_rpc`].
    pub fn endpoint_detected(&self, path: &str, has_mcp_headers: bool, has_a2a_header: bool) -> (Endpoint, bool) {
        let detect = self.config.detect_by_headers && self.config.other_paths == OtherPaths::Pass;
        match self.endpoint(path) {
            Endpoint::Other if detect && has_mcp_headers => (Endpoint::Mcp, false),
            Endpoint::Other if detect && has_a2a_header => (Endpoint::A2a, true),
            e => (e, false),
        }
    }

    fn call_for<'a>(
        &self,
        protocol: Protocol,
        method: &'a str,
        params: Option<&'a Value>,
        target: Option<&'a str>,
    ) -> Call<'a> {
        let arguments = match (protocol, method) {
            (Protocol::Mcp, "tools/call" | "prompts/get") => {
                Some(params.and_then(|p| p.get("arguments")).unwrap_or(&Value::Null))
            }
            _ => Some(params.unwrap_or(&Value::Null)),
        };
        let method_names = if protocol == Protocol::A2a { a2a::names(method) } else { &[] };
        Call { protocol, method, method_names, target, arguments }
    }

    fn target(protocol: Protocol, method: &str, params: Option<&Value>) -> Option<String> {
        match protocol {
            Protocol::Mcp => mcp::target(method, params),
            // A2A requests do not name a skill; v1.0 `tenant` is the closest thing to a target.
            Protocol::A2a => params.and_then(|p| p.get("tenant")).and_then(Value::as_str).map(str::to_string),
        }
    }

    pub fn decide_call(
        &self,
        identity: &Identity,
        protocol: Protocol,
        method: &str,
        params: Option<&Value>,
    ) -> (Decision, Option<String>) {
        let target = Self::target(protocol, method, params);
        // A URI glob matches text, a server resolves paths: `file:///public/../private/keys` (or
        // `%2e%2e`, `%252e%252e`) matches `file:///public/*` but reads /private/keys. Refused whoever asks.
        if protocol == Protocol::Mcp && mcp::request_uri(method, params).is_some_and(mcp::uri_has_dot_segments) {
            let d = Decision { allowed: false, rule: DOT_SEGMENTS_RULE.into(), answer: self.config.policy.deny_answer };
            return (d, target);
        }
        let call = self.call_for(protocol, method, params, target.as_deref());
        let uri =
            mcp::request_uri(method, params).filter(|u| protocol == Protocol::Mcp && Some(*u) == target.as_deref());
        let d = self.evaluate_naming(identity, &call, uri);
        if d.allowed && protocol == Protocol::Mcp && method == "subscriptions/listen" {
            if let Some((denied, uri)) = self.refused_subscription(identity, params) {
                return (denied, uri.or(target));
            }
        }
        (d, target)
    }

    /// The decision for `call`, whose target is the resource `uri` when it names one: a URI a URL parser
    /// reads otherwise (`FILE:///private/keys`, `file://localhost/private/keys`, ` file:///x`, see
    /// [`mcp::uri_as_url_parsers_read`]), or percent-decoded (`file:///public/%73ecret`, which the MCP
    /// Python SDK's templates read as `secret`; [`mcp::uri_spellings`]), must be allowed in that spelling
    /// too. The TypeScript SDK looks resources up by `new URL(uri)`: a deny rule on `file:///private/*`
    /// would not bind it otherwise.
    fn evaluate_naming(&self, identity: &Identity, call: &Call, uri: Option<&str>) -> Decision {
        let d = self.policy.evaluate(identity, call);
        let Some(uri) = uri.filter(|_| d.allowed) else {
            return d;
        };
        for other in mcp::uri_spellings(uri) {
            let as_other = self.policy.evaluate(identity, &Call { target: Some(&other), ..call.clone() });
            if !as_other.allowed {
                return as_other;
            }
        }
        d
    }

    /// The first resource a 2026-07-28 `subscriptions/listen` subscribes to that the caller may not
    /// `resources/subscribe` to (its decision and URI). `subscriptions/listen` replaced
    /// `resources/subscribe` in 2026-07-28: its `params.notifications.resourceSubscriptions` lists URIs,
    /// each authorized here as the `resources/subscribe` of that URI would be (dot segments refused), so
    /// a rule allowing the method does not open updates about every resource. Every key of
    /// `notifications` that is this member to some server counts: the Python SDK also reads
    /// `resource_subscriptions`, a Go server any case of either. A value that is not a list of strings is
    /// authorized as a subscribe without a target.
    fn refused_subscription(&self, identity: &Identity, params: Option<&Value>) -> Option<(Decision, Option<String>)> {
        let notifications = params?.get("notifications")?.as_object()?;
        let member = fold_key("resourceSubscriptions");
        let lists = notifications.iter().filter(|(k, _)| fold_key(k).replace('_', "") == member).map(|(_, v)| v);
        let mut uris: Vec<Option<&str>> = Vec::new();
        for list in lists {
            match list {
                Value::Null => {}
                Value::Array(items) => uris.extend(items.iter().map(Value::as_str)),
                _ => uris.push(None),
            }
        }
        uris.into_iter().find_map(|uri| {
            if uri.is_some_and(mcp::uri_has_dot_segments) {
                let d =
                    Decision { allowed: false, rule: DOT_SEGMENTS_RULE.into(), answer: self.config.policy.deny_answer };
                return Some((d, uri.map(str::to_string)));
            }
            let args = uri.map_or(Value::Null, |u| json!({ "uri": u }));
            let call = self.call_for(Protocol::Mcp, "resources/subscribe", Some(&args), uri);
            let d = self.evaluate_naming(identity, &call, uri);
            (!d.allowed).then(|| (d, uri.map(str::to_string)))
        })
    }

    /// Denied request's error (JSON-RPC error object, HTTP status).
    fn deny_error(protocol: Protocol, method: &str, target: Option<&str>, answer: DenyAnswer) -> (i64, String) {
        let t = target.unwrap_or("");
        match answer {
            DenyAnswer::Forbid => {
                (FORBIDDEN_CODE, format!("Forbidden: {method} {t} is not allowed for this caller").replace("  ", " "))
            }
            DenyAnswer::Hide => match (protocol, method) {
                (Protocol::Mcp, "tools/call") => (jsonrpc::INVALID_PARAMS, format!("Unknown tool: {t}")),
                (Protocol::Mcp, "prompts/get") => (jsonrpc::INVALID_PARAMS, format!("Unknown prompt: {t}")),
                (Protocol::Mcp, "resources/read" | "resources/subscribe" | "resources/unsubscribe") => {
                    (RESOURCE_NOT_FOUND, format!("Resource not found: {t}"))
                }
                _ => (jsonrpc::METHOD_NOT_FOUND, format!("Method not found: {method}")),
            },
        }
    }

    fn www_authenticate(&self) -> (String, String) {
        let mut v = "Bearer error=\"insufficient_scope\"".to_string();
        if let Some(s) = &self.config.policy.forbid_scope {
            v.push_str(&format!(", scope=\"{}\"", s.replace('"', "")));
        }
        ("www-authenticate".to_string(), v)
    }

    /// GET (server stream) and DELETE (end session) on an MCP endpoint: authorized as the pseudo methods
    /// `session/stream` and `session/delete`. Other HTTP methods: 405. `None` = forward.
    pub fn decide_session(&self, identity: &Identity, http_method: &str) -> Outcome {
        let method = match http_method {
            "GET" => "session/stream",
            "DELETE" => "session/delete",
            _ => {
                let body = jsonrpc::error_response(None, jsonrpc::INVALID_REQUEST, "Method not allowed: use POST");
                return Outcome {
                    reply: Some(json_reply(405, &body, vec![("allow".into(), "GET, POST, DELETE".into())])),
                    events: vec!["method_not_allowed"],
                    ..Outcome::default()
                };
            }
        };
        let (d, _) = self.decide_call(identity, Protocol::Mcp, method, None);
        let audit = Audit {
            protocol: Protocol::Mcp,
            method: method.into(),
            target: None,
            allowed: d.allowed,
            rule: d.rule.clone(),
            answer: (!d.allowed).then_some(d.answer),
            id: None,
        };
        let reply = (!d.allowed).then(|| {
            let (code, msg) = Self::deny_error(Protocol::Mcp, method, None, DenyAnswer::Forbid);
            json_reply(403, &jsonrpc::error_response(None, code, &msg), vec![self.www_authenticate()])
        });
        Outcome { reply, audits: vec![audit], ..Outcome::default() }
    }

    /// Decide a POST body on an MCP or A2A endpoint.
    pub fn decide_body(
        &self,
        identity: &Identity,
        protocol: Protocol,
        headers: &RequestHeaders,
        body: &[u8],
    ) -> Outcome {
        let payload = match parse_body(body, protocol) {
            Ok(p) => p,
            Err(ParseError::NotJson) => {
                let b = jsonrpc::error_response(None, jsonrpc::PARSE_ERROR, "Parse error: the body is not JSON");
                return Outcome {
                    reply: Some(json_reply(400, &b, vec![])),
                    events: vec!["invalid_json"],
                    ..Outcome::default()
                };
            }
            Err(ParseError::DuplicateKey(m)) => {
                let b = jsonrpc::error_response(
                    None,
                    jsonrpc::INVALID_REQUEST,
                    &format!("Invalid Request: ambiguous JSON ({m}); send each key once"),
                );
                return Outcome {
                    reply: Some(json_reply(400, &b, vec![])),
                    events: vec!["duplicate_json_key"],
                    ..Outcome::default()
                };
            }
            Err(ParseError::InvalidRequest) => {
                let b = jsonrpc::error_response(
                    None,
                    jsonrpc::INVALID_REQUEST,
                    "Invalid Request: not a JSON-RPC message or batch",
                );
                return Outcome {
                    reply: Some(json_reply(400, &b, vec![])),
                    events: vec!["invalid_request"],
                    ..Outcome::default()
                };
            }
        };
        match payload {
            Payload::Single(Err(inv)) => {
                let b = jsonrpc::error_response(
                    inv.id.as_ref(),
                    jsonrpc::INVALID_REQUEST,
                    &format!("Invalid Request: {}", inv.reason),
                );
                Outcome {
                    reply: Some(json_reply(400, &b, vec![])),
                    events: vec!["invalid_request"],
                    ..Outcome::default()
                }
            }
            Payload::Single(Ok(msg)) => self.decide_single(identity, protocol, headers, a2a_call(protocol, msg)),
            Payload::Batch(items) => {
                let items = items.into_iter().map(|m| m.map(|m| a2a_call(protocol, m))).collect();
                self.decide_batch(identity, protocol, headers, items)
            }
        }
    }

    fn header_mismatch(&self, id: Option<&Value>, msg: &str) -> Outcome {
        let b = jsonrpc::error_response(id, jsonrpc::MCP_HEADER_MISMATCH, &format!("Header mismatch: {msg}"));
        Outcome { reply: Some(json_reply(400, &b, vec![])), events: vec!["header_mismatch"], ..Outcome::default() }
    }

    fn decide_single(
        &self,
        identity: &Identity,
        protocol: Protocol,
        headers: &RequestHeaders,
        msg: Message,
    ) -> Outcome {
        let mut out = Outcome::default();
        let (id, method, params) = match msg {
            Message::Response { .. } => {
                if protocol == Protocol::Mcp && (headers.method.is_some() || headers.name.is_some()) {
                    return self.header_mismatch(None, "a response carries no method or name");
                }
                out.events.push("client_response");
                return out;
            }
            Message::Request { id, method, params } => (Some(id), method, params),
            Message::Notification { method, params } => (None, method, params),
        };
        if protocol == Protocol::Mcp {
            if let Err(e) = mcp::check_headers(&method, params.as_ref(), headers) {
                return self.header_mismatch(id.as_ref(), &e);
            }
        }
        let (d, target) = self.decide_call(identity, protocol, &method, params.as_ref());
        out.audits.push(Audit::of(protocol, &method, &target, &d, id.clone()));
        if d.allowed {
            if let Some(id) = &id {
                if let Some(k) = self.filter_kind(protocol, &method) {
                    out.filters.insert(id_key(id), k);
                }
            }
            out.note_tasks(protocol, id.as_ref(), &method, params.as_ref());
            return out;
        }
        let (code, message) = Self::deny_error(protocol, &method, target.as_deref(), d.answer);
        out.reply = Some(match (d.answer, &id) {
            (DenyAnswer::Hide, None) => Reply { status: 202, headers: vec![], body: String::new() },
            (DenyAnswer::Hide, Some(id)) => json_reply(200, &jsonrpc::error_response(Some(id), code, &message), vec![]),
            (DenyAnswer::Forbid, id) => {
                json_reply(403, &jsonrpc::error_response(id.as_ref(), code, &message), vec![self.www_authenticate()])
            }
        });
        out
    }

    fn filter_kind(&self, protocol: Protocol, method: &str) -> Option<FilterKind> {
        match protocol {
            Protocol::Mcp => ListKind::from_method(method).map(FilterKind::List),
            Protocol::A2a => a2a::returns_card(method).then_some(FilterKind::Card),
        }
    }

    fn decide_batch(
        &self,
        identity: &Identity,
        protocol: Protocol,
        headers: &RequestHeaders,
        items: Vec<Result<Message, jsonrpc::Invalid>>,
    ) -> Outcome {
        let mut out = Outcome::default();
        if protocol == Protocol::Mcp {
            if let Some(v) = headers.protocol_version.as_deref().map(str::trim) {
                if v != mcp::REV_2025_03_26 {
                    let b = jsonrpc::error_response(
                        None,
                        jsonrpc::INVALID_REQUEST,
                        &format!("Invalid Request: JSON-RPC batches are not part of MCP {v}"),
                    );
                    out.reply = Some(json_reply(400, &b, vec![]));
                    out.events.push("invalid_request");
                    return out;
                }
            }
            if headers.method.is_some() || headers.name.is_some() {
                return self.header_mismatch(None, "Mcp-Method / Mcp-Name cannot describe a batch");
            }
        }
        // (id, error) for every element that must be answered if the batch is refused.
        let mut refused: Vec<Refused> = Vec::new();
        let mut any_invalid = false;
        let mut any_denied = false;
        let mut forbid = false;
        // Answers are matched to requests by id: two requests with one id (`1` and `1.0` too, see
        // [`id_key`]) would share one plan entry, and the second's answer would be filtered as the first's
        // (a `tools/list` answer passed as a `prompts/list` one).
        let mut ids = std::collections::HashSet::new();
        for item in items {
            match item {
                Ok(Message::Request { id, .. }) if !ids.insert(id_key(&id)) => {
                    any_invalid = true;
                    let why = "Invalid Request: id already used by another request in the batch".to_string();
                    refused.push((Some(id), Some((jsonrpc::INVALID_REQUEST, why))));
                }
                Err(inv) => {
                    any_invalid = true;
                    refused
                        .push((inv.id, Some((jsonrpc::INVALID_REQUEST, format!("Invalid Request: {}", inv.reason)))));
                }
                Ok(Message::Response { .. }) => out.events.push("client_response"),
                Ok(Message::Request { id, method, params }) => {
                    let (d, target) = self.decide_call(identity, protocol, &method, params.as_ref());
                    out.audits.push(Audit::of(protocol, &method, &target, &d, Some(id.clone())));
                    if d.allowed {
                        if let Some(k) = self.filter_kind(protocol, &method) {
                            out.filters.insert(id_key(&id), k);
                        }
                        out.note_tasks(protocol, Some(&id), &method, params.as_ref());
                        refused.push((Some(id), None));
                    } else {
                        any_denied = true;
                        forbid |= d.answer == DenyAnswer::Forbid;
                        refused
                            .push((Some(id), Some(Self::deny_error(protocol, &method, target.as_deref(), d.answer))));
                    }
                }
                Ok(Message::Notification { method, params }) => {
                    let (d, target) = self.decide_call(identity, protocol, &method, params.as_ref());
                    out.audits.push(Audit {
                        protocol,
                        method: method.clone(),
                        target,
                        allowed: d.allowed,
                        rule: d.rule.clone(),
                        answer: (!d.allowed).then_some(d.answer),
                        id: None,
                    });
                    if !d.allowed {
                        any_denied = true;
                        forbid |= d.answer == DenyAnswer::Forbid;
                    }
                }
            }
        }
        if !any_invalid && !any_denied {
            return out;
        }
        out.filters.clear();
        out.tasks.clear();
        out.contexts.clear();
        out.creates_tasks = false;
        out.lists_tasks = false;
        let reason =
            if any_invalid { "the batch holds an invalid message" } else { "another request in the batch was denied" };
        let answers: Vec<Value> = refused
            .into_iter()
            .map(|(id, err)| {
                let (code, msg) = err.unwrap_or((FORBIDDEN_CODE, format!("Not executed: {reason}")));
                jsonrpc::error_response(id.as_ref(), code, &msg)
            })
            .collect();
        let body = if answers.is_empty() {
            jsonrpc::error_response(None, jsonrpc::INVALID_REQUEST, &format!("Batch refused: {reason}"))
        } else {
            Value::Array(answers)
        };
        out.reply = Some(if any_invalid {
            out.events.push("invalid_request");
            json_reply(400, &body, vec![])
        } else if forbid {
            json_reply(403, &body, vec![self.www_authenticate()])
        } else {
            json_reply(200, &body, vec![])
        });
        out
    }

    /// Whether a listed item is visible to `identity`.
    pub fn item_visible(&self, identity: &Identity, protocol: Protocol, method: &str, name: &str) -> bool {
        let call = Call { protocol, method, method_names: &[], target: Some(name), arguments: None };
        self.policy.evaluate(identity, &call).allowed
    }

    /// Filter an agent card's skills (evaluated as A2A pseudo method `agent/skill` with the skill id as
    /// target); returns how many were removed.
    pub fn filter_card(&self, identity: &Identity, card: &mut Value) -> usize {
        let view = self.policy.view(identity);
        a2a::filter_card_skills(card, |id| {
            view.allows(&Call {
                protocol: Protocol::A2a,
                method: "agent/skill",
                method_names: &[],
                target: Some(id),
                arguments: None,
            })
        })
    }

    /// Filter one JSON-RPC message of an answer in place; returns the number of items removed.
    pub fn filter_message(&self, identity: &Identity, plan: &HashMap<String, FilterKind>, msg: &mut Value) -> usize {
        let Some(kind) = msg.get("id").and_then(|id| plan.get(&id_key(id))).copied() else {
            return 0;
        };
        let Some(result) = msg.get_mut("result") else {
            return 0;
        };
        match kind {
            FilterKind::Card => self.filter_card(identity, result),
            FilterKind::List(k) => {
                let Some(items) = result.get_mut(k.result_key()).and_then(Value::as_array_mut) else {
                    return 0;
                };
                let view = self.policy.view(identity);
                let before = items.len();
                items.retain(|item| {
                    item.get(k.item_name_key())
                        .and_then(Value::as_str)
                        .is_some_and(|n| self.listed_item_allowed(&view, k, n))
                });
                before - items.len()
            }
        }
    }

    /// Filter a whole JSON answer (one message or a batch answer). `Ok(None)` = unchanged; `Err` = not
    /// JSON (the adapter fails closed). Only the envelope and the filtered list are parsed; every other
    /// value is copied through as raw JSON text (no tree is built for a 200-tool answer).
    pub fn filter_json_answer(
        &self,
        identity: &Identity,
        plan: &HashMap<String, FilterKind>,
        body: &[u8],
    ) -> Result<Filtered, Unreadable> {
        self.filter_json_plan(identity, plan, false, body)
    }

    /// [`filter_json_answer`](Self::filter_json_answer) with a [`Plan`] (`by_shape` included).
    pub fn filter_json_plan(
        &self,
        identity: &Identity,
        plan: &HashMap<String, FilterKind>,
        by_shape: bool,
        body: &[u8],
    ) -> Result<Filtered, Unreadable> {
        let text = std::str::from_utf8(body).map_err(|_| Unreadable)?;
        Ok(self.filter_plan_text(identity, plan, by_shape, text)?.map(|(s, n)| (s.into_bytes(), n)))
    }

    /// [`filter_json_answer`](Self::filter_json_answer) on text (also used for SSE event data), by id only.
    pub fn filter_answer_text(
        &self,
        identity: &Identity,
        plan: &HashMap<String, FilterKind>,
        text: &str,
    ) -> Result<Option<(String, usize)>, Unreadable> {
        self.filter_plan_text(identity, plan, false, text)
    }

    /// Filter answer text by id (`plan`) and, with `by_shape`, every other response shaped like a list
    /// answer ([`Plan::by_shape`]); then mark every result's `cacheScope` `"private"`
    /// ([`private_cache_scope`]). `Ok(Some((text, 0)))` = a message was replaced by an error, or a
    /// `cacheScope` changed.
    pub fn filter_plan_text(
        &self,
        identity: &Identity,
        plan: &HashMap<String, FilterKind>,
        by_shape: bool,
        text: &str,
    ) -> Result<Option<(String, usize)>, Unreadable> {
        let filtered = self.filter_lists_text(identity, plan, by_shape, text)?;
        let current = filtered.as_ref().map_or(text, |(t, _)| t.as_str());
        Ok(match private_cache_scope(current) {
            Some(private) => Some((private, filtered.map_or(0, |(_, n)| n))),
            None => filtered,
        })
    }

    /// [`filter_plan_text`](Self::filter_plan_text) without the `cacheScope` step.
    fn filter_lists_text(
        &self,
        identity: &Identity,
        plan: &HashMap<String, FilterKind>,
        by_shape: bool,
        text: &str,
    ) -> Result<Option<(String, usize)>, Unreadable> {
        let mut view = None;
        // The common case, one request whose answer is a list: read it in one pass.
        if let (1, Some((want_id, FilterKind::List(k)))) = (plan.len(), plan.iter().next()) {
            if !text.trim_start().starts_with('[') {
                let v = view.get_or_insert_with(|| self.policy.view(identity));
                let k = *k;
                let mut keep = |name: &str| self.listed_item_allowed(v, k, name);
                // On an error (invalid JSON, a number serde cannot hold where the one-pass reader
                // looks at a value's type, an unreadable id) the general path below decides, so both agree.
                let read = crate::onepass::filter_list(text, k.result_key(), k.item_name_key(), &LIST_KEYS, &mut keep);
                if let Ok(answer) = read {
                    let id = answer.id.map(|raw| serde_json::from_str::<Value>(raw.get()));
                    if !matches!(id, Some(Err(_))) {
                        let id_matches = matches!(id, Some(Ok(ref id)) if id_key(id) == *want_id);
                        // Another id (or none) is read by shape on the general path below, and so is the
                        // planned id's answer when it holds another kind of list too (see
                        // `filter_raw_message`).
                        if !by_shape || (id_matches && !answer.other_list) {
                            return Ok(match answer.rewritten {
                                Some(body) if id_matches => Some((body, answer.removed)),
                                _ => None,
                            });
                        }
                    }
                }
            }
        }
        if text.trim_start().starts_with('[') {
            let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|_| Unreadable)?;
            let mut removed = 0;
            let mut changed = false;
            let mut parts = Vec::with_capacity(items.len());
            for item in items {
                match self.filter_raw_message(identity, &mut view, plan, by_shape, item)? {
                    Some((s, n)) => {
                        removed += n;
                        changed = true;
                        parts.push(std::borrow::Cow::Owned(s));
                    }
                    None => parts.push(std::borrow::Cow::Borrowed(item.get())),
                }
            }
            if !changed {
                return Ok(None);
            }
            return Ok(Some((format!("[{}]", parts.join(",")), removed)));
        }
        let raw: &RawValue = serde_json::from_str(text).map_err(|_| Unreadable)?;
        self.filter_raw_message(identity, &mut view, plan, by_shape, raw)
    }

    /// An MCP response not in the plan, read by the shape of its `result`: each list member present
    /// (`tools`, `prompts`, `resources`, `resourceTemplates`) is filtered as that list. A `result` whose
    /// members cannot be read, or a list member that is not an array, replaces the message with a
    /// -32603 error for its id (fail closed: a client may read what the filter cannot).
    fn filter_by_shape<'p>(
        &'p self,
        identity: &Identity,
        view: &mut Option<View<'p>>,
        fields: &[(Cow<'_, str>, &RawValue)],
        id: &Value,
        result_raw: &RawValue,
    ) -> Result<Option<(String, usize)>, Unreadable> {
        if !result_raw.get().trim_start().starts_with('{') {
            return Ok(None);
        }
        let withheld = |why: &str| Ok(Some((withheld_answer(Some(id), why), 0)));
        let Ok(result_fields) = object_fields(result_raw.get()) else {
            return withheld("the result is not readable JSON");
        };
        let mut replaced: Vec<(&'static str, String)> = Vec::new();
        let mut removed = 0;
        for k in LIST_KINDS {
            let Some(list_raw) = result_fields.iter().rev().find(|(f, _)| f == k.result_key()).map(|(_, v)| *v) else {
                continue;
            };
            let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(list_raw.get()) else {
                return withheld(&format!("result.{} is not a list", k.result_key()));
            };
            let v = view.get_or_insert_with(|| self.policy.view(identity));
            let before = items.len();
            let kept: Vec<&str> = items
                .into_iter()
                .filter(|item| item_name(item, k).is_some_and(|n| self.listed_item_allowed(v, k, &n)))
                .map(|i| i.get())
                .collect();
            if kept.len() < before {
                removed += before - kept.len();
                replaced.push((k.result_key(), format!("[{}]", kept.join(","))));
            }
        }
        if removed == 0 {
            return Ok(None);
        }
        let result = rebuild_object(&result_fields, &replaced);
        Ok(Some((rebuild_object(fields, &[("result", result)]), removed)))
    }

    /// Whether an event's data is a `notifications/resources/updated` about a resource the caller may not
    /// `resources/subscribe` to (decided as that call: dot segments refused, the URL parser's reading
    /// too); one without a string `params.uri` counts as such. A server may announce updates to every
    /// session (its own subscription bookkeeping, or none), and the filtered streams (the GET stream,
    /// where a 2025 revision's server sends them) would pass them to callers who may not see the resource.
    pub fn hides_resource_update(&self, identity: &Identity, data: &str) -> bool {
        if !data.contains("updated") {
            return false;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return false;
        };
        if v.get("method").and_then(Value::as_str) != Some("notifications/resources/updated") || v.get("id").is_some() {
            return false;
        }
        let Some(uri) = v.get("params").and_then(|p| p.get("uri")).and_then(Value::as_str) else {
            return true;
        };
        let params = json!({ "uri": uri });
        !self.decide_call(identity, Protocol::Mcp, "resources/subscribe", Some(&params)).0.allowed
    }

    /// Whether a listed item may be shown: some call to it can be allowed, and (resources) its URI holds
    /// no `.` / `..` segment, which a read would be refused for anyway, and is allowed in the spelling a
    /// URL parser reads too (as the read is decided, see `evaluate_naming`).
    fn listed_item_allowed(&self, view: &View<'_>, k: ListKind, name: &str) -> bool {
        let resource = matches!(k, ListKind::Resources | ListKind::ResourceTemplates);
        if resource && mcp::uri_has_dot_segments(name) {
            return false;
        }
        let allows = |target: &str| {
            view.allows(&Call {
                protocol: Protocol::Mcp,
                method: k.use_method(),
                method_names: &[],
                target: Some(target),
                arguments: None,
            })
        };
        if !allows(name) {
            return false;
        }
        if !resource {
            return true;
        }
        mcp::uri_spellings(name).iter().all(|other| allows(other))
    }

    fn filter_raw_message<'p>(
        &'p self,
        identity: &Identity,
        view: &mut Option<View<'p>>,
        plan: &HashMap<String, FilterKind>,
        by_shape: bool,
        raw: &RawValue,
    ) -> Result<Option<(String, usize)>, Unreadable> {
        if !raw.get().trim_start().starts_with('{') {
            return Ok(None);
        }
        let fields: Vec<(Cow<'_, str>, &RawValue)> = object_fields(raw.get())?;
        let Some(id_raw) = fields.iter().rev().find(|(k, _)| k == "id").map(|(_, v)| *v) else {
            return Ok(None);
        };
        let id: Value = serde_json::from_str(id_raw.get()).map_err(|_| Unreadable)?;
        let kind = plan.get(&id_key(&id)).copied();
        let Some(result_raw) = fields.iter().rev().find(|(k, _)| k == "result").map(|(_, v)| *v) else {
            return Ok(None);
        };
        let kind = match kind {
            // A planned list answer is read by shape too (every list member it holds): servers route
            // answers by request id across a session's POSTs (see `Plan::incidental`), so a `prompts/list`
            // with id 1 sent while a `tools/list` with id 1 is in flight may receive the `tools/list`
            // answer. Read only as the planned `prompts` list, its whole tool list passed (before
            // 2026-12-07).
            Some(FilterKind::List(_)) | None if by_shape => {
                return self.filter_by_shape(identity, view, &fields, &id, result_raw)
            }
            Some(k) => k,
            None => return Ok(None),
        };
        let (new_result, removed) = match kind {
            FilterKind::Card => {
                let mut card: Value = serde_json::from_str(result_raw.get()).map_err(|_| Unreadable)?;
                let n = self.filter_card(identity, &mut card);
                (card.to_string(), n)
            }
            FilterKind::List(k) => {
                if !result_raw.get().trim_start().starts_with('{') {
                    return Ok(None);
                }
                let result_fields = object_fields(result_raw.get())?;
                let Some(list_raw) = result_fields.iter().rev().find(|(f, _)| f == k.result_key()).map(|(_, v)| *v)
                else {
                    return Ok(None);
                };
                let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(list_raw.get()) else {
                    return Ok(None);
                };
                let v = view.get_or_insert_with(|| self.policy.view(identity));
                let before = items.len();
                let kept: Vec<&str> = items
                    .into_iter()
                    .filter(|item| item_name(item, k).is_some_and(|n| self.listed_item_allowed(v, k, &n)))
                    .map(|i| i.get())
                    .collect();
                let removed = before - kept.len();
                if removed == 0 {
                    return Ok(None);
                }
                let list = format!("[{}]", kept.join(","));
                (rebuild_object(&result_fields, &[(k.result_key(), list)]), removed)
            }
        };
        if removed == 0 {
            return Ok(None);
        }
        Ok(Some((rebuild_object(&fields, &[("result", new_result)]), removed)))
    }

    /// Filter an agent card document.
    pub fn filter_card_document(&self, identity: &Identity, body: &[u8]) -> Result<Filtered, Unreadable> {
        let mut v: Value = serde_json::from_slice(body).map_err(|_| Unreadable)?;
        let removed = self.filter_card(identity, &mut v);
        if removed == 0 {
            return Ok(None);
        }
        Ok(Some((v.to_string().into_bytes(), removed)))
    }

    pub fn internal_error(message: &str) -> Reply {
        json_reply(502, &jsonrpc::error_response(None, jsonrpc::INTERNAL_ERROR, message), vec![])
    }

    /// One audit log line (JSON).
    pub fn audit_line(&self, identity: &Identity, a: &Audit) -> String {
        json!({
            "mcp_authz": "decision",
            "subject": identity.subject(&self.config.identity.subject_claims),
            "identity_source": identity.source,
            "protocol": a.protocol.as_str(),
            "method": a.method,
            "target": a.target,
            "id": a.id,
            "decision": if a.allowed { "allow" } else { "deny" },
            "rule": a.rule,
            "answer": a.answer.map(|x| match x { DenyAnswer::Hide => "hide", DenyAnswer::Forbid => "forbid" }),
        })
        .to_string()
    }
}

/// Method labels of the `method.<method>.{allow,deny}` stats beyond the known MCP / A2A methods and the
/// session pseudo methods (which always keep their own label).
pub const EXTRA_METHOD_LABELS: usize = 64;

/// The bounded labels of the per-method decision stats: every known MCP / A2A method and the session
/// pseudo methods, then at most [`EXTRA_METHOD_LABELS`] other methods callers send (the rest count as
/// `other`). `BoundedLabels::new(64)` with the 46 known names preloaded left room for 18 of them, where the
/// documentation promised 64 (before 2026-12-07).
pub fn method_labels() -> meshwarden_shared::stats::BoundedLabels {
    use meshwarden_shared::stats::BoundedLabels;
    let known = || {
        mcp::CLIENT_METHODS
            .iter()
            .copied()
            .chain(a2a::METHODS.iter().flat_map(|names| names.iter().copied()))
            .chain(["session/stream", "session/delete"])
    };
    // Counted once preloaded: names shared by MCP and A2A (`tasks/get`) are one label.
    let mut count = BoundedLabels::new(0);
    count.preload(known());
    let mut labels = BoundedLabels::new(count.len() + EXTRA_METHOD_LABELS);
    labels.preload(known());
    labels
}

/// Access-log escaping lives in the shared crate (token-limiter logs caller-chosen models too).
pub use meshwarden_shared::access_log::value as access_log_value;

/// The fields of a JSON object as raw values, in order (duplicates kept; the last one wins on rebuild).
fn object_fields(text: &str) -> Result<Vec<(Cow<'_, str>, &RawValue)>, Unreadable> {
    struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);
    impl<'de: 'a, 'a> serde::Deserialize<'de> for Fields<'a> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<'a>(std::marker::PhantomData<&'a ()>);
            impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
                type Value = Fields<'a>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<M: serde::de::MapAccess<'de>>(self, mut m: M) -> Result<Fields<'a>, M::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = m.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                        out.push((k, v));
                    }
                    Ok(Fields(out))
                }
            }
            d.deserialize_map(V(std::marker::PhantomData))
        }
    }
    serde_json::from_str::<Fields>(text).map(|f| f.0).map_err(|_| Unreadable)
}

/// Rebuild an object from raw fields, replacing the values of the `replace` keys (duplicates of a
/// replaced key collapse into one).
fn rebuild_object(fields: &[(Cow<'_, str>, &RawValue)], replace: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(replace.iter().map(|(_, v)| v.len()).sum::<usize>() + 64);
    out.push('{');
    let mut first = true;
    let mut written: Vec<&str> = Vec::new();
    for (k, v) in fields {
        let new = replace.iter().find(|(r, _)| k == r);
        if let Some((r, _)) = new {
            if written.contains(r) {
                continue;
            }
            written.push(r);
        }
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&Value::String(k.to_string()).to_string());
        out.push(':');
        match new {
            Some((_, value)) => out.push_str(value),
            None => out.push_str(v.get()),
        }
    }
    out.push('}');
    out
}

/// The answer (one message or a batch answer) with every `result.cacheScope` other than `"private"` set
/// to `"private"`; `None` when there is none (or the text cannot be read: it is passed or withheld as it
/// is). MCP 2026-07-28 results of `tools/list`, `prompts/list`, `resources/list`,
/// `resources/templates/list` and `resources/read` carry `cacheScope`: `"public"` lets a shared cache
/// serve the result to any caller (the Python SDK client with `share_public` serves such entries across
/// authorization contexts). Every answer the filter passes is one caller's: a list filtered for them,
/// a resource this caller was allowed to read. Shared, a finance caller's tool list reached every other
/// caller of the cache, and a resource one caller may read the others (before 2026-12-06).
fn private_cache_scope(text: &str) -> Option<String> {
    const KEY: &str = "cacheScope";
    if !text.contains(KEY) {
        return None;
    }
    let message = |raw: &str| -> Option<String> {
        let fields = object_fields(raw).ok()?;
        let result = fields.iter().rev().find(|(k, _)| k == "result").map(|(_, v)| *v)?;
        if !result.get().trim_start().starts_with('{') {
            return None;
        }
        let result_fields = object_fields(result.get()).ok()?;
        let scope = result_fields.iter().rev().find(|(k, _)| k == KEY).map(|(_, v)| *v)?;
        if serde_json::from_str::<Value>(scope.get()).ok()? == json!("private") {
            return None;
        }
        let private = rebuild_object(&result_fields, &[(KEY, "\"private\"".to_string())]);
        Some(rebuild_object(&fields, &[("result", private)]))
    };
    if text.trim_start().starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
        let parts: Vec<Option<String>> = items.iter().map(|i| message(i.get())).collect();
        if parts.iter().all(Option::is_none) {
            return None;
        }
        let joined: Vec<Cow<'_, str>> =
            items.iter().zip(parts).map(|(item, part)| part.map_or(Cow::Borrowed(item.get()), Cow::Owned)).collect();
        return Some(format!("[{}]", joined.join(",")));
    }
    if !text.trim_start().starts_with('{') {
        return None;
    }
    message(text)
}

/// The name of a listed item (`name`, `uri` or `uriTemplate`); `None` when missing or not a string.
fn item_name(item: &RawValue, kind: ListKind) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Item<'a> {
        #[serde(borrow, default)]
        name: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        uri: Option<Cow<'a, str>>,
        #[serde(borrow, default, rename = "uriTemplate")]
        uri_template: Option<Cow<'a, str>>,
    }
    let it: Item = serde_json::from_str(item.get()).ok()?;
    match kind.item_name_key() {
        "name" => it.name,
        "uri" => it.uri,
        _ => it.uri_template,
    }
    .map(Cow::into_owned)
}

/// Whether a request found A2A by its `A2A-Version` header alone ([`Engine::endpoint_detected`]) may be a
/// JSON-RPC call: a POST that is not gRPC. The a2a-sdk client sends `A2A-Version` on every request of
/// every binding (its card fetch, the HTTP+JSON binding's `GET /tasks/{id}`, gRPC metadata); those were
/// answered 405 or a JSON-RPC parse error though only the JSON-RPC binding is inspected. They pass as
/// another path would without the header (before 2026-12-07 they were refused).
pub fn a2a_by_header_may_be_json_rpc(http_method: &str, content_type: &str) -> bool {
    http_method == "POST" && !content_type.trim_start().to_ascii_lowercase().starts_with("application/grpc")
}

/// Whether a POST body found A2A by its header alone may be a JSON-RPC call: not when it is empty or a
/// JSON object with no key that is `jsonrpc` or `method` to a case-insensitive parser (an HTTP+JSON
/// binding body such as `POST /message:send`'s `{"message": …}`; no JSON-RPC server runs a call without
/// a method, and the a2a-sdk refuses one without `jsonrpc`). Anything else (a batch, invalid JSON) is
/// decided as JSON-RPC.
pub fn a2a_by_header_body_is_json_rpc(body: &[u8]) -> bool {
    if body.iter().all(u8::is_ascii_whitespace) {
        return false;
    }
    match meshwarden_shared::json::parse_strict(body) {
        Ok(Value::Object(m)) => m.keys().any(|k| fold_eq(k, "jsonrpc") || fold_eq(k, "method")),
        _ => true,
    }
}

/// Whether an answer read only by shape ([`Plan::incidental`]) can hold something to rewrite: a list
/// (`"tools"`, `"prompts"`, `"resources"` or `"resourceTemplates"` as a key), a `"cacheScope"`, or a
/// `\u` escape that could spell one of them. A call's own answer (a 1 KB tool result) has none of these
/// and is passed without being parsed; a list answer routed into it always has one.
pub fn may_hold_list_answer(text: &[u8]) -> bool {
    const KEYS: [&[u8]; 5] = [b"tools\"", b"prompts\"", b"resources\"", b"resourceTemplates\"", b"cacheScope\""];
    let mut rest = text;
    // memchr2 (SIMD in the Wasm build) rather than a byte loop: every call's answer is scanned here.
    while let Some(p) = memchr::memchr2(b'"', b'\\', rest) {
        let after = rest.get(p + 1..).unwrap_or(&[]);
        if rest.get(p) == Some(&b'\\') {
            if after.first() == Some(&b'u') {
                return true;
            }
            rest = after.get(1..).unwrap_or(&[]); // `\"`, `\\`: not a quote that opens a key
            continue;
        }
        if KEYS.iter().any(|k| after.starts_with(k)) {
            return true;
        }
        rest = after;
    }
    false
}

/// Whether an SSE block (an event's raw lines with its blank line) dispatches nothing to a client: every
/// line is blank, a comment (`:`) or a `retry` / `id` field. Anything else (`data`, `event`, unknown
/// fields, a byte order mark) is parsed and filtered.
fn holds_no_event(block: &[u8]) -> bool {
    block.split(|&b| b == b'\n' || b == b'\r').all(|line| {
        let field = line.split(|&b| b == b':').next().unwrap_or(line);
        line.is_empty() || line.first() == Some(&b':') || field == b"retry" || field == b"id"
    })
}

/// Filters an SSE answer as it streams: complete events are parsed, JSON-RPC answers in the plan are
/// filtered, every event is re-encoded; an incomplete tail is held back. Blocks holding no event (keep-alive
/// comments, `retry:`) pass as sent; comments and `retry:` inside an event's lines are dropped. Answers read
/// only by shape ([`Plan::incidental`]) pass byte for byte but for list answers.
pub struct SseFilter {
    parser: SseParser,
    /// Answers read only by shape ([`Plan::incidental`]): events as raw blocks, passed byte for byte
    /// unless one is a list answer to filter.
    blocks: SseBlockSplitter,
    max_event_bytes: usize,
    /// Filtered streams: the parser was handed the start of a block too large to hold, so the next block
    /// the splitter completes is its rest (parsed, never passed as a block of comments).
    continuing: bool,
    /// Filtered streams: the last block ended with `\r` (`Some(true)`: it was passed as sent).
    after_cr: Option<bool>,
    pub removed: usize,
    /// Events replaced by a -32603 error because they could not be read (fail closed).
    pub withheld: u64,
    /// `notifications/resources/updated` events withheld ([`Engine::hides_resource_update`]).
    pub updates_hidden: u64,
    /// MCP answers with `bind_event_ids`: every event id leaves tagged for this caller and session.
    pub event_ids: Option<Box<EventIdTagger>>,
    /// Legacy HTTP+SSE transport: the session ids the stream's `endpoint` events named (taken by the
    /// adapter, which binds them to the caller).
    pub legacy_sessions: Vec<String>,
    /// Answers to calls: the bytes passed so far end inside a line (the start of a block too large to
    /// hold went out), so the next ones do not begin a field line.
    mid_line: bool,
}

impl SseFilter {
    pub fn new(max_event_bytes: usize) -> Self {
        SseFilter {
            parser: SseParser::new(max_event_bytes),
            blocks: SseBlockSplitter::default(),
            max_event_bytes,
            continuing: false,
            after_cr: None,
            removed: 0,
            withheld: 0,
            updates_hidden: 0,
            event_ids: None,
            legacy_sessions: Vec::new(),
            mid_line: false,
        }
    }

    /// Tag the id lines of raw bytes passed as they came (see [`EventIdTagger::tag_id_lines`]).
    fn pass_raw(&mut self, raw: &[u8], complete: bool, out: &mut Vec<u8>) {
        let starts_mid_line = std::mem::take(&mut self.mid_line);
        match &self.event_ids {
            Some(t) => out.extend_from_slice(&t.tag_id_lines(raw, starts_mid_line, complete)),
            None => out.extend_from_slice(raw),
        }
        self.mid_line = !complete && raw.last().is_some_and(|b| *b != b'\n' && *b != b'\r');
    }

    /// Encode a (possibly rewritten) event, its id tagged.
    fn encode(&self, e: &mut SseEvent) -> String {
        if let (Some(t), Some(id)) = (&self.event_ids, &mut e.id) {
            *id = t.tag(id);
        }
        encode_event(e)
    }

    pub fn dropped_events(&self) -> u64 {
        self.parser.oversized_events()
    }

    pub fn feed(&mut self, engine: &Engine, identity: &Identity, plan: &Plan, chunk: &[u8], end: bool) -> Vec<u8> {
        if plan.incidental {
            return self.feed_incidental(engine, identity, plan, chunk, end);
        }
        // Blocks holding no event (only comments, `retry:`, `id:`) pass byte for byte: the GET stream is
        // idle most of the time, and the `: ping` comments a server sends on it (the MCP Python SDK every
        // 15 s) are what keeps proxies and clients from closing it for inactivity (before 2026-12-07 they
        // were dropped: no byte reached the client between two messages). Every other block is parsed.
        let mut out = Vec::new();
        for mut block in self.blocks.feed(chunk) {
            // The `\n` of a `\r\n` whose `\r` ended the previous block opens this one: it belongs to that
            // block (kept after a block passed as sent, gone with a re-encoded one).
            if let Some(raw) = self.after_cr.take() {
                if block.first() == Some(&b'\n') {
                    block.remove(0);
                    if raw {
                        out.push(b'\n');
                    }
                }
            }
            let raw = !std::mem::take(&mut self.continuing) && holds_no_event(&block);
            if block.last() == Some(&b'\r') {
                self.after_cr = Some(raw);
            }
            if raw {
                self.pass_raw(&block, true, &mut out);
            } else {
                let events = self.parser.feed(&block);
                self.filter_events(engine, identity, plan, events, &mut out);
            }
        }
        let mut events = Vec::new();
        if end {
            events.extend(self.parser.feed(&self.blocks.take_held()));
            events.extend(self.parser.finish());
        } else if self.blocks.held() > self.max_event_bytes {
            // Too large to hold as a block: the parser bounds (and drops) it, and reads its rest.
            events.extend(self.parser.feed(&self.blocks.take_held()));
            self.continuing = true;
            self.after_cr = None;
        }
        self.filter_events(engine, identity, plan, events, &mut out);
        out
    }

    /// Filter parsed events of a filtered stream and append them, re-encoded, to `out`.
    fn filter_events(
        &mut self,
        engine: &Engine,
        identity: &Identity,
        plan: &Plan,
        events: Vec<SseEvent>,
        out: &mut Vec<u8>,
    ) {
        for mut e in events {
            // The legacy HTTP+SSE transport's `endpoint` event names the URI to POST to: no JSON-RPC
            // message, nothing to filter. Read as an answer it was replaced by -32603 (before 2026-12-07),
            // and a legacy client never learnt where to send its messages.
            if e.event.as_deref() == Some(mcp::LEGACY_ENDPOINT_EVENT) {
                if let Ok(Some(session)) = mcp::legacy_session_id(e.data.trim()) {
                    self.legacy_sessions.push(session);
                }
                out.extend_from_slice(self.encode(&mut e).as_bytes());
                continue;
            }
            // An update about a resource this caller may not subscribe to is not its business: only its
            // `id:` goes out (resumption keeps working; an event without data dispatches nothing).
            if plan.by_shape && engine.hides_resource_update(identity, &e.data) {
                self.updates_hidden += 1;
                if let Some(id) = &e.id {
                    let id = self.event_ids.as_ref().map_or_else(|| id.clone(), |t| t.tag(id));
                    out.extend_from_slice(format!("id: {id}\n\n").as_bytes());
                }
                continue;
            }
            // Messages that are not for a filtered id (nor, by shape, a list answer) pass unchanged. An
            // event with data the filter cannot read (not JSON, or JSON serde_json refuses such as a lone
            // surrogate escape `"\udc80"` that Python's `json` accepts) may be the answer to filter:
            // replaced by a -32603 error, as a JSON answer would be. Empty data (a priming event that only
            // carries an `id:` for resumption) passes.
            match engine.filter_plan_text(identity, &plan.ids, plan.by_shape, &e.data) {
                Ok(Some((data, n))) => {
                    self.removed += n;
                    e.data = data;
                }
                Ok(None) => {}
                Err(Unreadable) if e.data.trim().is_empty() || plan.incidental => {}
                Err(Unreadable) => {
                    self.withheld += 1;
                    e.data = withheld_answer(plan.single_id().as_ref(), "the event is not readable JSON");
                }
            }
            out.extend_from_slice(self.encode(&mut e).as_bytes());
        }
    }

    /// The answer to a call, read only in case another request's list answer is routed into it
    /// ([`Plan::incidental`]): every event passes byte for byte (comments that keep an idle connection
    /// open, `retry:`, ids, line endings) unless it is a list answer, which is filtered and re-encoded.
    /// An event too large to hold, or one that cannot be read, passes as it is, as the whole answer did
    /// before such answers were read.
    fn feed_incidental(
        &mut self,
        engine: &Engine,
        identity: &Identity,
        plan: &Plan,
        chunk: &[u8],
        end: bool,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        for block in self.blocks.feed(chunk) {
            self.filter_block(engine, identity, plan, block, &mut out);
        }
        if end {
            let rest = self.blocks.take_held();
            if !rest.is_empty() {
                self.filter_block(engine, identity, plan, rest, &mut out);
            }
        } else if self.blocks.held() > self.max_event_bytes {
            let held = self.blocks.take_held();
            self.pass_raw(&held, false, &mut out);
        }
        out
    }

    fn filter_block(&mut self, engine: &Engine, identity: &Identity, plan: &Plan, block: Vec<u8>, out: &mut Vec<u8>) {
        if !may_hold_list_answer(&block) {
            self.pass_raw(&block, true, out);
            return;
        }
        let mut parser = SseParser::new(self.max_event_bytes.saturating_add(1));
        let mut events = parser.feed(&block);
        events.extend(parser.finish());
        let mut rewritten = String::new();
        let mut changed = false;
        for mut e in events {
            if let Ok(Some((data, n))) = engine.filter_plan_text(identity, &plan.ids, plan.by_shape, &e.data) {
                self.removed += n;
                e.data = data;
                changed = true;
            }
            rewritten.push_str(&self.encode(&mut e));
        }
        if changed {
            self.mid_line = false;
            out.extend_from_slice(rewritten.as_bytes());
        } else {
            self.pass_raw(&block, true, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwarden_shared::config::parse_config;

    fn engine(cfg: Value) -> Engine {
        Engine::new(parse_config(cfg.to_string().as_bytes()).unwrap()).unwrap()
    }

    /// The per-method stats keep 64 labels for methods beyond the known ones, as documented.
    #[test]
    fn method_stats_keep_64_extra_labels() {
        let mut labels = method_labels();
        for m in ["tools/call", "SendMessage", "message/send", "session/stream", "tasks/result"] {
            assert_eq!(labels.label(m), m.replace('/', "_"), "{m}");
        }
        for i in 0..EXTRA_METHOD_LABELS {
            assert_eq!(labels.label(&format!("acme/m{i}")), format!("acme_m{i}"), "extra label {i}");
        }
        assert_eq!(labels.label("acme/one-too-many"), "other");
        assert_eq!(labels.label("tools/list"), "tools_list");
    }

    /// Access-log values are caller-chosen text: no line break (nor quote) survives unescaped.
    #[test]
    fn access_log_values_are_escaped() {
        for plain in ["tools/call", "ledger_read", "file:///public/a b", "bob", "jörg", ""] {
            assert!(matches!(access_log_value(plain), Cow::Borrowed(_)), "{plain}");
        }
        assert_eq!(access_log_value("a\nb\r\tc"), r"a\nb\r\tc");
        assert_eq!(access_log_value("q\"x\\y"), r#"q\"x\\y"#);
        assert_eq!(
            access_log_value("\u{0}\u{1b}[31m\u{7f}\u{85}\u{2028}\u{2029}"),
            r"\u0000\u001b[31m\u007f\u0085\u2028\u2029"
        );
        let forged = access_log_value("x\n/mcp 200 subject=root decision=allow");
        assert!(!forged.contains(['\n', '\r']), "{forged}");
    }

    /// Allowed A2A requests report the tasks they name (checked against bindings by the adapter) and
    /// whether their answer creates or lists tasks; denied ones report nothing.
    #[test]
    fn a2a_outcomes_name_their_tasks() {
        let e = std_engine("hide");
        let rpc =
            |m: &str, p: Value| json!({"jsonrpc": "2.0", "id": 3, "method": m, "params": p}).to_string().into_bytes();
        let out = e.decide_body(&admin(), Protocol::A2a, &h(), &rpc("GetTask", json!({"id": "t1"})));
        assert!(out.forwarded());
        assert_eq!(out.tasks, vec![(Some(json!(3)), "t1".to_string())]);
        assert!(!out.creates_tasks && !out.lists_tasks);
        let msg = json!({"message": {"messageId": "m", "taskId": "t2", "contextId": "c2", "parts": []}});
        let out = e.decide_body(&admin(), Protocol::A2a, &h(), &rpc("message/send", msg.clone()));
        assert_eq!(out.tasks, vec![(Some(json!(3)), "t2".to_string())]);
        assert_eq!(out.contexts, vec![(Some(json!(3)), "c2".to_string())], "the context it continues");
        assert!(out.creates_tasks);
        assert!(e.decide_body(&admin(), Protocol::A2a, &h(), &rpc("ListTasks", json!({}))).lists_tasks);
        let denied = e.decide_body(&anon(), Protocol::A2a, &h(), &rpc("GetTask", json!({"id": "t1"})));
        assert!(!denied.forwarded() && denied.tasks.is_empty());
        // A plain MCP tool call names no task and creates none.
        let mcp = e.decide_body(&admin(), Protocol::Mcp, &h(), &call(json!(1), "search", json!({})));
        assert!(mcp.tasks.is_empty() && !mcp.creates_tasks);
        // MCP tasks: a call declaring the Tasks extension (or 2025-11-25 `params.task`) may create one; the
        // task methods and a listen's `taskIds` name them, under every key spelling a server reads.
        let ext = json!({"name": "search", "arguments": {},
            "_meta": {mcp::META_CLIENT_CAPABILITIES: {"extensions": {mcp::TASKS_EXTENSION: {}}}}});
        assert!(e.decide_body(&admin(), Protocol::Mcp, &h(), &rpc("tools/call", ext)).creates_tasks);
        let legacy = json!({"name": "search", "arguments": {}, "task": {"ttl": 1000}});
        assert!(e.decide_body(&admin(), Protocol::Mcp, &h(), &rpc("tools/call", legacy)).creates_tasks);
        for m in ["tasks/get", "tasks/result", "tasks/update", "tasks/cancel"] {
            let out = e.decide_body(&admin(), Protocol::Mcp, &h(), &rpc(m, json!({"taskId": "k1", "task_id": "k2"})));
            assert_eq!(out.tasks, vec![(Some(json!(3)), "k1".into()), (Some(json!(3)), "k2".into())], "{m}");
        }
        let listen = json!({"notifications": {"taskIds": ["k3"], "task_ids": ["k4"], "resourceSubscriptions": []}});
        let out = e.decide_body(&admin(), Protocol::Mcp, &h(), &rpc("subscriptions/listen", listen));
        assert_eq!(out.tasks, vec![(Some(json!(3)), "k3".into()), (Some(json!(3)), "k4".into())]);
        let r = mcp_task_not_found(Some(&json!(3)));
        assert_eq!((r.status, body(&r)["id"].clone(), body_code(&r)), (200, json!(3), jsonrpc::INVALID_PARAMS));
        // A binding refusal turns every decision into a deny by the binding rule, with its answer.
        let mut out = e.decide_body(&admin(), Protocol::A2a, &h(), &rpc("message/send", msg));
        out.refuse_for_binding(TASK_BINDING_RULE, task_not_found(out.single_id().as_ref()), "task_binding_denied");
        let r = out.reply.clone().unwrap();
        assert_eq!((r.status, body(&r)["id"].clone(), body_code(&r)), (200, json!(3), a2a::TASK_NOT_FOUND));
        assert!(out.audits.iter().all(|a| !a.allowed && a.rule == TASK_BINDING_RULE));
        assert!(!out.creates_tasks && out.tasks.is_empty() && out.events == ["task_binding_denied"]);
        let r = session_not_found(None);
        assert_eq!((r.status, body(&r)["error"]["message"].clone()), (404, json!("Session not found")));
    }

    /// The event id key comes from the VM's environment when configured: an unset or short variable
    /// refuses the configuration naming the field; a trailing newline (a secret file's) is dropped.
    #[test]
    fn event_id_key_comes_from_the_vm_environment() {
        use crate::event_id::EventIdKey;
        let cfg = |v: Value| parse_config::<Config>(v.to_string().as_bytes());
        let c = cfg(json!({"event_id_key_env": "MCP_EVENT_KEY"})).unwrap();
        let env = |value: Option<&str>| {
            let value = value.map(str::to_string);
            move |name: &str| (name == "MCP_EVENT_KEY").then(|| value.clone()).flatten()
        };
        let err = c.event_id_key(env(None)).unwrap_err().to_string();
        assert!(err.contains("$.event_id_key_env") && err.contains("MCP_EVENT_KEY"), "{err}");
        let err = c.event_id_key(env(Some("short\n"))).unwrap_err().to_string();
        assert!(err.contains("$.event_id_key_env") && err.contains("16 bytes"), "{err}");
        let key = c.event_id_key(env(Some("0123456789abcdef-secret\n"))).unwrap();
        assert_eq!(key, Some(EventIdKey::from_secret(b"0123456789abcdef-secret")));
        assert_eq!(cfg(json!({})).unwrap().event_id_key(env(Some("x"))).unwrap(), None, "not configured");
        for bad in ["", "A=B"] {
            let err = cfg(json!({ "event_id_key_env": bad })).unwrap_err().to_string();
            assert!(err.contains("$.event_id_key_env"), "{err}");
        }
        assert!(cfg(json!({"bind_event_ids": "yes"})).is_err());
        let reserved = json!({"policy": {"rules": [{"name": EVENT_ID_BINDING_RULE, "effect": "allow"}]}});
        assert!(cfg(reserved).unwrap_err().to_string().contains("event-id-binding"));
    }

    /// The binding settings are validated with their field named.
    #[test]
    fn binding_settings_are_validated() {
        for (field, value) in
            [("binding_ttl_secs", json!(0)), ("max_bindings", json!(0)), ("binding_ttl_secs", json!(99_999_999))]
        {
            let err = parse_config::<Config>(json!({ field: value }).to_string().as_bytes()).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        let err = parse_config::<Config>(br#"{"unknown_sessions": "maybe"}"#).unwrap_err().to_string();
        assert!(err.contains("unknown_sessions"), "{err}");
        let err = parse_config::<Config>(br#"{"policy": {"rules": [{"name": "task-binding", "effect": "allow"}]}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy.rules[0].name"), "{err}");
        let c: Config = parse_config(br#"{}"#).unwrap();
        assert!(c.bind_sessions && c.bind_tasks && c.unknown_sessions == crate::config::UnknownSessions::Allow);
        assert_eq!((c.binding_ttl_secs, c.max_bindings), (86_400, 100_000));
    }

    fn std_engine(answer: &str) -> Engine {
        engine(json!({"a2a_paths": ["/a2a"], "policy": {"deny_answer": answer, "rules": [
            {"name": "readers", "effect": "allow", "methods": ["tools/call", "prompts/get", "resources/read"], "targets": ["search", "get_*", "greet", "file:///public/*"]},
            {"name": "admins", "effect": "allow", "identity": [{"claim": "groups", "contains": "admin"}]},
            {"name": "a2a", "effect": "allow", "protocol": "a2a", "methods": ["SendMessage", "GetTask", "agent/skill"], "targets": [], "identity": [{"claim": "sub", "present": true}]},
            {"name": "limit", "effect": "deny", "answer": "forbid", "targets": ["search"], "arguments": [{"path": "limit", "min": 51}]}
        ]}}))
    }

    fn anon() -> Identity {
        Identity::default()
    }
    fn admin() -> Identity {
        Identity::from_claims(json!({"sub": "root", "groups": ["admin"]}).as_object().unwrap().clone())
    }
    fn h() -> RequestHeaders {
        RequestHeaders::default()
    }
    fn call(id: Value, tool: &str, args: Value) -> Vec<u8> {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}})
            .to_string()
            .into_bytes()
    }
    fn body(r: &Reply) -> Value {
        serde_json::from_str(&r.body).unwrap()
    }
    fn body_code(r: &Reply) -> i64 {
        let v = body(r);
        let e = if v.is_array() { &v[0]["error"] } else { &v["error"] };
        e["code"].as_i64().unwrap()
    }

    #[test]
    fn endpoints() {
        let e = std_engine("hide");
        assert_eq!(e.endpoint("/mcp?x=1"), Endpoint::Mcp);
        assert_eq!(e.endpoint("/mcp/tenant-a"), Endpoint::Mcp);
        assert_eq!(e.endpoint("/a2a"), Endpoint::A2a);
        assert_eq!(e.endpoint("/.well-known/agent-card.json"), Endpoint::Card);
        assert_eq!(e.endpoint("/v1/chat/completions"), Endpoint::Other);
        // Spellings a normalizing server routes to the same endpoint are the same endpoint.
        for p in [
            "/%6Dcp",
            "/%6dcp",
            "//mcp",
            "/x/../mcp",
            "/./mcp",
            "/MCP",
            "/Mcp/tenant-a",
            "\\mcp",
            "/%252Fmcp",
            "/m%63p?x=1",
        ] {
            assert_eq!(e.endpoint(p), Endpoint::Mcp, "{p}");
        }
        assert_eq!(e.endpoint("/%61%32a"), Endpoint::A2a);
        assert_eq!(e.endpoint("/.well-known/Agent-Card.json"), Endpoint::Card);
        for p in ["/mcpx", "/m", "/%zzmcp", "/v1/%63hat", "/x/../v1/chat", "/"] {
            assert_eq!(e.endpoint(p), Endpoint::Other, "{p}");
        }
        // `;` path parameters, ignored by Tomcat / Spring routing.
        for p in ["/mcp;x=1", "/mcp;jsessionid=abc?q=1", "/x/..;/mcp", "/MCP;a=b/tenant-a", "/mcp%3Bx"] {
            assert_eq!(e.endpoint(p), Endpoint::Mcp, "{p}");
        }
        assert_eq!(e.endpoint("/a2a;v=1"), Endpoint::A2a);
        assert_eq!(e.endpoint("/mcpx;y=1"), Endpoint::Other);
        assert_eq!(normalized_path("/a;x/b;y=1;z/c"), "/a/b/c");
        assert_eq!(normalized_path("/a//b/./c/../D%2Fe/"), "/a/b/d/e/");
        assert_eq!(normalized_path("/../.."), "/");
        assert_eq!(e.endpoint_with_headers("/v2/tools", true, false), Endpoint::Mcp);
        assert_eq!(e.endpoint_with_headers("/agent", false, true), Endpoint::A2a);
        assert_eq!(e.endpoint_with_headers("/mcp", false, true), Endpoint::Mcp);
        let off = engine(json!({"detect_by_headers": false}));
        assert_eq!(off.endpoint_with_headers("/v2/tools", true, true), Endpoint::Other);
    }

    /// The a2a-sdk client sends `A2A-Version` on every binding's requests: only what may be a JSON-RPC
    /// call is taken for one on a path found A2A by that header (HTTP+JSON binding GETs and bodies, gRPC
    /// were refused as bad JSON-RPC).
    #[test]
    fn a2a_header_detection_takes_only_json_rpc_calls() {
        let e = engine(json!({"a2a_paths": ["/a2a"]}));
        assert_eq!(e.endpoint_detected("/rest/tasks/t1", false, true), (Endpoint::A2a, true));
        assert_eq!(e.endpoint_detected("/a2a", false, true), (Endpoint::A2a, false));
        assert_eq!(e.endpoint_detected("/v2/tools", true, true), (Endpoint::Mcp, false));
        assert!(a2a_by_header_may_be_json_rpc("POST", "application/json"));
        assert!(!a2a_by_header_may_be_json_rpc("GET", ""));
        assert!(!a2a_by_header_may_be_json_rpc("POST", "application/grpc+proto"));
        for rest in [&b""[..], b" ", br#"{"message":{"messageId":"m","parts":[{"text":"hi"}]}}"#, b"{}"] {
            assert!(!a2a_by_header_body_is_json_rpc(rest), "{}", String::from_utf8_lossy(rest));
        }
        for rpc in [
            &br#"{"jsonrpc":"2.0","id":1,"method":"SendMessage"}"#[..],
            br#"{"method":"SendMessage","params":{}}"#,
            br#"{"Method":"SendMessage"}"#,
            br#"{"JSONRPC":"2.0"}"#,
            br#"[{"message":{}}]"#,
            b"not json",
            br#"{"message":{},"message":{}}"#,
        ] {
            assert!(a2a_by_header_body_is_json_rpc(rpc), "{}", String::from_utf8_lossy(rpc));
        }
    }

    #[test]
    fn allowed_and_hidden_and_forbidden() {
        let e = std_engine("hide");
        let ok = e.decide_body(&anon(), Protocol::Mcp, &h(), &call(json!(1), "search", json!({"q": "x"})));
        assert!(ok.reply.is_none());
        assert_eq!(ok.audits[0].rule, "readers");
        let hidden = e.decide_body(&anon(), Protocol::Mcp, &h(), &call(json!("a-7"), "delete_all", json!({})));
        let r = hidden.reply.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            body(&r),
            json!({"jsonrpc": "2.0", "id": "a-7", "error": {"code": -32602, "message": "Unknown tool: delete_all"}})
        );
        assert!(e.decide_body(&admin(), Protocol::Mcp, &h(), &call(json!(2), "delete_all", json!({}))).reply.is_none());
        let forbidden = e
            .decide_body(&admin(), Protocol::Mcp, &h(), &call(json!(3), "search", json!({"limit": 100})))
            .reply
            .unwrap();
        assert_eq!(forbidden.status, 403);
        assert!(forbidden.headers.contains(&("www-authenticate".into(), "Bearer error=\"insufficient_scope\"".into())));
        assert_eq!(body(&forbidden)["id"], 3);
        assert_eq!(body(&forbidden)["error"]["code"], FORBIDDEN_CODE);
        let e2 = std_engine("forbid");
        let r = e2.decide_body(&anon(), Protocol::Mcp, &h(), &call(json!(4), "delete_all", json!({}))).reply.unwrap();
        assert_eq!(r.status, 403);
        let r = e
            .decide_body(
                &anon(),
                Protocol::Mcp,
                &h(),
                br#"{"jsonrpc":"2.0","id":5,"method":"resources/read","params":{"uri":"file:///etc/x"}}"#,
            )
            .reply
            .unwrap();
        assert_eq!(body(&r)["error"]["code"], RESOURCE_NOT_FOUND);
    }

    #[test]
    fn ids_match_as_servers_echo_them() {
        for (sent, echoed) in [("1.0", "1"), ("1e2", "100"), ("-3.0", "-3"), ("7", "7"), ("\"a\"", "\"a\"")] {
            let (a, b): (Value, Value) = (serde_json::from_str(sent).unwrap(), serde_json::from_str(echoed).unwrap());
            assert_eq!(id_key(&a), id_key(&b), "{sent} vs {echoed}");
        }
        for (x, y) in [("\"1\"", "1"), ("1.5", "1"), ("2", "1")] {
            let (a, b): (Value, Value) = (serde_json::from_str(x).unwrap(), serde_json::from_str(y).unwrap());
            assert_ne!(id_key(&a), id_key(&b), "{x} vs {y}");
        }
        // A tools/list sent with id 1.0 and answered with id 1 is still filtered.
        let e = std_engine("hide");
        let plan =
            e.decide_body(&anon(), Protocol::Mcp, &h(), br#"{"jsonrpc":"2.0","id":1.0,"method":"tools/list"}"#).filters;
        let answer = br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_file"}]}}"#;
        let (out, removed) =
            e.filter_answer_text(&anon(), &plan, std::str::from_utf8(answer).unwrap()).unwrap().unwrap();
        assert_eq!(removed, 1, "{out}");
    }

    /// Ids beyond 2^53 come back as the double a JavaScript server (or Pydantic, for `1e19`) reads them
    /// as: the agent card answer to `GetExtendedAgentCard` is still filtered (A2A answers are not read by
    /// shape), and two requests a server reads as one id are refused in a batch.
    #[test]
    fn large_ids_match_as_servers_echo_them() {
        let e = engine(json!({"a2a_paths": ["/a2a"], "policy": {"rules": [
            {"name": "callers", "effect": "allow", "protocol": "a2a", "methods": ["GetExtendedAgentCard"],
             "identity": [{"claim": "sub", "present": true}]},
            {"name": "common-skills", "effect": "allow", "protocol": "a2a", "methods": ["agent/skill"],
             "targets": ["sql"], "identity": [{"claim": "sub", "present": true}]}
        ]}}));
        let bob = Identity::from_claims(json!({"sub": "bob"}).as_object().unwrap().clone());
        for (sent, echoed) in [
            ("9007199254740993", "9007199254740992"),
            ("1e19", "10000000000000000000"),
            ("18446744073709551615", "18446744073709552000"),
            ("-9007199254740995", "-9007199254740996"),
        ] {
            let req = format!(r#"{{"jsonrpc":"2.0","id":{sent},"method":"GetExtendedAgentCard"}}"#);
            let out = e.decide_body(&bob, Protocol::A2a, &h(), req.as_bytes());
            assert!(out.reply.is_none(), "{sent}");
            let answer = format!(
                r#"{{"jsonrpc":"2.0","id":{echoed},"result":{{"name":"agent","skills":[{{"id":"sql"}},{{"id":"payments"}}]}}}}"#
            );
            let filtered = e.filter_json_plan(&bob, &out.filters, false, answer.as_bytes()).unwrap();
            let (body, removed) = filtered.unwrap_or_else(|| panic!("{sent} answered as {echoed}: card not filtered"));
            assert_eq!(removed, 1, "{sent}");
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["result"]["skills"], json!([{"id": "sql"}]), "{sent}");
        }
        // A tools/list and a prompts/list whose ids a JavaScript server reads as one: refused, nothing
        // forwarded (else the tools answer, echoed with the prompts request's id, passed as a prompts one).
        let batch = br#"[{"jsonrpc":"2.0","id":9007199254740993,"method":"tools/list"},{"jsonrpc":"2.0","id":9007199254740992,"method":"prompts/list"}]"#;
        let out = e.decide_body(&bob, Protocol::Mcp, &h(), batch);
        assert_eq!(out.reply.map(|r| r.status), Some(400));
        assert!(out.filters.is_empty());
        // Ids a server keeps apart stay apart.
        for (x, y) in [("9007199254740992", "9007199254740994"), ("1e19", "1.0000000000000002e19")] {
            let (a, b): (Value, Value) = (serde_json::from_str(x).unwrap(), serde_json::from_str(y).unwrap());
            assert_ne!(id_key(&a), id_key(&b), "{x} vs {y}");
        }
    }

    /// A trailing slash: Express (non-strict routing, its default: the A2A JS SDK, most TypeScript MCP
    /// servers) routes `/a2a/` to its `/a2a` handler and `/.well-known/agent-card.json/` to the card.
    #[test]
    fn trailing_slash_spellings_are_the_endpoint() {
        let e = engine(json!({"mcp_paths": ["/v1/mcp"], "a2a_paths": ["/a2a"]}));
        for (p, want) in [
            ("/a2a/", Endpoint::A2a),
            ("/a2a/?x=1", Endpoint::A2a),
            ("/A2A/", Endpoint::A2a),
            ("/v1/mcp/", Endpoint::Mcp),
            ("/.well-known/agent-card.json/", Endpoint::Card),
            ("/.well-known/agent.json/", Endpoint::Card),
            ("/", Endpoint::Other),
            ("/a2ax/", Endpoint::Other),
            ("/v1/", Endpoint::Other),
        ] {
            assert_eq!(e.endpoint(p), want, "{p}");
        }
        // A glob that needs the slash still matches it.
        let g = engine(json!({"mcp_paths": ["/api/*"]}));
        assert_eq!(g.endpoint("/API/"), Endpoint::Mcp);
    }

    /// A path that is one endpoint as sent and another once normalized is refused: a normalizing server
    /// (Tomcat, Spring, Vert.x, or any behind Envoy without `normalize_path`) serves the card for
    /// `/mcp/../.well-known/agent-card.json`, which as an MCP GET (`session/stream`) passed unfiltered.
    #[test]
    fn paths_naming_two_endpoints_are_refused() {
        let e = engine(json!({"a2a_paths": ["/a2a", "/agents/*"]}));
        for p in [
            "/mcp/../.well-known/agent-card.json",
            "/mcp/..;/.well-known/agent-card.json",
            "/mcp/%2e%2e/.well-known/agent.json?x=1",
            "/mcp/../a2a",
            "/mcp/x/../../agents/y",
            "/agents/../mcp",
        ] {
            assert_eq!(e.endpoint(p), Endpoint::Ambiguous, "{p}");
        }
        // One endpoint either way, or an endpoint as sent and none normalized (other paths pass).
        for (p, want) in [
            ("/mcp/a/../b", Endpoint::Mcp),
            ("/mcp/..", Endpoint::Mcp),
            ("/mcp/../v1/chat", Endpoint::Mcp),
            ("/MCP/x", Endpoint::Mcp),
            ("/x/../a2a", Endpoint::A2a),
            ("/v1/../../x", Endpoint::Other),
        ] {
            assert_eq!(e.endpoint(p), want, "{p}");
        }
        // With other paths denied, such a path is another path (403), and MCP / A2A headers do not turn
        // another path into an authorized one (a GET with `Mcp-Session-Id` passed as `session/stream`).
        let deny = engine(json!({"other_paths": "deny"}));
        assert_eq!(deny.endpoint("/mcp/../admin"), Endpoint::Other);
        assert_eq!(deny.endpoint_with_headers("/admin", true, false), Endpoint::Other);
        assert_eq!(deny.endpoint_with_headers("/admin", false, true), Endpoint::Other);
        assert_eq!(deny.endpoint_with_headers("/mcp", true, false), Endpoint::Mcp);
        assert_eq!(deny.endpoint_with_headers("/mcp/..", false, false), Endpoint::Other);
        let session = deny.decide_session(&anon(), "GET");
        assert!(session.reply.is_none(), "what such a GET got as MCP: the built-in session/stream");
    }

    /// Keys that are one key to a case-insensitive parser (Go's `encoding/json`: mark3labs/mcp-go, the
    /// go-sdk before its CVE-2026-27896 fix) are refused like duplicate keys: the filter read one
    /// spelling, a Go server the last (or the only, misspelled, one).
    #[test]
    fn case_variant_keys_are_refused() {
        let e = engine(json!({"policy": {"rules": [
            {"name": "no-delete", "effect": "deny", "targets": ["delete_*"]},
            {"name": "cap", "effect": "deny", "targets": ["transfer"], "arguments": [{"path": "amount", "min": 1000}]},
            {"name": "calls", "effect": "allow", "methods": ["tools/call"]}
        ]}}));
        for body in [
            // ping for the filter, tools/call for Go
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call","params":{"name":"delete_all"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","Name":"delete_all"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","naMe":"delete_all"}}"#,
            // no name for the filter (no target: the deny rule on delete_* does not apply)
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"Name":"delete_all"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","Params":{"name":"delete_all"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","param\u017f":{"name":"delete_all"}}"#,
            // a notification for the filter (its answer not filtered), a request for Go
            r#"{"jsonrpc":"2.0","ID":7,"method":"tools/list"}"#,
            r#"{"jsonrpc":"2.0","\u0131d":7,"method":"tools/list"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5,"Amount":5000}}}"#,
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping","METHOD":"tools/call"}]"#,
        ] {
            let o = e.decide_body(&anon(), Protocol::Mcp, &h(), body.as_bytes());
            let r = o.reply.unwrap_or_else(|| panic!("forwarded: {body}"));
            assert_eq!((r.status, body_code(&r)), (400, -32600), "{body}");
            assert_eq!(o.events, vec!["duplicate_json_key"], "{body}");
            assert!(o.filters.is_empty());
        }
        // Only `Amount` (Go reads it as `amount`): the argument deny rule applies (fail closed).
        let o = e.decide_body(
            &anon(),
            Protocol::Mcp,
            &h(),
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"Amount":5000}}}"#,
        );
        assert_eq!(o.audits[0].rule, "cap");
        assert!(o.reply.is_some());
        // A2A: `Tenant` is the target Go reads.
        let a2a = br#"{"jsonrpc":"2.0","id":1,"method":"SendMessage","params":{"Tenant":"acme","message":{}}}"#;
        assert_eq!(e.decide_body(&anon(), Protocol::A2a, &h(), a2a).reply.map(|r| r.status), Some(400));
        // Large objects take the linear path.
        let mut args = serde_json::Map::new();
        for i in 0..40 {
            args.insert(format!("k{i}"), json!(i));
        }
        args.insert("K7".into(), json!(0));
        let big =
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search", "arguments": args}});
        assert_eq!(
            e.decide_body(&anon(), Protocol::Mcp, &h(), big.to_string().as_bytes()).reply.map(|r| r.status),
            Some(400)
        );
        // What clients send still passes: case variants elsewhere, in one spelling each.
        for ok in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{"Name":"x","rows":[{"ID":1,"id2":2}]}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"p"},"argument":{"name":"a","value":"b"}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5}}}"#,
        ] {
            let o = e.decide_body(&anon(), Protocol::Mcp, &h(), ok.as_bytes());
            assert!(o.events.is_empty(), "{ok}: {:?}", o.events);
        }
        // Go's folding (`unicode.ToUpper(unicode.ToLower(r))`).
        for (a, b) in [("paramſ", "params"), ("\u{212a}ey", "key"), ("İd", "id"), ("ıd", "ID"), ("METHOD", "method")]
        {
            assert!(fold_eq(a, b), "{a} {b}");
            assert_eq!(crate::policy::fold_key(a), crate::policy::fold_key(b), "{a} {b}");
        }
        for (a, b) in [("ß", "ss"), ("name", "names"), ("argument", "arguments"), ("i", "j")] {
            assert!(!fold_eq(a, b), "{a} {b}");
        }
    }

    #[test]
    fn bad_input() {
        let e = std_engine("hide");
        for (input, code, event) in [
            (&b"not json"[..], -32700, "invalid_json"),
            (b"", -32700, "invalid_json"),
            (b"\xff\xfe", -32700, "invalid_json"),
            (b"[]", -32600, "invalid_request"),
            (b"\"x\"", -32600, "invalid_request"),
            (br#"{"jsonrpc":"1.0","id":9,"method":"tools/call"}"#, -32600, "invalid_request"),
            // Allowed by the last copy, run by a first-wins server as the first: refused.
            (
                br#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"drop_db","name":"search"}}"#,
                -32600,
                "duplicate_json_key",
            ),
        ] {
            let o = e.decide_body(&admin(), Protocol::Mcp, &h(), input);
            let r = o.reply.unwrap();
            assert_eq!((r.status, body(&r)["error"]["code"].as_i64().unwrap()), (400, code), "{input:?}");
            assert_eq!(o.events, vec![event]);
        }
    }

    #[test]
    fn headers_are_checked() {
        let e = std_engine("hide");
        let hd = RequestHeaders {
            method: Some("tools/call".into()),
            name: Some("get_weather".into()),
            protocol_version: Some("2026-07-28".into()),
        };
        let o = e.decide_body(&anon(), Protocol::Mcp, &hd, &call(json!(1), "search", json!({})));
        let r = o.reply.unwrap();
        assert_eq!((r.status, body(&r)["error"]["code"].as_i64()), (400, Some(-32020)));
        assert_eq!(body(&r)["id"], 1);
        let hd = RequestHeaders {
            method: Some("tools/call".into()),
            name: Some("search".into()),
            protocol_version: Some("2026-07-28".into()),
        };
        assert!(e.decide_body(&anon(), Protocol::Mcp, &hd, &call(json!(1), "search", json!({}))).reply.is_none());
    }

    #[test]
    fn notifications_responses_and_batches() {
        let e = std_engine("hide");
        let n =
            e.decide_body(&anon(), Protocol::Mcp, &h(), br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert!(n.reply.is_none());
        assert_eq!(n.audits[0].rule, "builtin");
        let r = e.decide_body(&anon(), Protocol::Mcp, &h(), br#"{"jsonrpc":"2.0","id":"s1","result":{"roots":[]}}"#);
        assert!(r.reply.is_none() && r.audits.is_empty());
        let ok = format!(
            "[{},{},{}]",
            String::from_utf8(call(json!(1), "search", json!({}))).unwrap(),
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#
        );
        let o = e.decide_body(&anon(), Protocol::Mcp, &h(), ok.as_bytes());
        assert!(o.reply.is_none());
        assert_eq!(o.filters.get("2"), Some(&FilterKind::List(ListKind::Tools)));
        let mixed = format!(
            "[{},{}]",
            String::from_utf8(call(json!(1), "search", json!({}))).unwrap(),
            String::from_utf8(call(json!(2), "drop_db", json!({}))).unwrap()
        );
        let r = e.decide_body(&anon(), Protocol::Mcp, &h(), mixed.as_bytes()).reply.unwrap();
        assert_eq!(r.status, 200);
        let b = body(&r);
        assert_eq!(b[0]["id"], 1);
        assert_eq!(b[0]["error"]["code"], FORBIDDEN_CODE);
        assert_eq!(b[1]["error"]["message"], "Unknown tool: drop_db");
        let v = RequestHeaders { protocol_version: Some("2025-06-18".into()), ..h() };
        assert_eq!(e.decide_body(&anon(), Protocol::Mcp, &v, ok.as_bytes()).reply.unwrap().status, 400);
        let denied_note = engine(json!({"policy": {"builtin_allow": []}}));
        let r = denied_note
            .decide_body(&anon(), Protocol::Mcp, &h(), br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .reply
            .unwrap();
        assert_eq!((r.status, r.body.as_str()), (202, ""));
    }

    /// JSON text without the whitespace between tokens.
    fn minify(json: &str) -> String {
        let (mut out, mut in_string, mut escaped) = (String::new(), false, false);
        for c in json.chars() {
            if in_string {
                out.push(c);
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_string = false,
                    _ => {}
                }
            } else if !c.is_ascii_whitespace() {
                in_string = c == '"';
                out.push(c);
            }
        }
        out
    }

    fn same_json(a: &str, b: &str) -> bool {
        match (serde_json::from_str::<serde_json::Value>(a), serde_json::from_str::<serde_json::Value>(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => minify(a) == minify(b),
        }
    }

    /// The one-pass list filter (plan of one list) must answer exactly as the general path (forced by a
    /// second plan entry that matches nothing), on ordinary and hostile answers.
    #[test]
    fn one_pass_list_filter_agrees_with_general_path() {
        let e = std_engine("hide");
        let mut one = HashMap::new();
        one.insert("7".to_string(), FilterKind::List(ListKind::Tools));
        let mut general = one.clone();
        general.insert("\"unused\"".to_string(), FilterKind::List(ListKind::Prompts));
        let answers = [
            r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"search"},{"name":"delete_all"},{"name":"get_weather"}]}}"#,
            r#" { "jsonrpc" : "2.0" , "id" : 7 , "result" : { "tools" : [ { "name" : "search" , "x" : [1, 2.50, {"a": null}] } , { "name" : "rm" } ] , "nextCursor" : "c" } } "#,
            // id after result, duplicate keys (last wins), escaped keys and names
            r#"{"result":{"tools":[{"name":"rm"}]},"jsonrpc":"2.0","result":{"tools":[{"na\u006de":"search"},{"name":"d\u0065lete"}]},"id":7}"#,
            r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"rm"}],"tools":[{"name":"search"},{"name":"x"}]}}"#,
            // a repeated name field, a non-string name, a null name, a non-object item
            r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"search","name":"rm"},{"name":"rm","name":"search"},{"name":5},{"name":null},"search",[1],{"name":"get_x"}]}}"#,
            // nothing removed; wrong id; no result; result not an object; list not an array; error answer
            r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"search"}]}}"#,
            r#"{"jsonrpc":"2.0","id":8,"result":{"tools":[{"name":"rm"}]}}"#,
            r#"{"jsonrpc":"2.0","id":"7","result":{"tools":[{"name":"rm"}]}}"#,
            r#"{"jsonrpc":"2.0","id":7}"#,
            r#"{"jsonrpc":"2.0","id":7,"result":[{"name":"rm"}]}"#,
            r#"{"jsonrpc":"2.0","id":7,"result":{"tools":{"name":"rm"}}}"#,
            r#"{"jsonrpc":"2.0","id":7,"error":{"code":-1,"message":"x"}}"#,
            r#""just a string""#,
            r#"666e616"#,
            r#"{"id":55555E709551615,"result":{"tools":[{"name":"rm"}]}}"#,
            r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[1e999,{"name":"search","n":1e999}]}}"#,
            r#"{"jsonrpc":"2.0","id":7,"result":{"tools":1e999}}"#,
            r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"rm"}]}} trailing"#,
            r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"rm"}"#,
            r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"r\m\u00"}]}}"#,
            r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"\ud83d\ude00 \"q\"","k\"ey":1},{"name":"search","de\"sc":"a\nb"}]}}"#,
        ];
        for a in answers {
            let fast = e.filter_answer_text(&anon(), &one, a);
            let slow = e.filter_answer_text(&anon(), &general, a);
            match (fast, slow) {
                (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
                (Ok(Some((f, nf))), Ok(Some((s, ns)))) => {
                    assert_eq!(nf, ns, "removed count for {a}");
                    // Same JSON value (or, with numbers serde cannot hold, the same text up to whitespace).
                    assert!(same_json(&f, &s), "rewritten answer for {a}: {f} vs {s}");
                }
                (f, s) => panic!("one-pass {f:?} vs general {s:?} for {a}"),
            }
        }
    }

    #[test]
    fn list_filtering_json_and_sse_split_anywhere() {
        let e = std_engine("hide");
        let mut plan = HashMap::new();
        plan.insert("7".to_string(), FilterKind::List(ListKind::Tools));
        let answer = json!({"jsonrpc": "2.0", "id": 7, "result": {"tools": [{"name": "search"}, {"name": "delete_all"}, {"name": "get_weather"}, {"title": "nameless"}]}});
        let (out, removed) = e.filter_json_answer(&anon(), &plan, answer.to_string().as_bytes()).unwrap().unwrap();
        assert_eq!(removed, 2);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["result"]["tools"], json!([{"name": "search"}, {"name": "get_weather"}]));
        assert_eq!(
            e.filter_json_answer(&admin(), &plan, answer.to_string().as_bytes()).unwrap().map(|x| x.1),
            Some(1),
            "nameless item is dropped"
        );
        assert!(e.filter_json_answer(&anon(), &plan, b"<html>").is_err());
        let other = json!({"jsonrpc": "2.0", "id": 8, "result": {"tools": [{"name": "x"}]}});
        assert_eq!(
            e.filter_json_answer(&anon(), &plan, other.to_string().as_bytes()).unwrap(),
            None,
            "other ids untouched"
        );

        let stream = format!(
            "event: message\r\ndata: {}\r\n\r\n: ping\n\nevent: message\ndata: {}\n\n",
            json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"p":1}}),
            answer
        );
        let bytes = stream.as_bytes();
        let mut whole = SseFilter::new(1 << 20);
        let sse_plan = Plan::by_id(plan.clone());
        let expect = whole.feed(&e, &anon(), &sse_plan, bytes, true);
        assert_eq!(whole.removed, 2);
        let text = String::from_utf8(expect.clone()).unwrap();
        assert!(
            text.contains("notifications/progress") && !text.contains("delete_all") && text.contains("get_weather"),
            "{text}"
        );
        for cut in 0..bytes.len() {
            let mut f = SseFilter::new(1 << 20);
            let mut got = f.feed(&e, &anon(), &sse_plan, &bytes[..cut], false);
            got.extend(f.feed(&e, &anon(), &sse_plan, &bytes[cut..], true));
            assert_eq!(got, expect, "cut at {cut}");
        }
    }

    /// GET streams (and unplanned ids of POST answers) are read by shape: a replayed `tools/list` answer
    /// is filtered like the POST's, whatever its id; an unreadable one is replaced by -32603 for its id.
    #[test]
    fn list_answers_are_filtered_by_shape_when_not_planned() {
        let e = std_engine("hide");
        let none = HashMap::new();
        let shaped = |text: &str| e.filter_plan_text(&anon(), &none, true, text);
        let tools = r#"{"jsonrpc":"2.0","id":"old-1","result":{"tools":[{"name":"search"},{"name":"delete_all"}]}}"#;
        assert_eq!(e.filter_answer_text(&anon(), &none, tools).unwrap(), None, "by id only: nothing planned");
        let (out, n) = shaped(tools).unwrap().unwrap();
        assert_eq!(n, 1);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!((v["id"].clone(), v["result"]["tools"].clone()), (json!("old-1"), json!([{"name": "search"}])));
        for (answer, key, kept) in [
            (
                r#"{"jsonrpc":"2.0","id":2,"result":{"prompts":[{"name":"greet"},{"name":"secret"}]}}"#,
                "prompts",
                json!([{"name": "greet"}]),
            ),
            (
                r#"{"jsonrpc":"2.0","id":3,"result":{"resources":[{"uri":"file:///public/a"},{"uri":"file:///etc/shadow"}]}}"#,
                "resources",
                json!([{"uri": "file:///public/a"}]),
            ),
            (
                r#"{"jsonrpc":"2.0","id":4,"result":{"resourceTemplates":[{"uriTemplate":"db://{t}"},{"uriTemplate":"file:///public/{n}"}]}}"#,
                "resourceTemplates",
                json!([{"uriTemplate": "file:///public/{n}"}]),
            ),
        ] {
            let (out, n) = shaped(answer).unwrap().unwrap();
            assert_eq!(n, 1, "{answer}");
            assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["result"][key], kept, "{answer}");
        }
        // Two list members in one result: both filtered.
        let both = r#"{"jsonrpc":"2.0","id":5,"result":{"tools":[{"name":"rm"}],"prompts":[{"name":"secret"},{"name":"greet"}]}}"#;
        let (out, n) = shaped(both).unwrap().unwrap();
        assert_eq!(n, 2);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (v["result"]["tools"].clone(), v["result"]["prompts"].clone()),
            (json!([]), json!([{"name": "greet"}]))
        );
        // Not list answers: untouched.
        for other in [
            r#"{"jsonrpc":"2.0","id":6,"result":{"content":[{"type":"text","text":"hi"}]}}"#,
            r#"{"jsonrpc":"2.0","id":6,"result":{"capabilities":{"tools":{}}}}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#,
            r#"{"jsonrpc":"2.0","id":6,"error":{"code":-1,"message":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":6,"result":[1]}"#,
        ] {
            assert_eq!(shaped(other).unwrap(), None, "{other}");
        }
        // Shapes that cannot be read: withheld, -32603 for that id.
        for bad in [
            r#"{"jsonrpc":"2.0","id":8,"result":{"tools":{"name":"delete_all"}}}"#,
            r#"{"jsonrpc":"2.0","id":8,"result":{"tools":[{"name":"delete_all"}],"\udc80":1}}"#,
        ] {
            let (out, n) = shaped(bad).unwrap().unwrap();
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!((n, v["id"].clone(), v["error"]["code"].clone()), (0, json!(8), json!(-32603)), "{bad}");
            assert!(v.get("result").is_none());
        }
        // A batch answer: the replaced element only.
        let batch = format!(
            r#"[{tools},{{"jsonrpc":"2.0","id":9,"result":{{"tools":7}}}},{{"jsonrpc":"2.0","id":10,"result":{{}}}}]"#
        );
        let (out, n) = shaped(&batch).unwrap().unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(n, 1);
        assert_eq!(v[0]["result"]["tools"], json!([{"name": "search"}]));
        assert_eq!(v[1]["error"]["code"], -32603);
        assert_eq!(v[2], json!({"jsonrpc": "2.0", "id": 10, "result": {}}));
        // A POST answer: the planned id as planned, another id by shape (one-pass path and general path).
        let mut plan = HashMap::new();
        plan.insert("1".to_string(), FilterKind::List(ListKind::Prompts));
        let (_, n) = e.filter_plan_text(&anon(), &plan, true, tools).unwrap().unwrap();
        assert_eq!(n, 1, "an earlier request's tools/list answer in this POST's stream");
        assert_eq!(e.filter_plan_text(&anon(), &plan, false, tools).unwrap(), None);
        // SSE on a GET stream: a replayed answer filtered, the priming event (id only) and notifications kept.
        let stream = format!(
            "id: ev-0\ndata: \n\nid: ev-1\nevent: message\ndata: {tools}\n\ndata: {}\n\n",
            r#"{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"x"}}"#
        );
        let get = Plan { ids: HashMap::new(), by_shape: true, incidental: false };
        let mut f = SseFilter::new(1 << 20);
        let out = String::from_utf8(f.feed(&e, &anon(), &get, stream.as_bytes(), true)).unwrap();
        assert_eq!(f.removed, 1);
        assert!(out.contains("id: ev-0\n") && out.contains("id: ev-1\n"), "{out}");
        assert!(
            !out.contains("delete_all") && out.contains("search") && out.contains("notifications/message"),
            "{out}"
        );
    }

    /// Servers route answers by request id across a session's POSTs: a `prompts/list` with id 1 sent
    /// while a `tools/list` with id 1 is in flight may receive the `tools/list` answer (MCP Python SDK
    /// `_request_streams[str(id)]`). Read only as the planned `prompts` list, it passed whole.
    #[test]
    fn another_kind_of_list_under_a_planned_id_is_filtered() {
        let e = std_engine("hide");
        let tools = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_all"}]}}"#;
        for planned in [ListKind::Prompts, ListKind::Resources, ListKind::ResourceTemplates, ListKind::Tools] {
            let mut plan = HashMap::new();
            plan.insert("1".to_string(), FilterKind::List(planned));
            let (out, n) = e.filter_plan_text(&anon(), &plan, true, tools).unwrap().unwrap();
            assert_eq!(n, 1, "{planned:?}");
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["result"]["tools"], json!([{"name": "search"}]), "{planned:?}");
            // In a batch answer and in an SSE event alike.
            let (out, n) = e.filter_plan_text(&anon(), &plan, true, &format!("[{tools}]")).unwrap().unwrap();
            assert!(n == 1 && !out.contains("delete_all"), "{planned:?}: {out}");
            let p = Plan { ids: plan.clone(), by_shape: true, incidental: false };
            let mut f = SseFilter::new(1 << 20);
            let sse =
                String::from_utf8(f.feed(&e, &anon(), &p, format!("data: {tools}\n\n").as_bytes(), true)).unwrap();
            assert!(f.removed == 1 && !sse.contains("delete_all") && sse.contains("search"), "{planned:?}: {sse}");
        }
        // The planned list and another one in one result: both filtered.
        let mut plan = HashMap::new();
        plan.insert("1".to_string(), FilterKind::List(ListKind::Prompts));
        let both = r#"{"jsonrpc":"2.0","id":1,"result":{"prompts":[{"name":"greet"},{"name":"secret"}],"tools":[{"name":"rm"}]}}"#;
        let (out, n) = e.filter_plan_text(&anon(), &plan, true, both).unwrap().unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (n, v["result"]["prompts"].clone(), v["result"]["tools"].clone()),
            (2, json!([{"name": "greet"}]), json!([]))
        );
    }

    /// The legacy HTTP+SSE transport's `endpoint` event (a URI, not JSON) passes on a filtered stream;
    /// an unnamed or `message` event that is not JSON is still withheld.
    #[test]
    fn legacy_endpoint_events_pass_filtered_streams() {
        let e = std_engine("hide");
        let plan = Plan { ids: HashMap::new(), by_shape: true, incidental: false };
        let mut f = SseFilter::new(1 << 20);
        let stream = "event: endpoint\r\ndata: /messages/?session_id=abc\r\n\r\nevent: message\r\ndata: /x\r\n\r\n";
        let out = String::from_utf8(f.feed(&e, &anon(), &plan, stream.as_bytes(), false)).unwrap();
        let events = SseParser::new(1 << 20).feed(out.as_bytes());
        assert_eq!(events.len(), 2, "{out}");
        assert_eq!(
            (events[0].event.as_deref(), events[0].data.as_str()),
            (Some("endpoint"), "/messages/?session_id=abc")
        );
        assert!(events[1].data.contains("-32603"), "{out}");
        assert_eq!(f.withheld, 1);
    }

    /// An SSE event whose JSON cannot be read (a lone surrogate escape in a key: serde_json refuses it,
    /// Python's `json` reads it) is withheld as a JSON answer would be, not passed unfiltered.
    #[test]
    fn unreadable_sse_events_fail_closed() {
        let e = std_engine("hide");
        let mut ids = HashMap::new();
        ids.insert("7".to_string(), FilterKind::List(ListKind::Tools));
        let bad = r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"search"},{"name":"delete_all"}]},"\udc80":1}"#;
        assert!(e.filter_answer_text(&anon(), &ids, bad).is_err());
        for plan in [Plan::by_id(ids.clone()), Plan { ids: ids.clone(), by_shape: true, incidental: false }] {
            let stream = format!("event: message\ndata: {bad}\n\ndata: not json\n\n");
            let mut f = SseFilter::new(1 << 20);
            let out = String::from_utf8(f.feed(&e, &anon(), &plan, stream.as_bytes(), true)).unwrap();
            assert_eq!(f.withheld, 2, "{out}");
            assert!(!out.contains("delete_all"), "{out}");
            let first: Value =
                serde_json::from_str(out.lines().nth(1).unwrap().strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!((first["id"].clone(), first["error"]["code"].clone()), (json!(7), json!(-32603)));
        }
        // With no single planned id (a GET stream) the error's id is null.
        let mut f = SseFilter::new(1 << 20);
        let get = Plan { ids: HashMap::new(), by_shape: true, incidental: false };
        let out = String::from_utf8(f.feed(&e, &anon(), &get, format!("data: {bad}\n\n").as_bytes(), true)).unwrap();
        assert!(out.contains(r#""id":null"#) && out.contains("-32603") && !out.contains("delete_all"), "{out}");
    }

    /// The answer of a POST that asked for no list (a `ping`) may carry another POST's `tools/list`
    /// answer: servers route answers by request id. Such answers are read by shape; what cannot be read
    /// passes, as it did when they were not read.
    #[test]
    fn incidental_answers_are_read_by_shape_and_pass_what_is_unreadable() {
        let e = std_engine("hide");
        let plan = Plan { ids: HashMap::new(), by_shape: true, incidental: true };
        let list = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_all"}]}}"#;
        let ping = r#"{"jsonrpc":"2.0","id":1,"result":{}}"#;
        let stream = format!("event: message\ndata: {list}\n\ndata: [DONE]\n\ndata: {ping}\n\n");
        let mut f = SseFilter::new(1 << 20);
        let out = String::from_utf8(f.feed(&e, &anon(), &plan, stream.as_bytes(), true)).unwrap();
        assert_eq!((f.removed, f.withheld), (1, 0), "{out}");
        assert!(!out.contains("delete_all") && out.contains("search"), "{out}");
        assert!(out.contains("data: [DONE]\n") && out.contains(ping), "{out}");
        let (body, n) = e.filter_json_plan(&anon(), &plan.ids, plan.by_shape, list.as_bytes()).unwrap().unwrap();
        assert_eq!(n, 1);
        assert!(!String::from_utf8(body).unwrap().contains("delete_all"));
        assert_eq!(e.filter_json_plan(&anon(), &plan.ids, plan.by_shape, ping.as_bytes()).unwrap(), None);
    }

    #[test]
    fn only_answers_that_may_hold_a_list_are_parsed() {
        for yes in [
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}"#,
            r#"{"result":{"nextCursor":null,"resourceTemplates":[]}}"#,
            r#"{"result":{"contents":[],"cacheScope":"public"}}"#,
            r#"{"result":{"tool\u0073":[]}}"#,
            r#"data: {"result":{"prompts" : []}}"#,
        ] {
            assert!(may_hold_list_answer(yes.as_bytes()), "{yes}");
        }
        for no in [
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"42 tools"}]}}"#,
            r#"{"result":{"content":[{"type":"text","text":"say \"tools\" twice \\"}]}}"#,
            "",
            "\\",
        ] {
            assert!(!may_hold_list_answer(no.as_bytes()), "{no}");
        }
    }

    /// The GET stream (and a list answer's stream) is filtered event by event, and blocks that hold no
    /// event pass byte for byte, cut anywhere: the `: ping` comments that keep an idle GET stream open
    /// (the MCP Python SDK's sse-starlette sends one every 15 s), `retry:`, an `id:` alone. Before, they
    /// were dropped, and an idle GET stream carried no byte at all.
    #[test]
    fn filtered_streams_keep_keep_alive_comments() {
        let e = std_engine("hide");
        let plan = Plan { ids: HashMap::new(), by_shape: true, incidental: false };
        let list = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_all"}]}}"#;
        let ping = ": ping - 2026-12-07 00:40:00.000000+00:00\r\n\r\n";
        let stream = format!("{ping}id: e1\r\nevent: message\r\ndata: {list}\r\n\r\n{ping}retry: 500\n\n");
        for cut in 0..=stream.len() {
            let mut f = SseFilter::new(1 << 20);
            let mut out = f.feed(&e, &anon(), &plan, &stream.as_bytes()[..cut], false);
            out.extend(f.feed(&e, &anon(), &plan, &stream.as_bytes()[cut..], true));
            let out = String::from_utf8(out).unwrap();
            assert!(out.starts_with(ping), "cut {cut}: {out:?}");
            assert!(out.ends_with(&format!("{ping}retry: 500\n\n")), "cut {cut}: {out:?}");
            assert!(out.contains("id: e1\n") && out.contains("search") && !out.contains("delete_all"), "{out:?}");
            assert_eq!(f.removed, 1);
        }
        // A block that only looks empty to a careless reader is parsed: a data line without a colon, an
        // event name, a byte order mark before `data`.
        for block in ["data\n\n", "event: x\n\n", "\u{feff}data: {}\n\n", "Data: {}\n\n"] {
            assert!(!holds_no_event(block.as_bytes()), "{block:?}");
        }
        for block in [": x\n\n", "retry: 1\r\n\r\n", "id: 7\n\n", "\n", "\n: ping\n\n"] {
            assert!(holds_no_event(block.as_bytes()), "{block:?}");
        }
        // A list answer larger than max_response_bytes is still dropped, never passed.
        let big = format!(
            "data: {{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{{\"tools\":[{{\"name\":\"{}\"}}]}}}}\n\n: ping\n\n",
            "x".repeat(300)
        );
        let mut f = SseFilter::new(100);
        let mut out = Vec::new();
        for piece in big.as_bytes().chunks(64) {
            out.extend(f.feed(&e, &anon(), &plan, piece, false));
        }
        out.extend(f.feed(&e, &anon(), &plan, b"", true));
        assert_eq!(String::from_utf8(out).unwrap(), ": ping\n\n");
        assert_eq!(f.dropped_events(), 1);
    }

    /// A call's answer read only by shape passes byte for byte, cut anywhere: the keep-alive comments
    /// that hold an idle connection open during a long tool call, the `retry:` a 2025-11-25 server sets
    /// before closing a polled stream, CRLF line endings; only a list answer routed into it is rewritten.
    /// An event too large to hold passes as it is.
    #[test]
    fn incidental_answers_keep_every_byte_but_the_list_answers() {
        let e = std_engine("hide");
        let plan = Plan { ids: HashMap::new(), by_shape: true, incidental: true };
        let progress = r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}"#;
        let list = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_all"}]}}"#;
        let head = format!(": keep-alive\r\n\r\nid: e1\r\nretry: 3000\r\ndata: {progress}\r\n\r\n: ping\n\n");
        let stream = format!("{head}id: e2\ndata: {list}\n\nretry: 100\n\n");
        for cut in 0..=stream.len() {
            let mut f = SseFilter::new(1 << 20);
            let mut out = f.feed(&e, &anon(), &plan, &stream.as_bytes()[..cut], false);
            out.extend(f.feed(&e, &anon(), &plan, &stream.as_bytes()[cut..], true));
            let out = String::from_utf8(out).unwrap();
            assert!(out.starts_with(&head), "cut {cut}: {out:?}");
            assert!(out.ends_with("retry: 100\n\n"), "cut {cut}: {out:?}");
            assert!(out.contains("id: e2\n") && out.contains("search") && !out.contains("delete_all"), "{out:?}");
            assert_eq!(f.removed, 1);
        }
        // Larger than max_response_bytes: passed on as it comes, not dropped.
        let big = format!("data: {{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{{\"text\":\"{}\"}}}}\n\n", "x".repeat(300));
        let mut f = SseFilter::new(100);
        let mut out = Vec::new();
        for piece in big.as_bytes().chunks(64) {
            out.extend(f.feed(&e, &anon(), &plan, piece, false));
        }
        out.extend(f.feed(&e, &anon(), &plan, b"", true));
        assert_eq!(String::from_utf8(out).unwrap(), big);
    }

    /// With `bind_event_ids` every event id of an MCP answer leaves tagged for the caller and session,
    /// cut anywhere, in answers to calls (every other byte kept) and on filtered streams (GET: priming
    /// events, replayed answers, withheld resource updates); an event too large to hold keeps its tag.
    #[test]
    fn event_ids_leave_tagged_in_every_kind_of_answer() {
        use crate::event_id::{EventIdKey, EventIdTagger};
        let e = std_engine("hide");
        let tagger = EventIdTagger::new(EventIdKey::from_secret(b"0123456789abcdef"), [3; 16], "sess-1");
        let t = |id: &str| tagger.tag(id);
        let progress = r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}"#;
        let list = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_all"}]}}"#;
        let stream = format!(": keep-alive\r\n\r\nid: e1\r\nretry: 3000\r\ndata: {progress}\r\n\r\nid:e2\ndata: {list}\n\nid: e3\rdata: x\r\r");
        let call = Plan { ids: HashMap::new(), by_shape: true, incidental: true };
        // The stream through a tagging filter, cut in two at `cut`.
        let fed = |plan: &Plan, stream: &str, cut: usize| {
            let mut f = SseFilter::new(1 << 20);
            f.event_ids = Some(Box::new(tagger.clone()));
            let mut out = f.feed(&e, &anon(), plan, &stream.as_bytes()[..cut], false);
            out.extend(f.feed(&e, &anon(), plan, &stream.as_bytes()[cut..], true));
            String::from_utf8(out).unwrap()
        };
        for cut in 0..=stream.len() {
            let out = fed(&call, &stream, cut);
            // (The `\n` of the last `\r\n` goes with the next block when a cut falls between them.)
            let head = format!(": keep-alive\r\n\r\nid: {}\r\nretry: 3000\r\ndata: {progress}\r\n\r", t("e1"));
            assert!(out.starts_with(&head), "cut {cut}: {out:?}");
            assert!(out.contains(&format!("id: {}\n", t("e2"))) && !out.contains("delete_all"), "cut {cut}: {out:?}");
            assert!(out.ends_with(&format!("id: {}\rdata: x\r\r", t("e3"))), "cut {cut}: {out:?}");
            for raw in ["id: e1\r", "id:e2\n", "id: e2\n", "id: e3\r"] {
                assert!(!out.contains(raw), "{raw:?} left untagged, cut {cut}: {out:?}");
            }
        }
        // GET stream: priming event, replayed list answer, hidden resource update, keep-alive.
        let update =
            r#"{"jsonrpc":"2.0","method":"notifications/resources/updated","params":{"uri":"file:///private/keys"}}"#;
        let get_stream =
            format!("id: p0\ndata: \n\n: ping\n\nid: r1\nevent: message\ndata: {list}\n\nid: u2\ndata: {update}\n\n");
        let get = Plan { ids: HashMap::new(), by_shape: true, incidental: false };
        for cut in 0..=get_stream.len() {
            let out = fed(&get, &get_stream, cut);
            for id in ["p0", "r1", "u2"] {
                assert!(out.contains(&format!("id: {}\n", t(id))), "{id} untagged, cut {cut}: {out:?}");
            }
            assert!(
                out.contains(": ping\n\n") && !out.contains("delete_all") && !out.contains("private/keys"),
                "{out:?}"
            );
        }
        // Larger than max_response_bytes: passed as it comes, its leading id tagged; text that continues
        // a line passed earlier is no field line, even when it reads `id: `.
        let big = format!("id: big-1\ndata: {}id: no{}\n\nid: after\n\n", "x".repeat(150), "y".repeat(10));
        let cut = big.find("id: no").unwrap();
        let mut f = SseFilter::new(100);
        f.event_ids = Some(Box::new(tagger.clone()));
        let mut out = f.feed(&e, &anon(), &call, &big.as_bytes()[..cut], false);
        out.extend(f.feed(&e, &anon(), &call, &big.as_bytes()[cut..], false));
        out.extend(f.feed(&e, &anon(), &call, b"", true));
        let out = String::from_utf8(out).unwrap();
        let expected = big
            .replace("id: big-1\n", &format!("id: {}\n", t("big-1")))
            .replace("id: after", &format!("id: {}", t("after")));
        assert_eq!(out, expected);
    }

    /// 2026-07-28 cache hints: every answer the filter reads leaves with `cacheScope: "private"` (a
    /// `"public"` one let a shared cache serve one caller's filtered list, or allowed resource, to others).
    #[test]
    fn cache_scopes_are_made_private() {
        let e = std_engine("hide");
        let mut ids = HashMap::new();
        ids.insert("1".to_string(), FilterKind::List(ListKind::Tools));
        // Nothing removed for an admin: still one caller's view.
        let list = r#"{"jsonrpc":"2.0","id":1,"result":{"cacheScope":"public","ttlMs":5,"tools":[{"name":"search"}]}}"#;
        let (out, n) = e.filter_plan_text(&admin(), &ids, true, list).unwrap().unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (n, v["result"]["cacheScope"].clone(), v["result"]["ttlMs"].clone()),
            (0, json!("private"), json!(5))
        );
        let list =
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"drop"}],"cacheScope":"public"}}"#;
        let (out, n) = e.filter_plan_text(&anon(), &ids, true, list).unwrap().unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (n, v["result"]["cacheScope"].clone(), v["result"]["tools"].clone()),
            (1, json!("private"), json!([{"name":"search"}]))
        );
        // A resources/read answer (read by shape only) and a batch answer.
        let read = r#"{"jsonrpc":"2.0","id":2,"result":{"contents":[],"cacheScope":"public"}}"#;
        let (out, _) = e.filter_plan_text(&anon(), &HashMap::new(), true, read).unwrap().unwrap();
        assert!(out.contains(r#""cacheScope":"private""#) && !out.contains("public"), "{out}");
        let batch = format!("[{read},{}]", r#"{"jsonrpc":"2.0","id":3,"result":{}}"#);
        let (out, _) = e.filter_plan_text(&anon(), &HashMap::new(), true, &batch).unwrap().unwrap();
        assert!(out.contains(r#""cacheScope":"private""#) && out.contains(r#""id":3"#), "{out}");
        let private = r#"{"jsonrpc":"2.0","id":2,"result":{"contents":[],"cacheScope":"private"}}"#;
        assert_eq!(e.filter_plan_text(&anon(), &HashMap::new(), true, private).unwrap(), None);
    }

    #[test]
    fn batches_with_colliding_ids_are_refused() {
        let e = std_engine("hide");
        for batch in [
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":1,"method":"prompts/list"}]"#,
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":1.0,"method":"prompts/list"}]"#,
            r#"[{"jsonrpc":"2.0","id":"a","method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":"a","method":"tools/list"}]"#,
        ] {
            let o = e.decide_body(&admin(), Protocol::Mcp, &h(), batch.as_bytes());
            let r = o.reply.unwrap_or_else(|| panic!("forwarded: {batch}"));
            assert_eq!(r.status, 400, "{batch}");
            assert!(o.filters.is_empty());
            assert_eq!(o.events, vec!["invalid_request"]);
            let b = body(&r);
            let codes: Vec<i64> = b.as_array().unwrap().iter().map(|m| m["error"]["code"].as_i64().unwrap()).collect();
            assert!(codes.contains(&-32600), "{b}");
            assert!(b.to_string().contains("id already used by another request in the batch"), "{b}");
        }
        // Distinct ids (a string "1" is not the number 1), and a client response sharing a request's id: fine.
        let ok = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":"1","method":"prompts/list"},{"jsonrpc":"2.0","id":1,"result":{}}]"#;
        let o = e.decide_body(&admin(), Protocol::Mcp, &h(), ok.as_bytes());
        assert!(o.reply.is_none());
        assert_eq!(o.filters.len(), 2);
    }

    #[test]
    fn resource_uris_with_dot_segments_are_refused() {
        let e = std_engine("hide");
        let read = |method: &str, params: Value| {
            let b = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
            e.decide_body(&admin(), Protocol::Mcp, &h(), b.as_bytes())
        };
        assert!(read("resources/read", json!({"uri": "file:///public/readme"})).reply.is_none());
        for uri in [
            "file:///public/../private/keys",
            "file:///public/%2e%2e/private/keys",
            "file:///public/%2E%2E/private/keys",
            "file:///public/%252e%252e/private/keys",
            "file:///public/./readme",
        ] {
            // Even an admin (allowed everything by rule) is refused: the URI cannot be authorized as sent.
            for method in ["resources/read", "resources/subscribe"] {
                let o = read(method, json!({"uri": uri}));
                let r = o.reply.unwrap_or_else(|| panic!("{method} {uri} forwarded"));
                assert_eq!((r.status, body(&r)["error"]["code"].clone()), (200, json!(-32002)), "{uri}");
                assert_eq!(body(&r)["error"]["message"], format!("Resource not found: {uri}"));
                assert_eq!(o.audits[0].rule, DOT_SEGMENTS_RULE);
            }
            let o = read(
                "completion/complete",
                json!({"ref": {"type": "ref/resource", "uri": uri}, "argument": {"name": "a", "value": "b"}}),
            );
            assert_eq!(o.reply.unwrap().status, 200, "{uri}");
            assert_eq!(o.audits[0].rule, DOT_SEGMENTS_RULE);
        }
        let forbid = std_engine("forbid");
        let b =
            json!({"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": "file:///public/../x"}});
        let r = forbid.decide_body(&anon(), Protocol::Mcp, &h(), b.to_string().as_bytes()).reply.unwrap();
        assert_eq!((r.status, body(&r)["error"]["code"].clone()), (403, json!(FORBIDDEN_CODE)));
        // A listed resource with dot segments is hidden too (reading it would be refused).
        let mut plan = HashMap::new();
        plan.insert("3".to_string(), FilterKind::List(ListKind::Resources));
        let list = r#"{"jsonrpc":"2.0","id":3,"result":{"resources":[{"uri":"file:///public/a"},{"uri":"file:///public/../private/keys"}]}}"#;
        let (out, n) = e.filter_answer_text(&anon(), &plan, list).unwrap().unwrap();
        assert_eq!(n, 1, "{out}");
        // The reserved rule name cannot be configured.
        let cfg = json!({"policy": {"rules": [{"name": DOT_SEGMENTS_RULE, "effect": "allow"}]}});
        let refused = parse_config::<Config>(cfg.to_string().as_bytes()).map(|_| ()).map_err(|e| e.to_string());
        assert!(refused.as_ref().is_err_and(|e| e.contains("uri-dot-segments")), "{refused:?}");
    }

    /// The a2a-sdk reads params with protobuf's `ParseDict`: `context_id` is `contextId` to it, and of
    /// both the last one wins. Argument rules on one spelling must bind the other.
    #[test]
    fn a2a_arguments_under_their_other_protobuf_spelling() {
        let e = engine(json!({"a2a_paths": ["/a2a"], "policy": {"rules": [
            {"name": "project-a", "effect": "allow", "protocol": "a2a", "methods": ["SendMessage"],
             "arguments": [{"path": "message.contextId", "equals": "project-a"}]},
            {"name": "short-history", "effect": "deny", "protocol": "a2a",
             "arguments": [{"path": "configuration.historyLength", "min": 11}]}
        ]}}));
        let send = |params: Value| {
            let b = json!({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": params}).to_string();
            e.decide_body(&anon(), Protocol::A2a, &h(), b.as_bytes())
        };
        let o = send(json!({"message": {"contextId": "project-a"}}));
        assert!(o.reply.is_none(), "{:?}", o.reply);
        // Both spellings in one object: refused whole, as a key given twice is.
        let o = send(json!({"message": {"contextId": "project-a", "context_id": "project-secret"}}));
        assert_eq!(o.reply.map(|r| r.status), Some(400));
        // Only the other spelling: an allow rule does not read it as its value, a deny rule denies.
        let o = send(json!({"message": {"context_id": "project-secret"}}));
        assert_eq!(o.audits[0].rule, "default");
        let o = send(json!({"message": {"contextId": "project-a"}, "configuration": {"history_length": 500}}));
        assert_eq!(o.audits[0].rule, "short-history");
        // MCP tool arguments are read as spelled (no protobuf names): two such keys are two arguments.
        let b = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                       "params": {"name": "x", "arguments": {"user_id": 1, "userId": 2}}});
        let o = e.decide_body(&anon(), Protocol::Mcp, &h(), b.to_string().as_bytes());
        assert_ne!(o.reply.map(|r| r.status), Some(400));
    }

    /// A deny rule on resource URIs binds every spelling a URL parser (the TypeScript SDK's `new URL`)
    /// reads as a denied URI.
    #[test]
    fn resource_uris_are_decided_as_url_parsers_read_them_too() {
        let e = engine(json!({"policy": {"default": "allow", "rules": [
            {"name": "no-private", "effect": "deny", "methods": ["resources/*", "completion/complete", "subscriptions/listen"],
             "targets": ["file:///private/*"]}
        ]}}));
        let decide = |method: &str, params: Value| {
            let b = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
            e.decide_body(&anon(), Protocol::Mcp, &h(), b.as_bytes())
        };
        assert!(decide("resources/read", json!({"uri": "file:///public/x"})).reply.is_none());
        assert!(decide("resources/read", json!({"uri": "FILE:///public/x"})).reply.is_none());
        for uri in [
            "file:///private/keys",
            "FILE:///private/keys",
            "file://localhost/private/keys",
            " file:///private/keys",
            "file:///pri\tvate/keys",
            "file:/private/keys",
            "file:\\\\\\private\\keys",
        ] {
            for method in ["resources/read", "resources/subscribe", "resources/unsubscribe"] {
                let o = decide(method, json!({"uri": uri}));
                assert!(o.reply.is_some(), "{method} {uri:?} forwarded");
                assert_eq!(o.audits[0].rule, "no-private", "{method} {uri:?}");
            }
            let o = decide("completion/complete", json!({"ref": {"type": "ref/resource", "uri": uri}}));
            assert_eq!(o.audits[0].rule, "no-private", "completion {uri:?}");
            let o = decide("subscriptions/listen", json!({"notifications": {"resourceSubscriptions": [uri]}}));
            assert_eq!(o.audits[0].rule, "no-private", "listen {uri:?}");
        }
    }

    /// A listed resource (or template) is shown only when its read would be allowed: decided in both the
    /// spelling the server lists and the one a URL parser reads, as the read is. A `FILE:///private/keys`
    /// listed under a `file:///private/*` deny rule was shown though its read is refused.
    #[test]
    fn listed_resource_uris_are_decided_as_url_parsers_read_them_too() {
        let e = engine(json!({"policy": {"default": "allow", "rules": [
            {"name": "no-private", "effect": "deny", "methods": ["resources/*"], "targets": ["file:///private/*"]}
        ]}}));
        let mut plan = HashMap::new();
        plan.insert("1".to_string(), FilterKind::List(ListKind::Resources));
        plan.insert("2".to_string(), FilterKind::List(ListKind::ResourceTemplates));
        let hidden =
            ["FILE:///private/keys", "file://localhost/private/keys", " file:///private/keys", "file:/private/keys"];
        let mut resources = vec![json!({"uri": "file:///public/a"}), json!({"uri": "FILE:///public/b"})];
        resources.extend(hidden.iter().map(|u| json!({"uri": u})));
        let list = json!({"jsonrpc": "2.0", "id": 1, "result": {"resources": resources}}).to_string();
        let (out, n) = e.filter_answer_text(&anon(), &plan, &list).unwrap().unwrap();
        assert_eq!(n, hidden.len(), "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["result"]["resources"], json!([{"uri": "file:///public/a"}, {"uri": "FILE:///public/b"}]));
        let templates = json!({"jsonrpc": "2.0", "id": 2, "result": {"resourceTemplates": [
            {"uriTemplate": "FILE:///private/{name}"}, {"uriTemplate": "file://localhost/private/{name}"},
            {"uriTemplate": "FILE:///public/{name}"}
        ]}});
        let (out, n) = e.filter_answer_text(&anon(), &plan, &templates.to_string()).unwrap().unwrap();
        assert_eq!(n, 2, "{out}");
        // Their reads are refused.
        for uri in hidden {
            let body = json!({"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": uri}});
            assert!(e.decide_body(&anon(), Protocol::Mcp, &h(), body.to_string().as_bytes()).reply.is_some(), "{uri}");
        }
    }

    /// 2026-07-28 `subscriptions/listen` replaced `resources/subscribe`: a rule allowing the method must
    /// not open updates about every resource. Each URI in `notifications.resourceSubscriptions` (any
    /// spelling a server reads) is authorized as its `resources/subscribe` would be.
    #[test]
    fn listen_subscriptions_are_authorized_per_resource() {
        let e = engine(json!({"policy": {"rules": [
            {"name": "listen", "effect": "allow", "methods": ["subscriptions/listen"]},
            {"name": "public", "effect": "allow", "methods": ["resources/subscribe"], "targets": ["file:///public/*"]}
        ]}}));
        let listen = |notifications: Value| {
            let b = json!({"jsonrpc": "2.0", "id": 7, "method": "subscriptions/listen",
                           "params": {"notifications": notifications}});
            e.decide_body(&anon(), Protocol::Mcp, &h(), b.to_string().as_bytes())
        };
        for ok in [
            json!({"toolsListChanged": true}),
            json!({"resourceSubscriptions": ["file:///public/a", "file:///public/b"]}),
            json!({"resource_subscriptions": ["file:///public/a"], "resourceSubscriptions": null}),
            json!({"resourceSubscriptions": []}),
        ] {
            let o = listen(ok.clone());
            assert!(o.reply.is_none(), "{ok}: {:?}", o.reply);
            assert_eq!(o.audits[0].rule, "listen");
        }
        for (bad, rule, target) in [
            (
                json!({"resourceSubscriptions": ["file:///public/a", "file:///private/keys"]}),
                "default",
                Some("file:///private/keys"),
            ),
            (json!({"resource_subscriptions": ["file:///private/keys"]}), "default", Some("file:///private/keys")),
            (json!({"ResourceSubscriptions": ["file:///private/keys"]}), "default", Some("file:///private/keys")),
            (
                json!({"resourceSubscriptions": ["file:///public/../private/keys"]}),
                DOT_SEGMENTS_RULE,
                Some("file:///public/../private/keys"),
            ),
            (json!({"resourceSubscriptions": "file:///public/a"}), "default", None),
            (json!({"resourceSubscriptions": [{"uri": "file:///public/a"}]}), "default", None),
        ] {
            let o = listen(bad.clone());
            let r = o.reply.unwrap_or_else(|| panic!("{bad}: forwarded"));
            assert_eq!((r.status, body(&r)["error"]["code"].clone()), (200, json!(-32601)), "{bad}");
            assert_eq!((o.audits[0].rule.as_str(), o.audits[0].target.as_deref()), (rule, target), "{bad}");
        }
        // `notifications` spelled otherwise is read by case-insensitive (Go) servers: refused as ambiguous.
        let b = json!({"jsonrpc": "2.0", "id": 8, "method": "subscriptions/listen",
                       "params": {"Notifications": {"resourceSubscriptions": ["file:///private/keys"]}}});
        let o = e.decide_body(&anon(), Protocol::Mcp, &h(), b.to_string().as_bytes());
        assert_eq!(o.reply.map(|r| r.status), Some(400));
    }

    #[test]
    fn prompts_resources_templates_and_cards() {
        let e = std_engine("hide");
        let mut plan = HashMap::new();
        plan.insert("\"p\"".to_string(), FilterKind::List(ListKind::Prompts));
        plan.insert("\"r\"".to_string(), FilterKind::List(ListKind::Resources));
        plan.insert("\"t\"".to_string(), FilterKind::List(ListKind::ResourceTemplates));
        plan.insert("\"c\"".to_string(), FilterKind::Card);
        let batch = json!([
            {"jsonrpc": "2.0", "id": "p", "result": {"prompts": [{"name": "greet"}, {"name": "secret"}]}},
            {"jsonrpc": "2.0", "id": "r", "result": {"resources": [{"uri": "file:///public/a"}, {"uri": "file:///etc/shadow"}]}},
            {"jsonrpc": "2.0", "id": "t", "result": {"resourceTemplates": [{"uriTemplate": "file:///public/{name}"}, {"uriTemplate": "db://{table}"}]}},
            {"jsonrpc": "2.0", "id": "c", "result": {"name": "x", "skills": [{"id": "s1"}]}}
        ]);
        let (out, removed) = e.filter_json_answer(&anon(), &plan, batch.to_string().as_bytes()).unwrap().unwrap();
        assert_eq!(removed, 4);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v[0]["result"]["prompts"], json!([{"name": "greet"}]));
        assert_eq!(v[1]["result"]["resources"], json!([{"uri": "file:///public/a"}]));
        assert_eq!(v[2]["result"]["resourceTemplates"], json!([{"uriTemplate": "file:///public/{name}"}]));
        assert_eq!(v[3]["result"]["skills"], json!([]));
        let card = json!({"name": "agent", "skills": [{"id": "sql"}, {"id": "web"}]});
        let bob = Identity::from_claims(json!({"sub": "bob"}).as_object().unwrap().clone());
        assert_eq!(e.filter_card_document(&bob, card.to_string().as_bytes()).unwrap(), None, "bob may use every skill");
        assert_eq!(e.filter_card_document(&anon(), card.to_string().as_bytes()).unwrap().map(|x| x.1), Some(2));
    }

    /// The documented A2A policy ("nobody may manage push notifications") must also refuse a webhook
    /// registered inline: the a2a-sdk stores `configuration.taskPushNotificationConfig` (v1.0) /
    /// `configuration.pushNotificationConfig` (v0.3) of a `SendMessage` as the task's push config.
    #[test]
    fn documented_a2a_policy_refuses_push_configs_sent_inline() {
        let doc = include_str!("../../../docs/mcp-authz.md");
        let start = doc.find("**A2A agents**").unwrap();
        let block = &doc[start..];
        let json_start = block.find("```json\n").unwrap() + 8;
        let json_end = block[json_start..].find("```").unwrap() + json_start;
        let e = Engine::new(parse_config(&block.as_bytes()[json_start..json_end]).unwrap()).unwrap();
        let bob = Identity::from_claims(json!({"sub": "bob"}).as_object().unwrap().clone());
        let send = |method: &str, configuration: Value| {
            let params = json!({"message": {"role": "ROLE_USER", "messageId": "m1", "parts": [{"text": "hi"}]},
                                "configuration": configuration});
            json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string().into_bytes()
        };
        let decide = |body: Vec<u8>| e.decide_body(&bob, Protocol::A2a, &h(), &body);
        for method in ["SendMessage", "message/send", "SendStreamingMessage", "message/stream"] {
            let out = decide(send(method, json!({"historyLength": 2})));
            assert!(out.reply.is_none(), "{method}: a plain message is allowed: {:?}", out.audits);
            for configuration in [
                json!({"taskPushNotificationConfig": {"url": "https://attacker.example/hook"}}),
                json!({"task_push_notification_config": {"url": "https://attacker.example/hook"}}),
                json!({"pushNotificationConfig": {"url": "https://attacker.example/hook"}}),
            ] {
                let out = decide(send(method, configuration.clone()));
                assert!(out.reply.is_some(), "{method} {configuration}: an inline webhook passed: {:?}", out.audits);
            }
        }
        let set = json!({"jsonrpc": "2.0", "id": 2, "method": "CreateTaskPushNotificationConfig",
                         "params": {"taskId": "t1", "url": "https://attacker.example/hook"}});
        assert!(decide(set.to_string().into_bytes()).reply.is_some());
    }

    /// The documented read-only policy lets an agent subscribe to public resources: it must let it
    /// unsubscribe from them too (`resources/unsubscribe` is not built-in allowed), else the client's
    /// unsubscribe fails with -32002 and the server keeps sending updates for the session.
    #[test]
    fn documented_read_only_policy_lets_subscribers_unsubscribe() {
        let doc = include_str!("../../../docs/mcp-authz.md");
        let start = doc.find("**Read-only agents**").unwrap();
        let block = &doc[start..];
        let json_start = block.find("```json\n").unwrap() + 8;
        let json_end = block[json_start..].find("```").unwrap() + json_start;
        let e = Engine::new(parse_config(&block.as_bytes()[json_start..json_end]).unwrap()).unwrap();
        let agent = Identity::from_claims(json!({"sub": "a", "scope": "tools:read"}).as_object().unwrap().clone());
        let decide = |method: &str, uri: &str| {
            let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": {"uri": uri}});
            e.decide_body(&agent, Protocol::Mcp, &h(), body.to_string().as_bytes())
        };
        for method in ["resources/read", "resources/subscribe", "resources/unsubscribe"] {
            let out = decide(method, "file:///public/readme");
            assert!(out.reply.is_none(), "{method}: {:?}", out.audits);
            assert!(decide(method, "file:///private/keys").reply.is_some(), "{method}");
        }
    }

    /// `notifications/resources/updated` on a filtered stream (the GET stream) about a resource the
    /// caller may not `resources/subscribe` to is withheld (its `id:` kept for resumption): a server that
    /// announces updates to every session told a caller about resources it may not see.
    #[test]
    fn resource_updates_the_caller_may_not_subscribe_to_are_withheld() {
        let e = engine(json!({"policy": {"rules": [
            {"name": "public", "effect": "allow", "methods": ["resources/read", "resources/subscribe"], "targets": ["file:///public/*"]},
            {"name": "hr", "effect": "deny", "methods": ["resources/subscribe"], "targets": ["file:///public/hr/*"]}
        ]}}));
        let update = |uri: &str| {
            json!({"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": uri}}).to_string()
        };
        let stream = format!(
            "id: 1\nevent: message\ndata: {}\n\nid: 2\nevent: message\ndata: {}\n\n\
             data: {}\n\nid: 4\ndata: {}\n\ndata: {}\n\n: ping\n\n",
            update("file:///public/readme"),
            update("file:///private/keys"),
            update("FILE:///public/hr/salaries"),
            update("file:///public/../private/keys"),
            r#"{"jsonrpc":"2.0","method":"notifications/resources/updated","params":{}}"#,
        );
        let get = Plan { ids: HashMap::new(), by_shape: true, incidental: false };
        let mut f = SseFilter::new(1 << 20);
        let out = String::from_utf8(f.feed(&e, &anon(), &get, stream.as_bytes(), true)).unwrap();
        assert!(out.contains("file:///public/readme"), "{out}");
        for hidden in ["private/keys", "salaries", r#""params":{}"#] {
            assert!(!out.contains(hidden), "{hidden}: {out}");
        }
        assert!(out.contains("id: 2\n\n") && out.contains("id: 4\n\n") && out.ends_with(": ping\n\n"), "{out}");
        assert_eq!(f.updates_hidden, 4);
        // A caller allowed every subscription sees every update.
        let open = engine(json!({"policy": {"default": "allow"}}));
        let mut f = SseFilter::new(1 << 20);
        let one = format!("data: {}\n\n", update("file:///private/keys"));
        let out = String::from_utf8(f.feed(&open, &anon(), &get, one.as_bytes(), true)).unwrap();
        assert!(out.contains("file:///private/keys") && f.updates_hidden == 0, "{out}");
    }

    #[test]
    fn a2a_methods_and_sessions() {
        let e = std_engine("forbid");
        let bob = Identity::from_claims(json!({"sub": "bob"}).as_object().unwrap().clone());
        let send03 =
            br#"{"jsonrpc":"2.0","id":1,"method":"message/send","params":{"message":{"role":"user","parts":[]}}}"#;
        let send10 =
            br#"{"jsonrpc":"2.0","id":1,"method":"SendMessage","params":{"message":{"role":"ROLE_USER","parts":[]}}}"#;
        assert!(e.decide_body(&bob, Protocol::A2a, &h(), send03).reply.is_none());
        assert!(e.decide_body(&bob, Protocol::A2a, &h(), send10).reply.is_none());
        assert_eq!(e.decide_body(&anon(), Protocol::A2a, &h(), send03).reply.unwrap().status, 403);
        let cancel = br#"{"jsonrpc":"2.0","id":2,"method":"tasks/cancel","params":{"id":"t"}}"#;
        assert_eq!(e.decide_body(&bob, Protocol::A2a, &h(), cancel).reply.unwrap().status, 403);
        let card = br#"{"jsonrpc":"2.0","id":3,"method":"GetExtendedAgentCard"}"#;
        assert_eq!(e.decide_body(&admin(), Protocol::A2a, &h(), card).filters.get("3"), Some(&FilterKind::Card));
        assert!(e.decide_session(&anon(), "GET").reply.is_none());
        assert!(e.decide_session(&anon(), "DELETE").reply.is_none());
        assert_eq!(e.decide_session(&anon(), "PUT").reply.unwrap().status, 405);
        let strict = engine(json!({"policy": {"builtin_allow": ["initialize"]}}));
        assert_eq!(strict.decide_session(&anon(), "GET").reply.unwrap().status, 403);
    }
    /// A2A has no notifications: the a2a-sdk executes and answers a message without an `id` (`"id": null`
    /// in the answer). Before the fix such a `GetExtendedAgentCard` was decided as a notification and its
    /// answer not read: the whole extended card went out. A denied one got an empty 202 (`hide`) that the
    /// caller could not tell from delivery.
    #[test]
    fn a2a_messages_without_id_are_calls() {
        let e = engine(json!({"a2a_paths": ["/a2a"], "policy": {"rules": [
            {"name": "card", "effect": "allow", "protocol": "a2a", "methods": ["GetExtendedAgentCard"]},
            {"name": "sql", "effect": "allow", "protocol": "a2a", "methods": ["agent/skill"], "targets": ["sql"]}
        ]}}));
        let card = br#"{"jsonrpc":"2.0","method":"GetExtendedAgentCard","params":{}}"#;
        let out = e.decide_body(&anon(), Protocol::A2a, &h(), card);
        assert!(out.reply.is_none());
        assert_eq!(out.filters.get("null"), Some(&FilterKind::Card), "{:?}", out.filters);
        let answer =
            br#"{"jsonrpc":"2.0","id":null,"result":{"name":"a","skills":[{"id":"sql"},{"id":"ops-console"}]}}"#;
        let (filtered, removed) = e.filter_json_answer(&anon(), &out.filters, answer).unwrap().unwrap();
        assert_eq!(removed, 1);
        let v: Value = serde_json::from_slice(&filtered).unwrap();
        assert_eq!(v["result"]["skills"], json!([{"id": "sql"}]));
        // Denied: answered as the agent would answer a call, with the id `null`.
        let send = br#"{"jsonrpc":"2.0","method":"SendMessage","params":{"message":{"parts":[]}}}"#;
        let r = e.decide_body(&anon(), Protocol::A2a, &h(), send).reply.unwrap();
        assert_eq!((r.status, body(&r)["id"].clone(), body_code(&r)), (200, Value::Null, -32601));
        // MCP notifications stay notifications (MCP servers do not answer them).
        let note = br#"{"jsonrpc":"2.0","method":"tools/list"}"#;
        assert!(e.decide_body(&anon(), Protocol::Mcp, &h(), note).filters.is_empty());
    }

    /// Native cost of the pure core (no Envoy): `cargo test --release -p meshwarden-mcp-authz core_cost
    /// -- --ignored --nocapture`. Prints timings, asserts only correctness (no timed assertions).
    #[test]
    #[ignore]
    fn core_cost() {
        let mut rules: Vec<Value> = (0..46)
            .map(|i| json!({"name": format!("team-{i}"), "effect": "allow", "methods": ["tools/call"], "targets": [format!("team{i}_*")],
                            "identity": [{"claim": "groups", "contains": format!("team-{i}")}]}))
            .collect();
        rules.push(json!({"name": "no-prod", "effect": "deny", "targets": ["*"], "arguments": [{"path": "env", "equals": "prod"}]}));
        rules.push(json!({"name": "max-limit", "effect": "deny", "targets": ["search*"], "arguments": [{"path": "options.limit", "min": 1001}]}));
        rules.push(json!({"name": "no-etc", "effect": "deny", "targets": ["read_*"], "arguments": [{"path": "path", "regex": "^/etc/"}]}));
        rules.push(
            json!({"name": "readers", "effect": "allow", "methods": ["tools/call"], "targets": ["search*", "tool_0*"],
                          "identity": [{"claim": "scope", "contains": "tools:read"}]}),
        );
        let e = engine(json!({"policy": {"rules": rules}}));
        let id = Identity::from_claims(json!({"sub": "bench", "scope": "tools:read"}).as_object().unwrap().clone());
        let mut call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "search_docs", "arguments": {"query": "", "options": {"limit": 20}, "env": "dev"}}});
        let pad = 1024 - call.to_string().len();
        call["params"]["arguments"]["query"] = json!("q".repeat(pad));
        let body = call.to_string();
        assert_eq!(body.len(), 1024);
        let n = 20_000u32;
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert!(e.decide_body(&id, Protocol::Mcp, &h(), body.as_bytes()).reply.is_none());
        }
        println!("tools/call 1 KB, 50 rules: {:?} per decision", t.elapsed() / n);
        let tools: Vec<Value> = (0..200)
            .map(|i| json!({"name": format!("tool_{i:03}"), "description": format!("Generated tool {i} with a description long enough to look like a real one."),
                            "inputSchema": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}}))
            .collect();
        let answer = json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": tools}}).to_string();
        let mut plan = HashMap::new();
        plan.insert("1".to_string(), FilterKind::List(ListKind::Tools));
        let n = 2_000u32;
        let t = std::time::Instant::now();
        for _ in 0..n {
            let (_, removed) = e.filter_json_answer(&id, &plan, answer.as_bytes()).unwrap().unwrap();
            assert_eq!(removed, 100);
        }
        println!("tools/list 200 tools ({} bytes), 50 rules: {:?} per answer", answer.len(), t.elapsed() / n);
    }
}
