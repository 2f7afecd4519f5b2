//! The thin proxy-wasm glue every filter uses: config loading, metrics, local replies, callouts.
//! Kept small on purpose: decisions live in the pure modules, this only talks to the host.

use crate::callout::{CalloutConfig, CalloutFailure};
use crate::config::{parse_config, Validate};
use crate::errors::{error_body, ErrorFlavor, ErrorKind};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MetricType, Status};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

/// Log through Envoy (shows up in Envoy's log with the plugin name). Failures to log are ignored:
/// there is nowhere else to report them.
pub fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

/// Parse the plugin configuration in `on_configure`. On error, logs one line naming the JSON path and
/// returns `None`; the caller returns `false`, which makes Envoy reject the plugin.
pub fn load_config<T: DeserializeOwned + Validate>(filter: &str, bytes: Option<Vec<u8>>) -> Option<T> {
    match parse_config::<T>(bytes.as_deref().unwrap_or(&[])) {
        Ok(cfg) => Some(cfg),
        Err(err) => {
            log(LogLevel::Critical, &format!("meshwarden {filter}: {err}"));
            None
        }
    }
}

/// Milliseconds since the Unix epoch, from the host clock.
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where a filter's time goes inside the VM, for `make bench-breakdown`: compiled in only with the cargo
/// feature `bench-timers` (never in a shipped build). A filter starts a stopwatch when a callback begins
/// and adds [`Stopwatch::elapsed_us`] to the counter `<prefix>.vm_us.<callback>` when it ends; the
/// benchmark divides each sum by `<prefix>.requests`. The host clock ticks in whole microseconds, so one
/// reading means little and the mean over thousands of requests is what counts. Without the feature a
/// stopwatch is empty and `elapsed_us` is `None`: no clock read and no stat, the optimiser removes both.
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch {
    #[cfg(feature = "bench-timers")]
    started_us: u64,
}

impl Stopwatch {
    #[inline(always)]
    pub fn start() -> Self {
        Self {
            #[cfg(feature = "bench-timers")]
            started_us: now_us(),
        }
    }

    /// Microseconds since [`Stopwatch::start`]; `None` unless built with `bench-timers`.
    #[cfg(feature = "bench-timers")]
    #[inline(always)]
    pub fn elapsed_us(self) -> Option<u64> {
        Some(now_us().saturating_sub(self.started_us))
    }

    /// Microseconds since [`Stopwatch::start`]; `None` unless built with `bench-timers`.
    #[cfg(not(feature = "bench-timers"))]
    #[inline(always)]
    pub fn elapsed_us(self) -> Option<u64> {
        None
    }
}

/// A request context that can count its own time in the VM (see [`Stopwatch`]).
pub trait VmTimed {
    /// Add `us` to the counter `<filter prefix>.<section>`.
    fn add_vm_us(&self, section: &str, us: u64);
}

/// Run one callback's work `f`; with `bench-timers`, add its duration to `section` (`vm_us.<callback>`).
/// Each filter's `HttpContext` methods are one call of this around the method doing the work.
#[inline(always)]
pub fn timed<C: VmTimed, R>(ctx: &mut C, section: &str, f: impl FnOnce(&mut C) -> R) -> R {
    let sw = Stopwatch::start();
    let out = f(ctx);
    if let Some(us) = sw.elapsed_us() {
        ctx.add_vm_us(section, us);
    }
    out
}

/// The `HttpContext` methods of a request context whose work lives in inherent methods named after the
/// callbacks (`request_headers`, `request_body`, `request_trailers`, `response_headers`, `response_body`,
/// `response_trailers`, and `request_done` for `on_log`), each one call of [`timed`] with the section
/// `vm_us.<name>`. Name the ones the filter implements:
/// `impl HttpContext for Request { meshwarden_shared::timed_http_callbacks!(request_headers, request_body); }`
#[macro_export]
macro_rules! timed_http_callbacks {
    () => {};
    (request_headers $(, $rest:ident)*) => {
        fn on_http_request_headers(&mut self, n: usize, end_of_stream: bool) -> ::proxy_wasm::types::Action {
            $crate::host::timed(self, "vm_us.request_headers", |r| r.request_headers(n, end_of_stream))
        }
        $crate::timed_http_callbacks!($($rest),*);
    };
    (request_body $(, $rest:ident)*) => {
        fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> ::proxy_wasm::types::Action {
            $crate::host::timed(self, "vm_us.request_body", |r| r.request_body(body_size, end_of_stream))
        }
        $crate::timed_http_callbacks!($($rest),*);
    };
    (request_trailers $(, $rest:ident)*) => {
        fn on_http_request_trailers(&mut self, n: usize) -> ::proxy_wasm::types::Action {
            $crate::host::timed(self, "vm_us.request_trailers", |r| r.request_trailers(n))
        }
        $crate::timed_http_callbacks!($($rest),*);
    };
    (response_headers $(, $rest:ident)*) => {
        fn on_http_response_headers(&mut self, n: usize, end_of_stream: bool) -> ::proxy_wasm::types::Action {
            $crate::host::timed(self, "vm_us.response_headers", |r| r.response_headers(n, end_of_stream))
        }
        $crate::timed_http_callbacks!($($rest),*);
    };
    (response_body $(, $rest:ident)*) => {
        fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> ::proxy_wasm::types::Action {
            $crate::host::timed(self, "vm_us.response_body", |r| r.response_body(body_size, end_of_stream))
        }
        $crate::timed_http_callbacks!($($rest),*);
    };
    (response_trailers $(, $rest:ident)*) => {
        fn on_http_response_trailers(&mut self, n: usize) -> ::proxy_wasm::types::Action {
            $crate::host::timed(self, "vm_us.response_trailers", |r| r.response_trailers(n))
        }
        $crate::timed_http_callbacks!($($rest),*);
    };
    (request_done $(, $rest:ident)*) => {
        fn on_log(&mut self) {
            $crate::host::timed(self, "vm_us.request_done", |r| r.request_done())
        }
        $crate::timed_http_callbacks!($($rest),*);
    };
}

#[cfg(feature = "bench-timers")]
fn now_us() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Metric ids by name, defined on first use. One per root context (per VM); stat names must already
/// be bounded ([`crate::stats::BoundedLabels`]).
#[derive(Debug, Default)]
pub struct Metrics {
    ids: HashMap<String, u32>,
    /// Counter ids by the name *after* the filter's prefix: the per-request path looks a stat up
    /// without formatting its full name (a `format!` costs more than the host call inside V8).
    by_suffix: HashMap<String, u32>,
    /// The same for histograms.
    histograms_by_suffix: HashMap<String, u32>,
}

impl Metrics {
    fn id(&mut self, kind: MetricType, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.get(name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(kind, name).ok()?;
        self.ids.insert(name.to_string(), id);
        Some(id)
    }

    pub fn counter(&mut self, name: &str, delta: u64) {
        if let Some(id) = self.id(MetricType::Counter, name) {
            let _ = hostcalls::increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX));
        }
    }

    /// `counter(&format!("{prefix}.{name}"), delta)` without building the full name after its first use.
    /// One `Metrics` serves one filter, so the prefix is the same on every call.
    pub fn counter_in(&mut self, prefix: &str, name: &str, delta: u64) {
        if let Some(id) = self.id_in(MetricType::Counter, prefix, name) {
            let _ = hostcalls::increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX));
        }
    }

    /// The id of the counter `{prefix}.{name}` (defined now if need be), for a filter that keeps the ids
    /// of its hottest stats and adds to them with [`Metrics::add`]: no name is built or hashed per request.
    pub fn counter_id_in(&mut self, prefix: &str, name: &str) -> Option<u32> {
        self.id_in(MetricType::Counter, prefix, name)
    }

    /// Add to a counter by id ([`Metrics::counter_id_in`]).
    pub fn add(id: u32, delta: u64) {
        let _ = hostcalls::increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX));
    }

    /// Hand every increment held in `batch` to Envoy (one host call per counter) and empty it.
    pub fn flush(batch: &mut crate::stats::CounterBatch) {
        for (id, delta) in batch.drain() {
            Self::add(id, delta);
        }
    }

    /// The id of `{prefix}.{name}` (a counter or a histogram), looked up by `name` once defined.
    fn id_in(&mut self, kind: MetricType, prefix: &str, name: &str) -> Option<u32> {
        let by_suffix =
            if matches!(kind, MetricType::Histogram) { &self.histograms_by_suffix } else { &self.by_suffix };
        if let Some(id) = by_suffix.get(name) {
            return Some(*id);
        }
        let id = self.id(kind, &format!("{prefix}.{name}"))?;
        let by_suffix =
            if matches!(kind, MetricType::Histogram) { &mut self.histograms_by_suffix } else { &mut self.by_suffix };
        by_suffix.insert(name.to_string(), id);
        Some(id)
    }

    pub fn gauge_set(&mut self, name: &str, value: u64) {
        if let Some(id) = self.id(MetricType::Gauge, name) {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    pub fn gauge_add(&mut self, name: &str, delta: i64) {
        if let Some(id) = self.id(MetricType::Gauge, name) {
            let _ = hostcalls::increment_metric(id, delta);
        }
    }

    /// `histogram(&format!("{prefix}.{name}"), value)` without building the full name after its first use.
    pub fn histogram_in(&mut self, prefix: &str, name: &str, value: u64) {
        if let Some(id) = self.id_in(MetricType::Histogram, prefix, name) {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    pub fn histogram(&mut self, name: &str, value: u64) {
        if let Some(id) = self.id(MetricType::Histogram, name) {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

/// Answer the client from the filter with an OpenAI- or Anthropic-shaped error body.
pub fn send_error(
    status: u32,
    flavor: ErrorFlavor,
    kind: ErrorKind,
    code: Option<&str>,
    message: &str,
    extra_headers: &[(&str, &str)],
) {
    let body = error_body(flavor, kind, code, message);
    send_json(status, &body, extra_headers);
}

/// A local JSON reply. `content-type` is set here; callers add what else they need.
pub fn send_json(status: u32, body: &str, extra_headers: &[(&str, &str)]) {
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra_headers);
    let _ = hostcalls::send_http_response(status, headers, Some(body.as_bytes()));
}

/// Ask Envoy to recompute the route after headers that routing reads were changed.
pub fn clear_route_cache() -> Result<(), Status> {
    hostcalls::call_foreign_function("clear_route_cache", Some(&[])).map(|_| ())
}

/// Dispatch a callout described by `cfg`; returns the token that `on_http_call_response` will carry.
pub fn dispatch(
    cfg: &CalloutConfig,
    method: &str,
    path: &str,
    extra_headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<u32, CalloutFailure> {
    let mut headers: Vec<(&str, &str)> = vec![(":method", method), (":path", path), (":authority", cfg.authority())];
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    headers.extend_from_slice(extra_headers);
    hostcalls::dispatch_http_call(&cfg.cluster, headers, body, vec![], Duration::from_millis(cfg.timeout_ms))
        .map_err(|_| CalloutFailure::Dispatch)
}

/// Read a callout's answer in `on_http_call_response` (its `num_headers` and `body_size`): the body on
/// 2xx, or why it failed. Envoy answers a callout that timed out with its own 504 (and a failed
/// connection with 503), so 504 counts as a timeout; an answer without `:status` (the call was reset,
/// see [`callout_status`]) counts as one too.
pub fn callout_response(num_headers: usize, body_size: usize) -> Result<Vec<u8>, CalloutFailure> {
    let status = callout_status(num_headers);
    match status {
        None | Some(504) => Err(CalloutFailure::Timeout),
        Some(s) if !(200..300).contains(&s) => Err(CalloutFailure::Status(s)),
        Some(_) => Ok(hostcalls::get_buffer(proxy_wasm::types::BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()),
    }
}

/// A header value as text. Envoy passes values that are not UTF-8 (RFC 9110 obs-text, e.g. a Latin-1
/// `café` from an old client or upstream), and the SDK's string getters (`get_http_request_header`,
/// `get_map`, ...) unwrap `String::from_utf8` on them: one such header panicked the filter, and a
/// panic kills the VM, so every later request on that worker failed with a 503 (or passed unfiltered
/// under `fail_open`). Filters read headers only through this module: bytes from the host, each invalid
/// sequence replaced by U+FFFD, so such a value never equals a configured (UTF-8) value or key.
pub fn header_text(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

fn map_value(map: proxy_wasm::types::MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(map, name).ok().flatten().map(header_text)
}

/// One request header (see [`header_text`]); `None` when absent.
pub fn request_header(name: &str) -> Option<String> {
    map_value(proxy_wasm::types::MapType::HttpRequestHeaders, name)
}

/// One response header (see [`header_text`]); `None` when absent.
pub fn response_header(name: &str) -> Option<String> {
    map_value(proxy_wasm::types::MapType::HttpResponseHeaders, name)
}

/// The `:status` of a callout's answer, in `on_http_call_response` (pass its `num_headers`); `None`
/// when there is none. Envoy reports a call that was reset mid-answer (the service closed the connection
/// after its headers, or the answer outgrew the buffer) with no headers, and reading a header then fails
/// in the host with a status the SDK panics on: one such answer killed the VM, and every later request
/// on that worker was a 503.
pub fn callout_status(num_headers: usize) -> Option<u16> {
    if num_headers == 0 {
        return None;
    }
    map_value(proxy_wasm::types::MapType::HttpCallResponseHeaders, ":status").and_then(|s| s.parse::<u16>().ok())
}

/// A header map read with one host call. Each single-header read is a host call plus a call back into
/// the VM to allocate the answer; a filter that looks at many headers (mcp-authz reads up to ten per
/// request) is cheaper reading them all at once.
///
/// The host's answer is kept as the one block it arrives in and indexed, not copied out into a pair
/// of strings per header: the SDK's `get_map_bytes` makes two allocations per header (and frees them
/// with the snapshot), which inside the VM cost more than the host call. It also panics on a map it
/// cannot decode or a status it does not expect; this reader keeps what it could read.
#[derive(Debug)]
pub struct HeaderSnapshot {
    map: proxy_wasm::types::MapType,
    /// The map in Proxy-Wasm's serialised layout (see [`index_map`]), plus the lossy UTF-8 spelling of
    /// any name or value that was not valid UTF-8, appended at the end.
    raw: Vec<u8>,
    /// The headers still in the snapshot, in the host's order: ranges of `raw`, all valid UTF-8.
    entries: Vec<MapEntry>,
}

#[derive(Debug, Clone)]
struct MapEntry {
    name: std::ops::Range<usize>,
    value: std::ops::Range<usize>,
}

#[link(wasm_import_module = "env")]
extern "C" {
    // The SDK declares this import with its own `Status` enum as the result; a host answering a status
    // the enum lacks would be undefined behaviour there, so the raw number is read here.
    #[allow(clashing_extern_declarations)]
    fn proxy_get_header_map_pairs(
        map_type: proxy_wasm::types::MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
}

/// The whole header map `map` in Proxy-Wasm's serialised layout; empty when the host has none (or
/// answers anything but success, e.g. response headers asked for before they exist).
#[allow(unsafe_code)]
fn serialized_map(map: proxy_wasm::types::MapType) -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer to a block it allocated through the module's
    // `proxy_on_memory_allocate` (the SDK's allocator: a `Vec<u8>` of exactly `size` bytes whose
    // ownership passes to us) and its size; the Vec is rebuilt from exactly those, once, only on
    // success and for a non-null pointer, as the SDK's own `get_map_bytes` does.
    unsafe {
        if proxy_get_header_map_pairs(map, &mut data, &mut size) != 0 || data.is_null() {
            return Vec::new();
        }
        Vec::from_raw_parts(data, size, size)
    }
}

/// Index a serialised header map: a little-endian u32 count, then a (name length, value length) u32
/// pair per header, then each name and value followed by a NUL. Reads what is well-formed and stops
/// at the first header that runs past the end (a host never sends that; nothing here can panic).
/// A name or value that is not UTF-8 is replaced by its lossy spelling (U+FFFD for each bad byte,
/// as [`header_text`] does), appended to `raw`, so every entry can be read as `&str`.
fn index_map(raw: &mut Vec<u8>) -> Vec<MapEntry> {
    let u32_at = |raw: &[u8], at: usize| -> Option<usize> {
        let b: [u8; 4] = raw.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    };
    let Some(count) = u32_at(raw, 0) else {
        return Vec::new();
    };
    let Some(mut p) = count.checked_mul(8).and_then(|n| n.checked_add(4)) else {
        return Vec::new();
    };
    let mut entries = Vec::with_capacity(count.min(raw.len() / 10));
    for n in 0..count {
        let s = 4 + n * 8; // < p, so no overflow
        let (Some(name_len), Some(value_len)) = (u32_at(raw, s), u32_at(raw, s + 4)) else {
            break;
        };
        let Some(name_end) = p.checked_add(name_len) else { break };
        let name = p..name_end;
        let Some(value_start) = name_end.checked_add(1) else { break };
        let Some(value_end) = value_start.checked_add(value_len) else { break };
        if value_end > raw.len() {
            break;
        }
        entries.push(MapEntry { name, value: value_start..value_end });
        p = value_end + 1;
    }
    for e in &mut entries {
        for range in [&mut e.name, &mut e.value] {
            let lossy = match raw.get(range.clone()).map(std::str::from_utf8) {
                Some(Err(_)) => String::from_utf8_lossy(raw.get(range.clone()).unwrap_or_default()).into_owned(),
                _ => continue,
            };
            let start = raw.len();
            raw.extend_from_slice(lossy.as_bytes());
            *range = start..raw.len();
        }
    }
    entries
}

impl HeaderSnapshot {
    /// The request headers (call from a request-headers callback or later).
    pub fn request() -> Self {
        Self::read(proxy_wasm::types::MapType::HttpRequestHeaders)
    }

    /// The response headers (call from a response-headers callback or later).
    pub fn response() -> Self {
        Self::read(proxy_wasm::types::MapType::HttpResponseHeaders)
    }

    fn read(map: proxy_wasm::types::MapType) -> Self {
        Self::from_serialized(map, serialized_map(map))
    }

    fn from_serialized(map: proxy_wasm::types::MapType, mut raw: Vec<u8>) -> Self {
        let entries = index_map(&mut raw);
        Self { map, raw, entries }
    }

    /// Request headers from pairs (tests, or headers already read).
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Self {
        let mut raw = Vec::new();
        raw.extend_from_slice(&u32::try_from(pairs.len()).unwrap_or(u32::MAX).to_le_bytes());
        for (k, v) in &pairs {
            raw.extend_from_slice(&u32::try_from(k.len()).unwrap_or(u32::MAX).to_le_bytes());
            raw.extend_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_le_bytes());
        }
        for (k, v) in &pairs {
            raw.extend_from_slice(k.as_bytes());
            raw.push(0);
            raw.extend_from_slice(v.as_bytes());
            raw.push(0);
        }
        Self::from_serialized(proxy_wasm::types::MapType::HttpRequestHeaders, raw)
    }

    /// Remove every `name` header from the stream (and from the snapshot), with no host call when the
    /// snapshot shows none: a removal is a host call whether or not the header is there (about 0.7 µs
    /// in the VM), and most requests carry none of the headers a filter strips.
    pub fn remove(&mut self, name: &str) {
        if self.forget(name) {
            let _ = hostcalls::set_map_value(self.map, name, None);
        }
    }

    /// Drop every `name` header from the snapshot only; true when there was one, i.e. when the stream
    /// needs the host call too. Kept apart from [`Self::remove`] so that native unit tests, which have
    /// no host to link against, can check it.
    fn forget(&mut self, name: &str) -> bool {
        if !self.has(name) {
            return false;
        }
        let raw = &self.raw;
        self.entries.retain(|e| !raw.get(e.name.clone()).is_some_and(|k| k.eq_ignore_ascii_case(name.as_bytes())));
        true
    }

    /// Every header still in the snapshot, in the host's order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.entries.iter().filter_map(|e| Some((self.text(&e.name)?, self.text(&e.value)?)))
    }

    fn text(&self, range: &std::ops::Range<usize>) -> Option<&str> {
        std::str::from_utf8(self.raw.get(range.clone())?).ok()
    }

    /// The first value of `name` (case-insensitive), as a single-header read answers it.
    pub fn get(&self, name: &str) -> Option<&str> {
        let e = self
            .entries
            .iter()
            .find(|e| self.raw.get(e.name.clone()).is_some_and(|k| k.eq_ignore_ascii_case(name.as_bytes())))?;
        self.text(&e.value)
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// How many `name` headers the request carries (case-insensitive): a header a filter must read
    /// unambiguously is refused when repeated, since the upstream may read a different copy.
    pub fn count(&self, name: &str) -> usize {
        self.entries
            .iter()
            .filter(|e| self.raw.get(e.name.clone()).is_some_and(|k| k.eq_ignore_ascii_case(name.as_bytes())))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn header_values_that_are_not_utf8_are_read_not_panicked_on() {
        assert_eq!(header_text(b"alice".to_vec()), "alice");
        assert_eq!(header_text("café".as_bytes().to_vec()), "café");
        assert_eq!(header_text(b"caf\xe9".to_vec()), "caf\u{fffd}");
        assert_eq!(header_text(b"\xff\xfe".to_vec()), "\u{fffd}\u{fffd}");
        assert_ne!(header_text(b"caf\xe9".to_vec()), "café", "never equal to the UTF-8 spelling");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn header_snapshot_answers_like_a_single_header_read() {
        let h = HeaderSnapshot::from_pairs(vec![
            (":path".into(), "/mcp".into()),
            ("x-user".into(), "alice".into()),
            ("x-user".into(), "mallory".into()),
        ]);
        assert_eq!(h.get("X-User"), Some("alice"), "case-insensitive, first value");
        assert_eq!(h.get(":path"), Some("/mcp"));
        assert!(h.has("x-user") && !h.has("x-groups"));
        // A value that is not UTF-8 (serialised as the host hands it over) reads as a single-header read
        // answers it (U+FFFD for each bad byte), never as absent: `content-encoding: gz\xff` is an encoding.
        let mut raw = Vec::new();
        for n in [1u32, 16, 3] {
            raw.extend_from_slice(&n.to_le_bytes());
        }
        raw.extend_from_slice(b"content-encoding\0gz\xff\0");
        let odd = HeaderSnapshot::from_serialized(proxy_wasm::types::MapType::HttpRequestHeaders, raw);
        assert_eq!(odd.get("Content-Encoding"), Some("gz\u{fffd}"));
        assert_eq!(odd.get("x-none"), None);
        assert_eq!((h.count("X-USER"), h.count(":path"), h.count("x-groups")), (2, 1, 0));
    }

    /// Serialise `(name, value)` byte pairs in Proxy-Wasm's map layout, as the host does.
    fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut raw = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            raw.extend_from_slice(&(k.len() as u32).to_le_bytes());
            raw.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            raw.extend_from_slice(k);
            raw.push(0);
            raw.extend_from_slice(v);
            raw.push(0);
        }
        raw
    }

    fn snapshot(raw: Vec<u8>) -> HeaderSnapshot {
        HeaderSnapshot::from_serialized(proxy_wasm::types::MapType::HttpRequestHeaders, raw)
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_serialized_map_is_read_in_order_without_copies_of_each_header() {
        let h = snapshot(serialize(&[
            (b":authority", b"api.example"),
            (b"x-empty", b""),
            (b"x-team", b"blue"),
            (b"X-Team", b"red"),
        ]));
        let all: Vec<(&str, &str)> = h.iter().collect();
        assert_eq!(all, vec![(":authority", "api.example"), ("x-empty", ""), ("x-team", "blue"), ("X-Team", "red")]);
        assert_eq!(h.get("x-team"), Some("blue"), "first value wins");
        assert_eq!(h.get("x-empty"), Some(""), "an empty value is present");
        assert_eq!(h.get("x-none"), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn names_and_values_that_are_not_utf8_read_as_their_lossy_spelling() {
        let h = snapshot(serialize(&[(b"x-user", b"caf\xe9"), (b"x-\xff", b"v"), (b"x-ok", b"fine")]));
        assert_eq!(h.get("x-user"), Some("caf\u{fffd}"), "as header_text reads it");
        assert_eq!(h.get("x-\u{fffd}"), Some("v"));
        assert_eq!(h.get("x-ok"), Some("fine"), "headers after a bad one are still read");
        assert_eq!(h.iter().count(), 3);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_malformed_map_yields_what_was_well_formed_and_never_panics() {
        let good = serialize(&[(b"a", b"1"), (b"b", b"2")]);
        // Truncated anywhere: every complete header before the cut is kept.
        for cut in 0..good.len() {
            let h = snapshot(good[..cut].to_vec());
            let n = h.iter().count();
            assert!(n <= 2, "cut at {cut}");
            if n >= 1 {
                assert_eq!(h.get("a"), Some("1"), "cut at {cut}");
            }
        }
        assert_eq!(snapshot(good.clone()).iter().count(), 2);
        // A count far beyond the data, lengths that overflow, an empty answer.
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(snapshot(huge).iter().count(), 0);
        let mut long = good;
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(snapshot(long).iter().count(), 0);
        assert_eq!(snapshot(Vec::new()).iter().count(), 0);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_removed_header_is_gone_from_the_snapshot_and_others_stay() {
        let mut h = HeaderSnapshot::from_pairs(vec![
            (":path".into(), "/mcp".into()),
            ("Accept-Encoding".into(), "gzip".into()),
        ]);
        assert!(!h.forget("content-length"), "absent: no host call is needed");
        assert_eq!(h.get(":path"), Some("/mcp"));
        assert_eq!(h.get("accept-encoding"), Some("gzip"));
        assert!(h.forget("accept-encoding"), "present, in another case: the host call is needed");
        assert!(!h.has("Accept-Encoding"), "gone from the snapshot");
        assert_eq!(h.get(":path"), Some("/mcp"), "the others stay");
        assert!(!h.forget("accept-encoding"), "a second removal needs no host call");
    }
}
