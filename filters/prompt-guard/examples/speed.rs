//! Native timing of the scan pipeline stages (normalise, automaton, whole request inspection) for 1 KB
//! and 128 KB prompts: `cargo run --release -p meshwarden-prompt-guard --example speed`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // example code

use meshwarden_shared::config::parse_config;
use meshwarden_shared::llm::Role;
use prompt_guard::config::Config;
use prompt_guard::engine::{Dir, Engine};
use prompt_guard::inspect::{inspect_request, RequestOptions};
use prompt_guard::normalize::normalize;
use std::time::Instant;

fn main() {
    let cfg: Config = parse_config(b"{}").unwrap();
    let engine = Engine::compile(&cfg).unwrap();
    let policy = engine.default.clone();
    let combined: Vec<String> = prompt_guard::packs::Pack::ALL.iter().map(|p| format!("(?:{})", p.pattern())).collect();
    let one = regex::bytes::RegexBuilder::new(&combined.join("|"))
        .unicode(false)
        .case_insensitive(true)
        .size_limit(64 << 20)
        .dfa_size_limit(16 << 20)
        .build()
        .unwrap();
    let set = regex::bytes::RegexSetBuilder::new(&combined)
        .unicode(false)
        .case_insensitive(true)
        .size_limit(64 << 20)
        .dfa_size_limit(16 << 20)
        .build()
        .unwrap();
    let filler = "The quick brown fox jumps over the lazy dog. ";
    for size in [1024usize, 128 * 1024] {
        let text: String = filler.repeat(size / filler.len() + 1)[..size].to_string();
        let body = serde_json::json!({"model":"m","messages":[{"role":"user","content":text}]}).to_string();
        let iters = if size > 10_000 { 200 } else { 20_000 };
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(std::hint::black_box(&text).to_ascii_lowercase());
        }
        let base = t.elapsed().as_secs_f64() / iters as f64;
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(prompt_guard::normalize::normalize_with(&text, false));
        }
        let quick = t.elapsed().as_secs_f64() / iters as f64;
        let q = prompt_guard::normalize::normalize_with(&text, false);
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(one.is_match(&q.text));
        }
        let one_t = t.elapsed().as_secs_f64() / iters as f64;
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(set.matches(&q.text));
        }
        let set_t = t.elapsed().as_secs_f64() / iters as f64;
        println!(
            "{size:>7} B: one combined regex is_match {:.1} µs; RegexSet matches {:.1} µs",
            one_t * 1e6,
            set_t * 1e6
        );
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(normalize(&text));
        }
        let norm = t.elapsed().as_secs_f64() / iters as f64;
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(policy.scan(&text, Dir::Request, Role::User));
        }
        let scan = t.elapsed().as_secs_f64() / iters as f64;
        let opts =
            RequestOptions { scan_non_json: true, mask_text: "x", moderation_roles: &[], moderation_max_bytes: 0 };
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(
                inspect_request(&policy, "/v1/chat/completions", Some("application/json"), body.as_bytes(), &opts)
                    .unwrap(),
            );
        }
        let all = t.elapsed().as_secs_f64() / iters as f64;
        println!(
            "{size:>7} B: (calibration: to_ascii_lowercase {:.1} µs) normalise without map {:.1} µs",
            base * 1e6,
            quick * 1e6
        );
        println!(
            "{size:>7} B: normalise {:>8.1} µs ({:.0} MB/s) | normalise+automaton {:>8.1} µs ({:.0} MB/s) | whole request {:>8.1} µs",
            norm * 1e6,
            size as f64 / norm / 1e6,
            scan * 1e6,
            size as f64 / scan / 1e6,
            all * 1e6
        );
    }
}
