//! The thin proxy-wasm adapter: reads headers, bodies and properties, hands them to the pure engine,
//! and applies its answer (local reply, forwarded request, filtered answer, stats, audit log,
//! filter state for access logs).

use crate::binding::{self, Bound, Kind, Table, Verdict};
use crate::config::{Config, OtherPaths, Protocol, UnknownSessions};
use crate::engine::{withheld_answer, Audit, Endpoint, Engine, Outcome, Plan, Reply, SseFilter};
use crate::event_id::{EventIdKey, EventIdTagger};
use crate::identity::{self, Identity, Sources};
use meshwarden_shared::host::{load_config, log, now_ms, HeaderSnapshot, Metrics, VmTimed};
use meshwarden_shared::mcp::{self, RequestHeaders};
use meshwarden_shared::pbstruct::decode_metadata_namespace;
use meshwarden_shared::sse::SseParser;
use meshwarden_shared::stats::{BoundedLabels, CounterBatch};
use meshwarden_shared::{a2a, jsonrpc};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

const FILTER: &str = "mcp_authz";
const P: &str = "meshwarden.mcp_authz";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

struct Shared {
    metrics: Metrics,
    /// Every counter update, summed here and handed to Envoy on the root's tick
    /// (`stats_flush_interval_ms`): a request makes no stat host call.
    counters: CounterBatch,
    methods: BoundedLabels,
    /// Counter ids of `method.<label>.{allow,deny}` and `decision.{allow,deny}` by method label (at most
    /// the bounded labels' count): one lookup per decision instead of two names built and hashed.
    decision_ids: HashMap<String, [Option<u32>; 2]>,
    totals: [Option<u32>; 2],
    /// The key of the event id tags: from `event_id_key_env`, or this Envoy's random key, read from
    /// shared data at the first request that needs it (see [`shared_event_key`]).
    event_key: Option<EventIdKey>,
}

/// Envoy shared data key of this Envoy's random event id key (when `event_id_key_env` is not set).
const EVENT_KEY: &str = "meshwarden.mcp_authz.event_id_key";

/// This Envoy's random event id key, one for all its workers (a stream resumes on whichever worker the
/// GET lands): the first VM to configure writes it, every VM reads it back. Shared data cannot refuse
/// a second first writer (a CAS token cannot guard a key not written yet), so VMs read the key at their
/// first request, after every worker configured, not at their own configure.
fn shared_event_key() -> EventIdKey {
    let stored =
        || hostcalls::get_shared_data(EVENT_KEY).ok().and_then(|(v, _)| v).and_then(|v| EventIdKey::from_stored(&v));
    if let Some(k) = stored() {
        return k;
    }
    let fresh = random_key();
    let _ = hostcalls::set_shared_data(EVENT_KEY, Some(fresh.as_bytes()), None);
    stored().unwrap_or(fresh)
}

/// 32 bytes from the host's random source (WASI `random_get`, which Envoy serves from BoringSSL).
fn random_key() -> EventIdKey {
    let mut bytes = [0u8; 32];
    if getrandom::getrandom(&mut bytes).is_err() {
        // Not expected in Envoy; std's per-thread SipHash keys come from the same source.
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let h = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), (i, now_ms()));
            chunk.copy_from_slice(&h.to_le_bytes());
        }
    }
    EventIdKey::from_bytes(bytes)
}

impl Shared {
    /// Count one decision of `method` (index 0 allow, 1 deny).
    fn count_decision(&mut self, method: &str, allowed: bool) {
        let (i, decision) = if allowed { (0, "allow") } else { (1, "deny") };
        let label = self.methods.label(method);
        let id = match self.decision_ids.get(&label).and_then(|ids| ids.get(i).copied().flatten()) {
            Some(id) => Some(id),
            None => {
                // `stat_name(FILTER, &[("method", label)], decision)` after the filter's prefix.
                let id = self.metrics.counter_id_in(P, &format!("method.{label}.{decision}"));
                if let Some(slot) = self.decision_ids.entry(label).or_default().get_mut(i) {
                    *slot = id;
                }
                id
            }
        };
        let total = match self.totals.get(i).copied().flatten() {
            Some(id) => Some(id),
            None => {
                let id = self.metrics.counter_id_in(P, &format!("decision.{decision}"));
                if let Some(slot) = self.totals.get_mut(i) {
                    *slot = id;
                }
                id
            }
        };
        for id in [id, total].into_iter().flatten() {
            self.counters.add(id, 1);
        }
    }

    fn count(&mut self, name: &str) {
        self.add(name, 1);
    }
    fn add(&mut self, name: &str, n: u64) {
        if let Some(id) = self.metrics.counter_id_in(P, name) {
            self.counters.add(id, n);
        }
    }

    fn flush_counters(&mut self) {
        Metrics::flush(&mut self.counters);
    }
}

struct Root {
    engine: Rc<Engine>,
    shared: Rc<RefCell<Shared>>,
}

impl Default for Root {
    fn default() -> Self {
        let methods = crate::engine::method_labels();
        let engine = Engine::new(Config::default())
            .unwrap_or_else(|_| Engine { config: Config::default(), policy: Default::default() });
        let shared = Shared {
            metrics: Metrics::default(),
            counters: CounterBatch::default(),
            methods,
            decision_ids: HashMap::new(),
            totals: [None; 2],
            event_key: None,
        };
        Root { engine: Rc::new(engine), shared: Rc::new(RefCell::new(shared)) }
    }
}

impl Context for Root {
    /// The plugin is going away: hand over what was counted since the last tick.
    fn on_done(&mut self) -> bool {
        self.shared.borrow_mut().flush_counters();
        true
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(cfg) = load_config::<Config>(FILTER, self.get_plugin_configuration()) else {
            return false;
        };
        if cfg.identity.unverified_bearer_dev_only {
            log(LogLevel::Warn, "meshwarden mcp_authz: identity.unverified_bearer_dev_only is ON: bearer token payloads are trusted WITHOUT signature verification; never use this in production");
        }
        self.set_tick_period(Duration::from_millis(cfg.stats_flush_interval_ms.max(1)));
        let configured_key = match cfg.event_id_key(|name| std::env::var(name).ok()) {
            Ok(k) => k,
            Err(err) => {
                log(LogLevel::Critical, &format!("meshwarden mcp_authz: invalid configuration: {err}"));
                return false;
            }
        };
        if cfg.bind_event_ids && configured_key.is_none() {
            // Written now so that it exists before traffic; read back at each VM's first request.
            let _ = shared_event_key();
        }
        self.shared.borrow_mut().event_key = configured_key;
        match Engine::new(cfg) {
            Ok(e) => {
                log(LogLevel::Info, &format!("meshwarden mcp_authz: loaded {} rules", e.policy.rule_count()));
                self.engine = Rc::new(e);
                true
            }
            Err(err) => {
                log(LogLevel::Critical, &format!("meshwarden mcp_authz: {err}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        self.shared.borrow_mut().flush_counters();
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            engine: self.engine.clone(),
            shared: self.shared.clone(),
            endpoint: Endpoint::Other,
            identity: Identity::default(),
            headers: RequestHeaders::default(),
            plan: Plan::default(),
            card: false,
            answer: Answer::Untouched,
            unreadable: false,
            replied: false,
            decided: false,
            body_size: 0,
            a2a_by_header: false,
            response_size: 0,
            session_id: None,
            session: Verdict::Unknown,
            session_create: false,
            session_delete: false,
            capture: None,
            capture_planned: false,
            task_list_planned: false,
            session_header: None,
            event_id_refused: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Envoy shared data: the binding table of every worker of this Envoy (see `binding`).
struct SharedData;

impl binding::Store for SharedData {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        hostcalls::set_shared_data(key, Some(value), cas).is_ok()
    }
}

/// Reading an A2A answer for the tasks it creates (it passes as it comes).
enum Capture {
    /// A JSON answer: a copy of its bytes, read at its end.
    Json(Vec<u8>),
    /// An SSE answer: each event as it completes.
    Sse(SseParser),
}

/// Envoy's default buffer limit (`per_connection_buffer_limit_bytes`), see [`Request::incidental_json_limit`].
const ENVOY_DEFAULT_BUFFER_LIMIT: u64 = 1024 * 1024;

enum Answer {
    Untouched,
    /// An answer that could not be filtered was replaced by an error: drop what is left of it.
    Discard,
    Json,
    Sse(Box<SseFilter>),
    /// A2A `ListTasks` answer (buffered): only the caller's own tasks are kept.
    TaskList,
}

struct Request {
    engine: Rc<Engine>,
    shared: Rc<RefCell<Shared>>,
    endpoint: Endpoint,
    identity: Identity,
    headers: RequestHeaders,
    plan: Plan,
    /// A GET of an agent card: filter its skills.
    card: bool,
    answer: Answer,
    /// The answer to filter is compressed or of an unknown type: it is withheld (fail closed).
    unreadable: bool,
    replied: bool,
    /// The request body was decided (forwarded or answered).
    decided: bool,
    /// Request body bytes buffered so far.
    body_size: usize,
    /// A2A by its `A2A-Version` header alone: a body that is no JSON-RPC call passes.
    a2a_by_header: bool,
    /// Answer bytes buffered so far (JSON answers being filtered).
    response_size: usize,
    /// MCP: the request's `Mcp-Session-Id` (with `bind_sessions`), and who may use it.
    session_id: Option<String>,
    session: Verdict,
    /// MCP POST without a session id (an initialize): bind the session its answer names.
    session_create: bool,
    /// MCP DELETE of a session bound to this caller: forget it when the server confirms.
    session_delete: bool,
    /// A2A: the answer is read for the tasks it creates.
    capture: Option<Capture>,
    capture_planned: bool,
    /// A2A `ListTasks`: keep only the caller's tasks in the answer.
    task_list_planned: bool,
    /// MCP: the request's `Mcp-Session-Id` as sent (whatever `bind_sessions` says): event id tags name it.
    session_header: Option<String>,
    /// MCP: the request carries a `Last-Event-ID` not handed to this caller in this session.
    event_id_refused: bool,
}

impl Context for Request {}

impl Request {
    fn table(&self) -> Table<'static, SharedData> {
        const STORE: SharedData = SharedData;
        Table {
            store: &STORE,
            slots: self.engine.config.max_bindings,
            ttl_ms: self.engine.config.binding_ttl_secs.saturating_mul(1000),
        }
    }

    /// The tasks of this endpoint: MCP tasks (Tasks extension, 2025-11-25 tasks) or A2A tasks.
    fn task_kind(&self) -> Kind {
        if self.endpoint == Endpoint::Mcp {
            Kind::McpTask
        } else {
            Kind::Task
        }
    }

    /// Tags and checks event ids for this caller in `session` (see `event_id`).
    fn event_tagger(&self, session: &str) -> EventIdTagger {
        let cached = self.shared.borrow().event_key.clone();
        let key = match cached {
            Some(k) => k,
            None => {
                let k = shared_event_key();
                self.shared.borrow_mut().event_key = Some(k.clone());
                k
            }
        };
        EventIdTagger::new(key, self.owner(), session)
    }

    fn owner(&self) -> [u8; 16] {
        let key = self.identity.owner_key(&self.engine.config.identity.subject_claims);
        binding::owner_hash(key.as_deref().unwrap_or("anonymous"))
    }

    /// Refuse a forwarded request whose session or tasks are bound to another caller.
    fn check_bindings(&mut self, mut out: Outcome) -> Outcome {
        if !out.forwarded() {
            return out;
        }
        // Only an initialize creates a session: other answers are not read for one.
        self.session_create &= out.audits.iter().any(|a| a.method == "initialize");
        let cfg = &self.engine.config;
        if self.session_id.is_some() {
            let id = out.single_id();
            match self.session {
                Verdict::Foreign => {
                    let r = crate::engine::session_not_found(id.as_ref());
                    out.refuse_for_binding(crate::engine::SESSION_BINDING_RULE, r, "session_binding_denied");
                    return out;
                }
                Verdict::Unknown if cfg.unknown_sessions == UnknownSessions::Deny => {
                    let r = crate::engine::session_not_found(id.as_ref());
                    out.refuse_for_binding(crate::engine::UNKNOWN_SESSION_RULE, r, "session_unknown_denied");
                    return out;
                }
                _ => {}
            }
        }
        if self.event_id_refused {
            let r = crate::engine::unknown_event_id();
            out.refuse_for_binding(crate::engine::EVENT_ID_BINDING_RULE, r, "event_id_denied");
            return out;
        }
        if cfg.bind_tasks && !out.tasks.is_empty() {
            let (owner, now, kind) = (self.owner(), now_ms(), self.task_kind());
            let table = self.table();
            let foreign = out.tasks.iter().find(|(_, task)| table.verdict(kind, task, &owner, now) == Verdict::Foreign);
            if let Some((id, _)) = foreign {
                let r = if kind == Kind::McpTask {
                    crate::engine::mcp_task_not_found(id.as_ref())
                } else {
                    crate::engine::task_not_found(id.as_ref())
                };
                out.refuse_for_binding(crate::engine::TASK_BINDING_RULE, r, "task_binding_denied");
                return out;
            }
        }
        if cfg.bind_tasks && !out.contexts.is_empty() {
            // A message continuing another caller's context would continue that caller's conversation
            // (its history, the agent's memory of it, the tasks the agent looks up by it).
            let (owner, now) = (self.owner(), now_ms());
            let table = self.table();
            let foreign =
                out.contexts.iter().find(|(_, c)| table.verdict(Kind::Context, c, &owner, now) == Verdict::Foreign);
            if let Some((id, _)) = foreign {
                let r = crate::engine::context_not_found(id.as_ref());
                out.refuse_for_binding(crate::engine::CONTEXT_BINDING_RULE, r, "context_binding_denied");
                return out;
            }
        }
        self.capture_planned = cfg.bind_tasks && out.creates_tasks;
        self.task_list_planned = cfg.bind_tasks && out.lists_tasks;
        out
    }

    /// Record, at the answer's headers, the session an initialize created, or forget a deleted one, and
    /// plan reading an A2A answer for the tasks it creates.
    fn bind_at_answer(&mut self) {
        if !(self.session_create || self.session_delete || self.capture_planned || self.task_list_planned) {
            return;
        }
        let status = self.get_http_response_header(":status").and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        if !(200..300).contains(&status) {
            return;
        }
        if self.session_create {
            if let Some(sid) = self.get_http_response_header(mcp::HEADER_SESSION_ID) {
                self.bind(Kind::Session, &sid);
            }
        }
        if self.session_delete {
            if let Some(sid) = self.session_id.clone() {
                if self.table().unbind(Kind::Session, &sid) {
                    self.shared.borrow_mut().count("sessions_unbound");
                }
            }
        }
        if self.task_list_planned && self.plan.is_empty() {
            // Read whole, uncompressed or not at all (then withheld, see `finish_task_list`).
            self.answer = Answer::TaskList;
            self.set_http_response_header("content-length", None);
            let encoding = self.get_http_response_header("content-encoding").unwrap_or_default();
            if !encoding.is_empty() && !encoding.eq_ignore_ascii_case("identity") {
                self.set_http_response_header("content-encoding", None);
                self.unreadable = true;
            }
        }
        // An MCP answer is read by shape too (its plan is never empty): the copy is read beside that.
        if self.capture_planned && (self.plan.is_empty() || self.endpoint == Endpoint::Mcp) {
            let ctype = self.get_http_response_header("content-type").unwrap_or_default().to_ascii_lowercase();
            let limit = self.engine.config.max_response_bytes as usize;
            self.capture = Some(if ctype.starts_with("text/event-stream") {
                Capture::Sse(SseParser::new(limit))
            } else {
                Capture::Json(Vec::new())
            });
        }
    }

    fn bind(&mut self, kind: Kind, id: &str) {
        let result = self.table().bind(kind, id, &self.owner(), now_ms());
        let mut sh = self.shared.borrow_mut();
        match (result, kind) {
            (Bound::Recorded, Kind::Session) => sh.count("sessions_bound"),
            (Bound::Recorded, Kind::Task | Kind::McpTask) => sh.count("tasks_bound"),
            (Bound::Recorded, Kind::Context) => sh.count("contexts_bound"),
            (Bound::Owned, _) => {}
            (Bound::Taken, _) => sh.count("binding_taken"),
            (Bound::Full, _) => {
                sh.count("bindings_full");
                drop(sh);
                log(LogLevel::Warn, "meshwarden mcp_authz: binding table full (max_bindings): id not bound");
            }
        }
    }

    /// Keep only the caller's own tasks in a buffered `ListTasks` answer; withhold one that cannot be read.
    fn finish_task_list(&mut self, body_size: usize) {
        self.answer = Answer::Untouched;
        let body = self.get_http_response_body(0, body_size).unwrap_or_default();
        let parsed = if self.unreadable { None } else { serde_json::from_slice::<serde_json::Value>(&body).ok() };
        let Some(mut v) = parsed else {
            self.fail_closed_answer(body_size, "task list is not readable JSON");
            return;
        };
        let Some(tasks) = a2a::listed_tasks_mut(&mut v) else { return };
        let (owner, now) = (self.owner(), now_ms());
        let table = self.table();
        let before = tasks.len();
        // Only tasks bound to this caller: another caller's, and one this Envoy cannot attribute (created
        // through another replica or before a restart), are not shown.
        tasks.retain(|t| {
            t.get("id")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|id| table.verdict(Kind::Task, id, &owner, now) == Verdict::Owner)
        });
        let removed = before - tasks.len();
        if removed > 0 {
            self.shared.borrow_mut().add("tasks_hidden", removed as u64);
            // It counts every caller's tasks.
            if let Some(result) = v.get_mut("result").and_then(serde_json::Value::as_object_mut) {
                result.retain(|k, _| !k.replace('_', "").eq_ignore_ascii_case("totalsize"));
            }
        }
        self.set_http_response_body(0, body_size, v.to_string().as_bytes());
    }

    /// Read a chunk of an answer for the tasks it creates (the chunk passes unchanged). An answer the
    /// filter buffers (a JSON answer read by shape) is read once, whole, at its end: each callback sees
    /// all of it buffered so far.
    fn capture_answer(&mut self, body_size: usize, end_of_stream: bool) {
        if self.capture.is_none() {
            return;
        }
        if !matches!(self.answer, Answer::Json | Answer::TaskList) {
            self.capture_chunk(body_size, end_of_stream);
        } else if end_of_stream {
            self.capture_chunk(body_size.max(self.response_size), true);
        }
    }

    /// Read a chunk of an answer for the tasks it names (the chunk passes unchanged).
    fn capture_chunk(&mut self, body_size: usize, end_of_stream: bool) {
        let Some(mut capture) = self.capture.take() else { return };
        let mcp = self.endpoint == Endpoint::Mcp;
        let task_of = |v: &serde_json::Value| -> Option<String> {
            if mcp { mcp::answer_task_id(v) } else { a2a::answer_task_id(v) }.map(str::to_string)
        };
        let chunk = self.get_http_response_body(0, body_size).unwrap_or_default();
        let limit = self.engine.config.max_response_bytes as usize;
        let mut tasks: Vec<String> = Vec::new();
        // A2A: the contexts the answer names (a new one the agent created, or one the caller chose).
        let mut contexts: Vec<String> = Vec::new();
        let mut note_context = |v: &serde_json::Value| {
            if let Some(c) = (!mcp).then(|| a2a::answer_context_id(v)).flatten() {
                if !contexts.iter().any(|x| x == c) {
                    contexts.push(c.to_string());
                }
            }
        };
        let mut keep = true;
        match &mut capture {
            Capture::Json(buf) => {
                if buf.len() + chunk.len() > limit {
                    keep = false;
                    self.shared.borrow_mut().count("task_answer_unread");
                } else {
                    buf.extend_from_slice(&chunk);
                    if end_of_stream {
                        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(buf) {
                            let messages: Vec<&serde_json::Value> = match &v {
                                serde_json::Value::Array(items) => items.iter().collect(),
                                one => vec![one],
                            };
                            messages.iter().copied().for_each(&mut note_context);
                            tasks.extend(messages.into_iter().filter_map(task_of));
                        }
                    }
                }
            }
            Capture::Sse(parser) => {
                parser.feed_with(&chunk, |event| {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&event.data) {
                        note_context(&v);
                        if let Some(t) = task_of(&v) {
                            if !tasks.contains(&t) {
                                tasks.push(t);
                            }
                        }
                    }
                });
            }
        }
        let kind = self.task_kind();
        for t in &tasks {
            self.bind(kind, t);
        }
        for c in &contexts {
            self.bind(Kind::Context, c);
        }
        if keep && !end_of_stream {
            self.capture = Some(capture);
        }
    }

    fn reply(&mut self, r: &Reply) -> Action {
        let headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let body = if r.body.is_empty() { None } else { Some(r.body.as_bytes()) };
        self.send_http_response(r.status, headers, body);
        self.replied = true;
        Action::Pause
    }

    fn error_reply(&mut self, status: u32, code: i64, message: &str, event: &str) -> Action {
        self.shared.borrow_mut().count(event);
        let body = jsonrpc::error_response(None, code, message).to_string();
        self.reply(&Reply { status, headers: vec![("content-type".into(), "application/json".into())], body })
    }

    fn resolve_identity(&self, headers: &HeaderSnapshot) -> Identity {
        let cfg = &self.engine.config.identity;
        let jwt_metadata = cfg.jwt_authn.as_ref().and_then(|j| {
            // The whole `metadata` property is the Metadata message (typed protobuf); a deeper path would
            // come back as an untyped CEL map.
            let raw = self.get_property(vec!["metadata"])?;
            match decode_metadata_namespace(&raw, &j.metadata_namespace) {
                Ok(m) => m,
                Err(e) => {
                    log(
                        LogLevel::Warn,
                        &format!("meshwarden mcp_authz: dynamic metadata unreadable ({e}): no verified claims"),
                    );
                    None
                }
            }
        });
        let authorization = if cfg.unverified_bearer_dev_only { headers.get("authorization") } else { None };
        let trusted =
            cfg.trusted_headers.iter().filter_map(|h| headers.get(&h.header).map(|v| (h, v.to_string()))).collect();
        let peer = |without_spiffe: &Identity| {
            if !identity::spiffe_matters(self.engine.policy.reads_spiffe(), &cfg.subject_claims, without_spiffe) {
                return None;
            }
            self.get_property(vec!["connection", "uri_san_peer_certificate"]).and_then(|b| String::from_utf8(b).ok())
        };
        identity::resolve(cfg, Sources { jwt_metadata, authorization, headers: trusted }, peer)
    }

    fn record(&mut self, audits: &[Audit]) {
        let mut sh = self.shared.borrow_mut();
        for a in audits {
            sh.count_decision(&a.method, a.allowed);
            if self.engine.config.audit_log {
                log(LogLevel::Info, &self.engine.audit_line(&self.identity, a));
            }
        }
        drop(sh);
        // Filter state for access logs: %FILTER_STATE(wasm.mcp_authz.decision:PLAIN)% etc.
        let (method, target, decision, rule) = match audits {
            [] => return,
            [a] => (
                a.method.clone(),
                a.target.clone().unwrap_or_default(),
                if a.allowed { "allow" } else { "deny" },
                a.rule.clone(),
            ),
            many => {
                let denied = many.iter().find(|a| !a.allowed);
                (
                    "batch".to_string(),
                    String::new(),
                    if denied.is_some() { "deny" } else { "allow" },
                    denied.map(|a| a.rule.clone()).unwrap_or_else(|| "batch".into()),
                )
            }
        };
        // Caller-chosen text (a tool name, a method, a token's `sub`): escaped, so that no value can
        // write a line of its own into a text access log.
        use crate::engine::access_log_value as esc;
        self.set_property(vec!["mcp_authz.method"], Some(esc(&method).as_bytes()));
        self.set_property(vec!["mcp_authz.target"], Some(esc(&target).as_bytes()));
        self.set_property(vec!["mcp_authz.decision"], Some(decision.as_bytes()));
        self.set_property(vec!["mcp_authz.rule"], Some(esc(&rule).as_bytes()));
        let subject = self.identity.subject(&self.engine.config.identity.subject_claims);
        self.set_property(vec!["mcp_authz.subject"], Some(esc(&subject).as_bytes()));
    }

    fn apply(&mut self, out: Outcome) -> Action {
        self.record(&out.audits);
        {
            let mut sh = self.shared.borrow_mut();
            for e in &out.events {
                sh.count(e);
            }
        }
        if let Some(r) = &out.reply {
            return self.reply(r);
        }
        // Every MCP answer is read by shape: a response for an id this POST did not plan that looks like a
        // list answer is filtered too. Servers route answers by request id across the POSTs of a session
        // (see `Plan::incidental`): a `ping` with id 1 sent while a `tools/list` with id 1 is in flight
        // received the whole tool list on its own, unread, stream (before 2026-12-06).
        let mcp = self.endpoint == Endpoint::Mcp;
        let incidental = mcp && out.filters.is_empty();
        self.plan = Plan { ids: out.filters, by_shape: mcp, incidental };
        Action::Continue
    }

    fn decide_request_body(&mut self, body_size: usize) -> Action {
        self.decided = true;
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        if self.a2a_by_header && !crate::engine::a2a_by_header_body_is_json_rpc(&body) {
            // The HTTP+JSON binding (`POST /message:send`) on a path found A2A by its header: not inspected.
            self.endpoint = Endpoint::Other;
            self.shared.borrow_mut().count("passthrough");
            return Action::Continue;
        }
        let protocol = if self.endpoint == Endpoint::Mcp { Protocol::Mcp } else { Protocol::A2a };
        let out = self.engine.decide_body(&self.identity, protocol, &self.headers, &body);
        let out = self.check_bindings(out);
        self.apply(out)
    }

    /// Filter (or withhold) a buffered JSON answer.
    fn finish_json_answer(&mut self, body_size: usize) {
        self.answer = Answer::Untouched;
        if self.unreadable {
            self.fail_closed_answer(body_size, "answer is compressed or not JSON");
            return;
        }
        let body = self.get_http_response_body(0, body_size).unwrap_or_default();
        if self.plan.incidental && !self.card && !crate::engine::may_hold_list_answer(&body) {
            return; // a call's own answer, nothing in it to filter: not parsed
        }
        let result = if self.card {
            self.engine.filter_card_document(&self.identity, &body)
        } else {
            self.engine.filter_json_plan(&self.identity, &self.plan.ids, self.plan.by_shape, &body)
        };
        match result {
            Ok(None) => {}
            Ok(Some((new_body, removed))) => {
                self.shared
                    .borrow_mut()
                    .add(if self.card { "skills_hidden" } else { "list_items_hidden" }, removed as u64);
                self.set_http_response_body(0, body_size, &new_body);
            }
            // Read only in case another POST's list answer is in it (`Plan::incidental`): not JSON, so
            // not a list answer; it passes as it did before such answers were read.
            Err(_) if self.plan.incidental => {}
            Err(_) => self.fail_closed_answer(body_size, "answer is not JSON"),
        }
    }

    /// How much of a JSON answer read only by shape ([`Plan::incidental`]) is buffered: a configured
    /// `max_response_bytes` (the docs ask to raise Envoy's buffer limit with it), else Envoy's default
    /// buffer limit (1 MiB), so that a tool's JSON answer of 1 to 4 MiB is not failed by Envoy for being
    /// buffered. A list answer larger than this is refused on its own request anyway.
    fn incidental_json_limit(&self) -> u64 {
        let limit = self.engine.config.max_response_bytes;
        if limit == crate::config::DEFAULT_MAX_RESPONSE_BYTES {
            limit.min(ENVOY_DEFAULT_BUFFER_LIMIT)
        } else {
            limit
        }
    }

    fn fail_closed_answer(&mut self, size: usize, why: &str) {
        self.shared.borrow_mut().count("answer_filter_failed");
        log(LogLevel::Warn, &format!("meshwarden mcp_authz: answer withheld: {why}"));
        let body = withheld_answer(self.plan.single_id().as_ref(), why);
        self.set_http_response_body(0, size, body.as_bytes());
    }
}

impl HttpContext for Request {
    meshwarden_shared::timed_http_callbacks!(
        request_headers,
        request_body,
        request_trailers,
        response_headers,
        response_body,
        response_trailers
    );
}

impl VmTimed for Request {
    fn add_vm_us(&self, section: &str, us: u64) {
        self.shared.borrow_mut().add(section, us);
    }
}

// The callbacks' work (the trait methods above only time it for `make bench-breakdown`).
impl Request {
    fn request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        self.shared.borrow_mut().count("requests");
        // One host call for all headers: this callback reads up to ten of them.
        let mut headers = HeaderSnapshot::request();
        let path = headers.get(":path").unwrap_or_default().to_string();
        let method = headers.get(":method").unwrap_or_default().to_string();
        let has_mcp_headers =
            [mcp::HEADER_METHOD, mcp::HEADER_PROTOCOL_VERSION, mcp::HEADER_SESSION_ID].iter().any(|h| headers.has(h));
        let has_a2a_header = headers.has("a2a-version");
        let (endpoint, a2a_by_header) = self.engine.endpoint_detected(&path, has_mcp_headers, has_a2a_header);
        self.endpoint = endpoint;
        self.a2a_by_header = a2a_by_header;
        if a2a_by_header {
            let ctype = headers.get("content-type").unwrap_or_default();
            if !crate::engine::a2a_by_header_may_be_json_rpc(&method, ctype) {
                // Another binding's request (HTTP+JSON GET, gRPC): passes as it would without the header.
                self.endpoint = Endpoint::Other;
            }
        }
        if self.endpoint == Endpoint::Ambiguous {
            return self.error_reply(
                400,
                jsonrpc::INVALID_REQUEST,
                "Invalid Request: the path names another endpoint once normalized",
                "invalid_request",
            );
        }
        if self.endpoint == Endpoint::Other {
            if self.engine.config.other_paths == OtherPaths::Deny {
                return self.error_reply(
                    403,
                    crate::engine::FORBIDDEN_CODE,
                    "Forbidden: not an MCP or A2A endpoint",
                    "other_path_denied",
                );
            }
            self.shared.borrow_mut().count("passthrough");
            return Action::Continue;
        }
        // A WebSocket upgrade or CONNECT tunnel to an MCP or A2A endpoint: the JSON-RPC messages would
        // travel in frames this filter does not read (the MCP Python SDK still ships a WebSocket server
        // transport), so no call on it could be authorized. Refused whatever the policy says; before
        // 2026-12-07 such a GET was decided as the session stream and, once allowed, its frames passed.
        if meshwarden_shared::upgrade::is_upgrade_request(headers.get("upgrade"), Some(&method)) {
            return self.error_reply(
                403,
                crate::engine::FORBIDDEN_CODE,
                "Forbidden: upgraded connections (WebSocket) to an MCP or A2A endpoint cannot be authorized",
                "upgrade_refused",
            );
        }
        self.identity = self.resolve_identity(&headers);
        if self.endpoint == Endpoint::Card {
            if method == "GET" {
                self.card = true;
                headers.remove("accept-encoding");
                // The answer is filtered per caller, its validators are the whole card's: a cache (or
                // client) revalidating a copy filtered for another caller would get a 304 vouching for
                // it. Ask for the whole card every time; the filter decides what this caller sees.
                headers.remove("if-none-match");
                headers.remove("if-modified-since");
                // A byte range of the card is no card: a server serving it as a file (honouring `Range`)
                // answers a part of it, e.g. one skill's object, which has no `skills` to filter.
                headers.remove("range");
                headers.remove("if-range");
            }
            return Action::Continue;
        }
        let protocol = if self.endpoint == Endpoint::Mcp { Protocol::Mcp } else { Protocol::A2a };
        if protocol == Protocol::Mcp && self.engine.config.bind_sessions && method != "OPTIONS" {
            if headers.count(mcp::HEADER_SESSION_ID) > 1 {
                return self.error_reply(
                    400,
                    jsonrpc::INVALID_REQUEST,
                    "Invalid Request: Mcp-Session-Id is repeated",
                    "header_mismatch",
                );
            }
            // The legacy HTTP+SSE transport names its session in the POST target's query instead
            // (`/messages/?session_id=…`), read as the server reads it. Its clients (2024-11-05) send no
            // `MCP-Protocol-Version`; a Streamable HTTP request's query is not its session.
            let legacy_client = !headers.has(mcp::HEADER_PROTOCOL_VERSION);
            let legacy = match mcp::legacy_session_id(if legacy_client { &path } else { "" }) {
                Ok(l) => l,
                Err(mcp::RepeatedSessionId) => {
                    return self.error_reply(
                        400,
                        jsonrpc::INVALID_REQUEST,
                        "Invalid Request: session_id is repeated",
                        "header_mismatch",
                    )
                }
            };
            match headers.get(mcp::HEADER_SESSION_ID).map(str::to_string).or(legacy) {
                Some(sid) => {
                    self.session = self.table().verdict(Kind::Session, &sid, &self.owner(), now_ms());
                    self.session_delete = method == "DELETE" && self.session == Verdict::Owner;
                    self.session_id = Some(sid);
                }
                None => self.session_create = method == "POST",
            }
        }
        if protocol == Protocol::Mcp && self.engine.config.bind_event_ids && method != "OPTIONS" {
            self.session_header = headers.get(mcp::HEADER_SESSION_ID).map(str::to_string);
            if headers.count("last-event-id") > 1 {
                return self.error_reply(
                    400,
                    jsonrpc::INVALID_REQUEST,
                    "Invalid Request: Last-Event-ID is repeated",
                    "header_mismatch",
                );
            }
            if let Some(tagged) = headers.get("last-event-id").filter(|v| !v.is_empty()) {
                // Only an id handed to this caller in this session resumes, and the server sees it as
                // it issued it; any other is refused once the request is decided (after the policy).
                let tagger = self.event_tagger(self.session_header.as_deref().unwrap_or(""));
                match tagger.verify(tagged).map(str::to_string) {
                    Some(id) => self.set_http_request_header("last-event-id", Some(&id)),
                    None => self.event_id_refused = true,
                }
            }
        }
        match method.as_str() {
            "POST" => {}
            "OPTIONS" => return Action::Continue,
            m if protocol == Protocol::Mcp => {
                let out = self.engine.decide_session(&self.identity, m);
                let out = self.check_bindings(out);
                let action = self.apply(out);
                if m == "GET" && !self.replied {
                    // The server-to-client stream: the server may replay stored answers there
                    // (`Last-Event-ID`), a `tools/list` answer among them. Read every list answer by shape,
                    // and withhold what cannot be read (fail closed).
                    self.plan = Plan { ids: Default::default(), by_shape: true, incidental: false };
                    headers.remove("accept-encoding");
                } else {
                    // DELETE: its answer carries no JSON-RPC message.
                    self.plan = Plan::default();
                }
                return action;
            }
            _ => {
                return self.error_reply(
                    405,
                    jsonrpc::INVALID_REQUEST,
                    "Method not allowed: use POST",
                    "method_not_allowed",
                );
            }
        }
        let encoding = headers.get("content-encoding").unwrap_or_default();
        if !encoding.is_empty() && !encoding.eq_ignore_ascii_case("identity") {
            return self.error_reply(
                415,
                jsonrpc::PARSE_ERROR,
                "Parse error: compressed request bodies are not accepted",
                "invalid_json",
            );
        }
        let too_long = headers
            .get("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > self.engine.config.max_body_bytes);
        if too_long {
            return self.error_reply(413, jsonrpc::INVALID_REQUEST, "Request body too large", "body_too_large");
        }
        // Two copies of a mirrored header: we would check the first, a server or router might read the other.
        for h in [mcp::HEADER_METHOD, mcp::HEADER_NAME, mcp::HEADER_PROTOCOL_VERSION] {
            if headers.count(h) > 1 {
                return self.error_reply(
                    400,
                    jsonrpc::MCP_HEADER_MISMATCH,
                    &format!("Header mismatch: {h} is repeated"),
                    "header_mismatch",
                );
            }
        }
        self.headers = RequestHeaders {
            method: headers.get(mcp::HEADER_METHOD).map(str::to_string),
            name: headers.get(mcp::HEADER_NAME).map(str::to_string),
            protocol_version: headers.get(mcp::HEADER_PROTOCOL_VERSION).map(str::to_string),
        };
        // Answers may have to be filtered: ask for them uncompressed.
        headers.remove("accept-encoding");
        if end_of_stream {
            if self.a2a_by_header {
                // No body: no JSON-RPC call (an HTTP+JSON binding POST such as `/tasks/{id}:cancel`).
                self.endpoint = Endpoint::Other;
                self.shared.borrow_mut().count("passthrough");
                return Action::Continue;
            }
            self.decided = true;
            let out = self.engine.decide_body(&self.identity, protocol, &self.headers, b"");
            let out = self.check_bindings(out);
            return self.apply(out);
        }
        Action::Continue
    }

    fn request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.replied || !matches!(self.endpoint, Endpoint::Mcp | Endpoint::A2a) {
            return Action::Continue;
        }
        if body_size as u64 > self.engine.config.max_body_bytes {
            return self.error_reply(413, jsonrpc::INVALID_REQUEST, "Request body too large", "body_too_large");
        }
        if !end_of_stream {
            self.body_size = body_size;
            return Action::Pause;
        }
        self.decide_request_body(body_size)
    }

    fn request_trailers(&mut self, _n: usize) -> Action {
        // A body followed by trailers never reaches `end_of_stream` in the body callback: decide here,
        // never let it through undecided.
        if self.replied || self.decided || !matches!(self.endpoint, Endpoint::Mcp | Endpoint::A2a) {
            return Action::Continue;
        }
        self.decide_request_body(self.body_size)
    }

    fn response_trailers(&mut self, _n: usize) -> Action {
        if !self.replied {
            self.capture_answer(0, true);
        }
        if !self.replied && matches!(self.answer, Answer::TaskList) {
            self.finish_task_list(self.response_size);
        }
        // Trailers end the answer without `end_of_stream` in the body callback: finish filtering here.
        if !self.replied && matches!(self.answer, Answer::Json) {
            self.finish_json_answer(self.response_size);
        }
        Action::Continue
    }

    fn response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        if !self.replied {
            self.bind_at_answer();
        }
        if self.replied || (self.plan.is_empty() && !self.card) {
            return Action::Continue;
        }
        // One host call for the four headers read here (each single read is a call of ~1 µs, and every
        // MCP answer comes here).
        let headers = meshwarden_shared::host::HeaderSnapshot::response();
        let status = headers.get(":status").and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        if !(200..300).contains(&status) || status == 202 || status == 204 {
            return Action::Continue;
        }
        let ctype = headers.get("content-type").unwrap_or_default().to_ascii_lowercase();
        let encoding = headers.get("content-encoding").unwrap_or_default();
        let encoded = !encoding.is_empty() && !encoding.eq_ignore_ascii_case("identity");
        if self.plan.incidental && !self.card {
            // Read only in case another POST's list answer arrives here: an answer that cannot be read
            // (compressed, not JSON), or a JSON one that cannot be buffered safely, passes as it did
            // before. A JSON answer is buffered only with a `Content-Length` within the limit: without
            // one, Envoy checks its buffer limit on a large chunk before this filter sees it and resets
            // the answer (a 3 MB tool answer was), where it passed unbuffered before.
            let sse = ctype.starts_with("text/event-stream");
            let json = ctype.starts_with("application/json") || ctype.contains("+json");
            let declared = headers.get("content-length").and_then(|v| v.trim().parse::<u64>().ok());
            let bufferable = declared.is_some_and(|n| n <= self.incidental_json_limit());
            if encoded || !(sse || json) || (!sse && !bufferable) {
                return Action::Continue;
            }
        }
        self.answer = if ctype.starts_with("text/event-stream") && !self.card {
            let mut f = SseFilter::new(self.engine.config.max_response_bytes as usize);
            if self.endpoint == Endpoint::Mcp && self.engine.config.bind_event_ids {
                // An initialize's answer names the session it created.
                let session =
                    self.session_header.clone().or_else(|| headers.get(mcp::HEADER_SESSION_ID).map(str::to_string));
                f.event_ids = Some(Box::new(self.event_tagger(session.as_deref().unwrap_or(""))));
            }
            Answer::Sse(Box::new(f))
        } else {
            Answer::Json
        };
        self.set_http_response_header("content-length", None);
        if self.card {
            // One caller's view of the card: no shared cache may store it for another caller (an origin
            // `Cache-Control: public` would let it), and the origin's `ETag` / `Last-Modified` describe
            // the whole card, not this view.
            self.set_http_response_header("cache-control", Some("private, no-store"));
            self.set_http_response_header("etag", None);
            self.set_http_response_header("last-modified", None);
        }
        if encoded
            || !(ctype.starts_with("application/json")
                || ctype.starts_with("text/event-stream")
                || ctype.contains("+json"))
        {
            // Cannot read it, so cannot filter it: withhold it (fail closed) in the body callback.
            self.set_http_response_header("content-type", Some("application/json"));
            self.set_http_response_header("content-encoding", None);
            self.answer = Answer::Json;
            self.unreadable = true;
        }
        Action::Continue
    }

    fn response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.replied {
            return Action::Continue;
        }
        self.capture_answer(body_size, end_of_stream);
        match std::mem::replace(&mut self.answer, Answer::Untouched) {
            Answer::Untouched => Action::Continue,
            Answer::Discard => {
                self.answer = Answer::Discard;
                self.set_http_response_body(0, body_size, b"");
                Action::Continue
            }
            Answer::Sse(mut f) => {
                let chunk = self.get_http_response_body(0, body_size).unwrap_or_default();
                let out = f.feed(&self.engine, &self.identity, &self.plan, &chunk, end_of_stream);
                let removed = std::mem::take(&mut f.removed);
                let withheld = std::mem::take(&mut f.withheld);
                if self.engine.config.bind_sessions {
                    // A legacy HTTP+SSE stream's `endpoint` event: the session it opened is this caller's.
                    for session in std::mem::take(&mut f.legacy_sessions) {
                        self.bind(Kind::Session, &session);
                    }
                }
                let updates_hidden = std::mem::take(&mut f.updates_hidden);
                let dropped = f.dropped_events();
                self.answer = Answer::Sse(f);
                if removed > 0 {
                    self.shared
                        .borrow_mut()
                        .add(if self.card { "skills_hidden" } else { "list_items_hidden" }, removed as u64);
                }
                if updates_hidden > 0 {
                    self.shared.borrow_mut().add("resource_updates_hidden", updates_hidden);
                }
                if withheld > 0 {
                    self.shared.borrow_mut().add("answer_filter_failed", withheld);
                    log(LogLevel::Warn, "meshwarden mcp_authz: SSE event withheld: not readable JSON");
                }
                if end_of_stream && dropped > 0 {
                    self.shared.borrow_mut().add("sse_events_dropped", dropped);
                }
                self.set_http_response_body(0, body_size, &out);
                Action::Continue
            }
            Answer::TaskList => {
                self.answer = Answer::TaskList;
                if body_size as u64 > self.engine.config.max_response_bytes {
                    self.fail_closed_answer(body_size, "answer too large");
                    self.answer = Answer::Discard;
                    return Action::Continue;
                }
                if !end_of_stream {
                    self.response_size = body_size;
                    return Action::Pause;
                }
                self.finish_task_list(body_size);
                Action::Continue
            }
            Answer::Json => {
                self.answer = Answer::Json;
                if self.plan.incidental && body_size as u64 > self.incidental_json_limit() {
                    // Larger than a list answer can be here: release what is buffered, read no further.
                    self.answer = Answer::Untouched;
                    return Action::Continue;
                }
                if body_size as u64 > self.engine.config.max_response_bytes {
                    self.fail_closed_answer(body_size, "answer too large");
                    // Drop the rest of it too: nothing unfiltered may follow the error.
                    self.answer = Answer::Discard;
                    return Action::Continue;
                }
                if !end_of_stream {
                    self.response_size = body_size;
                    return Action::Pause;
                }
                self.finish_json_answer(body_size);
                Action::Continue
            }
        }
    }
}
