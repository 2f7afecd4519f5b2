//! The thin proxy-wasm adapter: moves bytes between Envoy and the pure core ([`crate::inspect`]),
//! applies verdicts, counts stats, records the rule for access logs and runs the moderation callout.

use crate::config::{rule_header_value, Action, Config, Fallback, UpgradeMode};
use crate::engine::{Engine, Policy};
use crate::inspect::{
    blocked_response, inspect_request, inspect_response, reject_body, render_message, BodyError, RequestOptions,
    StreamGuard,
};
use crate::moderation::{parse_verdict, request_body, Verdict};
use meshwarden_shared::callout::{CalloutFailure, FailureMode, LogThrottle};
use meshwarden_shared::errors::{ErrorFlavor, ErrorKind};
use meshwarden_shared::host::{callout_response, dispatch, load_config, log, now_ms, send_error, send_json, Metrics};
use meshwarden_shared::host::{HeaderSnapshot, VmTimed};
use meshwarden_shared::llm::Api;
use meshwarden_shared::stats::sanitize;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action as WasmAction, ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;

const FILTER: &str = "prompt_guard";
/// Filter state key (Envoy prefixes it with `wasm.`): `%FILTER_STATE(wasm.meshwarden.prompt_guard.rule:PLAIN)%`.
const STATE_RULE: &str = "meshwarden.prompt_guard.rule";
const STATE_ACTION: &str = "meshwarden.prompt_guard.action";
const MAX_SSE_EVENT_BYTES: usize = 256 * 1024;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

struct Shared {
    config: Config,
    engine: Engine,
    metrics: RefCell<Metrics>,
    moderation_log: RefCell<LogThrottle>,
}

#[derive(Default)]
struct Root {
    shared: Option<Rc<Shared>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = load_config::<Config>(FILTER, self.get_plugin_configuration()) else {
            return false;
        };
        match Engine::compile(&config) {
            Ok(engine) => {
                self.shared = Some(Rc::new(Shared {
                    config,
                    engine,
                    metrics: RefCell::new(Metrics::default()),
                    moderation_log: RefCell::new(LogThrottle::new(60_000)),
                }));
                true
            }
            Err(e) => {
                log(LogLevel::Critical, &format!("meshwarden {FILTER}: invalid configuration at $: {e}"));
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        let policy = shared.engine.default.clone();
        Some(Box::new(Request {
            shared,
            policy,
            flavor: ErrorFlavor::OpenAi,
            path: String::new(),
            content_type: None,
            skip_request: false,
            fired: Vec::new(),
            replied: false,
            response: ResponseMode::Pass,
            moderation_token: None,
            rewritten: None,
            request_size: 0,
            response_size: 0,
            context_id,
            realtime: None,
            upgraded: false,
            client_held: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

enum ResponseMode {
    Pass,
    Json,
    Stream(Box<StreamGuard>),
}

struct Request {
    shared: Rc<Shared>,
    policy: Rc<Policy>,
    flavor: ErrorFlavor,
    path: String,
    content_type: Option<String>,
    skip_request: bool,
    /// (rule name, what happened) for the response header and filter state.
    fired: Vec<(String, &'static str)>,
    response: ResponseMode,
    moderation_token: Option<u32>,
    rewritten: Option<Vec<u8>>,
    request_size: usize,
    /// JSON answer bytes buffered so far.
    response_size: usize,
    /// This filter answered the request itself (its reply names its rule in the rule header).
    replied: bool,
    context_id: u32,
    /// An inspected Realtime session (`on_upgrade: inspect`).
    realtime: Option<Box<crate::realtime::Session>>,
    /// Its upstream answered `101`: the bodies are frames.
    upgraded: bool,
    /// Client bytes held (before the `101`, or until a message is whole).
    client_held: usize,
}

impl Request {
    fn cfg(&self) -> &Config {
        &self.shared.config
    }

    fn count(&self, name: &str) {
        self.count_n(name, 1);
    }

    fn count_n(&self, name: &str, n: u64) {
        self.shared.metrics.borrow_mut().counter(&format!("meshwarden.{FILTER}.{name}"), n);
    }

    /// Count, log and remember one rule that fired. `acted` is false in monitor mode.
    fn record(&mut self, rule: usize, dir: &str, acted: bool) {
        let Some(r) = self.policy.rules.get(rule) else { return };
        let outcome = match (acted, r.action) {
            (false, _) => "monitored",
            (true, Action::Reject) => "rejected",
            (true, Action::Mask) => "masked",
            (true, Action::Log) => "logged",
        };
        let name = r.name.clone();
        self.count(&format!("rule.{}.{dir}.{outcome}", sanitize(&name)));
        let verb = if acted { r.action.as_str() } else { "monitor" };
        log(
            LogLevel::Info,
            &format!("meshwarden {FILTER}: rule={name} action={verb} direction={dir} path={}", self.path),
        );
        if !self.fired.iter().any(|(n, _)| *n == name) {
            self.fired.push((name, outcome));
        }
        self.save_state();
    }

    fn save_state(&self) {
        let rules: Vec<&str> = self.fired.iter().map(|(n, _)| n.as_str()).collect();
        let actions: Vec<&str> = self.fired.iter().map(|(_, a)| *a).collect();
        self.set_property(vec![STATE_RULE], Some(rules.join(",").as_bytes()));
        self.set_property(vec![STATE_ACTION], Some(actions.join(",").as_bytes()));
    }

    fn reject_message(&self, rule: usize) -> (u32, String, String) {
        let r = self.policy.rules.get(rule);
        let name = r.map_or_else(|| "unknown".to_string(), |r| r.name.clone());
        let status = r.and_then(|r| r.status).unwrap_or(self.cfg().reject.status);
        let template = r.and_then(|r| r.message.clone()).unwrap_or_else(|| self.cfg().reject.message.clone());
        (u32::from(status), render_message(&template, &name), name)
    }

    fn reject_request(&mut self, rule: usize) {
        let (status, message, name) = self.reject_message(rule);
        self.replied = true;
        self.count("rejected");
        let header = self.cfg().reject.rule_header.clone();
        send_json(status, &reject_body(self.flavor, &message), &[(header.as_str(), name.as_str())]);
    }

    fn local_error(&mut self, status: u32, kind: ErrorKind, code: &str, message: &str) {
        self.replied = true;
        send_error(status, self.flavor, kind, Some(code), message, &[]);
    }

    /// Whether this request's policy inspects anything (requests, moderation or answers).
    fn inspects_anything(&self) -> bool {
        self.policy.has_request_rules() || self.policy.moderation || self.policy.has_response_rules()
    }

    /// A WebSocket upgrade or CONNECT tunnel.
    fn is_upgrade(headers: &HeaderSnapshot) -> bool {
        meshwarden_shared::upgrade::is_upgrade_request(headers.get("upgrade"), headers.get(":method"))
    }

    /// An upgraded connection's frames reach this filter as a request body that never ends, which the
    /// request scan would wait for (the session hung after its `101`), and neither they nor the answer's
    /// frames can be inspected: refused (403 `upgrade_refused`) or let through uninspected, as
    /// `on_upgrade` says.
    fn upgrade_request(&mut self, headers: &HeaderSnapshot) -> WasmAction {
        self.skip_request = true;
        let realtime = meshwarden_shared::realtime::is_realtime_path(&self.path)
            && headers.get(":method").is_some_and(|m| m.eq_ignore_ascii_case("GET"));
        match self.cfg().on_upgrade {
            UpgradeMode::Inspect if realtime && self.policy.has_request_rules() => {
                self.count("realtime.sessions");
                // A compressed message (permessage-deflate) could not be read: the offer is withdrawn.
                self.set_http_request_header("sec-websocket-extensions", None);
                let mask = (now_ms() ^ u64::from(self.context_id).rotate_left(32)).to_le_bytes();
                self.realtime = Some(Box::new(crate::realtime::Session::new([mask[0], mask[1], mask[2], mask[3]])));
                WasmAction::Continue
            }
            // No request rule to apply (only answer rules or moderation, which Realtime sessions do not
            // get): nothing would be inspected, so it is refused as an upgrade that cannot be.
            UpgradeMode::Reject | UpgradeMode::Inspect => {
                self.count("upgrade.rejected");
                let message = "prompt-guard: WebSocket and other upgraded connections cannot be inspected, so this \
                               gateway refuses them (on_upgrade: reject).";
                self.local_error(403, ErrorKind::PermissionDenied, "upgrade_refused", message);
                WasmAction::Pause
            }
            UpgradeMode::Pass => {
                self.count("upgrade.passed");
                WasmAction::Continue
            }
        }
    }

    /// The client's bytes of an inspected Realtime session, held since they last passed.
    fn realtime_client(&mut self, size: usize) -> WasmAction {
        self.client_held = size;
        if !self.upgraded {
            // Frames sent before the `101` wait for it (they are inspected then).
            return WasmAction::Pause;
        }
        let held = self.get_http_request_body(0, size).unwrap_or_default();
        let policy = self.policy.clone();
        let max = usize::try_from(self.cfg().max_body_bytes).unwrap_or(usize::MAX);
        let monitor = policy.monitor;
        let mut fired: Vec<usize> = Vec::new();
        let mut blocking: Option<usize> = None;
        let template = self.cfg().reject.message.clone();
        let Some(rt) = self.realtime.as_mut() else {
            return WasmAction::Continue;
        };
        let before = rt.scanned;
        let (step, block) =
            rt.client(&held, max, |texts| realtime_scan(&policy, &template, texts, &mut fired, &mut blocking));
        let scanned = rt.scanned - before;
        if scanned > 0 {
            self.count_n("realtime.messages_scanned", scanned);
        }
        for rule in fired {
            self.record(rule, "request", !monitor);
        }
        match (&step, block) {
            (_, Some(crate::realtime::Block::Rule(_))) => {
                self.count("rejected");
                self.count("realtime.blocked");
            }
            (_, Some(crate::realtime::Block::Unreadable(what))) => {
                self.count(&format!("realtime.uninspectable.{what}"));
            }
            (_, None) => {}
        }
        match step {
            crate::realtime::ClientStep::Hold => return WasmAction::Pause,
            crate::realtime::ClientStep::Pass => {}
            crate::realtime::ClientStep::Rewrite(out) => self.set_http_request_body(0, size, &out),
            crate::realtime::ClientStep::Reset(e) => return self.realtime_reset("client", e),
        }
        self.client_held = 0;
        WasmAction::Continue
    }

    /// The server's frames of an inspected Realtime session: passed, or cut when the session ends; the
    /// transcripts of the user's speech are scanned on the way.
    fn realtime_server(&mut self, size: usize) -> WasmAction {
        let chunk = self.get_http_response_body(0, size).unwrap_or_default();
        let policy = self.policy.clone();
        let template = self.cfg().reject.message.clone();
        let (mut fired, mut blocking) = (Vec::new(), None);
        let Some(rt) = self.realtime.as_mut() else {
            return WasmAction::Continue;
        };
        let (before, had_ending) = (rt.scanned, rt.ending.is_some());
        let out = rt.server(&chunk, |texts| realtime_scan(&policy, &template, texts, &mut fired, &mut blocking));
        let (scanned, ended) = (rt.scanned - before, !had_ending && rt.ending.is_some());
        if scanned > 0 {
            self.count_n("realtime.transcripts_scanned", scanned);
        }
        for rule in fired {
            self.record(rule, "request", !policy.monitor);
        }
        if ended {
            self.count("rejected");
            self.count("realtime.blocked");
        }
        match out {
            Ok(Some(out)) => self.set_http_response_body(0, size, &out),
            Ok(None) => {}
            Err(e) => return self.realtime_reset("server", e),
        }
        WasmAction::Continue
    }

    fn realtime_reset(&mut self, side: &str, e: meshwarden_shared::websocket::BadFrame) -> WasmAction {
        self.count(&format!("realtime.broken_frames.{side}"));
        log(
            LogLevel::Warn,
            &format!(
                "meshwarden {FILTER}: a Realtime session's {side} frames are not WebSocket framing ({}); reset",
                e.as_str()
            ),
        );
        let _ = proxy_wasm::hostcalls::reset_http_response();
        let _ = proxy_wasm::hostcalls::reset_http_request();
        WasmAction::Pause
    }

    /// gRPC and other length-framed binary bodies: a rule cannot read protobuf fields (a gRPC message may
    /// be compressed, a string cut across messages), a mask would leave the length prefixes around it
    /// wrong (the server then fails to parse the message), and a gRPC stream does not end its body while it
    /// waits for answers (the scan waited for ever). Refused (a gRPC request with a gRPC answer,
    /// `grpc-status` 7, which gRPC clients report as such; another with 415) or passed uninspected, as
    /// `on_binary_body` says. Before 2026-12-07 such a body was scanned as text and masked in place.
    fn binary_body(&mut self) -> WasmAction {
        let grpc = self.content_type.as_deref().is_some_and(meshwarden_shared::binary::is_grpc);
        match self.cfg().on_binary_body {
            Fallback::Reject if grpc => {
                self.count("binary_body.rejected");
                self.replied = true;
                let message = "prompt-guard: gRPC bodies cannot be inspected, so this gateway refuses them \
                               (on_binary_body: reject)";
                self.send_http_response(
                    200,
                    vec![("content-type", "application/grpc"), ("grpc-status", "7"), ("grpc-message", message)],
                    None,
                );
                WasmAction::Pause
            }
            fb => self.fallback(
                "binary_body",
                fb,
                415,
                ErrorKind::InvalidRequest,
                "Binary request bodies (protobuf, MessagePack, CBOR) cannot be inspected by the prompt guard.",
            ),
        }
    }

    /// Too large / malformed / encoded: reject with `status` or pass (counted either way).
    /// A request body over `max_body_bytes` (declared or received): `on_too_large` decides (413 or pass).
    fn too_large(&mut self) -> WasmAction {
        let fb = self.cfg().on_too_large;
        self.fallback(
            "too_large",
            fb,
            413,
            ErrorKind::RequestTooLarge,
            "The request body is too large to be inspected.",
        )
    }

    fn fallback(&mut self, what: &str, fb: Fallback, status: u32, kind: ErrorKind, message: &str) -> WasmAction {
        match fb {
            Fallback::Reject => {
                self.count(&format!("{what}.rejected"));
                self.local_error(status, kind, what, message);
                WasmAction::Pause
            }
            Fallback::Pass => {
                self.count(&format!("{what}.passed"));
                self.skip_request = true;
                WasmAction::Continue
            }
        }
    }

    fn start_moderation(&mut self, input: &str) -> bool {
        let Some(m) = self.cfg().moderation.clone() else { return false };
        let body = request_body(m.model.as_deref(), input);
        let auth: Vec<(&str, &str)> =
            m.authorization.as_deref().map(|a| vec![("authorization", a)]).unwrap_or_default();
        match dispatch(&m.service, "POST", &m.path, &auth, Some(&body)) {
            Ok(token) => {
                self.count("moderation.calls");
                self.moderation_token = Some(token);
                true
            }
            Err(f) => {
                self.moderation_failed(f);
                false
            }
        }
    }

    /// Apply the failure mode; returns true if the request was rejected.
    fn moderation_failed(&mut self, f: CalloutFailure) -> bool {
        self.count(&format!("moderation.failure.{}", f.as_str()));
        if let Some(suppressed) = self.shared.moderation_log.borrow_mut().should_log(now_ms()) {
            log(
                LogLevel::Warn,
                &format!(
                    "meshwarden {FILTER}: moderation callout failed ({}); {suppressed} similar failures suppressed",
                    f.as_str()
                ),
            );
        }
        let mode = self.cfg().moderation.as_ref().map_or(FailureMode::Deny, |m| m.service.failure_mode);
        match mode {
            FailureMode::Allow => {
                self.count("moderation.fail_open");
                false
            }
            FailureMode::Deny => {
                self.count("moderation.fail_closed");
                self.fired.push(("moderation_unavailable".to_string(), "rejected"));
                self.save_state();
                let header = self.cfg().reject.rule_header.clone();
                self.replied = true;
                send_error(
                    503,
                    self.flavor,
                    ErrorKind::Unavailable,
                    Some("moderation_unavailable"),
                    "The content moderation service is unavailable; the request was not forwarded.",
                    &[(header.as_str(), "moderation_unavailable")],
                );
                true
            }
        }
    }

    fn apply_rewrite(&mut self) {
        if let Some(body) = self.rewritten.take() {
            self.set_http_request_body(0, self.request_size, &body);
        }
    }
}

impl Context for Request {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        if self.moderation_token != Some(token) {
            return;
        }
        self.moderation_token = None;
        let threshold = self.cfg().moderation.as_ref().map_or(0.5, |m| m.threshold);
        let verdict = callout_response(num_headers, body_size)
            .and_then(|b| parse_verdict(&b, threshold).map_err(|_| CalloutFailure::BadBody));
        match verdict {
            Ok(Verdict::Clean) => {
                self.count("moderation.clean");
                self.apply_rewrite();
                self.resume_http_request();
            }
            Ok(Verdict::Flagged { category, score }) => {
                self.count("moderation.flagged");
                log(
                    LogLevel::Info,
                    &format!("meshwarden {FILTER}: moderation flagged category={category} score={score:.3}"),
                );
                let monitor = self.policy.monitor;
                self.fired.push(("moderation".to_string(), if monitor { "monitored" } else { "rejected" }));
                self.save_state();
                if monitor {
                    self.apply_rewrite();
                    self.resume_http_request();
                    return;
                }
                self.count("rejected");
                let status = u32::from(self.cfg().reject.status);
                let message = render_message(&self.cfg().reject.message, "moderation");
                let header = self.cfg().reject.rule_header.clone();
                self.replied = true;
                send_json(status, &reject_body(self.flavor, &message), &[(header.as_str(), "moderation")]);
            }
            Err(f) => {
                if !self.moderation_failed(f) {
                    self.apply_rewrite();
                    self.resume_http_request();
                }
            }
        }
    }
}

impl Request {
    /// Inspect a whole buffered JSON answer (at its end: `eos`, or the trailers).
    fn inspect_json_response(&mut self, size: usize) -> WasmAction {
        let body = self.get_http_response_body(0, size).unwrap_or_default();
        let ins = inspect_response(&self.policy, &body, &self.shared.config.mask_text);
        let monitor = self.policy.monitor;
        for &rule in &ins.fired {
            self.record(rule, "response", !monitor);
        }
        if monitor {
            return WasmAction::Continue;
        }
        if let Some(rule) = ins.reject {
            let (_, message, _) = self.reject_message(rule);
            self.count("rejected");
            if let Some(new) = blocked_response(&body, &message) {
                self.set_http_response_body(0, size, &new);
            }
            return WasmAction::Continue;
        }
        if let Some(new) = ins.rewritten {
            self.count("masked");
            self.set_http_response_body(0, size, &new);
        }
        WasmAction::Continue
    }

    /// Inspect the whole buffered request body (at its end: `eos`, or the trailers), once.
    fn inspect_request_body(&mut self) -> WasmAction {
        self.skip_request = true; // one inspection per request
        let size = self.request_size;
        let body = self.get_http_request_body(0, size).unwrap_or_default();
        let moderation_roles = if self.policy.moderation {
            self.cfg().moderation.as_ref().map(|m| m.roles.clone()).unwrap_or_default()
        } else {
            Vec::new()
        };
        let opts = RequestOptions {
            scan_non_json: self.cfg().scan_non_json,
            mask_text: &self.shared.config.mask_text,
            moderation_roles: &moderation_roles,
            moderation_max_bytes: self.cfg().moderation.as_ref().map_or(0, |m| m.max_input_bytes),
        };
        let inspection = match inspect_request(&self.policy, &self.path, self.content_type.as_deref(), &body, &opts) {
            Ok(i) => i,
            Err(BodyError::MalformedJson(e)) => {
                let fb = self.cfg().on_malformed;
                let msg = format!("The request body is not valid JSON: {e}");
                return self.fallback("malformed_body", fb, 400, ErrorKind::InvalidRequest, &msg);
            }
            Err(BodyError::Ambiguous(e)) => {
                let fb = self.cfg().on_malformed;
                let msg = format!("The request body cannot be inspected reliably: {e}.");
                return self.fallback(e.code(), fb, 400, ErrorKind::InvalidRequest, &msg);
            }
        };
        if inspection.encoded_texts > 0 {
            self.count_n("encoded_texts_scanned", inspection.encoded_texts as u64);
        }
        let monitor = self.policy.monitor;
        for &rule in &inspection.fired {
            self.record(rule, "request", !monitor);
        }
        if monitor {
            if !inspection.fired.is_empty() {
                self.count("monitored");
            }
        } else {
            if let Some(rule) = inspection.reject {
                self.reject_request(rule);
                return WasmAction::Pause;
            }
            if inspection.rewritten.is_some() {
                self.count("masked");
            }
            self.rewritten = inspection.rewritten;
        }
        if self.policy.moderation && !inspection.moderation_input.trim().is_empty() {
            if self.start_moderation(&inspection.moderation_input) {
                return WasmAction::Pause;
            }
            // dispatch failed: moderation_failed already applied the failure mode
            if self.fired.iter().any(|(n, _)| n == "moderation_unavailable") {
                return WasmAction::Pause;
            }
        }
        self.apply_rewrite();
        WasmAction::Continue
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
        self.count_n(section, us);
    }
}

// The callbacks' work (the trait methods above only time it for `make bench-breakdown`).
impl Request {
    fn request_headers(&mut self, _n: usize, eos: bool) -> WasmAction {
        self.count("requests");
        // One host call for the headers read here (up to seven; a single-header read is a call of ~1 µs in
        // the VM) and the ones removed.
        let mut headers = HeaderSnapshot::request();
        self.path = headers.get(":path").unwrap_or_default().to_string();
        self.flavor = ErrorFlavor::for_api(Api::from_path(&self.path));
        let from_property = self.cfg().profile_property.clone().and_then(|path| {
            let segs: Vec<&str> = path.iter().map(String::as_str).collect();
            self.get_property(segs).and_then(|v| String::from_utf8(v).ok()).filter(|v| !v.is_empty())
        });
        // With `profile_property` set, the profile comes from it alone: a client header cannot pick one.
        let header = self.cfg().profile_header_in_use().map(str::to_string);
        let profile = from_property.or_else(|| header.and_then(|h| headers.get(&h).map(str::to_string)));
        self.policy = self.shared.engine.policy(profile.as_deref());
        if self.policy.has_response_rules() {
            // answers must come back uncompressed to be scanned
            headers.remove("accept-encoding");
        }
        if !eos && self.inspects_anything() && Self::is_upgrade(&headers) {
            return self.upgrade_request(&headers);
        }
        if eos || (!self.policy.has_request_rules() && !self.policy.moderation) {
            self.skip_request = true;
            return WasmAction::Continue;
        }
        self.content_type = headers.get("content-type").map(str::to_string);
        if self.content_type.as_deref().is_some_and(meshwarden_shared::binary::is_length_framed) {
            return self.binary_body();
        }
        let encoding = headers.get("content-encoding").unwrap_or_default();
        if !encoding.is_empty() && !encoding.eq_ignore_ascii_case("identity") {
            let fb = self.cfg().on_encoded_body;
            return self.fallback(
                "encoded_body",
                fb,
                415,
                ErrorKind::InvalidRequest,
                "Compressed request bodies cannot be inspected by the prompt guard; send them uncompressed.",
            );
        }
        let declared = headers.get("content-length").and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.cfg().max_body_bytes) {
            return self.too_large();
        }
        if self.policy.has_mask_rules(crate::engine::Dir::Request) || self.policy.monitor {
            headers.remove("content-length");
        }
        WasmAction::Continue
    }

    fn request_body(&mut self, size: usize, eos: bool) -> WasmAction {
        if self.realtime.is_some() {
            return self.realtime_client(size);
        }
        if self.skip_request {
            return WasmAction::Continue;
        }
        if size as u64 > self.cfg().max_body_bytes {
            return self.too_large();
        }
        self.request_size = size;
        if !eos {
            return WasmAction::Pause;
        }
        self.inspect_request_body()
    }

    fn request_trailers(&mut self, _n: usize) -> WasmAction {
        // A body followed by trailers never reaches `eos` in the body callback: it ends here, and is
        // inspected here (else the buffered body would go upstream uninspected).
        if self.skip_request {
            return WasmAction::Continue;
        }
        self.inspect_request_body()
    }
    fn response_headers(&mut self, _n: usize, _eos: bool) -> WasmAction {
        if self.realtime.is_some() {
            self.upgraded = meshwarden_shared::host::response_header(":status").as_deref() == Some("101");
            if !self.upgraded {
                // The upstream refused the upgrade: an HTTP answer, nothing to inspect.
                self.realtime = None;
            }
            if self.client_held > 0 {
                // Frames sent before the `101`: decided now (or, refused upgrade, let go).
                if self.realtime.is_none() || self.realtime_client(self.client_held) == WasmAction::Continue {
                    self.resume_http_request();
                }
            }
            return WasmAction::Continue;
        }
        let names: Vec<&str> = self.fired.iter().map(|(n, _)| n.as_str()).collect();
        // The rule header is ours: a local reply already names its rule; on an upstream answer it is set
        // from what fired here, and any copy the upstream sent is removed.
        if let Some(value) = rule_header_value(self.replied, self.policy.monitor, &names) {
            let header = self.cfg().reject.rule_header.clone();
            self.set_http_response_header(&header, value.as_deref());
        }
        if !self.policy.has_response_rules() {
            return WasmAction::Continue;
        }
        let encoding = meshwarden_shared::host::response_header("content-encoding").unwrap_or_default();
        if !encoding.is_empty() && !encoding.eq_ignore_ascii_case("identity") {
            self.count("response_unscannable");
            return WasmAction::Continue;
        }
        let ct = meshwarden_shared::host::response_header("content-type").unwrap_or_default().to_ascii_lowercase();
        if ct.contains("text/event-stream") {
            let act = !self.policy.monitor;
            self.response = ResponseMode::Stream(Box::new(StreamGuard::new(
                self.cfg().stream_holdback_bytes,
                MAX_SSE_EVENT_BYTES,
                act,
            )));
            self.set_http_response_header("content-length", None);
            WasmAction::Continue
        } else if ct.contains("json") {
            self.response = ResponseMode::Json;
            self.set_http_response_header("content-length", None);
            // Pausing here would stop the body callbacks too (Envoy holds the data until headers resume),
            // so the headers go out now and a reject rewrites the body (see `blocked_response`).
            WasmAction::Continue
        } else {
            WasmAction::Continue
        }
    }

    fn response_trailers(&mut self, _n: usize) -> WasmAction {
        // A JSON answer followed by trailers never reaches `eos` in the body callback: inspect it here
        // (else the buffered answer would go to the client uninspected). A stream has been passed on
        // chunk by chunk already; only a held-back incomplete last event cannot be flushed here.
        match std::mem::replace(&mut self.response, ResponseMode::Pass) {
            ResponseMode::Json => self.inspect_json_response(self.response_size),
            other => {
                self.response = other;
                WasmAction::Continue
            }
        }
    }

    fn response_body(&mut self, size: usize, eos: bool) -> WasmAction {
        if self.realtime.is_some() && self.upgraded {
            return self.realtime_server(size);
        }
        match std::mem::replace(&mut self.response, ResponseMode::Pass) {
            ResponseMode::Pass => WasmAction::Continue,
            ResponseMode::Json => {
                if size as u64 > self.cfg().max_body_bytes {
                    self.count("response_too_large");
                    return WasmAction::Continue;
                }
                if !eos {
                    self.response = ResponseMode::Json;
                    self.response_size = size;
                    return WasmAction::Pause;
                }
                self.inspect_json_response(size)
            }
            ResponseMode::Stream(mut guard) => {
                let chunk = self.get_http_response_body(0, size).unwrap_or_default();
                let policy = self.policy.clone();
                let mask = self.shared.config.mask_text.clone();
                let (status_msg, flavor) = (self.cfg().reject.message.clone(), self.flavor);
                let rules_for_msg = policy.clone();
                let step = guard.feed(&policy, &chunk, eos, &mask, flavor, &|rule| {
                    let r = rules_for_msg.rules.get(rule);
                    let name = r.map_or("unknown", |r| r.name.as_str());
                    render_message(r.and_then(|r| r.message.as_deref()).unwrap_or(&status_msg), name)
                });
                let monitor = self.policy.monitor;
                for &rule in &step.fired {
                    let acted = !monitor;
                    // mask/log/reject in streams are counted when first seen
                    self.record(rule, "response", acted);
                }
                if step.rejected.is_some() {
                    self.count("rejected");
                }
                let oversized = guard.oversized_events();
                self.response = ResponseMode::Stream(guard);
                if oversized > 0 && eos {
                    self.count("stream_oversized_events");
                }
                self.set_http_response_body(0, size, &step.output);
                WasmAction::Continue
            }
        }
    }
}

/// Scan a Realtime session's texts with the request rules. Every rule that fires is added to `fired`; a
/// rule that blocks (`reject`, and `mask`: a message whose frames may already be on their way cannot be
/// rewritten, so in a Realtime session it blocks too; never in monitor mode) sets `blocking` (the first
/// rule), and its reject message is the answer.
fn realtime_scan(
    policy: &Policy,
    template: &str,
    texts: &[meshwarden_shared::realtime::ClientText],
    fired: &mut Vec<usize>,
    blocking: &mut Option<usize>,
) -> Option<String> {
    for t in texts {
        for h in policy.scan_with(&t.text, crate::engine::Dir::Request, t.role, crate::engine::Spans::MaskOnly) {
            if !fired.contains(&h.rule) {
                fired.push(h.rule);
            }
            let blocks = policy.rules.get(h.rule).is_some_and(|r| r.action != Action::Log);
            if blocks && !policy.monitor {
                *blocking = Some(blocking.map_or(h.rule, |b| b.min(h.rule)));
            }
        }
    }
    let rule = policy.rules.get((*blocking)?)?;
    Some(render_message(rule.message.as_deref().unwrap_or(template), &rule.name))
}
