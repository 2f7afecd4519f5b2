//! The floor of `make bench`: a Proxy-Wasm (ABI 0.2.1) HTTP filter with every callback a meshwarden
//! filter uses (context create, request headers and body, response headers and body, log, done,
//! delete), each returning at once, and no SDK. Envoy + this module versus plain Envoy is what Envoy's
//! Wasm machinery alone costs per request on the machine at hand (context creation, the calls into
//! V8, buffering); a meshwarden filter's own work is what it adds on top. Never deployed.
// `#[no_mangle]` counts as unsafe code for the lint: the ABI needs these exact export names.
#![allow(unsafe_code)]

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

#[no_mangle]
pub extern "C" fn proxy_on_configure(_context_id: u32, _configuration_size: usize) -> u32 {
    1
}

/// 0 = Continue, for every stream callback.
#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(_context_id: u32, _body_size: usize, _end_of_stream: u32) -> u32 {
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
