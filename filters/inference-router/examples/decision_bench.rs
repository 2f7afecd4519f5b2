//! Cost of one routing decision in the pure core: parse a 16 KB chat body, hash its prefix blocks,
//! score 16 endpoints and record the pick. Native build; the filter runs the same code compiled to
//! wasm32 under V8 (expect roughly 1.5-2x).
//!
//! `cargo run --release -p meshwarden-inference-router --example decision_bench`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)] // benchmark tool

use inference_router::config::Config;
use inference_router::picker::{Picker, PickerConfig};
use inference_router::request::features;
use meshwarden_shared::endpoints::{EndpointState, PoolSnapshot};
use std::time::Instant;

fn main() {
    let cfg = Config::default();
    let mut picker = Picker::new(PickerConfig::from(&cfg));
    let endpoints: Vec<EndpointState> = (0..16)
        .map(|i| EndpointState {
            address: format!("10.0.0.{i}:8000"),
            fresh: true,
            waiting: i % 4,
            running: 4 + i % 5,
            kv: 0.1 + 0.04 * i as f32,
            max_lora: 4,
            lora_running: vec![format!("lora-{i}"), format!("lora-{}", i + 16)],
            lora_waiting: vec![],
            models: vec!["base".into()],
        })
        .collect();
    picker.update(Some(PoolSnapshot { pool: "p".into(), version: 1, endpoints }), 0);
    // 64 tenants with 12 KB system prompts + a 4 KB question: 16 KB bodies, 256 blocks each.
    let sys: Vec<String> = (0..64).map(|t| format!("tenant {t} policy handbook. ").repeat(12 * 1024 / 26)).collect();
    let bodies: Vec<Vec<u8>> = (0..256)
        .map(|i| {
            let q = format!("question {i} about the invoice ").repeat(4 * 1024 / 30);
            serde_json::json!({"model": format!("lora-{}", i % 32), "messages": [
                {"role": "system", "content": sys[i % 64]}, {"role": "user", "content": q}]})
            .to_string()
            .into_bytes()
        })
        .collect();
    let n = 20_000;
    let (mut parse, mut pick) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut now = 1u64;
    for i in 0..n {
        let body = &bodies[i % bodies.len()];
        let t0 = Instant::now();
        let f = features(&cfg, "/v1/chat/completions", body, 0);
        let t1 = Instant::now();
        let d = picker.pick(&f, now);
        let t2 = Instant::now();
        std::hint::black_box(d);
        parse.push((t1 - t0).as_nanos() as f64 / 1000.0);
        pick.push((t2 - t1).as_nanos() as f64 / 1000.0);
        if i % 8 == 0 {
            now += 1; // keep the snapshot fresh; picks age out of the pending window
            picker.update(None, now);
        }
    }
    let body_len = bodies[0].len();
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() - 1) as f64 * p) as usize]
    };
    let mut total: Vec<f64> = parse.iter().zip(&pick).map(|(a, b)| a + b).collect();
    println!("decision cost, 16 endpoints, {body_len}-byte body, {n} decisions (native, µs):");
    println!("| step | p50 | p99 |\n|---|---|---|");
    println!("| parse body + prompt + 256 block hashes | {:.1} | {:.1} |", pct(&mut parse, 0.5), pct(&mut parse, 0.99));
    println!("| score 16 endpoints + record pick | {:.1} | {:.1} |", pct(&mut pick, 0.5), pct(&mut pick, 0.99));
    println!("| total | {:.1} | {:.1} |", pct(&mut total, 0.5), pct(&mut total, 0.99));
}
