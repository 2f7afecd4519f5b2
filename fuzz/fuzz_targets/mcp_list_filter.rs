//! mcp-authz list filtering: the one-pass path (a plan of one list answer) and the general path (forced
//! by a second plan entry that matches nothing) give the same answer for any input: both unreadable, both
//! untouched, or the same rewritten JSON with the same number of removed items.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mcp_authz::config::Config;
use mcp_authz::engine::{Engine, FilterKind};
use mcp_authz::identity::Identity;
use meshwarden_shared::config::parse_config;
use meshwarden_shared::mcp::ListKind;
use std::collections::HashMap;
use std::sync::OnceLock;

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let cfg: Config = parse_config(
            br#"{"policy": {"rules": [
                {"name": "readers", "effect": "allow", "methods": ["tools/call"], "targets": ["search", "get_*"]},
                {"name": "no-rm", "effect": "deny", "targets": ["rm*"]}]}}"#,
        )
        .expect("fuzz policy parses");
        Engine::new(cfg).expect("fuzz policy compiles")
    })
}

/// JSON text without the whitespace between tokens.
fn minify(json: &str) -> String {
    let (mut out, mut in_string, mut escaped) = (String::new(), false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if !c.is_ascii_whitespace() {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

fn same_json(a: &str, b: &str) -> bool {
    match (serde_json::from_str::<serde_json::Value>(a), serde_json::from_str::<serde_json::Value>(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => minify(a) == minify(b),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let e = engine();
    let id = Identity::default();
    let mut one = HashMap::new();
    one.insert("7".to_string(), FilterKind::List(ListKind::Tools));
    let mut general = one.clone();
    general.insert("\"unused\"".to_string(), FilterKind::List(ListKind::Prompts));
    match (e.filter_answer_text(&id, &one, text), e.filter_answer_text(&id, &general, text)) {
        (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
        (Ok(Some((f, nf))), Ok(Some((g, ng)))) => {
            assert_eq!(nf, ng);
            // Same JSON value (or, with numbers serde cannot hold, the same text up to whitespace).
            assert!(same_json(&f, &g), "{f} vs {g}");
        }
        (f, g) => panic!("one-pass {f:?} vs general {g:?}"),
    }
});
