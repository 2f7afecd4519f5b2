//! The floor of `make bench`: a Proxy-Wasm (ABI 0.2.1) HTTP filter with every callback a meshwarden
//! filter uses (context create, request headers and body, response headers and body, log, done,
//! delete), each returning at once, and no SDK. Envoy + this module versus plain Envoy is what Envoy's
//! Wasm machinery alone costs per request on the machine at hand (context creation, the calls into
//! V8, buffering); a meshwarden filter's own work is what it adds on top. Never deployed.
//!
//! Its plugin configuration is a number N (0: nothing more); N > 0: each request touches N random 64-byte lines of a
//! 1 MiB buffer (one read-modify-write each) at the end of its body. That is the cache footprint
//! experiment of docs/benchmarks.md: N = 3000 costs ~6 µs inside the VM but adds ~20 µs to Envoy's
//! latency, because what the filter evicts from the core's caches Envoy has to fetch back.
// `#[no_mangle]` and the host imports count as unsafe code for the lint: the ABI needs them.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, ptr: *mut *mut u8, len: *mut usize) -> u32;
}

/// Proxy-Wasm buffer type of the plugin configuration.
const PLUGIN_CONFIGURATION: u32 = 7;
const LINE: usize = 64;
const BUFFER_BYTES: usize = 1 << 20;

thread_local! {
    static TOUCH_LINES: Cell<usize> = const { Cell::new(0) };
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

/// An empty configuration or a number of lines to touch per request; anything else is rejected.
#[no_mangle]
pub extern "C" fn proxy_on_configure(_context_id: u32, configuration_size: usize) -> u32 {
    let text = if configuration_size == 0 {
        String::new()
    } else {
        plugin_configuration(configuration_size).unwrap_or_default()
    };
    let lines = match text.trim() {
        "" => 0,
        n => match n.parse::<usize>() {
            Ok(n) => n,
            Err(_) => return 0,
        },
    };
    TOUCH_LINES.with(|t| t.set(lines));
    if lines > 0 {
        BUFFER.with(|b| *b.borrow_mut() = vec![0u8; BUFFER_BYTES]);
    }
    1
}

/// 0 = Continue, for every stream callback.
#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(_context_id: u32, _body_size: usize, end_of_stream: u32) -> u32 {
    if end_of_stream != 0 {
        touch();
    }
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(_context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(_context_id: u32, _body_size: usize, _end_of_stream: u32) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_log(_context_id: u32) {}

/// 1 = done now (nothing pending).
#[no_mangle]
pub extern "C" fn proxy_on_done(_context_id: u32) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(_context_id: u32) {}
