//! Native timing of the pure core on the bench bodies: `cargo run --release -p meshwarden-pii-redactor --example timing`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // example code

use meshwarden_shared::config::parse_config;
use pii_redactor::config::Config;
use pii_redactor::engine::Engine;
use pii_redactor::request::process_request;
use std::time::Instant;

fn main() {
    let engine = Engine::new(&parse_config::<Config>(b"{}").unwrap());
    let filler = "The quick brown fox jumps over the lazy dog. ";
    for size in [1024usize, 128 * 1024] {
        let mut text = String::new();
        while text.len() < size {
            text.push_str(filler);
        }
        text.insert_str(text.len() / 2, "Contact jane.doe@example.com or +44 20 7946 0958. ");
        let body = serde_json::json!({"model":"m","messages":[{"role":"user","content":text}]}).to_string();
        let n = if size > 2000 { 200 } else { 20000 };
        let t = Instant::now();
        for _ in 0..n {
            let v: serde_json::Value = serde_json::from_slice(body.as_bytes()).unwrap();
            std::hint::black_box(v);
        }
        let parse = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(engine.find(text.as_bytes()));
        }
        let scan = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(process_request(&engine, "/v1/chat/completions", body.as_bytes(), true));
        }
        let total = t.elapsed() / n;
        let clean = text.replace("Contact jane.doe@example.com or +44 20 7946 0958. ", "");
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(engine.find(clean.as_bytes()));
        }
        println!("  clean scan {:?}", t.elapsed() / n);
        for pattern in ["EMP-[0-9]{6}", "[0-9]{6}-EMP"] {
            let cfg = format!(r#"{{"custom_detectors":[{{"name":"x","pattern":"{pattern}"}}]}}"#);
            let custom = Engine::new(&parse_config::<Config>(cfg.as_bytes()).unwrap());
            let t = Instant::now();
            for _ in 0..n / 10 + 1 {
                std::hint::black_box(custom.find(clean.as_bytes()));
            }
            println!("  scan with custom detector {pattern}: {:?}", t.elapsed() / (n / 10 + 1));
        }
        // Percent-encoded and HTML-entity text: a URL with an encoded address (read through a decoded
        // copy), and prose with `%` and `&` that decode to nothing (only the candidates are checked).
        let encoded = text.replace(
            "Contact jane.doe@example.com or +44 20 7946 0958. ",
            "Reset https://app.example.com/reset?email=jane.doe%40example.com&phone=%2B14155552671 or jane&#64;example.com. ",
        );
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(engine.find(encoded.as_bytes()));
        }
        println!("  scan with encoded values {:?}", t.elapsed() / n);
        let ampersands = clean.replace("lazy dog. ", "lazy dog & R&D grew 50% a year. ");
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(engine.find(ampersands.as_bytes()));
        }
        println!("  clean scan, prose with % and & ({} bytes) {:?}", ampersands.len(), t.elapsed() / n);
        let mbps = text.len() as f64 / scan.as_secs_f64() / 1e6;
        println!("{} bytes: parse {parse:?}, scan {scan:?} ({mbps:.0} MB/s), whole request {total:?}", body.len());
    }
}
