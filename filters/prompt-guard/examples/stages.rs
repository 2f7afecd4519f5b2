//! Native per-stage timing of one request inspection (the default configuration, the bench's chat body of
//! 1 KB and 128 KB: `The quick brown fox ...` as one user message):
//! `cargo run --release -p meshwarden-prompt-guard --example stages`.
//!
//! Each stage: the fastest and the median of 15 batches (on a shared machine the fastest batch is the
//! steadier figure).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // example code

use meshwarden_shared::config::parse_config;
use meshwarden_shared::llm::{extract_request_texts, Api, Role};
use prompt_guard::config::Config;
use prompt_guard::engine::{Dir, Engine};
use prompt_guard::inspect::{inspect_request, RequestOptions};
use prompt_guard::normalize::{normalize, normalize_with};
use serde_json::Value;
use std::hint::black_box;
use std::time::Instant;

/// The bench's body (integration-tests `chat_body_of_size`): exactly `bytes` of JSON.
fn chat_body_of_size(bytes: usize) -> Value {
    let base = serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ""}]});
    let overhead = base.to_string().len();
    let filler = "The quick brown fox jumps over the lazy dog. ";
    let mut text = String::new();
    while text.len() + overhead < bytes {
        text.push_str(filler);
    }
    text.truncate(bytes.saturating_sub(overhead));
    serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
}

/// (fastest, median) over 15 batches of the per-call time in µs.
fn time(iters: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut v: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() * 1e6 / iters as f64
        })
        .collect();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn main() {
    let cfg: Config = parse_config(b"{}").unwrap();
    let engine = Engine::compile(&cfg).unwrap();
    let policy = engine.default.clone();
    // the policy's request set: the packs and, last, the reversed words (since 2026-12-07)
    let mut patterns: Vec<String> = prompt_guard::packs::Pack::ALL.iter().map(|p| p.pattern()).collect();
    patterns.push(prompt_guard::engine::reversed_words_pattern());
    let reversed_words = regex::bytes::RegexBuilder::new(&prompt_guard::engine::reversed_words_pattern())
        .unicode(false)
        .case_insensitive(true)
        .build()
        .unwrap();
    let set = regex::bytes::RegexSetBuilder::new(&patterns)
        .unicode(false)
        .case_insensitive(true)
        .size_limit(32 << 20)
        .dfa_size_limit(8 << 20)
        .build()
        .unwrap();
    let opts = RequestOptions { scan_non_json: true, mask_text: "x", moderation_roles: &[], moderation_max_bytes: 0 };
    let path = "/v1/chat/completions";
    // a second 128 KB prompt of varied prose: the benign evaluation prompts (digits, quotes, markdown,
    // newlines, code) one per line, repeated
    let benign = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/eval/benign.tsv")).unwrap();
    let lines: Vec<&str> =
        benign.lines().filter(|l| !l.starts_with('#')).map(|l| l.split_once('\t').map_or(l, |x| x.1)).collect();
    let mut prose = String::new();
    for l in lines.iter().cycle() {
        if prose.len() >= 128 * 1024 {
            break;
        }
        prose.push_str(l);
        prose.push('\n');
    }
    let prose_body =
        serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prose}]}).to_string();
    let bodies = [
        ("bench chat body", chat_body_of_size(1024).to_string()),
        ("bench chat body", chat_body_of_size(128 * 1024).to_string()),
        ("benign eval prose", prose_body),
    ];
    for (label, body) in bodies {
        let size = body.len();
        let body = body.into_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        let text = extract_request_texts(Api::detect(path, &v), &v).remove(0).text;
        let quick = normalize_with(&text, false);
        let iters = if size > 10_000 { 40 } else { 4000 };
        let rows = [
            (
                "json parse (serde_json::Value)",
                time(iters, || drop(black_box(serde_json::from_slice::<Value>(black_box(&body)).unwrap()))),
            ),
            (
                "extract texts",
                time(iters, || drop(black_box(extract_request_texts(Api::detect(path, &v), black_box(&v))))),
            ),
            ("normalise, no map", time(iters, || drop(black_box(normalize_with(black_box(&text), false))))),
            ("normalise, with map", time(iters, || drop(black_box(normalize(black_box(&text)))))),
            (
                "automaton (RegexSet is_match)",
                time(iters, || {
                    black_box(set.is_match(black_box(&quick.text)));
                }),
            ),
            ("automaton (RegexSet matches)", time(iters, || drop(black_box(set.matches(black_box(&quick.text)))))),
            (
                "reversed words (find_iter; only when present)",
                time(iters, || {
                    black_box(reversed_words.find_iter(black_box(&quick.text)).count());
                }),
            ),
            (
                "base64 blobs (decode.rs)",
                time(iters, || drop(black_box(prompt_guard::decode::base64_blobs(black_box(&text))))),
            ),
            (
                "hex blobs (decode.rs)",
                time(iters, || drop(black_box(prompt_guard::decode::hex_blobs(black_box(&text))))),
            ),
            (
                "unescaped copy (decode.rs)",
                time(iters, || drop(black_box(prompt_guard::decode::unescape(black_box(&text))))),
            ),
            (
                "unescaped copy, no spans (decode.rs)",
                time(iters, || drop(black_box(prompt_guard::decode::unescape_with(black_box(&text), false)))),
            ),
            (
                "rot13 mentions (decode.rs)",
                time(iters, || drop(black_box(prompt_guard::decode::rot13_windows(black_box(&text))))),
            ),
            (
                "policy.scan (normalise+automaton+decode)",
                time(iters, || drop(black_box(policy.scan(black_box(&text), Dir::Request, Role::User)))),
            ),
            (
                "inspect_request (everything)",
                time(iters, || {
                    drop(black_box(inspect_request(&policy, path, Some("application/json"), black_box(&body), &opts)))
                }),
            ),
        ];
        println!("{label}, {} B body ({} B text):", body.len(), text.len());
        println!("  {:<46} {:>9} {:>9}", "stage", "min µs", "median µs");
        for (name, (min, med)) in rows {
            println!("  {name:<46} {min:>9.1} {med:>9.1}");
        }
    }
}
