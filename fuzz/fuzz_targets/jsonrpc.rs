//! JSON-RPC parsing never panics, and every error answer it leads to is valid JSON-RPC.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshwarden_shared::jsonrpc::{error_response, parse, Payload, INVALID_REQUEST};

fuzz_target!(|data: &[u8]| {
    if let Ok(payload) = parse(data) {
        let items = match payload {
            Payload::Single(m) => vec![m],
            Payload::Batch(v) => v,
        };
        for item in items {
            match item {
                Ok(m) => {
                    let _ = (m.method(), m.params(), m.id());
                }
                Err(invalid) => {
                    let e = error_response(invalid.id.as_ref(), INVALID_REQUEST, invalid.reason);
                    assert_eq!(e["jsonrpc"], "2.0");
                }
            }
        }
    }
});
