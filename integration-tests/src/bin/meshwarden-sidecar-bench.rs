//! Sidecar load benchmark: decisions per second and latency percentiles of `POST /v1/ratelimit/reserve`
//! on the memory backend and on Redis (a real `redis-server` started here), driven by many concurrent
//! keep-alive HTTP clients for a bounded time.
//!
//! Usage: `meshwarden-sidecar-bench [--seconds N] [--clients N] [--keys N] [--backend memory|redis|both]`.
//! Build the sidecar in release first (`cargo build --release -p meshwarden-sidecar`); the harness runs
//! the newest of target/{debug,release}/meshwarden-sidecar (or `$MESHWARDEN_SIDECAR_BIN`).
#![allow(clippy::indexing_slicing)]

use anyhow::{bail, Context, Result};
use meshwarden_integration_tests::redis_server::RedisServer;
use meshwarden_integration_tests::sidecar::Sidecar;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Figures {
    decisions: u64,
    errors: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
    allowed: u64,
}

async fn drive(url: String, clients: usize, keys: usize, seconds: u64) -> Result<Figures> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = url.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(1).build()?;
            let mut lat = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut allowed = 0u64;
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                i = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let key = format!("team:h:{:032x}", i % keys.max(1));
                // A token-limiter request: team total (minute + day) and a per-model window.
                let body = json!({"groups":[
                    {"key": key, "windows":[{"limit":100000000u64,"window_ms":60000},{"limit":10000000000u64,"window_ms":86400000}],"cost":300},
                    {"key": format!("{key}:m"), "windows":[{"limit":50000000u64,"window_ms":60000}],"cost":300}]});
                let t = Instant::now();
                match http.post(&url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {
                        let v: serde_json::Value = r.json().await.unwrap_or_default();
                        if v["allowed"] == true {
                            allowed += 1;
                        }
                        lat.push(t.elapsed().as_micros() as u64);
                    }
                    _ => errors += 1,
                }
            }
            anyhow::Ok((lat, errors, allowed))
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    let mut allowed = 0;
    for t in tasks {
        let (l, e, a) = t.await??;
        all.extend(l);
        errors += e;
        allowed += a;
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct =
        |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0);
    Ok(Figures { decisions: all.len() as u64, errors, secs, p50_us: pct(0.50), p99_us: pct(0.99), allowed })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<()> {
    let mut seconds = 5u64;
    let mut clients = 64usize;
    let mut keys = 1000usize;
    let mut backend = "both".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => seconds = args.next().context("--seconds N")?.parse()?,
            "--clients" => clients = args.next().context("--clients N")?.parse()?,
            "--keys" => keys = args.next().context("--keys N")?.parse()?,
            "--backend" => backend = args.next().context("--backend memory|redis|both")?,
            other => bail!("unknown argument {other}"),
        }
    }
    println!("| backend | clients | decisions/s | p50 | p99 | errors |");
    println!("|---|---:|---:|---:|---:|---:|");
    for b in ["memory", "redis"] {
        if backend != "both" && backend != b {
            continue;
        }
        let redis = if b == "redis" { Some(RedisServer::start()?) } else { None };
        let url_arg = redis.as_ref().map(|r| r.url());
        let flags: Vec<&str> = match &url_arg {
            Some(u) => vec!["--redis-url", u.as_str(), "--log", "warn"],
            None => vec!["--log", "warn"],
        };
        let sidecar = Sidecar::start(&flags)?;
        let url = sidecar.url("/v1/ratelimit/reserve");
        drive(url.clone(), clients, keys, 1).await?; // warm-up
        let f = drive(url, clients, keys, seconds).await?;
        if f.allowed != f.decisions {
            eprintln!("note: {} of {} decisions denied", f.decisions - f.allowed, f.decisions);
        }
        println!(
            "| {b} | {clients} | {:.0} | {:.2} ms | {:.2} ms | {} |",
            f.decisions as f64 / f.secs,
            f.p50_us as f64 / 1000.0,
            f.p99_us as f64 / 1000.0,
            f.errors
        );
    }
    Ok(())
}
