//! Thin proxy-wasm adapter. The root context refreshes the pool snapshot from the sidecar on a tick
//! (conditional GET; the answer is shared with the other workers through shared data); requests are
//! scored in memory, with no callout.
//!
//! Needs `allow_on_headers_stop_iteration: true` in the Wasm plugin config (Envoy >= 1.35): the
//! destination depends on the body, so request headers are held until the body has been read.

use crate::config::Config;
use crate::picker::{parse_priority, Decision, Picker, PickerConfig, Reason};
use crate::request::features;
use meshwarden_shared::callout::LogThrottle;
use meshwarden_shared::endpoints::PoolSnapshot;
use meshwarden_shared::errors::{ErrorFlavor, ErrorKind};
use meshwarden_shared::host::{clear_route_cache, load_config, log, now_ms, send_error, Metrics};
use meshwarden_shared::llm::Api;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

const FILTER: &str = "inference_router";
const P: &str = "meshwarden.inference_router";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

struct Shared {
    config: Config,
    picker: RefCell<Picker>,
    metrics: RefCell<Metrics>,
    /// Requests whose headers are held until their body arrives: context id -> since (ms).
    held: RefCell<HashMap<u32, u64>>,
    /// Set when a held request got no body callback in time: Envoy runs without
    /// `allow_on_headers_stop_iteration`, so from then on requests are decided in the headers callback.
    no_stop_iteration: Cell<bool>,
}

impl Default for Shared {
    fn default() -> Self {
        let config = Config::default();
        let picker = RefCell::new(Picker::new(PickerConfig::from(&config)));
        Self {
            config,
            picker,
            metrics: RefCell::new(Metrics::default()),
            held: RefCell::new(HashMap::new()),
            no_stop_iteration: Cell::new(false),
        }
    }
}

/// How long a request may wait for its first body callback before the root context releases it.
const HELD_LIMIT_MS: u64 = 500;

impl Shared {
    fn count(&self, name: &str, n: u64) {
        self.metrics.borrow_mut().counter_in(P, name, n);
    }
}

#[derive(Default)]
struct Root {
    shared: Rc<Shared>,
    /// Shared-data CAS last adopted.
    seen_cas: Option<u32>,
    /// The body of the snapshot this VM holds (re-published on `304`).
    body: Vec<u8>,
    version: Option<u64>,
    call_started_ms: Option<u64>,
    fail_log: Option<LogThrottle>,
}

fn inflight_key(pool: &str) -> String {
    format!("meshwarden.inference_router.inflight.{pool}")
}

/// Shared in-flight counts: `addr count` lines.
fn parse_inflight(data: &[u8]) -> HashMap<String, u32> {
    let text = std::str::from_utf8(data).unwrap_or("");
    text.lines()
        .filter_map(|l| {
            let (a, n) = l.rsplit_once(' ')?;
            Some((a.to_string(), n.parse().ok()?))
        })
        .collect()
}

fn read_inflight(pool: &str) -> HashMap<String, u32> {
    match hostcalls::get_shared_data(&inflight_key(pool)) {
        Ok((Some(d), _)) => parse_inflight(&d),
        _ => HashMap::new(),
    }
}

/// Add `delta` to `addr`'s shared in-flight count (compare-and-swap, a few retries; a lost update only
/// skews one count until the request completes).
fn adjust_inflight(pool: &str, addr: &str, delta: i64) {
    let key = inflight_key(pool);
    for _ in 0..8 {
        let (data, cas) = match hostcalls::get_shared_data(&key) {
            Ok((d, c)) => (d.unwrap_or_default(), c),
            Err(_) => return,
        };
        let mut m = parse_inflight(&data);
        let n = i64::from(m.get(addr).copied().unwrap_or(0)) + delta;
        if n > 0 {
            m.insert(addr.to_string(), u32::try_from(n).unwrap_or(u32::MAX));
        } else {
            m.remove(addr);
        }
        let text: String = m.iter().map(|(a, n)| format!("{a} {n}\n")).collect();
        match hostcalls::set_shared_data(&key, Some(text.as_bytes()), cas) {
            Ok(()) => return,
            Err(proxy_wasm::types::Status::CasMismatch) => continue,
            Err(_) => return,
        }
    }
}

fn key(pool: &str) -> String {
    format!("meshwarden.inference_router.snapshot.{pool}")
}

/// Shared-data value: confirmed_ms (8 bytes LE), version (8 bytes LE), snapshot JSON.
fn encode(confirmed_ms: u64, version: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + body.len());
    v.extend_from_slice(&confirmed_ms.to_le_bytes());
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(body);
    v
}

fn decode(v: &[u8]) -> Option<(u64, u64, &[u8])> {
    let c = u64::from_le_bytes(v.get(0..8)?.try_into().ok()?);
    let ver = u64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
    Some((c, ver, v.get(16..)?))
}

impl Root {
    /// Adopt what another worker (or this one) published. Returns the confirmation time.
    fn adopt_shared(&mut self) -> Option<u64> {
        let (data, cas) = self.get_shared_data(&key(&self.shared.config.pool));
        let data = data?;
        let (confirmed, version, body) = decode(&data)?;
        if cas.is_some() && cas == self.seen_cas {
            return Some(confirmed);
        }
        self.seen_cas = cas;
        if self.version == Some(version) {
            self.shared.picker.borrow_mut().update(None, confirmed);
        } else if let Ok(snap) = serde_json::from_slice::<PoolSnapshot>(body) {
            self.version = Some(version);
            self.body = body.to_vec();
            self.shared.picker.borrow_mut().update(Some(snap), confirmed);
        }
        Some(confirmed)
    }

    fn publish(&mut self, confirmed: u64) {
        let Some(version) = self.version else { return };
        let value = encode(confirmed, version, &self.body);
        if self.set_shared_data(&key(&self.shared.config.pool), Some(&value), None).is_ok() {
            // Our own write: adopt its CAS so the next tick does not re-parse it.
            let (_, cas) = self.get_shared_data(&key(&self.shared.config.pool));
            self.seen_cas = cas;
        }
    }

    fn failed(&mut self, why: &str) {
        self.shared.count(&format!("snapshot.failures.{why}"), 1);
        let now = now_ms();
        if let Some(t) = self.fail_log.as_mut() {
            if let Some(suppressed) = t.should_log(now) {
                log(
                    LogLevel::Warn,
                    &format!(
                        "meshwarden {FILTER}: snapshot refresh from sidecar cluster '{}' failed ({why}); routing on the last snapshot until it is older than {} ms, then falling back ({suppressed} similar suppressed)",
                        self.shared.config.sidecar.cluster, self.shared.config.max_snapshot_age_ms
                    ),
                );
            }
        }
    }
}

impl Root {
    /// Never stall: a request held in the headers callback whose body never reaches the filter (Envoy
    /// without `allow_on_headers_stop_iteration`) is resumed without a pick, and later requests are
    /// decided in the headers callback.
    fn release_stuck(&mut self, now: u64) {
        let stuck: Vec<u32> = self
            .shared
            .held
            .borrow()
            .iter()
            .filter(|(_, since)| now.saturating_sub(**since) > HELD_LIMIT_MS)
            .map(|(id, _)| *id)
            .collect();
        if stuck.is_empty() {
            return;
        }
        if !self.shared.no_stop_iteration.replace(true) {
            log(
                LogLevel::Error,
                &format!("meshwarden {FILTER}: request bodies do not reach the filter while headers are held; set `allow_on_headers_stop_iteration: true` in the Wasm plugin config (Envoy >= 1.35). Routing on headers only until then."),
            );
        }
        for id in stuck {
            self.shared.held.borrow_mut().remove(&id);
            self.shared.count("released_without_body", 1);
            if hostcalls::set_effective_context(id).is_ok() {
                let _ = hostcalls::resume_http_request();
            }
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, _token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        self.call_started_ms = None;
        let now = now_ms();
        let status = meshwarden_shared::host::callout_status(num_headers);
        match status {
            Some(200) => {
                let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
                match serde_json::from_slice::<PoolSnapshot>(&body) {
                    Ok(snap) => {
                        self.version = Some(snap.version);
                        self.body = body;
                        self.shared.picker.borrow_mut().update(Some(snap), now);
                        self.shared.count("snapshot.updates", 1);
                        self.publish(now);
                    }
                    Err(_) => self.failed("bad_body"),
                }
            }
            Some(304) => {
                self.shared.picker.borrow_mut().update(None, now);
                self.shared.count("snapshot.not_modified", 1);
                self.publish(now);
            }
            Some(404) => self.failed("unknown_pool"),
            Some(_) => self.failed("status"),
            None => self.failed("timeout"),
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        match load_config::<Config>(FILTER, self.get_plugin_configuration()) {
            Some(c) => {
                let picker = RefCell::new(Picker::new(PickerConfig::from(&c)));
                self.set_tick_period(Duration::from_millis(c.refresh_interval_ms));
                self.fail_log = Some(LogThrottle::new(60_000));
                self.shared = Rc::new(Shared {
                    config: c,
                    picker,
                    metrics: RefCell::new(Metrics::default()),
                    held: RefCell::new(HashMap::new()),
                    no_stop_iteration: Cell::new(false),
                });
                self.seen_cas = None;
                self.version = None;
                true
            }
            None => false,
        }
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        self.release_stuck(now);
        let confirmed = self.adopt_shared();
        let cfg = &self.shared.config;
        if let Some(age) = self.shared.picker.borrow().snapshot_age_ms(now) {
            self.shared.metrics.borrow_mut().gauge_set(&format!("{P}.snapshot.age_ms"), age);
        }
        // Another worker refreshed recently enough: nothing to do.
        if confirmed.is_some_and(|c| now.saturating_sub(c) < cfg.refresh_interval_ms) {
            return;
        }
        if self.call_started_ms.is_some_and(|s| now.saturating_sub(s) <= cfg.sidecar.timeout_ms + 50) {
            return;
        }
        let path = format!("/v1/pools/{}/endpoints", cfg.pool);
        let etag = self.version.map(|v| format!("\"{v}\"")).unwrap_or_default();
        let mut headers = vec![(":method", "GET"), (":path", path.as_str()), (":authority", cfg.sidecar.authority())];
        if !etag.is_empty() {
            headers.push(("if-none-match", etag.as_str()));
        }
        let cluster = cfg.sidecar.cluster.clone();
        let timeout = Duration::from_millis(cfg.sidecar.timeout_ms);
        match self.dispatch_http_call(&cluster, headers, None, vec![], timeout) {
            Ok(_) => self.call_started_ms = Some(now),
            Err(_) => self.failed("dispatch"),
        }
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            id,
            shared: self.shared.clone(),
            path: String::new(),
            priority: 0,
            decided: false,
            endpoint: None,
            body_len: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    id: u32,
    shared: Rc<Shared>,
    path: String,
    priority: i32,
    decided: bool,
    endpoint: Option<String>,
    body_len: usize,
}

impl Context for Request {}

impl Request {
    fn decide(&mut self, body: &[u8]) -> Action {
        self.decided = true;
        let cfg = &self.shared.config;
        let t0 = hostcalls::get_current_time().ok();
        let req = features(cfg, &self.path, body, self.priority);
        let decision = {
            let mut picker = self.shared.picker.borrow_mut();
            picker.set_global_inflight(read_inflight(&cfg.pool));
            picker.pick(&req, now_ms())
        };
        if let (Some(t0), Ok(t1)) = (t0, hostcalls::get_current_time()) {
            let us = t1.duration_since(t0).map_or(0, |d| d.as_micros() as u64);
            self.shared.metrics.borrow_mut().histogram_in(P, "decision_us", us);
        }
        match req.model.as_deref() {
            Some(m) if crate::request::is_header_value(m) => self.set_http_request_header(&cfg.model_header, Some(m)),
            Some(_) => self.shared.count("model_not_a_header_value", 1),
            None => {}
        }
        self.shared.count("blocks", req.blocks.len() as u64);
        match decision {
            Decision::Route { endpoint, reason, prefix_hit_blocks } => {
                self.set_http_request_header(&cfg.destination_header, Some(&endpoint));
                adjust_inflight(&cfg.pool, &endpoint, 1);
                self.shared.count(&format!("routed.{}", reason.as_str()), 1);
                self.shared.count("prefix_hit_blocks", prefix_hit_blocks as u64);
                self.endpoint = Some(endpoint);
            }
            Decision::Shed => {
                self.shared.count("shed", 1);
                let flavor = ErrorFlavor::for_api(Api::from_path(&self.path));
                send_error(
                    429,
                    flavor,
                    ErrorKind::RateLimit,
                    Some("pool_saturated"),
                    "Every model server is saturated and this request is sheddable; retry later.",
                    &[("retry-after", "1")],
                );
                return Action::Pause;
            }
            Decision::Passthrough(reason) => {
                self.shared.count(&format!("passthrough.{}", reason.as_str()), 1);
                if reason == Reason::NoSnapshot {
                    self.shared.count("no_snapshot", 1);
                }
            }
        }
        let _ = clear_route_cache();
        Action::Continue
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        self.shared.count("requests", 1);
        let cfg = &self.shared.config;
        // One host call for the six headers read here and the two removed (a single-header read or a
        // removal is a host call of ~0.5-1 µs in the VM; a removal is made only for a header present).
        let mut headers = meshwarden_shared::host::HeaderSnapshot::request();
        // A client must never choose the endpoint or the model header routes match on.
        headers.remove(&cfg.destination_header);
        headers.remove(&cfg.model_header);
        self.path = headers.get(":path").unwrap_or_default().to_string();
        self.priority = match headers.get(&cfg.priority_header) {
            None => cfg.default_priority,
            Some(v) => parse_priority(v).unwrap_or_else(|| {
                self.shared.count("bad_priority", 1);
                cfg.default_priority
            }),
        };
        let too_large = headers
            .get("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > cfg.max_body_bytes);
        // A WebSocket upgrade or CONNECT tunnel sends no body before its `101` (and then frames that never
        // end): routed on its headers at once. Before 2026-12-07 the headers were held for a body that could
        // not come, so the upgrade waited for the hold's timeout.
        let upgrade = !end_of_stream
            && meshwarden_shared::upgrade::is_upgrade_request(headers.get("upgrade"), headers.get(":method"));
        // gRPC: protobuf (no `model` to read), and a client or bidirectional stream does not end its body
        // while it waits for answers: routed on its headers at once (before 2026-12-07 the first message
        // was held for that end, and the stream hung).
        let grpc = !end_of_stream && headers.get("content-type").is_some_and(meshwarden_shared::binary::is_grpc);
        if end_of_stream || too_large || upgrade || grpc || self.shared.no_stop_iteration.get() {
            if too_large {
                self.shared.count("body_too_large", 1);
            }
            if upgrade {
                self.shared.count("upgrade", 1);
            }
            if grpc {
                self.shared.count("grpc", 1);
            }
            return self.decide(&[]);
        }
        self.shared.held.borrow_mut().insert(self.id, now_ms());
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let was_held = self.shared.held.borrow_mut().remove(&self.id).is_some();
        if self.decided {
            return Action::Continue;
        }
        if !was_held && self.shared.no_stop_iteration.get() {
            // Released by the root context: the headers are gone, nothing to route any more.
            self.decided = true;
            return Action::Continue;
        }
        self.body_len = body_size;
        if body_size as u64 > self.shared.config.max_body_bytes {
            self.shared.count("body_too_large", 1);
            return self.decide(&[]);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        self.decide(&body)
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        if self.decided {
            return Action::Continue;
        }
        let body = self.get_http_request_body(0, self.body_len).unwrap_or_default();
        self.decide(&body)
    }

    fn on_log(&mut self) {
        self.shared.held.borrow_mut().remove(&self.id);
        if let Some(e) = self.endpoint.take() {
            adjust_inflight(&self.shared.config.pool, &e, -1);
            self.shared.picker.borrow_mut().done(&e);
        }
    }
}
