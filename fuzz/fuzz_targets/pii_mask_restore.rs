//! Property: restore(mask(x)) == x for any text, whatever the network cuts the masked answer into, and
//! no value detected in x survives masking; the scanner's prose fast path changes no finding; a JSON
//! answer scanned as raw JSON text (`scan_responses`, an answer too large to buffer) stays JSON whatever
//! the cut. Base64 runs in the text (decoded, masked and re-encoded, so not restored by design): with
//! them scanned, masking changes nothing else, and the result is still UTF-8.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshwarden_shared::config::parse_config;
use pii_redactor::config::Config;
use pii_redactor::engine::{Engine, MaskState};
use pii_redactor::restore::{RawStream, Restorer};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::OnceLock;

/// Base64 runs left as written: restore(mask(x)) == x must hold exactly.
fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        Engine::new(&parse_config::<Config>(br#"{"scan_base64_in_text":false}"#).expect("plain config"))
    })
}

/// The default configuration: base64 runs decoded and masked.
fn decoding_engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| Engine::new(&parse_config::<Config>(b"{}").expect("default config")))
}

thread_local! {
    static SCANNING: Rc<Engine> =
        Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).expect("scanning config")));
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut_seed, rest)) = data.split_first() else { return };
    let Ok(x) = std::str::from_utf8(rest) else { return };
    let scanner = pii_redactor::detect::Scanner::default();
    assert_eq!(scanner.scan(rest), scanner.scan_without_prose_fast_path(rest), "the fast path changed a finding");

    // Raw JSON text scanning keeps JSON valid, cut anywhere.
    if serde_json::from_slice::<serde_json::Value>(rest).is_ok() {
        let cut = usize::from(cut_seed) * rest.len() / 256;
        let mut r = Restorer::new(HashMap::new(), Some(SCANNING.with(Rc::clone)));
        let mut s = RawStream::json_text();
        let (a, b) = rest.split_at(cut);
        let mut out = s.feed(&mut r, a, false);
        out.extend(s.feed(&mut r, b, true));
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok(), "scanned JSON text is no longer JSON");
    }

    let mut st = MaskState::default();
    st.reserve_lookalikes(x.as_bytes());
    let masked = st.mask(engine(), x.as_bytes()).unwrap_or_else(|| x.as_bytes().to_vec());
    let mut decoding = MaskState::default();
    decoding.reserve_lookalikes(x.as_bytes());
    let with_runs = decoding.mask(decoding_engine(), x.as_bytes()).unwrap_or_else(|| x.as_bytes().to_vec());
    assert!(std::str::from_utf8(&with_runs).is_ok(), "masking base64 runs broke UTF-8");
    if decoding.base64_runs_masked == 0 {
        assert_eq!(with_runs, masked, "decoding base64 runs changed a text without one");
    }
    if !st.rejected.is_empty() {
        return;
    }
    let cut = usize::from(cut_seed) * masked.len() / 256;
    let mut r = Restorer::new(st.restore.clone(), None);
    let mut s = RawStream::default();
    let (a, b) = masked.split_at(cut);
    let mut out = s.feed(&mut r, a, false);
    out.extend(s.feed(&mut r, b, true));
    assert_eq!(out, x.as_bytes(), "restore(mask(x)) != x");
});
