//! The floor of `make bench`: a Proxy-Wasm (ABI 0.2.1) HTTP filter with every callback a meshwarden
//! filter uses (context create, request headers and body, response headers and body, log, done,
//! delete), each returning at once, and no SDK. Envoy + this module versus plain Envoy is what Envoy's
//! Wasm machinery alone costs per request on the machine at hand (context creation, the calls into
//! V8, buffering); a meshwarden filter's own work is what it adds on top. Never deployed.
//!
//! Its plugin configuration is up to six numbers `N [H [C [B [L [R]]]]]` (empty: all 0):
//! - N > 0: each request touches N random 64-byte lines of a 1 MiB buffer (one read-modify-write each)
//!   at the end of its body. That is the cache footprint experiment of docs/benchmarks.md: N = 3000
//!   costs ~6 µs inside the VM but adds 20-75 µs to Envoy's latency (it varies from run to run),
//!   because what the filter evicts from the core's caches Envoy has to fetch back.
//! - H > 0: each request reads its `:path` header H times (a host call that calls back into the module
//!   to allocate the answer, as every header, body, property or shared-data read does);
//! - C > 0: each request reads the clock C times (a host call that returns a number, as stat updates
//!   and header removals do).
//!
//! - B = 1: the request body is held (`Pause`, Envoy buffers it) until its end, as a filter that must
//!   see a whole body does; B = 2: the response body too. What Envoy's buffering itself costs.
//!
//! - L > 0: `on_log` busy-waits L µs (host clock); R > 0: the end of the request body does. Whether
//!   work a filter does once the answer is complete (settlements, stats in `on_log`) is on the
//!   client's latency path, priced against the same work on the request path.
//!
//! H and C price one host call of either kind, so a filter's count of host calls per request can be
//! turned into latency.
// `#[no_mangle]` and the host imports count as unsafe code for the lint: the ABI needs them.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, ptr: *mut *mut u8, len: *mut usize) -> u32;
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_len: usize,
        value: *mut *mut u8,
        value_len: *mut usize,
    ) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
}

/// Proxy-Wasm map type of the request headers.
const REQUEST_HEADERS: u32 = 0;

/// Proxy-Wasm buffer type of the plugin configuration.
const PLUGIN_CONFIGURATION: u32 = 7;
const LINE: usize = 64;
const BUFFER_BYTES: usize = 1 << 20;

thread_local! {
    static TOUCH_LINES: Cell<usize> = const { Cell::new(0) };
    static HEADER_READS: Cell<usize> = const { Cell::new(0) };
    static CLOCK_READS: Cell<usize> = const { Cell::new(0) };
    static BUFFER_BODIES: Cell<usize> = const { Cell::new(0) };
    static SPIN_ON_LOG_US: Cell<usize> = const { Cell::new(0) };
    static SPIN_ON_REQUEST_US: Cell<usize> = const { Cell::new(0) };
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static STATE: Cell<u64> = const { Cell::new(0x9e37_79b9_7f4a_7c15) };
}

fn plugin_configuration(size: usize) -> Option<String> {
    let mut ptr: *mut u8 = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: the host writes a pointer it allocated through `proxy_on_memory_allocate` (a leaked Vec
    // of `len` bytes) and its length; ownership passes to us and the Vec is rebuilt from exactly those.
    let bytes = unsafe {
        if proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, size, &mut ptr, &mut len) != 0 || ptr.is_null() {
            return None;
        }
        Vec::from_raw_parts(ptr, len, len)
    };
    String::from_utf8(bytes).ok()
}

/// Touch `TOUCH_LINES` random lines of the buffer (xorshift positions, so nothing is predictable).
fn touch() {
    let lines = TOUCH_LINES.with(Cell::get);
    if lines == 0 {
        return;
    }
    BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        let mut x = STATE.with(Cell::get);
        let count = b.len() / LINE;
        for _ in 0..lines {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize % count) * LINE;
            if let Some(byte) = b.get_mut(i) {
                *byte = byte.wrapping_add(1);
            }
        }
        STATE.with(|s| s.set(x));
    });
}

/// `HEADER_READS` reads of `:path` and `CLOCK_READS` reads of the clock; returns something derived from
/// the answers so that nothing can be optimised away.
fn host_calls() -> u64 {
    let mut acc = 0u64;
    for _ in 0..HEADER_READS.with(Cell::get) {
        let key = b":path";
        let mut ptr: *mut u8 = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: as in `plugin_configuration`: the host hands over a block it allocated through
        // `proxy_on_memory_allocate`, which is rebuilt into a Vec of exactly that length and freed.
        unsafe {
            if proxy_get_header_map_value(REQUEST_HEADERS, key.as_ptr(), key.len(), &mut ptr, &mut len) == 0
                && !ptr.is_null()
            {
                acc = acc.wrapping_add(Vec::from_raw_parts(ptr, len, len).len() as u64);
            }
        }
    }
    for _ in 0..CLOCK_READS.with(Cell::get) {
        let mut t = 0u64;
        // SAFETY: the host writes one u64 through a pointer to a live local.
        unsafe {
            proxy_get_current_time_nanoseconds(&mut t);
        }
        acc = acc.wrapping_add(t);
    }
    acc
}

fn now_ns() -> u64 {
    let mut t = 0u64;
    // SAFETY: the host writes one u64 through a pointer to a live local.
    unsafe {
        proxy_get_current_time_nanoseconds(&mut t);
    }
    t
}

/// Busy-wait `micros` µs of host (wall-clock) time.
fn spin(micros: usize) {
    if micros == 0 {
        return;
    }
    let until = now_ns().saturating_add(micros as u64 * 1000);
    while now_ns() < until {
        std::hint::spin_loop();
    }
}

/// The ABI marker Envoy looks for.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host copies header maps and bodies into memory it gets here; this filter reads none.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut block: Vec<u8> = Vec::with_capacity(size);
    let ptr = block.as_mut_ptr();
    std::mem::forget(block);
    ptr
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context_id: u32, _parent_id: u32) {}

/// 1 = success.
#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_context_id: u32, _configuration_size: usize) -> u32 {
    1
}

/// `N [H [C [B [L [R]]]]]` -> `[N, H, C, B, L, R]` (missing numbers are 0); `None` for anything else.
fn parse_floor_config(text: &str) -> Option<[usize; 6]> {
    let mut numbers = [0usize; 6];
    let mut words = text.split_whitespace();
    for slot in &mut numbers {
        match words.next() {
            Some(word) => *slot = word.parse().ok()?,
            None => break,
        }
    }
    words.next().is_none().then_some(numbers)
}

/// An empty configuration or up to six numbers (lines to touch, header reads, clock reads per request,
/// bodies buffered, µs spun in `on_log`, µs spun at the end of the request body); anything else is
/// rejected.
#[no_mangle]
pub extern "C" fn proxy_on_configure(_context_id: u32, configuration_size: usize) -> u32 {
    let text = if configuration_size == 0 {
        String::new()
    } else {
        plugin_configuration(configuration_size).unwrap_or_default()
    };
    let Some([lines, header_reads, clock_reads, buffer_bodies, spin_on_log, spin_on_request]) =
        parse_floor_config(&text)
    else {
        return 0;
    };
    TOUCH_LINES.with(|t| t.set(lines));
    HEADER_READS.with(|h| h.set(header_reads));
    CLOCK_READS.with(|c| c.set(clock_reads));
    BUFFER_BODIES.with(|b| b.set(buffer_bodies));
    SPIN_ON_LOG_US.with(|s| s.set(spin_on_log));
    SPIN_ON_REQUEST_US.with(|s| s.set(spin_on_request));
    if lines > 0 {
        BUFFER.with(|b| *b.borrow_mut() = vec![0u8; BUFFER_BYTES]);
    }
    1
}

/// 0 = Continue, 1 = Pause (for a body: Envoy buffers it), for every stream callback.
#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    std::hint::black_box(host_calls());
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(_context_id: u32, _body_size: usize, end_of_stream: u32) -> u32 {
    if end_of_stream != 0 {
        touch();
        spin(SPIN_ON_REQUEST_US.with(Cell::get));
        return 0;
    }
    if BUFFER_BODIES.with(Cell::get) >= 1 {
        1
    } else {
        0
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(_context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(_context_id: u32, _body_size: usize, end_of_stream: u32) -> u32 {
    if end_of_stream == 0 && BUFFER_BODIES.with(Cell::get) >= 2 {
        1
    } else {
        0
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_log(_context_id: u32) {
    spin(SPIN_ON_LOG_US.with(Cell::get));
}

/// 1 = done now (nothing pending).
#[no_mangle]
pub extern "C" fn proxy_on_done(_context_id: u32) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(_context_id: u32) {}

#[cfg(test)]
mod tests {
    use super::parse_floor_config;

    #[test]
    fn floor_config_is_up_to_six_numbers() {
        assert_eq!(parse_floor_config(""), Some([0, 0, 0, 0, 0, 0]));
        assert_eq!(parse_floor_config(" 3000 "), Some([3000, 0, 0, 0, 0, 0]));
        assert_eq!(parse_floor_config("0 20"), Some([0, 20, 0, 0, 0, 0]));
        assert_eq!(parse_floor_config("0 0 20"), Some([0, 0, 20, 0, 0, 0]));
        assert_eq!(parse_floor_config("0 0 0 2"), Some([0, 0, 0, 2, 0, 0]));
        assert_eq!(parse_floor_config("0 0 0 1 20"), Some([0, 0, 0, 1, 20, 0]));
        assert_eq!(parse_floor_config("0 0 0 1 0 20"), Some([0, 0, 0, 1, 0, 20]));
        assert_eq!(parse_floor_config("1 2 3 4 5 6 7"), None);
        assert_eq!(parse_floor_config("many"), None);
        assert_eq!(parse_floor_config("1 -2"), None);
    }
}
