//! The thin proxy-wasm adapter: reads headers/body/properties, keeps `local` state in Envoy shared data
//! (compare-and-swap across worker threads) or calls the sidecar, answers 429s, meters responses and
//! settles every admitted request exactly once in `on_log`.

use crate::config::{Config, KeySource, OnUpgrade, StateMode, UnknownModel};
use crate::context_memory::{self, ContextRef};
use crate::keys::{claim_value, spiffe_part, unverified_jwt_claim};
use crate::limiter::{settle_deltas, Admission, Denial, Facts, Outcome, Plan};
use crate::meter::Meter;
use crate::request::{
    adds_stream_usage, multipart_boundary, parse_request, parsed_multipart, read_multipart, rewrite_body,
    size_estimate, BadBody, Parsed,
};
use crate::usage_chunk::UsageChunkHider;
use meshwarden_shared::callout::{CalloutFailure, FailureMode, LogThrottle};
use meshwarden_shared::errors::{openai_reset_duration, retry_after_seconds, ErrorFlavor, ErrorKind};
use meshwarden_shared::host::{
    callout_response, dispatch, load_config, log, send_error, timed, HeaderSnapshot, Metrics, VmTimed,
};
use meshwarden_shared::llm::Api;
use meshwarden_shared::ratelimit::{
    reserve, reserve_all, rollback_item, settle, DenyReason, Group, GroupResult, GroupStore, ReserveRequest,
    ReserveResponse, SettleItem, SettleRequest, WindowSpec, WindowState,
};
use meshwarden_shared::stats::{BoundedLabels, CounterBatch};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, Status};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

const FILTER: &str = "token_limiter";
const P: &str = "meshwarden.token_limiter";
const LOCK_KEY: &str = "meshwarden.tl.lock";
const FAILURE_LOG_INTERVAL_MS: u64 = 60_000;
/// Where Envoy's `jwt_authn` filter writes verified payloads (`payload_in_metadata`).
const JWT_AUTHN_NAMESPACE: &str = "envoy.filters.http.jwt_authn";
/// How many times a concurrency lease release (or a settlement with an id) is sent before it is given
/// up: the sidecar's lease expiry (`lease_ms`) then frees the slot, and the reservation stays charged.
const RELEASE_ATTEMPTS: u8 = 4;
/// Bound on releases and settlements waiting to be (re)sent per VM: past it a slot is left to expire
/// (`lease_ms`) and a reservation stays as it was charged.
const MAX_LATE_RELEASES: usize = 10_000;

/// A settle call in flight.
struct SettleCall {
    releases: Vec<LateRelease>,
    /// Made from a request's callback: the SDK hands its answer to that request context, which is
    /// usually gone by then, so the answer is never seen. Past `unseen_after_ms` its releases are sent
    /// once more from the root (releasing a lease twice is harmless; leaving one held blocks the slot
    /// for `lease_ms`).
    unseen_after_ms: Option<u64>,
}

/// A lease release, or a settlement with an id (both safe to resend: the sidecar applies an id once),
/// sent at a tick no earlier than `due_ms`, the `attempts`th time.
struct LateRelease {
    due_ms: u64,
    attempts: u8,
    item: SettleItem,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root::new(id)) });
}}

/// Metric ids of the stats every admitted request updates whose names are built from a rule, a model or
/// the usage source: looked up once per name, so the request path neither formats nor hashes a name.
#[derive(Default)]
struct HotStats {
    /// By rule index: `rule.<name>.charged_tokens`.
    charged: Vec<Option<u32>>,
    /// By model as requested (at most `MAX_HOT_MODELS`; others take the slow path):
    /// `model.<label>.input_tokens`, `model.<label>.output_tokens`.
    models: Vec<(String, Option<u32>, Option<u32>)>,
    /// `usage.reported`, `usage.partial`, `usage.estimated`.
    usage: [Option<u32>; 3],
    /// By [`Hot`]: the fixed names every request updates.
    fixed: [Option<u32>; 4],
}

/// The stats with fixed names that every request updates, by their slot in [`HotStats::fixed`].
#[derive(Clone, Copy)]
enum Hot {
    Requests,
    Admitted,
    InputTokens,
    OutputTokens,
}

impl Hot {
    fn name(self) -> &'static str {
        match self {
            Hot::Requests => "requests",
            Hot::Admitted => "admitted",
            Hot::InputTokens => "input_tokens",
            Hot::OutputTokens => "output_tokens",
        }
    }
}

const MAX_HOT_MODELS: usize = 64;

/// The counter id in `slot`, defined as `<prefix>.<name()>` and remembered on first use.
fn cached_id(metrics: &RefCell<Metrics>, slot: &mut Option<u32>, name: impl FnOnce() -> String) -> Option<u32> {
    if slot.is_none() {
        *slot = metrics.borrow_mut().counter_id_in(P, &name());
    }
    *slot
}

/// State shared by a worker's root context and its requests.
struct Shared {
    config: Rc<Config>,
    metrics: RefCell<Metrics>,
    /// Every counter update, summed here and handed to Envoy on the root's tick
    /// (`stats_flush_interval_ms`): a request makes no stat host call.
    counters: RefCell<CounterBatch>,
    hot: RefCell<HotStats>,
    models: RefCell<BoundedLabels>,
    settle_queue: RefCell<Vec<SettleItem>>,
    /// Lease releases sent later: one that could overtake its own reserve call (the reserve's answer
    /// never came), or one whose settle call failed (retried: a lost release holds a slot for `lease_ms`).
    late_releases: RefCell<Vec<LateRelease>>,
    /// Settle calls in flight by token, with the lease releases they carry (resent if the call fails).
    settle_calls: RefCell<std::collections::HashMap<u32, SettleCall>>,
    /// The root replaced this state (reconfigured): requests still holding it send their settlements
    /// at once, since no tick flushes it any more.
    retired: Cell<bool>,
    /// Every rule's state tag and windows (`local` state keeps only these windows of its rules).
    rule_windows: Vec<(u64, Vec<WindowSpec>)>,
    failure_log: RefCell<LogThrottle>,
    lease_seq: Cell<u64>,
    seed: u64,
    /// The worker's root context (settlements are dispatched on its behalf).
    root_context_id: Cell<u32>,
    /// `Bearer <sidecar_token>`, sent on every sidecar call.
    sidecar_authorization: Option<String>,
}

impl Shared {
    fn count(&self, name: &str, n: u64) {
        let id = self.metrics.borrow_mut().counter_id_in(P, name);
        if let Some(id) = id {
            self.counters.borrow_mut().add(id, n);
        }
    }

    /// One of the fixed-name stats every request updates (see [`HotStats`]).
    fn count_hot(&self, stat: Hot, n: u64) {
        if let Some(slot) = self.hot.borrow_mut().fixed.get_mut(stat as usize) {
            if let Some(id) = cached_id(&self.metrics, slot, || stat.name().to_string()) {
                self.counters.borrow_mut().add(id, n);
            }
        }
    }

    /// The stats of one settled request (see [`HotStats`]).
    fn count_usage(&self, source: crate::meter::Source, model: &str, input: u64, output: u64) {
        let mut hot = self.hot.borrow_mut();
        let slot = match source {
            crate::meter::Source::Reported => 0,
            crate::meter::Source::Partial => 1,
            crate::meter::Source::Estimated => 2,
        };
        if let Some(slot) = hot.usage.get_mut(slot) {
            if let Some(id) = cached_id(&self.metrics, slot, || format!("usage.{}", source.as_str())) {
                self.counters.borrow_mut().add(id, 1);
            }
        }
        let (input_id, output_id) = match hot.models.iter().find(|(m, _, _)| m == model) {
            Some((_, i, o)) => (*i, *o),
            None => {
                let label = self.models.borrow_mut().label(model);
                let mut metrics = self.metrics.borrow_mut();
                let i = metrics.counter_id_in(P, &format!("model.{label}.input_tokens"));
                let o = metrics.counter_id_in(P, &format!("model.{label}.output_tokens"));
                // (Only names a model could have: a client's huge `model` is not kept for the worker's life.)
                if hot.models.len() < MAX_HOT_MODELS && model.len() <= meshwarden_shared::stats::MAX_REMEMBERED_BYTES {
                    hot.models.push((model.to_string(), i, o));
                }
                (i, o)
            }
        };
        let mut counters = self.counters.borrow_mut();
        for (id, n) in [(input_id, input), (output_id, output)] {
            if let Some(id) = id {
                counters.add(id, n);
            }
        }
    }

    /// `rule.<name>.charged_tokens` by rule index (see [`HotStats`]).
    fn count_charged(&self, rule_index: usize, rule_name: &str, n: u64) {
        let mut hot = self.hot.borrow_mut();
        if hot.charged.len() <= rule_index {
            hot.charged.resize(rule_index + 1, None);
        }
        if let Some(slot) = hot.charged.get_mut(rule_index) {
            if let Some(id) = cached_id(&self.metrics, slot, || format!("rule.{rule_name}.charged_tokens")) {
                self.counters.borrow_mut().add(id, n);
            }
        }
    }

    fn callout_failed(&self, what: &str, f: CalloutFailure) {
        self.count(&format!("callout_failures.{}", f.as_str()), 1);
        self.count("callout_failures", 1);
        if let Some(suppressed) = self.failure_log.borrow_mut().should_log(now_ms()) {
            log(
                LogLevel::Warn,
                &format!(
                    "meshwarden {FILTER}: sidecar {what} failed ({}{}); {suppressed} more failures since the last line",
                    f.as_str(),
                    match f {
                        CalloutFailure::Status(s) => format!(" {s}"),
                        _ => String::new(),
                    }
                ),
            );
        }
    }
}

impl Shared {
    /// Hand the summed counter updates to Envoy.
    fn flush_counters(&self) {
        Metrics::flush(&mut self.counters.borrow_mut());
    }

    /// Send the queued settlements, and the lease releases that are due (all of them when `all_late`),
    /// to the sidecar in bounded batches; returns the calls dispatched. Callable from a request's
    /// `on_log` too (`from_request`): the calls are made on behalf of the root context, so Envoy keeps
    /// them after the request context is gone, but the SDK hands their answers to that (gone) request
    /// context: see [`SettleCall::unseen_after_ms`].
    fn flush_settlements(&self, all_late: bool, from_request: bool) -> usize {
        let mut items: Vec<(SettleItem, u8)> =
            std::mem::take(&mut *self.settle_queue.borrow_mut()).into_iter().map(|it| (it, 0)).collect();
        {
            let now = now_ms();
            let mut late = self.late_releases.borrow_mut();
            let (due, waiting): (Vec<LateRelease>, Vec<LateRelease>) =
                std::mem::take(&mut *late).into_iter().partition(|l| all_late || l.due_ms <= now);
            *late = waiting;
            items.extend(due.into_iter().map(|l| (l.item, l.attempts)));
        }
        let Some(cfg) = self.config.sidecar.as_ref().filter(|_| !items.is_empty()) else {
            return 0;
        };
        let _ = hostcalls::set_effective_context(self.root_context_id.get());
        let mut dispatched = 0;
        for chunk in items.chunks(meshwarden_shared::ratelimit::MAX_ITEMS) {
            let releases: Vec<LateRelease> = chunk
                .iter()
                .filter(|(it, _)| it.release_lease.is_some() || (it.delta != 0 && it.id.is_some()))
                .map(|(it, attempts)| LateRelease { due_ms: 0, attempts: attempts + 1, item: resendable(it) })
                .collect();
            let req = SettleRequest { items: chunk.iter().map(|(it, _)| it.clone()).collect() };
            let auth = self.sidecar_authorization.as_deref().map(|a| [("authorization", a)]);
            let sent = serde_json::to_vec(&req).map_err(|_| CalloutFailure::BadBody).and_then(|body| {
                dispatch(cfg, "POST", "/v1/ratelimit/settle", auth.as_ref().map_or(&[][..], |a| &a[..]), Some(&body))
            });
            match sent {
                Ok(token) => {
                    let unseen_after_ms =
                        from_request.then(|| now_ms().saturating_add(cfg.timeout_ms).saturating_add(100));
                    self.settle_calls.borrow_mut().insert(token, SettleCall { releases, unseen_after_ms });
                    dispatched += 1;
                }
                Err(f) => {
                    self.count("settle_failures", 1);
                    self.callout_failed("settle", f);
                    self.release_later(releases, self.config.settle_interval_ms);
                }
            }
        }
        dispatched
    }

    /// Queue lease releases to be sent `delay_ms` from now, unless they were tried enough.
    fn release_later(&self, releases: Vec<LateRelease>, delay_ms: u64) {
        let due_ms = now_ms().saturating_add(delay_ms);
        let mut late = self.late_releases.borrow_mut();
        for mut r in releases {
            if r.attempts >= RELEASE_ATTEMPTS || late.len() >= MAX_LATE_RELEASES {
                if r.item.release_lease.is_some() {
                    self.count("lease_releases_abandoned", 1);
                }
                if r.item.delta != 0 {
                    self.count("settlements_abandoned", 1);
                }
                continue;
            }
            r.due_ms = due_ms;
            late.push(r);
        }
    }

    /// A settle call answered: resend its lease releases if it failed. False if `token` is not a
    /// settle call.
    fn settle_answered(&self, token: u32, result: Result<(), CalloutFailure>) -> bool {
        let Some(call) = self.settle_calls.borrow_mut().remove(&token) else {
            return false;
        };
        if let Err(f) = result {
            self.count("settle_failures", 1);
            self.callout_failed("settle", f);
            self.release_later(call.releases, self.config.settle_interval_ms);
        }
        true
    }

    /// Settle calls made from requests whose answer was not seen in time (or at all: `all`): their
    /// lease releases are queued to be sent again from the root.
    fn resend_unseen_releases(&self, all: bool) {
        let now = now_ms();
        let mut calls = self.settle_calls.borrow_mut();
        let unseen: Vec<u32> =
            calls.iter().filter(|(_, c)| c.unseen_after_ms.is_some_and(|t| all || t <= now)).map(|(t, _)| *t).collect();
        let releases: Vec<LateRelease> =
            unseen.iter().filter_map(|t| calls.remove(t)).flat_map(|c| c.releases).collect();
        drop(calls);
        if !releases.is_empty() {
            self.release_later(releases, 0);
        }
    }
}

/// How long the sidecar must remember a settlement's id: past every resend of it (a first call and up to
/// [`RELEASE_ATTEMPTS`] resends, each after a timeout and a tick, the first perhaps from a request whose
/// answer is never seen), doubled. With the defaults (50 ms timeout, 20 ms ticks) under 3 s, so the
/// sidecar holds few ids; at the configuration maxima about 10 minutes.
fn settle_id_ttl_ms(cfg: &Config) -> u64 {
    let timeout = cfg.sidecar.as_ref().map_or(0, |s| s.timeout_ms);
    let one_attempt = timeout.saturating_add(cfg.settle_interval_ms).saturating_add(200);
    one_attempt.saturating_mul(u64::from(RELEASE_ATTEMPTS) + 1).saturating_mul(2)
}

/// What of a settlement may be sent again: all of it when it has an id (the sidecar applies the id's
/// delta once), else only its lease release (idempotent; the token delta is not).
fn resendable(it: &SettleItem) -> SettleItem {
    match &it.id {
        Some(_) => it.clone(),
        None => SettleItem {
            key: it.key.clone(),
            windows: Vec::new(),
            delta: 0,
            release_lease: it.release_lease.clone(),
            id: None,
            id_ttl_ms: None,
        },
    }
}

fn now_us() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn now_ms() -> u64 {
    now_us() / 1000
}

struct Root {
    id: u32,
    shared: Rc<Shared>,
    /// `on_done` was called and waits for settle calls in flight before the host may drop this root.
    closing: bool,
    /// Sidecar mode: settlements are sent every this many ticks (the tick is the shorter of the two
    /// intervals, so counters and settlements each keep their own period).
    settle_every_ticks: u64,
    ticks: u64,
}

impl Root {
    fn new(id: u32) -> Self {
        let seed = crate::limiter::lease_seed(now_us(), id);
        Root {
            id,
            shared: Rc::new(Shared {
                config: Rc::new(Config::default()),
                metrics: RefCell::new(Metrics::default()),
                counters: RefCell::new(CounterBatch::default()),
                hot: RefCell::new(HotStats::default()),
                models: RefCell::new(BoundedLabels::new(32)),
                settle_queue: RefCell::new(Vec::new()),
                late_releases: RefCell::new(Vec::new()),
                settle_calls: RefCell::new(Default::default()),
                retired: Cell::new(false),
                rule_windows: Vec::new(),
                failure_log: RefCell::new(LogThrottle::new(FAILURE_LOG_INTERVAL_MS)),
                lease_seq: Cell::new(0),
                seed,
                root_context_id: Cell::new(id),
                sidecar_authorization: None,
            }),
            closing: false,
            settle_every_ticks: 1,
            ticks: 0,
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        let _ = self.shared.settle_answered(token, callout_response(num_headers, body_size).map(|_| ()));
        if self.closing && self.shared.settle_calls.borrow().is_empty() {
            self.shared.flush_counters();
            let _ = hostcalls::done();
        }
    }
    /// The plugin is going away (configuration change, shutdown): hand over what was counted since
    /// the last tick, send every queued settlement and lease release, and stay until their calls
    /// answer (a settlement lost here would leave budgets charged and slots held for `lease_ms`).
    fn on_done(&mut self) -> bool {
        // Requests still in flight (the host drops this root while they finish, e.g. an Istio
        // WasmPlugin update) must send their settlements themselves: no tick will flush them.
        self.shared.retired.set(true);
        self.shared.resend_unseen_releases(true);
        self.shared.flush_settlements(true, false);
        self.shared.flush_counters();
        if self.shared.settle_calls.borrow().is_empty() {
            return true;
        }
        self.closing = true;
        false
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        // The creation lock must exist before traffic; every worker's VM starts before listeners serve.
        if let Ok((None, _)) = hostcalls::get_shared_data(LOCK_KEY) {
            let _ = hostcalls::set_shared_data(LOCK_KEY, Some(&[0]), None);
        }
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = load_config::<Config>(FILTER, self.get_plugin_configuration()) else {
            return false;
        };
        let mut models = BoundedLabels::new(32);
        models.preload(config.rules.iter().filter_map(|r| r.model.as_deref()).filter(|m| !m.contains(['*', '?'])));
        models.preload(config.rules.iter().filter_map(|r| r.fallback_model.as_deref()));
        let tick_ms = match config.state {
            StateMode::Sidecar => config.settle_interval_ms.min(config.stats_flush_interval_ms),
            StateMode::Local => config.stats_flush_interval_ms,
        }
        .max(1);
        self.settle_every_ticks = config.settle_interval_ms.div_ceil(tick_ms).max(1);
        self.set_tick_period(Duration::from_millis(tick_ms));
        // What the previous configuration's requests counted and settled is not lost with it; its
        // requests still in flight settle at once (see `Shared::retired`).
        self.shared.resend_unseen_releases(true);
        self.shared.flush_settlements(true, false);
        self.shared.flush_counters();
        self.shared.retired.set(true);
        let in_flight = std::mem::take(&mut *self.shared.settle_calls.borrow_mut());
        let rule_windows = config.rules.iter().map(|r| (crate::state::rule_tag(&r.name), r.limits.windows())).collect();
        let sidecar_authorization = match config.sidecar_authorization(|name| std::env::var(name).ok()) {
            Ok(a) => a,
            Err(err) => {
                log(LogLevel::Critical, &format!("meshwarden {FILTER}: {err}"));
                return false;
            }
        };
        self.shared = Rc::new(Shared {
            config: Rc::new(config),
            metrics: RefCell::new(Metrics::default()),
            counters: RefCell::new(CounterBatch::default()),
            hot: RefCell::new(HotStats::default()),
            models: RefCell::new(models),
            settle_queue: RefCell::new(Vec::new()),
            late_releases: RefCell::new(Vec::new()),
            settle_calls: RefCell::new(in_flight),
            retired: Cell::new(false),
            rule_windows,
            failure_log: RefCell::new(LogThrottle::new(FAILURE_LOG_INTERVAL_MS)),
            lease_seq: Cell::new(0),
            seed: self.shared.seed,
            root_context_id: Cell::new(self.id),
            sidecar_authorization,
        });
        let _ = self.id;
        true
    }

    fn on_tick(&mut self) {
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks % self.settle_every_ticks == 0 {
            self.shared.resend_unseen_releases(false);
            self.shared.flush_settlements(false, false);
        }
        self.shared.flush_counters();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request::new(self.shared.clone(), context_id)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

// ---------------------------------------------------------------------------------------------------
// `local` state: Envoy shared data, one entry per (key, window) holding the GCRA `tat` (µs, 8 bytes LE)
// and one per concurrency key holding the count. Every update is a compare-and-swap loop.

fn read_u64(bytes: Option<&[u8]>) -> u64 {
    bytes.and_then(|b| b.get(..8)).and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_le_bytes)
}

const CAS_ATTEMPTS: usize = 64;

/// Create `key` (value 0) if it does not exist, under the creation lock, so that two workers creating
/// the same key cannot overwrite each other's first update.
fn ensure_key(key: &str) -> Result<(), Status> {
    if let (Some(_), _) = hostcalls::get_shared_data(key)? {
        return Ok(());
    }
    let mut locked = false;
    for _ in 0..CAS_ATTEMPTS * 4 {
        let (v, cas) = hostcalls::get_shared_data(LOCK_KEY)?;
        if v.as_deref().and_then(|b| b.first().copied()).unwrap_or(0) == 0
            && hostcalls::set_shared_data(LOCK_KEY, Some(&[1]), cas).is_ok()
        {
            locked = true;
            break;
        }
    }
    let r = match hostcalls::get_shared_data(key) {
        Ok((None, _)) => hostcalls::set_shared_data(key, Some(&0u64.to_le_bytes()), None),
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    if locked {
        let _ = hostcalls::set_shared_data(LOCK_KEY, Some(&[0]), None);
    }
    r
}

/// CAS-update an entry: `f(old bytes)` returns the new bytes or `None` to leave it, and a result.
fn cas_update_bytes<T>(key: &str, mut f: impl FnMut(&[u8]) -> (Option<Vec<u8>>, T)) -> Result<T, Status> {
    for _ in 0..CAS_ATTEMPTS {
        let (v, cas) = match hostcalls::get_shared_data(key)? {
            (None, _) => {
                // First use of this key anywhere in this Envoy: create it under the lock, then CAS.
                ensure_key(key)?;
                hostcalls::get_shared_data(key)?
            }
            found => found,
        };
        let (new, out) = f(v.as_deref().unwrap_or(&[]));
        let Some(new) = new else {
            return Ok(out);
        };
        match hostcalls::set_shared_data(key, Some(&new), cas) {
            Ok(()) => return Ok(out),
            Err(Status::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Status::CasMismatch)
}

/// CAS-update a u64 entry (concurrency counters).
fn cas_update<T>(key: &str, mut f: impl FnMut(u64) -> (Option<u64>, T)) -> Result<T, Status> {
    cas_update_bytes(key, |b| {
        let (n, out) = f(read_u64(Some(b)));
        (n.map(|n| n.to_le_bytes().to_vec()), out)
    })
}

/// A group key is `<rule>:<kind>:<hashed value>` (`keys::budget_key_hashed`; rule names cannot hold a
/// `:`): the rule's tag and its budget identity, whose one shared-data entry holds every rule's windows
/// (see `state.rs`).
fn split_group_key(key: &str) -> (u64, &str) {
    match key.split_once(':') {
        Some((rule, identity)) => (crate::state::rule_tag(rule), identity),
        None => (crate::state::rule_tag(key), ""),
    }
}

/// The `state::update` changes of rules whose windows are `windows` and whose tags and new tats are `tats`
/// (in the same order).
fn rule_changes<'a>(
    windows: impl Iterator<Item = &'a [WindowSpec]>,
    tats: &'a [(u64, Vec<u64>)],
) -> Vec<crate::state::RuleTats<'a>> {
    windows.zip(tats).map(|(w, (tag, t))| crate::state::RuleTats { tag: *tag, windows: w, tats: t }).collect()
}

fn entry_key(identity: &str) -> String {
    format!("meshwarden.tl.e.{identity}")
}

fn conc_key(group_key: &str) -> String {
    format!("meshwarden.tl.c.{group_key}")
}

/// `local` state for one request's reservation or settlement; `now_us` is read once for all its groups
/// (one clock host call, and every group of the request sees the same instant). `configured` is every
/// configured rule's tag and windows (what a write keeps, see `state::update`).
struct LocalStore<'a> {
    now_us: u64,
    configured: &'a [(u64, Vec<WindowSpec>)],
}

/// The groups of a request by shared-data entry, in order of first appearance: `(identity, group
/// indexes)`.
fn by_entry<'k>(keys: impl Iterator<Item = &'k str>) -> Vec<(&'k str, Vec<usize>)> {
    let mut entries: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, key) in keys.enumerate() {
        let (_, identity) = split_group_key(key);
        match entries.iter_mut().find(|(e, _)| *e == identity) {
            Some((_, groups)) => groups.push(i),
            None => entries.push((identity, vec![i])),
        }
    }
    entries
}

impl LocalStore<'_> {
    /// Reserve every group of `req`, or none: `reserve_all`'s answer, with one compare-and-swap per
    /// budget identity instead of one per rule. Requests with a concurrency limit take the per-group path
    /// (each slot is its own entry, taken before that group's tokens, in order).
    fn reserve_request(&mut self, req: &ReserveRequest) -> Result<ReserveResponse, Status> {
        if req.groups.iter().any(|g| g.concurrency.is_some()) {
            return reserve_all(self, req);
        }
        let groups = &req.groups;
        let now = self.now_us;
        let configured = self.configured;
        let mut results: Vec<GroupResult> = vec![GroupResult::default(); groups.len()];
        let mut denied: Option<usize> = None;
        let mut written: Vec<Vec<usize>> = Vec::new();
        for (identity, members) in by_entry(groups.iter().map(|g| g.key.as_str())) {
            let attempt = cas_update_bytes(&entry_key(identity), |old| {
                let mut rs = Vec::with_capacity(members.len());
                let mut tats = Vec::with_capacity(members.len());
                for g in members.iter().filter_map(|i| groups.get(*i)) {
                    let (tag, _) = split_group_key(&g.key);
                    let old_tats = crate::state::decode(old, tag, &g.windows);
                    let r: Vec<_> = g.windows.iter().zip(&old_tats).map(|(w, t)| reserve(w, *t, now, g.cost)).collect();
                    tats.push((tag, r.iter().map(|x| x.new_tat_us).collect::<Vec<u64>>()));
                    rs.push(r);
                }
                let all = denied.is_none() && rs.iter().flatten().all(|r| r.allowed);
                let new = all.then(|| {
                    let windows = members.iter().filter_map(|i| groups.get(*i)).map(|g| g.windows.as_slice());
                    crate::state::update(old, &rule_changes(windows, &tats), configured)
                });
                (new, (all, rs))
            });
            let (wrote, rs) = match attempt {
                Ok(x) => x,
                Err(e) => {
                    self.roll_back(groups, &written);
                    return Err(e);
                }
            };
            for (i, r) in members.iter().zip(rs) {
                let allowed = r.iter().all(|x| x.allowed);
                if let Some(slot) = results.get_mut(*i) {
                    *slot = GroupResult {
                        allowed,
                        reason: (!allowed).then_some(DenyReason::Tokens),
                        windows: r.iter().map(|x| x.state).collect(),
                        never: !allowed && r.iter().any(|x| x.never),
                    };
                }
                if !allowed {
                    denied = Some(denied.map_or(*i, |d| d.min(*i)));
                }
            }
            if wrote {
                written.push(members);
            }
        }
        match denied {
            None => Ok(ReserveResponse { allowed: true, denied_group: None, groups: results }),
            Some(i) => {
                // As `reserve_all`: the denial stands even if giving back what was taken fails, and the
                // answer holds every group (each was computed), so `retry-after` covers all denials.
                self.roll_back(groups, &written);
                Ok(ReserveResponse { allowed: false, denied_group: Some(i), groups: results })
            }
        }
    }

    fn roll_back(&mut self, groups: &[Group], written: &[Vec<usize>]) {
        let items: Vec<SettleItem> =
            written.iter().flatten().filter_map(|i| groups.get(*i)).map(rollback_item).collect();
        let _ = self.settle_items(&items);
    }

    /// Settle `items` (a request's groups): slots released per group, tokens with one compare-and-swap
    /// per budget identity. Every item is attempted; the first error is returned.
    fn settle_items(&mut self, items: &[SettleItem]) -> Result<(), Status> {
        let mut first_err = None;
        for it in items.iter().filter(|it| it.release_lease.is_some()) {
            if let Err(e) = cas_update(&conc_key(&it.key), |n| (Some(n.saturating_sub(1)), ())) {
                first_err.get_or_insert(e);
            }
        }
        let now = self.now_us;
        let configured = self.configured;
        let charged = |it: &&SettleItem| it.delta != 0 && !it.windows.is_empty();
        let with_tokens: Vec<&SettleItem> = items.iter().filter(charged).collect();
        for (identity, members) in by_entry(with_tokens.iter().map(|it| it.key.as_str())) {
            let r = cas_update_bytes(&entry_key(identity), |old| {
                let tats: Vec<(u64, Vec<u64>)> = members
                    .iter()
                    .filter_map(|i| with_tokens.get(*i))
                    .map(|it| {
                        let (tag, _) = split_group_key(&it.key);
                        let old_tats = crate::state::decode(old, tag, &it.windows);
                        (tag, it.windows.iter().zip(&old_tats).map(|(w, t)| settle(w, *t, now, it.delta)).collect())
                    })
                    .collect();
                let windows = members.iter().filter_map(|i| with_tokens.get(*i)).map(|it| it.windows.as_slice());
                (Some(crate::state::update(old, &rule_changes(windows, &tats), configured)), ())
            });
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// The per-group path (`reserve_all`), for requests with a concurrency limit: each group's slot, then its
/// tokens in its identity's entry.
impl GroupStore for LocalStore<'_> {
    type Error = Status;

    fn reserve_group(&mut self, g: &Group) -> Result<GroupResult, Status> {
        if let Some(c) = &g.concurrency {
            let max = c.max;
            let took = cas_update(&conc_key(&g.key), |n| if n < max { (Some(n + 1), true) } else { (None, false) })?;
            if !took {
                return Ok(GroupResult { allowed: false, reason: Some(DenyReason::Concurrency), ..Default::default() });
            }
        }
        let now = self.now_us;
        let configured = self.configured;
        let (tag, identity) = split_group_key(&g.key);
        let tokens = cas_update_bytes(&entry_key(identity), |old| {
            let tats = crate::state::decode(old, tag, &g.windows);
            let rs: Vec<_> = g.windows.iter().zip(&tats).map(|(w, t)| reserve(w, *t, now, g.cost)).collect();
            let allowed = rs.iter().all(|r| r.allowed);
            let new_tats: Vec<u64> = rs.iter().map(|r| r.new_tat_us).collect();
            let change = [crate::state::RuleTats { tag, windows: &g.windows, tats: &new_tats }];
            (allowed.then(|| crate::state::update(old, &change, configured)), (allowed, rs))
        });
        // The group is all-or-nothing: a denial or a storage error gives its slot back (local state
        // has no lease expiry, so a slot kept here would be lost until Envoy restarts).
        let give_slot_back = || {
            if g.concurrency.is_some() {
                let _ = cas_update(&conc_key(&g.key), |n| (Some(n.saturating_sub(1)), ()));
            }
        };
        let (allowed, rs) = match tokens {
            Ok(r) => r,
            Err(e) => {
                give_slot_back();
                return Err(e);
            }
        };
        let states: Vec<WindowState> = rs.iter().map(|r| r.state).collect();
        if !allowed {
            give_slot_back();
            let never = rs.iter().any(|r| r.never);
            return Ok(GroupResult { allowed: false, reason: Some(DenyReason::Tokens), windows: states, never });
        }
        Ok(GroupResult { allowed: true, reason: None, windows: states, never: false })
    }

    fn settle_item(&mut self, item: &SettleItem) -> Result<(), Status> {
        self.settle_items(std::slice::from_ref(item))
    }
}

// ---------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the body.
    Start,
    /// Not limited (no body, or failed open).
    Pass,
    /// A reserve callout is in flight.
    Waiting,
    /// Reservations are held and must be settled in `on_log`.
    Admitted,
    /// Answered with a local reply.
    Rejected,
}

struct Request {
    shared: Rc<Shared>,
    context_id: u32,
    phase: Phase,
    path: String,
    encoded: bool,
    /// The boundary of a `multipart/form-data` body (audio, image edits, file uploads).
    multipart: Option<String>,
    /// A gRPC request (protobuf, often a stream that never ends while it waits for answers): admitted on
    /// its first body bytes instead of its end.
    grpc: bool,
    /// `POST .../cachedContents`: the answer names a Gemini context cache and its size (`context_memory`).
    creates_gemini_cache: bool,
    identities: Vec<Option<String>>,
    body_size: usize,
    /// The request body as read, until the request is let through (see `start_admission`).
    body: Vec<u8>,
    parsed: Option<Parsed>,
    admission: Option<Admission>,
    plan: Option<Plan>,
    window: Option<WindowState>,
    meter: Option<Meter>,
    /// The body sent upstream asks for stream usage the client did not ask for (`include_usage` added).
    usage_added: bool,
    /// Removes that usage chunk from the answer's stream (set for a 2xx SSE answer when `usage_added`).
    usage_hider: Option<UsageChunkHider>,
    lease_id: String,
    /// This request's number in its VM (with the VM's seed and the context id: unique ids).
    seq: u64,
    settled: bool,
    /// A metered Realtime session (`on_upgrade: meter`) while its connection is upgraded.
    realtime: Option<Box<crate::realtime::Session>>,
    /// A Realtime session's next reservation in flight to the sidecar: the call's token and its plan.
    realtime_reserve: Option<(u32, Plan)>,
    /// The concurrency slots a Realtime session holds until it ends (released in `on_log`).
    leases: Vec<SettleItem>,
    /// Client frames held (this many bytes) while the sidecar decides the next reservation.
    client_held: Option<usize>,
    /// A gRPC stream's request bytes after the first that admitted it: charged by size at its end.
    grpc_later_bytes: u64,
}

impl Request {
    /// A WebSocket upgrade or CONNECT tunnel: its frames reach this filter as a request body that never
    /// ends, which admission would wait for (the session hung after its `101`). Refused, let through
    /// unmetered, or (a WebSocket with `meter`) admitted as a Realtime session, as `on_upgrade` says.
    fn upgrade_request(&mut self, headers: &mut HeaderSnapshot) -> Action {
        let tunnel = headers.get(":method").is_some_and(|m| m.eq_ignore_ascii_case("CONNECT"))
            && headers.get("upgrade").is_none_or(|u| u.trim().is_empty());
        // Only a Realtime endpoint's events are read: a session on another path (Gemini Live) would be
        // charged nothing, so `meter` refuses it.
        let realtime = headers.get(":path").is_some_and(meshwarden_shared::realtime::is_realtime_path);
        match self.cfg().on_upgrade {
            OnUpgrade::Meter if !tunnel && realtime => self.realtime_admission(headers),
            OnUpgrade::Reject | OnUpgrade::Meter => {
                self.phase = Phase::Rejected;
                self.shared.count("upgrade.rejected", 1);
                self.publish("decision", "upgrade_refused");
                let message = "token-limiter: WebSocket and other upgraded connections cannot be metered in tokens, \
                               so this gateway refuses them (on_upgrade: reject; `meter` meters OpenAI Realtime \
                               sessions, on paths ending in /realtime, and refuses other upgrades).";
                send_error(
                    403,
                    ErrorFlavor::OpenAi,
                    ErrorKind::PermissionDenied,
                    Some("upgrade_refused"),
                    message,
                    &[],
                );
                Action::Pause
            }
            OnUpgrade::Pass => {
                self.phase = Phase::Pass;
                self.shared.count("upgrade.passed", 1);
                self.publish("decision", "skipped");
                Action::Continue
            }
        }
    }

    /// `on_upgrade: meter`: a Realtime session is admitted like a request whose prompt and answer are
    /// its first response's reservation (`realtime_*_reservation`), with the model of its query string.
    fn realtime_admission(&mut self, headers: &mut HeaderSnapshot) -> Action {
        let cfg = self.cfg();
        self.path = headers.get(":path").unwrap_or_default().to_string();
        self.identities = cfg.rules.iter().map(|r| self.identity(headers, &r.key)).collect();
        // A compressed message (permessage-deflate) could not be read: the client's offer is withdrawn,
        // so the server sends plain frames.
        headers.remove("sec-websocket-extensions");
        self.shared.count("realtime.sessions", 1);
        let model = meshwarden_shared::realtime::model_from_path(&self.path);
        if model.is_none() && cfg.rules.iter().any(|r| r.model.is_some()) && cfg.unknown_model == UnknownModel::Reject {
            self.shared.count("unknown_model_rejected", 1);
            self.phase = Phase::Rejected;
            self.publish("decision", "model_unreadable");
            let message = "The Realtime session names no model (`?model=` or `?deployment=`); this gateway limits \
                           tokens per model.";
            send_error(400, ErrorFlavor::OpenAi, ErrorKind::InvalidRequest, Some("model_unreadable"), message, &[]);
            return Action::Pause;
        }
        let facts = Facts {
            model,
            // The query string decides what is served, and it is not rewritten: no fallback.
            model_from_path: true,
            other_model: None,
            input_estimate: cfg.realtime_input_reservation,
            output_reservation: cfg.realtime_output_reservation,
            identities: std::mem::take(&mut self.identities),
        };
        self.admission = Some(Admission::new(facts));
        let seq = self.shared.lease_seq.get().wrapping_add(1);
        self.shared.lease_seq.set(seq);
        self.seq = seq;
        if cfg.rules.iter().any(|r| r.max_concurrent_requests.is_some()) {
            self.lease_id = format!("{:x}-{:x}-{:x}", self.shared.seed, self.context_id, seq);
        }
        // The mask of the close frame this filter may send the server (a client's frames are masked).
        let mask = (self.shared.seed ^ seq.rotate_left(29) ^ u64::from(self.context_id)).to_le_bytes();
        self.realtime = Some(Box::new(crate::realtime::Session::new([mask[0], mask[1], mask[2], mask[3]])));
        self.step()
    }

    /// A Realtime session's `101`: the rate-limit headers go on it. Any other answer (the upstream
    /// refused the upgrade, e.g. a 401) passes unread, and the reservation is given back in `on_log`:
    /// nothing was generated.
    fn realtime_answer(&mut self, headers: &mut HeaderSnapshot) {
        let upgraded = headers.get(":status") == Some("101");
        headers.remove(&self.cfg().fallback_header);
        if let Some(rt) = self.realtime.as_mut() {
            rt.upgraded = upgraded;
            rt.answered = true;
        }
        if !upgraded {
            self.shared.count("realtime.upgrade_refused_upstream", 1);
            return;
        }
        if let Some(w) = self.window {
            for (k, v) in self.ratelimit_headers(&w) {
                self.set_http_response_header(k, Some(&v));
            }
        }
    }

    /// Server frames: each `response.done` is charged, the next response reserved, and the session ended
    /// when that reservation is refused.
    fn realtime_server_chunk(&mut self, body_size: usize) -> Action {
        if body_size == 0 {
            return Action::Continue;
        }
        let chunk = self.get_http_response_body(0, body_size).unwrap_or_default();
        let Some(rt) = self.realtime.as_mut() else {
            return Action::Continue;
        };
        let had_ending = rt.ending.is_some();
        let (read, ends, was_mid) = match rt.read_server(&chunk) {
            Ok(r) => r,
            Err(e) => return self.realtime_reset("server", e),
        };
        let mut ended_at = read.unreadable_at;
        for (usage, end) in read.done {
            self.realtime_charge(usage, true);
            if ended_at.is_none() && !had_ending && self.realtime.as_ref().is_some_and(|r| r.ending.is_some()) {
                // This response spent the budget: it reaches the client, nothing after it does.
                ended_at = Some(end);
            }
        }
        let Some(rt) = self.realtime.as_mut() else {
            return Action::Continue;
        };
        let ended_here = !had_ending && rt.ending.is_some();
        // Ended in this chunk by a sidecar answer that arrived before it: at its first boundary.
        let pass = rt.server_pass(&chunk, &ends, was_mid, if ended_here { ended_at } else { None });
        if ended_here {
            self.realtime_ending_counted();
        }
        self.realtime_apply(pass, body_size, false)
    }

    /// Write what a Realtime session's step says into the client's (`client`) or the server's bytes.
    fn realtime_apply(&mut self, pass: crate::realtime::Pass, body_size: usize, client: bool) -> Action {
        match pass {
            crate::realtime::Pass::AsIs => {}
            crate::realtime::Pass::Rewrite(out) if client => self.set_http_request_body(0, body_size, &out),
            crate::realtime::Pass::Rewrite(out) => self.set_http_response_body(0, body_size, &out),
            crate::realtime::Pass::Reset(e) => return self.realtime_reset(if client { "client" } else { "server" }, e),
        }
        Action::Continue
    }

    /// Client frames pass as they are until the session ends; then the server gets a close frame.
    fn realtime_client_chunk(&mut self, body_size: usize) -> Action {
        if body_size == 0 {
            return Action::Continue;
        }
        let chunk = self.get_http_request_body(0, body_size).unwrap_or_default();
        let Some(rt) = self.realtime.as_mut() else {
            return Action::Continue;
        };
        let pass = rt.client_pass(&chunk);
        self.realtime_apply(pass, body_size, true)
    }

    /// Frames that are not WebSocket framing: nothing can be metered or placed safely, so the connection
    /// is reset (the open response is charged its reservation in `on_log`).
    fn realtime_reset(&mut self, side: &str, e: meshwarden_shared::websocket::BadFrame) -> Action {
        self.shared.count(&format!("realtime.broken_frames.{side}"), 1);
        log(
            LogLevel::Warn,
            &format!(
                "meshwarden {FILTER}: a Realtime session's {side} frames are not WebSocket framing ({}); reset",
                e.as_str()
            ),
        );
        self.publish("decision", "realtime_reset");
        let _ = hostcalls::reset_http_response();
        let _ = hostcalls::reset_http_request();
        Action::Pause
    }

    fn realtime_ending_counted(&self) {
        match self.realtime.as_ref().and_then(|r| r.ending.as_ref()) {
            Some(crate::realtime::Ending::Exhausted { .. }) => {
                self.shared.count("realtime.ended_exhausted", 1);
                self.publish("decision", "realtime_exhausted");
            }
            Some(crate::realtime::Ending::Unreadable { what, .. }) => {
                self.shared.count(&format!("realtime.ended_unreadable.{what}"), 1);
                self.publish("decision", "realtime_unreadable");
            }
            None => {}
        }
    }

    /// Concurrency slots are taken once, by the session's admission, and released when it ends.
    fn keep_leases(&mut self) {
        let Some(plan) = self.plan.as_mut() else {
            return;
        };
        for g in &mut plan.request.groups {
            if let Some(c) = g.concurrency.take() {
                self.leases.push(SettleItem {
                    key: g.key.clone(),
                    windows: Vec::new(),
                    delta: 0,
                    release_lease: Some(c.lease_id),
                    id: None,
                    id_ttl_ms: None,
                });
            }
        }
    }

    /// Charge one response: its usage (or, with none, the reservation) against the reservation it was
    /// admitted on (a fresh charge when none was held: failed open). Then, with `next`, reserve the
    /// next response.
    fn realtime_charge(&mut self, usage: Option<meshwarden_shared::realtime::RealtimeUsage>, next: bool) {
        let cfg = self.cfg();
        self.keep_leases();
        let Some(adm) = self.admission.as_ref() else {
            return;
        };
        let (plan, reserved) = match self.plan.take() {
            Some(p) => (p, true),
            None => match adm.plan(&cfg, "") {
                Ok(p) => (p, false),
                Err(_) => return,
            },
        };
        let (input, cached, output, source) = match usage {
            Some(u) => (u.input, u.cached_input, u.output, crate::meter::Source::Reported),
            None => (adm.facts.input_estimate, 0, adm.facts.output_reservation, crate::meter::Source::Estimated),
        };
        let model = adm.model.clone();
        self.shared.count("realtime.responses", 1);
        self.shared.count_usage(source, model.as_deref().unwrap_or("none"), input, output);
        self.shared.count_hot(Hot::InputTokens, input);
        self.shared.count_hot(Hot::OutputTokens, output);
        let mut deltas = settle_deltas(&cfg, &plan, input, cached, output);
        let sidecar = cfg.state == StateMode::Sidecar;
        // One settlement id per response (the sidecar applies an id once); a cut response has its own.
        let n = self.realtime.as_ref().map_or(0, |r| r.responses);
        let suffix = if next { format!("r{n}") } else { "cut".to_string() };
        let mut items = Vec::new();
        for ((g, d), ri) in plan.request.groups.iter().zip(deltas.iter_mut()).zip(&plan.rules) {
            if g.windows.is_empty() {
                continue;
            }
            let cost = i64::try_from(g.cost).unwrap_or(i64::MAX);
            if !reserved {
                *d = d.saturating_add(cost);
            }
            let charged = if reserved { cost.saturating_add(*d) } else { *d };
            if let Some(rule) = cfg.rules.get(*ri) {
                self.shared.count_charged(*ri, &rule.name, charged.max(0).unsigned_abs());
            }
            if *d != 0 {
                items.push(SettleItem {
                    key: g.key.clone(),
                    windows: g.windows.clone(),
                    id: sidecar.then(|| format!("{}-{suffix}", self.settle_id())),
                    id_ttl_ms: sidecar.then(|| settle_id_ttl_ms(&cfg)),
                    delta: *d,
                    release_lease: None,
                });
            }
        }
        self.apply_settlements(items);
        if next {
            self.realtime_reserve_next();
        }
    }

    fn apply_settlements(&self, items: Vec<SettleItem>) {
        if items.is_empty() {
            return;
        }
        match self.cfg().state {
            StateMode::Local => {
                let mut store = LocalStore { now_us: now_us(), configured: &self.shared.rule_windows };
                if store.settle_items(&items).is_err() {
                    self.shared.count("local_state_errors", 1);
                }
            }
            StateMode::Sidecar => self.shared.settle_queue.borrow_mut().extend(items),
        }
    }

    /// Reserve the session's next response; refused = the session ends (at the next frame boundary of
    /// each direction).
    fn realtime_reserve_next(&mut self) {
        if self.realtime.as_ref().is_none_or(|r| r.ending.is_some()) || self.realtime_reserve.is_some() {
            return;
        }
        let cfg = self.cfg();
        let Some(adm) = self.admission.as_ref() else {
            return;
        };
        let mut plan = match adm.plan(&cfg, "") {
            Ok(p) => p,
            Err(d) => return self.realtime_exhausted(&d),
        };
        // Token windows only: the session's concurrency slot is already held.
        let keep: Vec<bool> = plan.request.groups.iter().map(|g| !g.windows.is_empty()).collect();
        let mut it = keep.iter();
        plan.request.groups.retain(|_| it.next().copied().unwrap_or(false));
        let mut it = keep.iter();
        plan.rules.retain(|_| it.next().copied().unwrap_or(false));
        for g in &mut plan.request.groups {
            g.concurrency = None;
        }
        if plan.request.groups.is_empty() {
            self.plan = Some(plan);
            return;
        }
        match cfg.state {
            StateMode::Local => {
                let mut store = LocalStore { now_us: now_us(), configured: &self.shared.rule_windows };
                match store.reserve_request(&plan.request) {
                    Ok(resp) => self.realtime_reserved(plan, &resp),
                    // Shared data failing is an Envoy-internal problem: counted, and the session goes on.
                    Err(_) => self.shared.count("local_state_errors", 1),
                }
            }
            StateMode::Sidecar => {
                let Some(sc) = cfg.sidecar.as_ref() else {
                    return;
                };
                let Ok(body) = serde_json::to_vec(&plan.request) else {
                    return;
                };
                // The response just charged is sent first, so the reserve is decided on it (the sidecar
                // still applies the two calls in the order they arrive).
                self.release_leases_now();
                let auth = self.shared.sidecar_authorization.as_deref().map(|a| [("authorization", a)]);
                let headers = auth.as_ref().map_or(&[][..], |a| &a[..]);
                match dispatch(sc, "POST", "/v1/ratelimit/reserve", headers, Some(&body)) {
                    Ok(token) => self.realtime_reserve = Some((token, plan)),
                    Err(f) => self.realtime_reserve_failed(f),
                }
            }
        }
    }

    fn realtime_reserved(&mut self, plan: Plan, resp: &ReserveResponse) {
        let cfg = self.cfg();
        let Some(adm) = self.admission.as_mut() else {
            return;
        };
        match adm.decide(&cfg, &plan, resp) {
            Outcome::Admit { window } => {
                self.plan = Some(plan);
                if window.is_some() {
                    self.window = window;
                }
            }
            Outcome::Deny(d) => self.realtime_exhausted(&d),
            // Not offered for a model named in the query string (`model_from_path`); ended as spent.
            Outcome::Fallback { .. } => self.realtime_exhausted(&Denial {
                rule: resp.denied_group.and_then(|g| plan.rules.get(g).copied()).unwrap_or(usize::MAX),
                reason: DenyReason::Tokens,
                retry_after_ms: 0,
                window: None,
                never: false,
                missing_key: false,
            }),
        }
    }

    fn realtime_reserve_failed(&mut self, f: CalloutFailure) {
        self.shared.callout_failed("reserve", f);
        match self.cfg().sidecar.as_ref().map_or(FailureMode::Deny, |s| s.failure_mode) {
            // The session goes on; its next response is charged when done, with nothing reserved.
            FailureMode::Allow => self.shared.count("failure_allowed", 1),
            FailureMode::Deny => {
                self.shared.count("failure_denied", 1);
                let error = meshwarden_shared::realtime::error_event(
                    "api_error",
                    "rate_limit_service_unavailable",
                    "The rate limit service is unavailable; the session was ended (failure_mode: deny).",
                );
                if let Some(rt) = self.realtime.as_mut() {
                    rt.ending.get_or_insert(crate::realtime::Ending::Exhausted { error });
                }
            }
        }
    }

    fn realtime_exhausted(&mut self, d: &Denial) {
        let cfg = self.cfg();
        let rule = cfg.rules.get(d.rule).map_or("unknown", |r| r.name.as_str());
        self.shared.count("limited", 1);
        self.shared.count(&format!("rule.{rule}.limited"), 1);
        let message = format!("{} The Realtime session was ended.", self.denial_message(d));
        let error = meshwarden_shared::realtime::error_event("rate_limit_error", "rate_limit_exceeded", &message);
        if let Some(rt) = self.realtime.as_mut() {
            rt.ending.get_or_insert(crate::realtime::Ending::Exhausted { error });
        }
    }

    /// The sidecar's answer to a Realtime session's next reservation.
    fn realtime_reserve_answer(&mut self, num_headers: usize, body_size: usize) {
        let Some((_, plan)) = self.realtime_reserve.take() else {
            return;
        };
        let resp = callout_response(num_headers, body_size)
            .and_then(|b| serde_json::from_slice::<ReserveResponse>(&b).map_err(|_| CalloutFailure::BadBody));
        match resp {
            Ok(r) => self.realtime_reserved(plan, &r),
            Err(f) => self.realtime_reserve_failed(f),
        }
        // The held client frames go on now, cut if the session ended.
        if let Some(size) = self.client_held.take() {
            self.realtime_client_chunk(size);
            self.resume_http_request();
        }
    }

    /// The session is over: the next response's reservation is given back, unless a response was still
    /// being generated (then it is charged that reservation: its usage never came), and the
    /// concurrency slot is released. A reservation still in flight to the sidecar stays charged.
    fn realtime_end(&mut self) {
        if self.settled {
            return;
        }
        self.settled = true;
        self.keep_leases();
        let open = self.realtime.as_ref().map_or(0, |r| r.open_responses);
        match (self.plan.take(), open) {
            (Some(plan), 0) => {
                let cfg = self.cfg();
                let deltas = settle_deltas(&cfg, &plan, 0, 0, 0);
                let items: Vec<SettleItem> = plan
                    .request
                    .groups
                    .iter()
                    .zip(deltas)
                    .filter(|(g, d)| *d != 0 && !g.windows.is_empty())
                    .map(|(g, delta)| SettleItem {
                        key: g.key.clone(),
                        windows: g.windows.clone(),
                        id: (cfg.state == StateMode::Sidecar).then(|| format!("{}-end", self.settle_id())),
                        id_ttl_ms: (cfg.state == StateMode::Sidecar).then(|| settle_id_ttl_ms(&cfg)),
                        delta,
                        release_lease: None,
                    })
                    .collect();
                self.apply_settlements(items);
            }
            (plan, 0) => self.plan = plan,
            (plan, _) => {
                self.shared.count("realtime.cut_responses", 1);
                self.plan = plan;
                // Charged its reservation (a fresh one when none was held).
                self.realtime_charge(None, false);
            }
        }
        let leases = std::mem::take(&mut self.leases);
        if !leases.is_empty() {
            self.apply_settlements(leases);
            if self.cfg().state == StateMode::Sidecar {
                self.release_leases_now();
            }
        }
    }

    fn new(shared: Rc<Shared>, context_id: u32) -> Self {
        Request {
            shared,
            context_id,
            phase: Phase::Start,
            path: String::new(),
            encoded: false,
            multipart: None,
            grpc: false,
            creates_gemini_cache: false,
            identities: Vec::new(),
            body_size: 0,
            body: Vec::new(),
            parsed: None,
            admission: None,
            plan: None,
            window: None,
            meter: None,
            usage_added: false,
            usage_hider: None,
            lease_id: String::new(),
            seq: 0,
            settled: false,
            realtime: None,
            realtime_reserve: None,
            leases: Vec::new(),
            client_held: None,
            grpc_later_bytes: 0,
        }
    }

    fn cfg(&self) -> Rc<Config> {
        self.shared.config.clone()
    }

    /// One access-log value (filter state `wasm.meshwarden.token_limiter.<name>`), unless `filter_state`
    /// is off. Caller-chosen text (the model) is escaped so that it cannot write a log line of its own.
    fn publish(&self, name: &str, value: &str) {
        if self.shared.config.filter_state {
            let value = meshwarden_shared::access_log::value(value);
            let _ = hostcalls::set_property(vec![&format!("meshwarden.token_limiter.{name}")], Some(value.as_bytes()));
        }
    }

    /// The decision for the access log, with the model the request was admitted or refused for.
    fn publish_decision(&self, decision: &str) {
        self.publish("decision", decision);
        if let Some(model) = self.admission.as_ref().and_then(|a| a.model.as_deref()) {
            self.publish("model", model);
        }
    }

    fn flavor(&self) -> ErrorFlavor {
        ErrorFlavor::for_api(self.parsed.as_ref().map_or(Api::from_path(&self.path), |p| p.api))
    }

    fn identity(&self, headers: &HeaderSnapshot, source: &KeySource) -> Option<String> {
        match source {
            KeySource::Header(h) => headers.get(h).filter(|v| !v.is_empty()).map(str::to_string),
            KeySource::UnverifiedJwtClaim { claim, header } => {
                headers.get(header).and_then(|v| unverified_jwt_claim(v, claim))
            }
            KeySource::JwtClaim { claim, metadata_key } => {
                // The whole `metadata` property is the typed Metadata message. A path into it comes back
                // as an untyped CEL value: a number as its 8 raw bytes (often not UTF-8, so a numeric
                // `team_id` read as a missing key), a list or map as protobuf.
                let raw = self.get_property(vec!["metadata"])?;
                let jwt = meshwarden_shared::pbstruct::decode_metadata_namespace(&raw, JWT_AUTHN_NAMESPACE).ok()??;
                claim_value(jwt.get(metadata_key.as_str())?, claim)
            }
            KeySource::Spiffe(part) => {
                let raw = self.get_property(vec!["connection", "uri_san_peer_certificate"])?;
                spiffe_part(&String::from_utf8_lossy(&raw), *part)
            }
            KeySource::Constant(c) => Some(c.clone()),
        }
    }

    /// Decide with what we know; called at end of body (or when the body is over `max_body_bytes`).
    fn start_admission(&mut self, body: Vec<u8>, oversize: bool) -> Action {
        // Kept until the request is let through: a rewrite splices its changes into these bytes.
        self.body = body;
        let cfg = self.cfg();
        // A form's files are not text: its parts are read instead of estimating its bytes (see
        // `read_multipart`); over `max_body_bytes`, from the part of it Envoy has buffered.
        let form = self.multipart.clone().filter(|_| !self.encoded);
        let max = usize::try_from(cfg.max_body_bytes).unwrap_or(usize::MAX);
        let parsed = if let (true, Some(boundary)) = (oversize, form.as_deref()) {
            let prefix = self.get_http_request_body(0, self.body_size.min(max)).unwrap_or_default();
            read_multipart(&prefix, boundary).map(|(model, est)| parsed_multipart(&cfg, &self.path, model, est, true))
        } else {
            None
        };
        let parsed = if let Some(p) = parsed {
            p
        } else if oversize {
            Parsed {
                api: Api::from_path(&self.path),
                json: None,
                model: meshwarden_shared::llm::model_from_path(&self.path),
                model_from_path: true,
                other_model: None,
                stream: false,
                input_estimate: size_estimate(self.body_size),
                output_reservation: cfg.default_output_reservation,
                bad: Some(if self.grpc { BadBody::NotJson } else { BadBody::TooLarge }),
                problem: None,
                contexts: Vec::new(),
            }
        } else {
            let p = parse_request(&cfg, &self.path, &self.body, self.encoded);
            match (p.bad, form.as_deref()) {
                (Some(BadBody::NotJson), Some(boundary)) => read_multipart(&self.body, boundary)
                    .map_or(p, |(model, est)| parsed_multipart(&cfg, &self.path, model, est, false)),
                _ => p,
            }
        };
        if let Some(bad) = parsed.bad {
            self.shared.count(&format!("bad_body.{}", bad.as_str()), 1);
            if let (true, Some(problem)) = (bad.refused(), &parsed.problem) {
                // Refused before anything is reserved: nothing to settle, no slot taken.
                self.phase = Phase::Rejected;
                self.publish("decision", "bad_request");
                let flavor = ErrorFlavor::for_api(parsed.api);
                let message = format!("The request body cannot be read reliably: {problem}.");
                send_error(400, flavor, ErrorKind::InvalidRequest, Some(problem.code()), &message, &[]);
                return Action::Pause;
            }
        }
        let model_rules = cfg.rules.iter().any(|r| r.model.is_some());
        if parsed.model.is_none() && model_rules && cfg.unknown_model == UnknownModel::Reject {
            self.shared.count("unknown_model_rejected", 1);
            self.phase = Phase::Rejected;
            self.publish("decision", "model_unreadable");
            let why = parsed.bad.map_or("unreadable", BadBody::as_str);
            let message = format!(
                "The request's model cannot be read ({why}); this gateway limits tokens per model, so it needs a \
                 readable `model` (uncompressed JSON body, or a model in the path)."
            );
            send_error(
                400,
                ErrorFlavor::for_api(parsed.api),
                ErrorKind::InvalidRequest,
                Some("model_unreadable"),
                &message,
                &[],
            );
            return Action::Pause;
        }
        let mut parsed = parsed;
        if !parsed.contexts.is_empty() && cfg.context_memory_slots > 0 {
            // The stored conversation the request names is read by the model: admitted on it too.
            let remembered = parsed
                .contexts
                .iter()
                .filter_map(ContextRef::key)
                .filter_map(|key| {
                    let slot = context_memory::slot_key(&key, cfg.context_memory_slots);
                    let (value, _) = hostcalls::get_shared_data(&slot).ok()?;
                    context_memory::decode(&value?, &key)
                })
                .max();
            match remembered {
                Some(tokens) => {
                    parsed.input_estimate = parsed.input_estimate.saturating_add(tokens);
                    self.shared.count("context_memory.hits", 1);
                }
                None => self.shared.count("context_memory.misses", 1),
            }
        }
        let facts = Facts {
            model: parsed.model.clone(),
            model_from_path: parsed.model_from_path,
            other_model: parsed.other_model.clone(),
            input_estimate: parsed.input_estimate,
            output_reservation: parsed.output_reservation,
            identities: std::mem::take(&mut self.identities),
        };
        self.parsed = Some(parsed);
        self.admission = Some(Admission::new(facts));
        let seq = self.shared.lease_seq.get().wrapping_add(1);
        self.shared.lease_seq.set(seq);
        self.seq = seq;
        // A lease names this request's concurrency slots; without a concurrency limit there are none.
        if cfg.rules.iter().any(|r| r.max_concurrent_requests.is_some()) {
            self.lease_id = format!("{:x}-{:x}-{:x}", self.shared.seed, self.context_id, seq);
        }
        self.step()
    }

    /// Plan for the current model and reserve (local) or dispatch (sidecar).
    fn step(&mut self) -> Action {
        let cfg = self.cfg();
        for _ in 0..=crate::limiter::MAX_FALLBACKS + 1 {
            let Some(adm) = self.admission.as_ref() else {
                return Action::Continue;
            };
            let plan = match adm.plan(&cfg, &self.lease_id) {
                Ok(p) => p,
                Err(d) => {
                    self.reject(&d);
                    return Action::Pause;
                }
            };
            if plan.request.groups.is_empty() {
                self.plan = Some(plan);
                return self.admit(None);
            }
            match cfg.state {
                StateMode::Local => {
                    let mut store = LocalStore { now_us: now_us(), configured: &self.shared.rule_windows };
                    let resp = match store.reserve_request(&plan.request) {
                        Ok(r) => r,
                        Err(_) => {
                            // Shared data failing is an Envoy-internal problem; count it and fail open.
                            self.shared.count("local_state_errors", 1);
                            self.phase = Phase::Pass;
                            self.publish_decision("failed_open");
                            return Action::Continue;
                        }
                    };
                    match self.apply(plan, &resp) {
                        Some(a) => return a,
                        None => continue, // fallback: plan again
                    }
                }
                StateMode::Sidecar => {
                    let Some(sc) = cfg.sidecar.as_ref() else {
                        return Action::Continue;
                    };
                    let body = match serde_json::to_vec(&plan.request) {
                        Ok(b) => b,
                        Err(_) => return Action::Continue,
                    };
                    self.plan = Some(plan);
                    let auth = self.shared.sidecar_authorization.as_deref().map(|a| [("authorization", a)]);
                    let headers = auth.as_ref().map_or(&[][..], |a| &a[..]);
                    match dispatch(sc, "POST", "/v1/ratelimit/reserve", headers, Some(&body)) {
                        Ok(_) => {
                            self.phase = Phase::Waiting;
                            return Action::Pause;
                        }
                        Err(f) => return self.sidecar_failed(f, false),
                    }
                }
            }
        }
        Action::Continue
    }

    /// Apply a reservation answer. `None` = fell back, plan again.
    fn apply(&mut self, plan: Plan, resp: &ReserveResponse) -> Option<Action> {
        let cfg = self.cfg();
        let adm = self.admission.as_mut()?;
        let model_before = adm.model.clone();
        match adm.decide(&cfg, &plan, resp) {
            Outcome::Admit { window } => {
                self.plan = Some(plan);
                Some(self.admit(window))
            }
            Outcome::Fallback { .. } => {
                if let Some(r) = resp.denied_group.and_then(|g| plan.rules.get(g)).and_then(|i| cfg.rules.get(*i)) {
                    self.shared.count(&format!("rule.{}.fallbacks", r.name), 1);
                }
                self.shared.count("fallbacks", 1);
                self.count_per_model(model_before.as_deref(), "fallbacks");
                None
            }
            Outcome::Deny(d) => {
                self.reject(&d);
                Some(Action::Pause)
            }
        }
    }

    /// `model.<model>.<what>` (the model label bounded like the token counters; `none` when unknown).
    fn count_per_model(&self, model: Option<&str>, what: &str) {
        let label = self.shared.models.borrow_mut().label(model.unwrap_or("none"));
        self.shared.count(&format!("model.{label}.{what}"), 1);
    }

    fn admit(&mut self, window: Option<WindowState>) -> Action {
        self.phase = Phase::Admitted;
        self.window = window;
        self.shared.count_hot(Hot::Admitted, 1);
        let fell_back = self.admission.as_ref().is_some_and(Admission::fell_back);
        self.publish_decision(if fell_back { "fallback" } else { "allowed" });
        let new_model = self.admission.as_ref().filter(|a| a.fell_back()).and_then(|a| a.model.clone());
        if let Some(p) = self.parsed.as_mut() {
            self.usage_added = adds_stream_usage(p);
            if let Some(bytes) = rewrite_body(p, &self.body, new_model.as_deref()) {
                self.set_http_request_body(0, self.body_size.max(1), &bytes);
            }
        }
        self.body = Vec::new();
        Action::Continue
    }

    fn reject(&mut self, d: &Denial) {
        self.phase = Phase::Rejected;
        let cfg = self.cfg();
        let rule = cfg.rules.get(d.rule).map_or("unknown", |r| r.name.as_str());
        self.shared.count("limited", 1);
        let what = match (d.missing_key, d.reason) {
            (true, _) => "missing_key",
            (false, DenyReason::Concurrency) => "limited_concurrency",
            (false, DenyReason::Tokens) => "limited",
        };
        self.shared.count(&format!("rule.{rule}.{what}"), 1);
        self.publish_decision(what);
        self.publish("rule", rule);
        let model = self.admission.as_ref().and_then(|a| a.model.clone());
        self.count_per_model(model.as_deref(), "limited");
        if d.missing_key {
            // Not a rate limit: retrying the same request cannot help, so no 429 (which SDKs retry) and no
            // retry-after. 401, as for a missing API key: the caller must say who is charged.
            let message = format!(
                "Request rejected by rule '{rule}': the request does not carry the key this budget is charged to."
            );
            send_error(401, self.flavor(), ErrorKind::Authentication, Some("missing_budget_key"), &message, &[]);
            return;
        }
        let retry_ms = d.retry_ms();
        let message = self.denial_message(d);
        let retry_after = retry_after_seconds(retry_ms).to_string();
        let retry_after_ms = retry_ms.max(1).to_string();
        let mut headers: Vec<(String, String)> =
            vec![("retry-after".into(), retry_after), ("retry-after-ms".into(), retry_after_ms)];
        if let Some(w) = d.window {
            headers.extend(self.ratelimit_headers(&w).into_iter().map(|(k, v)| (k.to_string(), v)));
        }
        let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        send_error(429, self.flavor(), ErrorKind::RateLimit, Some("rate_limit_exceeded"), &message, &refs);
    }

    /// What a denial says to the client (the 429's message, a Realtime session's `error` event).
    fn denial_message(&self, d: &Denial) -> String {
        let cfg = self.cfg();
        let rule = cfg.rules.get(d.rule).map_or("unknown", |r| r.name.as_str());
        let retry_ms = d.retry_ms();
        if d.reason == DenyReason::Concurrency {
            format!("Rate limit reached for rule '{rule}': too many concurrent requests. Please retry after a request completes.")
        } else if d.never {
            format!("Request too large for rule '{rule}': it needs more tokens than the limit allows per window.")
        } else {
            let w = d.window.unwrap_or_default();
            format!(
                "Rate limit reached for rule '{rule}' on tokens: limit {} per {}, remaining {}. Please try again in {}.",
                w.limit,
                openai_reset_duration(w.window_ms),
                w.remaining,
                openai_reset_duration(retry_ms)
            )
        }
    }

    fn ratelimit_headers(&self, w: &WindowState) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("x-ratelimit-limit-tokens", w.limit.to_string()),
            ("x-ratelimit-remaining-tokens", w.remaining.to_string()),
            ("x-ratelimit-reset-tokens", openai_reset_duration(w.reset_ms)),
        ];
        if self.flavor() == ErrorFlavor::Anthropic {
            h.push(("anthropic-ratelimit-tokens-limit", w.limit.to_string()));
            h.push(("anthropic-ratelimit-tokens-remaining", w.remaining.to_string()));
            // When the bucket is full again, as an RFC 3339 instant (Anthropic's format for it).
            let full_at = now_ms().saturating_add(w.reset_ms);
            h.push(("anthropic-ratelimit-tokens-reset", meshwarden_shared::errors::rfc3339_utc(full_at)));
        }
        h
    }

    /// A 2xx SSE answer to a stream whose usage reporting this filter added: its usage chunk is removed
    /// on the way to the client (see `usage_chunk`), so the answer cannot keep a `content-length`. A
    /// compressed stream is left as it is.
    fn hide_added_usage_chunk(&mut self, headers: &mut HeaderSnapshot) {
        let ok = headers.get(":status").is_some_and(|s| s.starts_with('2'));
        let sse = headers
            .get("content-type")
            .is_some_and(|t| t.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream")));
        // A compressed stream cannot be read: passed as it is (the meter charges it the reservation).
        let plain = headers
            .get("content-encoding")
            .is_none_or(|e| e.trim().is_empty() || e.trim().eq_ignore_ascii_case("identity"));
        if ok && sse && plain {
            self.usage_hider = Some(UsageChunkHider::default());
            headers.remove("content-length");
        }
    }

    fn sidecar_failed(&mut self, f: CalloutFailure, resume: bool) -> Action {
        self.shared.callout_failed("reserve", f);
        if f != CalloutFailure::Dispatch {
            // The reserve was sent: it may have taken a lease that nothing would release.
            self.release_after_reserve();
        }
        let mode = self.cfg().sidecar.as_ref().map_or(FailureMode::Deny, |s| s.failure_mode);
        match mode {
            FailureMode::Allow => {
                self.shared.count("failure_allowed", 1);
                self.phase = Phase::Pass;
                self.publish_decision("failed_open");
                // Still add include_usage / keep the body as is: nothing was reserved.
                if let Some(p) = self.parsed.as_mut() {
                    self.usage_added = adds_stream_usage(p);
                    if let Some(bytes) = rewrite_body(p, &self.body, None) {
                        self.set_http_request_body(0, self.body_size.max(1), &bytes);
                    }
                }
                self.body = Vec::new();
                if resume {
                    self.resume_http_request();
                }
                Action::Continue
            }
            FailureMode::Deny => {
                self.shared.count("failure_denied", 1);
                self.phase = Phase::Rejected;
                self.publish_decision("failed_closed");
                send_error(
                    503,
                    self.flavor(),
                    ErrorKind::Unavailable,
                    None,
                    "The rate limit service is unavailable; the request was not sent (failure_mode: deny).",
                    &[("retry-after", "1")],
                );
                Action::Pause
            }
        }
    }

    /// Settle the reservation with what the response cost. Exactly once (guarded by `settled`).
    fn settle_once(&mut self) {
        if self.settled {
            return;
        }
        self.settled = true;
        let cfg = self.cfg();
        let (Some(plan), Some(adm)) = (self.plan.as_ref(), self.admission.as_ref()) else {
            return;
        };
        let est = adm.facts.input_estimate.saturating_add(size_estimate(self.grpc_later_bytes as usize));
        let (input, output, source) = match self.meter.as_mut() {
            Some(m) => m.finish(est, adm.facts.output_reservation),
            // No response at all (client went away, upstream never answered): the prompt was sent.
            None => (est, 0, crate::meter::Source::Estimated),
        };
        let reported = (source == crate::meter::Source::Reported).then(|| input.saturating_add(output));
        self.remember_context(&cfg, reported);
        let cached_input = self.meter.as_ref().map_or(0, Meter::cached_input_tokens);
        if cached_input > 0 {
            self.shared.count("cached_input_tokens", cached_input);
        }
        self.shared.count_usage(source, adm.model.as_deref().unwrap_or("none"), input, output);
        self.publish("input_tokens", &input.to_string());
        self.publish("cached_input_tokens", &cached_input.to_string());
        self.publish("output_tokens", &output.to_string());
        self.publish("usage", source.as_str());
        self.shared.count_hot(Hot::InputTokens, input);
        self.shared.count_hot(Hot::OutputTokens, output);
        let deltas = settle_deltas(&cfg, plan, input, cached_input, output);
        for ((g, d), ri) in plan.request.groups.iter().zip(&deltas).zip(&plan.rules) {
            if let (false, Some(rule)) = (g.windows.is_empty(), cfg.rules.get(*ri)) {
                let charged = i64::try_from(g.cost).unwrap_or(i64::MAX).saturating_add(*d).max(0);
                self.shared.count_charged(*ri, &rule.name, charged.unsigned_abs());
            }
        }
        let items: Vec<SettleItem> = plan
            .request
            .groups
            .iter()
            .zip(deltas)
            .filter(|(g, d)| *d != 0 || g.concurrency.is_some())
            .map(|(g, delta)| SettleItem {
                key: g.key.clone(),
                windows: g.windows.clone(),
                // Sidecar mode: an id makes the settlement safe to resend after a failed call.
                id: (delta != 0 && cfg.state == StateMode::Sidecar).then(|| self.settle_id()),
                id_ttl_ms: (delta != 0 && cfg.state == StateMode::Sidecar).then(|| settle_id_ttl_ms(&cfg)),
                delta,
                release_lease: g.concurrency.as_ref().map(|c| c.lease_id.clone()),
            })
            .collect();
        match cfg.state {
            StateMode::Local => {
                let mut store = LocalStore { now_us: now_us(), configured: &self.shared.rule_windows };
                if store.settle_items(&items).is_err() {
                    self.shared.count("local_state_errors", 1);
                }
            }
            StateMode::Sidecar => {
                let releases = items.iter().any(|i| i.release_lease.is_some());
                self.shared.settle_queue.borrow_mut().extend(items);
                if releases || self.shared.retired.get() {
                    self.release_leases_now();
                }
            }
        }
    }

    /// After a Responses answer with reported usage: its context size (`reported`, input plus output:
    /// what the next turn reads again) under its response id and the conversation it continued; after a
    /// Gemini cache was created: its size under its name. For the requests that will name them (see
    /// `context_memory`). An answer without a response id (an error) stores nothing.
    fn remember_context(&self, cfg: &Config, reported: Option<u64>) {
        if cfg.context_memory_slots == 0 {
            return;
        }
        if let Some((name, size)) = self.meter.as_ref().and_then(Meter::created_gemini_cache) {
            // A cache's size is what every request naming it reads, whatever this call was charged.
            self.store_context(cfg, &ContextRef::GeminiCache(name.to_string()), size);
        }
        // Only a Responses object answered (an error body has no response id), with its usage.
        let (Some(id), Some(tokens)) = (self.meter.as_ref().and_then(Meter::response_id), reported) else {
            return;
        };
        let answered = ContextRef::Response(id.to_string());
        let conversations =
            self.parsed.iter().flat_map(|p| &p.contexts).filter(|c| matches!(c, ContextRef::Conversation(_)));
        for context in std::iter::once(&answered).chain(conversations) {
            self.store_context(cfg, context, tokens);
        }
    }

    fn store_context(&self, cfg: &Config, context: &ContextRef, tokens: u64) {
        let Some(key) = context.key() else {
            return;
        };
        let slot = context_memory::slot_key(&key, cfg.context_memory_slots);
        if hostcalls::set_shared_data(&slot, Some(&context_memory::encode(&key, tokens)), None).is_ok() {
            self.shared.count("context_memory.stored", 1);
        }
    }

    /// The reserve call's answer will not be read (the client left, or the call failed after it was
    /// sent), so whether it took a concurrency lease is unknown: release the plan's leases after the
    /// callout timeout, when the sidecar has handled the reserve or Envoy gave up on it. Sent at once,
    /// the release could reach the sidecar before the reserve and the slot would stay taken for `lease_ms`.
    fn release_after_reserve(&self) {
        let Some(plan) = self.plan.as_ref() else {
            return;
        };
        let releases: Vec<LateRelease> = plan
            .request
            .groups
            .iter()
            .filter_map(|g| {
                g.concurrency.as_ref().map(|c| LateRelease {
                    due_ms: 0,
                    attempts: 0,
                    item: SettleItem {
                        key: g.key.clone(),
                        windows: Vec::new(),
                        delta: 0,
                        release_lease: Some(c.lease_id.clone()),
                        id: None,
                        id_ttl_ms: None,
                    },
                })
            })
            .collect();
        if !releases.is_empty() {
            let timeout = self.cfg().sidecar.as_ref().map_or(0, |s| s.timeout_ms);
            self.shared.release_later(releases, timeout.saturating_add(100));
        }
    }

    /// The idempotency id of this request's settlements (the sidecar applies each once per key).
    fn settle_id(&self) -> String {
        format!("{:x}-{:x}-{:x}", self.shared.seed, self.context_id, self.seq)
    }

    /// A concurrency slot must be free as soon as its request is over, not at the next settlement tick
    /// (with batching, a key's count would also hold the requests of the last interval): flush now.
    fn release_leases_now(&self) {
        self.shared.flush_settlements(false, true);
        let _ = hostcalls::set_effective_context(self.context_id);
    }
}

impl Context for Request {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        // A settle call this request made (the SDK answers it here while the request lives).
        if self.shared.settle_calls.borrow().contains_key(&token) {
            let _ = self.shared.settle_answered(token, callout_response(num_headers, body_size).map(|_| ()));
            return;
        }
        if self.realtime_reserve.as_ref().is_some_and(|(t, _)| *t == token) {
            self.realtime_reserve_answer(num_headers, body_size);
            return;
        }
        timed(self, "vm_us.reserve_answer", |r| r.reserve_answer(num_headers, body_size));
    }
}

impl HttpContext for Request {
    meshwarden_shared::timed_http_callbacks!(
        request_headers,
        request_body,
        request_trailers,
        response_headers,
        response_body,
        request_done
    );
}

impl VmTimed for Request {
    fn add_vm_us(&self, section: &str, us: u64) {
        self.shared.count(section, us);
    }
}

// The callbacks' work (the trait methods above only time it for `make bench-breakdown`).
impl Request {
    fn reserve_answer(&mut self, num_headers: usize, body_size: usize) {
        if self.phase != Phase::Waiting {
            return;
        }
        let resp = callout_response(num_headers, body_size)
            .and_then(|b| serde_json::from_slice::<ReserveResponse>(&b).map_err(|_| CalloutFailure::BadBody));
        let resp = match resp {
            Ok(r) => r,
            Err(f) => {
                self.sidecar_failed(f, true);
                return;
            }
        };
        let Some(plan) = self.plan.take() else {
            self.resume_http_request();
            return;
        };
        match self.apply(plan, &resp) {
            Some(Action::Continue) => {
                self.resume_http_request();
            }
            Some(_) => {} // rejected: the local reply was sent
            None => {
                // Fell back: reserve for the new model.
                if self.step() == Action::Continue {
                    self.resume_http_request();
                }
            }
        }
    }

    fn request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        self.shared.count_hot(Hot::Requests, 1);
        if end_of_stream {
            // No body: nothing to charge (GET /v1/models and the like).
            self.phase = Phase::Pass;
            self.shared.count("skipped_no_body", 1);
            self.publish("decision", "skipped");
            return Action::Continue;
        }
        // One host call for the path, the encoding and every rule's key header.
        let mut headers = HeaderSnapshot::request();
        if meshwarden_shared::upgrade::is_upgrade_request(headers.get("upgrade"), headers.get(":method")) {
            return self.upgrade_request(&mut headers);
        }
        self.path = headers.get(":path").unwrap_or_default().to_string();
        if meshwarden_shared::llm::is_token_count_path(&self.path) {
            // Counting a prompt's tokens runs no model and is not billed: charging it the prompt would
            // make a client that counts before it sends (agents managing their context) pay twice.
            self.phase = Phase::Pass;
            self.shared.count("skipped_count_tokens", 1);
            self.publish("decision", "skipped");
            return Action::Continue;
        }
        self.encoded = headers
            .get("content-encoding")
            .is_some_and(|e| !e.trim().is_empty() && !e.trim().eq_ignore_ascii_case("identity"));
        self.multipart = headers.get("content-type").and_then(multipart_boundary);
        self.grpc = headers.get("content-type").is_some_and(meshwarden_shared::binary::is_grpc);
        self.creates_gemini_cache =
            context_memory::creates_gemini_cache(headers.get(":method").unwrap_or(""), &self.path);
        let cfg = self.cfg();
        self.identities = cfg.rules.iter().map(|r| self.identity(&headers, &r.key)).collect();
        // The body may be rewritten (include_usage, fallback model).
        headers.remove("content-length");
        // Usage is read from the answer: it must come back uncompressed (the meter charges the
        // output reservation for an answer it cannot read, but the real figure is better).
        headers.remove("accept-encoding");
        Action::Continue
    }

    fn request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let (Some(rt), false) = (self.realtime.as_ref(), self.phase == Phase::Waiting) {
            if rt.answered && !rt.upgraded {
                // The upstream refused the upgrade: an HTTP exchange, passed unread.
                return Action::Continue;
            }
            if self.realtime_reserve.is_some() {
                // The sidecar is deciding whether the session may have another response: the client's
                // frames (its next `response.create`) wait for that answer, at most the callout timeout.
                self.client_held = Some(body_size);
                return Action::Pause;
            }
            return self.realtime_client_chunk(body_size);
        }
        match self.phase {
            Phase::Start => {}
            Phase::Waiting => return Action::Pause,
            Phase::Admitted if self.grpc => {
                // The stream's later messages (a bidirectional stream sends many prompts on one
                // admission): counted, and charged by size when it ends.
                self.grpc_later_bytes = self.grpc_later_bytes.saturating_add(body_size as u64);
                return Action::Continue;
            }
            _ => return Action::Continue,
        }
        self.body_size = body_size;
        let max = usize::try_from(self.cfg().max_body_bytes).unwrap_or(usize::MAX);
        if body_size > max {
            return self.start_admission(Vec::new(), true);
        }
        if self.grpc && !end_of_stream {
            // A gRPC client or bidirectional stream sends its next message only after an answer: waiting
            // for the body's end held it for ever (before 2026-12-07). Admitted on what has come so far;
            // protobuf is not read either way.
            return self.start_admission(Vec::new(), true);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        self.start_admission(body, false)
    }

    fn request_trailers(&mut self, _n: usize) -> Action {
        // A body ended by trailers never reports end_of_stream to the body callback: decide here.
        match self.phase {
            Phase::Start => {
                let body = self.get_http_request_body(0, self.body_size).unwrap_or_default();
                self.start_admission(body, false)
            }
            Phase::Waiting => Action::Pause,
            _ => Action::Continue,
        }
    }

    fn response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        // The fallback header is ours: set it after a fallback, remove any other copy (an upstream's).
        let cfg = self.cfg();
        let mut headers = HeaderSnapshot::response();
        if self.usage_added {
            self.hide_added_usage_chunk(&mut headers);
        }
        if self.realtime.is_some() {
            self.realtime_answer(&mut headers);
            return Action::Continue;
        }
        if self.phase != Phase::Admitted {
            self.set_http_response_header(&cfg.fallback_header, None);
            return Action::Continue;
        }
        match Admission::fallback_header_value(self.admission.as_ref()) {
            Some(model) => self.set_http_response_header(&cfg.fallback_header, Some(model)),
            // Only a copy the snapshot shows costs a host call to remove.
            None => headers.remove(&cfg.fallback_header),
        }
        let status = headers.get(":status").and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        let max = usize::try_from(cfg.max_body_bytes).unwrap_or(usize::MAX);
        let mut meter = Meter::new(status, headers.get("content-type"), headers.get("content-encoding"), max);
        let count = |name: &str| headers.get(name).and_then(|v| v.trim().parse::<u64>().ok());
        let bedrock = (count("x-amzn-bedrock-input-token-count"), count("x-amzn-bedrock-output-token-count"));
        if bedrock.0.is_some() || bedrock.1.is_some() {
            meter.set_header_usage(bedrock.0, bedrock.1);
        } else {
            // Hugging Face TGI's native `/generate` (also behind SageMaker's Hugging Face LLM containers).
            meter.set_header_usage(count("x-prompt-tokens"), count("x-generated-tokens"));
        }
        if meshwarden_shared::llm::is_image_generation_path(&self.path) {
            meter.media_answer();
        }
        if cfg.context_memory_slots > 0 && self.parsed.as_ref().is_some_and(|p| p.api == Api::OpenAiResponses) {
            meter.watch_response_id();
        }
        if cfg.context_memory_slots > 0 && self.creates_gemini_cache {
            meter.watch_gemini_cache();
        }
        self.meter = Some(meter);
        if let Some(w) = self.window {
            for (k, v) in self.ratelimit_headers(&w) {
                self.set_http_response_header(k, Some(&v));
            }
        }
        Action::Continue
    }

    fn response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(rt) = self.realtime.as_ref() {
            return if rt.upgraded { self.realtime_server_chunk(body_size) } else { Action::Continue };
        }
        let metered = self.phase == Phase::Admitted;
        if (!metered && self.usage_hider.is_none()) || (body_size == 0 && !end_of_stream) {
            return Action::Continue;
        }
        let chunk =
            if body_size == 0 { Vec::new() } else { self.get_http_response_body(0, body_size).unwrap_or_default() };
        if metered && !chunk.is_empty() {
            if let Some(m) = self.meter.as_mut() {
                m.on_chunk(&chunk);
            }
        }
        // The meter has read the usage chunk; the client, which did not ask for it, does not see it.
        if let Some(hider) = self.usage_hider.as_mut() {
            let out = hider.feed(&chunk, end_of_stream);
            if out != chunk {
                self.set_http_response_body(0, body_size, &out);
            }
        }
        Action::Continue
    }

    fn request_done(&mut self) {
        if self.realtime.is_some() && matches!(self.phase, Phase::Admitted | Phase::Pass) {
            self.realtime_end();
            return;
        }
        match self.phase {
            Phase::Admitted => self.settle_once(),
            Phase::Waiting => {
                // The client left while the reserve call was in flight: whatever the sidecar decides
                // stays charged (the prompt estimate), and the concurrency lease is released once the
                // reserve must have been handled (see `release_after_reserve`).
                self.release_after_reserve();
            }
            _ => {}
        }
    }
}
