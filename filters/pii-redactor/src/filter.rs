//! The thin proxy-wasm adapter: buffers the request body, runs the pure core, rewrites the body, then
//! restores (and optionally scans) the answer: JSON buffered, SSE, Bedrock event streams and other
//! bodies streamed chunk by chunk with only a possible placeholder prefix (and an unfinished frame) held
//! back.

use crate::config::{Config, Unscannable};
use crate::engine::{Counts, Engine};
use crate::eventstream::EventStreamRestore;
use crate::request::{process_request, Scanned};
use crate::restore::{RawStream, Restorer, SseRestore};
use meshwarden_shared::errors::{ErrorFlavor, ErrorKind};
use meshwarden_shared::host::{load_config, log, send_error, Metrics, VmTimed};
use meshwarden_shared::llm::Api;
use meshwarden_shared::sse::DEFAULT_MAX_EVENT_BYTES;
use meshwarden_shared::stats::CounterBatch;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

const FILTER: &str = "pii_redactor";
const P: &str = "meshwarden.pii_redactor";
/// Filter state keys (Envoy prefixes them with `wasm.`) for access logs: the request's findings and the
/// answer's (`scan_responses`), as `type=count` lists.
const STATE_FINDINGS: &str = "meshwarden.pii_redactor.findings";
const STATE_RESPONSE_FINDINGS: &str = "meshwarden.pii_redactor.response_findings";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    config: Rc<Config>,
    engine: Option<Rc<Engine>>,
    metrics: Rc<RefCell<Metrics>>,
    /// Every counter update of this worker's requests, summed here and handed to Envoy on the tick
    /// (`stats_flush_interval_ms`): a request makes no counter host call (histograms are recorded
    /// at once: each value counts).
    counters: Rc<RefCell<CounterBatch>>,
}

impl Context for Root {
    /// The plugin is going away: hand over what was counted since the last tick.
    fn on_done(&mut self) -> bool {
        Metrics::flush(&mut self.counters.borrow_mut());
        true
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        match load_config::<Config>(FILTER, self.get_plugin_configuration()) {
            Some(c) => {
                self.set_tick_period(Duration::from_millis(c.stats_flush_interval_ms.max(1)));
                self.engine = Some(Rc::new(Engine::new(&c)));
                self.config = Rc::new(c);
                true
            }
            None => false,
        }
    }

    fn on_tick(&mut self) {
        Metrics::flush(&mut self.counters.borrow_mut());
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let engine = match &self.engine {
            Some(e) => e.clone(),
            None => Rc::new(Engine::new(&self.config)),
        };
        Some(Box::new(Request {
            config: self.config.clone(),
            engine,
            metrics: self.metrics.clone(),
            counters: self.counters.clone(),
            path: String::new(),
            api: Api::Unknown,
            encoded: false,
            grpc: false,
            passthrough: false,
            counts: Counts::default(),
            restorer: None,
            mode: Mode::None,
            sse: SseRestore::with_max_event_bytes(
                usize::try_from(self.config.max_body_bytes).unwrap_or(usize::MAX).max(DEFAULT_MAX_EVENT_BYTES),
            ),
            raw: RawStream::default(),
            es: EventStreamRestore::default(),
            response_us: 0,
            body_size: 0,
            response_size: 0,
            body_done: false,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
    Json,
    Sse,
    Raw,
    /// Bedrock `application/vnd.amazon.eventstream`.
    EventStream,
}

struct Request {
    config: Rc<Config>,
    engine: Rc<Engine>,
    metrics: Rc<RefCell<Metrics>>,
    counters: Rc<RefCell<CounterBatch>>,
    path: String,
    api: Api,
    encoded: bool,
    /// A gRPC request: refusals are gRPC answers (`grpc-status`), which gRPC clients read.
    grpc: bool,
    /// Request body not scanned (fail-open on unscannable input).
    passthrough: bool,
    counts: Counts,
    restorer: Option<Restorer>,
    mode: Mode,
    sse: SseRestore,
    raw: RawStream,
    es: EventStreamRestore,
    /// Time spent restoring the answer, over all its chunks.
    response_us: u64,
    /// Request body bytes buffered so far.
    body_size: usize,
    /// JSON answer bytes buffered so far.
    response_size: usize,
    /// The request body was scanned (at `eos` or at the trailers).
    body_done: bool,
    context_id: u32,
    /// A masked Realtime session (`on_upgrade: mask`).
    realtime: Option<Box<crate::realtime::Session>>,
    /// Its upstream answered `101`: the bodies are frames.
    upgraded: bool,
    /// Client bytes held (before the `101`, or until a message is whole).
    client_held: usize,
}

/// Microseconds since the Unix epoch from the host clock (for the processing-time histograms).
fn now_us() -> u64 {
    proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_micros() as u64)
}

impl Request {
    fn count(&self, name: &str, n: u64) {
        let id = self.metrics.borrow_mut().counter_id_in(P, name);
        if let Some(id) = id {
            self.counters.borrow_mut().add(id, n);
        }
    }

    fn flavor(&self) -> ErrorFlavor {
        ErrorFlavor::for_api(self.api)
    }

    fn counts_header(&self) -> Vec<(&str, String)> {
        if self.config.counts_header.is_empty() || self.counts.is_empty() {
            return Vec::new();
        }
        vec![(self.config.counts_header.as_str(), self.counts.summary())]
    }

    /// Unscannable request body: reject (fail closed) or pass and count (fail open).
    fn unscannable(&mut self, status: u32, kind: ErrorKind, code: &str, why: &str) -> Action {
        self.count(&format!("unscannable.{code}"), 1);
        match self.config.on_unscannable {
            Unscannable::Reject if self.grpc => {
                // A trailers-only gRPC answer: HTTP 200 with `grpc-status` 7 (PERMISSION_DENIED); gRPC
                // clients report an HTTP 4xx only as an unknown transport failure.
                let message = format!("pii-redactor: {why}");
                self.send_http_response(
                    200,
                    vec![("content-type", "application/grpc"), ("grpc-status", "7"), ("grpc-message", &message)],
                    None,
                );
                Action::Pause
            }
            Unscannable::Reject => {
                send_error(status, self.flavor(), kind, Some(code), &format!("pii-redactor: {why}"), &[]);
                Action::Pause
            }
            Unscannable::Pass => {
                self.passthrough = true;
                Action::Continue
            }
        }
    }
}

impl Request {
    fn restore_chunk(&mut self, restorer: &mut Restorer, size: usize, eos: bool) -> Action {
        match self.mode {
            Mode::None => Action::Continue,
            Mode::Json => {
                if !eos {
                    if size as u64 > self.config.max_body_bytes {
                        // Too large to buffer: stream it as raw JSON text from here on.
                        self.mode = Mode::Raw;
                        self.raw.escape_json = true;
                        let chunk = self.get_http_response_body(0, size).unwrap_or_default();
                        let out = self.raw.feed(restorer, &chunk, false);
                        self.set_http_response_body(0, size, &out);
                        return Action::Continue;
                    }
                    self.response_size = size;
                    return Action::Pause;
                }
                let body = self.get_http_response_body(0, size).unwrap_or_default();
                if let Some(out) = restorer.rewrite_json_body(&body) {
                    self.set_http_response_body(0, size, &out);
                }
                Action::Continue
            }
            Mode::Sse | Mode::Raw | Mode::EventStream => {
                let chunk = self.get_http_response_body(0, size).unwrap_or_default();
                let out = match self.mode {
                    Mode::Sse => self.sse.feed(restorer, &chunk, eos),
                    Mode::EventStream => self.es.feed(restorer, &chunk, eos),
                    _ => self.raw.feed(restorer, &chunk, eos),
                };
                if out != chunk {
                    self.set_http_response_body(0, size, &out);
                }
                Action::Continue
            }
        }
    }
}

impl Context for Request {}

impl HttpContext for Request {
    meshwarden_shared::timed_http_callbacks!(
        request_headers,
        request_body,
        request_trailers,
        response_headers,
        response_body,
        response_trailers,
        request_done
    );
}

impl VmTimed for Request {
    fn add_vm_us(&self, section: &str, us: u64) {
        self.count(section, us);
    }
}

// The callbacks' work (the trait methods above only time it for `make bench-breakdown`).
impl Request {
    fn request_headers(&mut self, _n: usize, eos: bool) -> Action {
        self.count("requests", 1);
        // One host call for the five headers read here and the two removed (a single-header read is a
        // call of ~1 µs in the VM; five of them cost ~3 µs more per request than this snapshot).
        let mut headers = meshwarden_shared::host::HeaderSnapshot::request();
        self.path = headers.get(":path").unwrap_or_default().to_string();
        self.api = Api::from_path(&self.path);
        if eos {
            return Action::Continue;
        }
        // A WebSocket upgrade or CONNECT tunnel: its frames reach this filter as a request body that never
        // ends, which the scan would wait for (the session hung after its `101`), and they cannot be
        // scanned: refused, or passed unscanned, as `on_unscannable` says.
        let method = headers.get(":method");
        if meshwarden_shared::upgrade::is_upgrade_request(headers.get("upgrade"), method) {
            let realtime = meshwarden_shared::realtime::is_realtime_path(&self.path)
                && method.is_some_and(|m| m.eq_ignore_ascii_case("GET"));
            if realtime && self.config.on_upgrade == crate::config::UpgradeMode::Mask {
                self.count("realtime.sessions", 1);
                // A compressed message (permessage-deflate) could not be scanned: the offer is withdrawn.
                self.set_http_request_header("sec-websocket-extensions", None);
                let mask = (now_us() ^ u64::from(self.context_id).rotate_left(32)).to_le_bytes();
                self.realtime = Some(Box::new(crate::realtime::Session::new(
                    self.config.restore,
                    [mask[0], mask[1], mask[2], mask[3]],
                )));
                return Action::Continue;
            }
            return self.unscannable(
                403,
                ErrorKind::PermissionDenied,
                "upgrade_refused",
                "WebSocket and other upgraded connections cannot be scanned for sensitive data, so this gateway \
                 refuses them (on_unscannable: reject)",
            );
        }
        // gRPC and other length-framed binary bodies: a byte scan cannot read protobuf fields, and a masked
        // value would leave every length prefix around it wrong (the upstream then fails to parse the
        // message); a gRPC stream also never ends its body while it waits for answers. Before 2026-12-07
        // such a body was scanned as raw bytes, rewritten (corrupted) when a value was found, and held to
        // its end.
        let ctype = headers.get("content-type").unwrap_or_default();
        if meshwarden_shared::binary::is_length_framed(ctype) {
            self.grpc = meshwarden_shared::binary::is_grpc(ctype);
            return self.unscannable(
                415,
                ErrorKind::InvalidRequest,
                "binary_body",
                "gRPC and other binary (protobuf, MessagePack, CBOR) request bodies cannot be scanned for \
                 sensitive data, so this gateway refuses them (on_unscannable: reject)",
            );
        }
        let enc = headers.get("content-encoding").unwrap_or_default();
        self.encoded = !enc.is_empty() && !enc.eq_ignore_ascii_case("identity");
        // The body may be rewritten: its length is not known yet.
        headers.remove("content-length");
        // The answer must come back uncompressed to be restored or scanned.
        if self.config.restore || self.config.scan_responses {
            headers.remove("accept-encoding");
        }
        Action::Continue
    }

    fn request_body(&mut self, size: usize, eos: bool) -> Action {
        if self.realtime.is_some() {
            return self.realtime_client(size);
        }
        if self.passthrough || self.body_done {
            return Action::Continue;
        }
        if self.encoded {
            return self.unscannable(
                415,
                ErrorKind::InvalidRequest,
                "encoded_body",
                "compressed request bodies cannot be scanned for sensitive data; send it uncompressed",
            );
        }
        if size as u64 > self.config.max_body_bytes {
            return self.unscannable(
                413,
                ErrorKind::RequestTooLarge,
                "body_too_large",
                &format!("request body over {} bytes cannot be scanned", self.config.max_body_bytes),
            );
        }
        self.body_size = size;
        if !eos {
            return Action::Pause;
        }
        self.scan_request_body()
    }

    fn request_trailers(&mut self, _n: usize) -> Action {
        // A body followed by trailers never reaches `eos` in the body callback: it ends here, and is
        // scanned here (else the buffered body would go upstream unscanned).
        if self.passthrough || self.body_done {
            return Action::Continue;
        }
        self.scan_request_body()
    }

    /// The client's bytes of a masked Realtime session, held since they last passed.
    fn realtime_client(&mut self, size: usize) -> Action {
        self.client_held = size;
        if !self.upgraded {
            // Frames sent before the `101` wait for it (they are masked then).
            return Action::Pause;
        }
        let held = self.get_http_request_body(0, size).unwrap_or_default();
        let max = usize::try_from(self.config.max_body_bytes).unwrap_or(usize::MAX);
        let engine = self.engine.clone();
        let Some(rt) = self.realtime.as_mut() else {
            return Action::Continue;
        };
        let step = rt.client(&engine, &held, max);
        self.realtime_apply(step, size, true)
    }

    fn realtime_server(&mut self, size: usize) -> Action {
        let held = self.get_http_response_body(0, size).unwrap_or_default();
        let max = usize::try_from(self.config.max_body_bytes).unwrap_or(usize::MAX);
        let Some(rt) = self.realtime.as_mut() else {
            return Action::Continue;
        };
        let step = rt.server(&held, max);
        self.realtime_apply(step, size, false)
    }

    fn realtime_apply(&mut self, step: crate::realtime::Step, size: usize, client: bool) -> Action {
        use crate::realtime::Step;
        match step {
            Step::Hold => return Action::Pause,
            Step::Pass => {}
            Step::Rewrite(out) if client => self.set_http_request_body(0, size, &out),
            Step::Rewrite(out) => self.set_http_response_body(0, size, &out),
            Step::Reset(e) => {
                let side = if client { "client" } else { "server" };
                self.count(&format!("realtime.broken_frames.{side}"), 1);
                log(
                    LogLevel::Warn,
                    &format!("meshwarden pii_redactor: a Realtime session's {side} frames are not WebSocket framing ({}); reset", e.as_str()),
                );
                let _ = proxy_wasm::hostcalls::reset_http_response();
                let _ = proxy_wasm::hostcalls::reset_http_request();
                return Action::Pause;
            }
        }
        if client {
            self.client_held = 0;
        }
        Action::Continue
    }

    /// A Realtime session's findings and restores, counted when it ends.
    fn realtime_stats(&self, rt: &crate::realtime::Session) {
        for ((name, action), n) in &rt.mask.counts.0 {
            self.count(&format!("findings.{name}.{}", action.name()), *n);
        }
        self.count("realtime.messages_scanned", rt.scanned);
        if rt.restored() > 0 {
            self.count("restored", rt.restored());
        }
        match &rt.ending {
            Some(crate::realtime::Ending::Rejected(_)) => self.count("realtime.ended_rejected", 1),
            Some(crate::realtime::Ending::Unscannable(what)) => {
                self.count(&format!("realtime.ended_unscannable.{what}"), 1)
            }
            None => {}
        }
    }

    /// Scan and rewrite the whole buffered request body (at its end: `eos`, or the trailers), once.
    fn scan_request_body(&mut self) -> Action {
        self.body_done = true;
        let size = self.body_size;
        let started = now_us();
        let body = self.get_http_request_body(0, size).unwrap_or_default();
        let result = process_request(&self.engine, &self.path, &body, self.config.raw_fallback);
        self.api = result.api;
        if let (Scanned::Refused, Some(problem)) = (result.scanned, &result.problem) {
            let why = format!("the request body cannot be scanned reliably: {problem}");
            return self.unscannable(400, ErrorKind::InvalidRequest, problem.code(), &why);
        }
        if result.encoded_texts > 0 {
            self.count("encoded_texts_scanned", result.encoded_texts as u64);
        }
        if result.state.base64_runs_masked > 0 {
            self.count("base64_in_text_masked", result.state.base64_runs_masked);
        }
        match result.scanned {
            Scanned::Raw => self.count("scanned_raw", 1),
            Scanned::Skipped => self.count("not_scanned", 1),
            _ => {}
        }
        let mut result = result;
        self.counts = std::mem::take(&mut result.state.counts);
        for ((name, action), n) in &self.counts.0 {
            self.count(&format!("findings.{name}.{}", action.name()), *n);
        }
        if !self.counts.is_empty() {
            self.count("requests_with_findings", 1);
            self.set_property(vec![STATE_FINDINGS], Some(self.counts.summary().as_bytes()));
        }
        if !result.state.rejected.is_empty() {
            self.count("rejected", 1);
            let types = result.state.rejected.join(", ");
            let header = self.counts_header();
            let extra: Vec<(&str, &str)> = header.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send_error(
                400,
                self.flavor(),
                ErrorKind::InvalidRequest,
                Some("sensitive_data_rejected"),
                &format!("the request contains sensitive data that may not be sent to the model: {types}"),
                &extra,
            );
            return Action::Pause;
        }
        if let Some(new_body) = &result.body {
            self.set_http_request_body(0, size, new_body);
            self.count("requests_rewritten", 1);
        }
        let map: HashMap<String, String> = if self.config.restore { result.state.restore } else { HashMap::new() };
        let scan = self.config.scan_responses.then(|| self.engine.clone());
        let restorer = Restorer::new(map, scan);
        if !restorer.is_noop() {
            self.restorer = Some(restorer);
        }
        self.metrics.borrow_mut().histogram_in(P, "request_processing_us", now_us().saturating_sub(started));
        Action::Continue
    }

    fn response_headers(&mut self, _n: usize, eos: bool) -> Action {
        if self.realtime.is_some() {
            self.upgraded = meshwarden_shared::host::response_header(":status").as_deref() == Some("101");
            if !self.upgraded {
                // The upstream refused the upgrade: an HTTP answer, nothing to mask or restore.
                self.realtime = None;
            }
            if self.client_held > 0
                && (self.realtime.is_none() || self.realtime_client(self.client_held) == Action::Continue)
            {
                self.resume_http_request();
            }
            return Action::Continue;
        }
        if !self.config.counts_header.is_empty() {
            // Ours alone: set from this request's findings, any other copy (an upstream's) removed.
            let value = self.counts.header_value();
            let name = self.config.counts_header.clone();
            self.set_http_response_header(&name, value.as_deref());
        }
        if self.restorer.is_none() || eos {
            return Action::Continue;
        }
        let enc = meshwarden_shared::host::response_header("content-encoding").unwrap_or_default();
        if !enc.is_empty() && !enc.eq_ignore_ascii_case("identity") {
            // Placeholders reach the client unrestored (never the reverse: nothing leaks).
            self.count("response_not_restored_encoded", 1);
            log(LogLevel::Warn, "meshwarden pii_redactor: compressed answer, placeholders not restored");
            self.restorer = None;
            return Action::Continue;
        }
        let ct = meshwarden_shared::host::response_header("content-type").unwrap_or_default().to_ascii_lowercase();
        if meshwarden_shared::binary::is_opaque_answer(&ct) {
            // Audio, images, files, protobuf: no text to restore into or scan, and a byte rewrite would
            // corrupt them (before 2026-12-07 `scan_responses` scanned them as raw text).
            self.count("response_opaque_passed", 1);
            self.restorer = None;
            return Action::Continue;
        }
        // Only a successful answer is parsed as SSE; anything else labelled so is restored as raw bytes,
        // so a mislabelled error body is never swallowed by the event parser.
        let ok = meshwarden_shared::host::response_header(":status").is_some_and(|st| st.starts_with('2'));
        self.mode = if ct.starts_with("application/vnd.amazon.eventstream") {
            // Bedrock streams: binary frames with length prefixes and CRCs, decoded, restored and
            // re-encoded frame by frame (any status: bytes that are not valid frames pass unchanged).
            Mode::EventStream
        } else if ct.starts_with("text/event-stream") && ok {
            Mode::Sse
        } else if ct.contains("json") {
            Mode::Json
        } else {
            Mode::Raw
        };
        self.set_http_response_header("content-length", None);
        Action::Continue
    }

    fn response_body(&mut self, size: usize, eos: bool) -> Action {
        if self.realtime.is_some() && self.upgraded {
            return self.realtime_server(size);
        }
        let Some(mut restorer) = self.restorer.take() else {
            return Action::Continue;
        };
        let started = now_us();
        let action = self.restore_chunk(&mut restorer, size, eos);
        if eos {
            self.export_response_findings(&restorer);
        }
        self.restorer = Some(restorer);
        self.response_us += now_us().saturating_sub(started);
        action
    }

    /// The answer's findings (`scan_responses`) as filter state for the access log, set before the
    /// stream ends: `%FILTER_STATE(wasm.meshwarden.pii_redactor.response_findings:PLAIN)%`. The counts
    /// header cannot carry them: it leaves with the response headers, before the body is scanned.
    fn export_response_findings(&self, restorer: &Restorer) {
        if !restorer.response_counts.is_empty() {
            let summary = restorer.response_counts.summary();
            self.set_property(vec![STATE_RESPONSE_FINDINGS], Some(summary.as_bytes()));
        }
    }

    fn response_trailers(&mut self, _n: usize) -> Action {
        // A JSON answer followed by trailers never reaches `eos` in the body callback: restore (and scan)
        // it here, else the buffered answer would reach the client unrestored (and unscanned). Streams
        // have been passed on chunk by chunk already.
        if self.mode != Mode::Json {
            return Action::Continue;
        }
        let Some(mut restorer) = self.restorer.take() else {
            return Action::Continue;
        };
        let started = now_us();
        let action = self.restore_chunk(&mut restorer, self.response_size, true);
        self.export_response_findings(&restorer);
        self.restorer = Some(restorer);
        self.response_us += now_us().saturating_sub(started);
        action
    }

    fn request_done(&mut self) {
        if let Some(rt) = self.realtime.take() {
            self.realtime_stats(&rt);
        }
        if let Some(r) = &self.restorer {
            if self.mode != Mode::None {
                self.metrics.borrow_mut().histogram_in(P, "response_processing_us", self.response_us);
            }
            if r.restored > 0 {
                self.count("restored", r.restored);
            }
            for ((name, action), n) in &r.response_counts.0 {
                self.count(&format!("response_findings.{name}.{}", action.name()), *n);
            }
            if self.es.broken.is_some() {
                self.count("response_eventstream_broken", 1);
            }
            if self.sse.rw.oversized_events() > 0 {
                self.count("response_oversized_events", self.sse.rw.oversized_events());
            }
        }
    }
}
