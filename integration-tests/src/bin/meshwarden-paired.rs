//! Paired latency measurement, robust on a busy machine and across Envoy processes.
//!
//! For each bench scenario it starts K plain Envoys and K Envoys + meshwarden (`--instances K`, default
//! 3; one worker thread each). Plain instance j and filtered instance j form a pair. Every iteration
//! visits the pairs in a fresh random order; for each pair it sends a block of B sequential requests
//! (`--block B`, default 16) to one side and then to the other (which side goes first alternates), on
//! one keep-alive connection per Envoy, and records the difference of the two blocks' medians. The
//! first request of a block is not counted: it pays for the caches the other Envoys just used, while
//! wrk's loop (`meshwarden-bench`) and a busy gateway run hot. The added latency is the median of all
//! block differences, so load drift hits both sides of a pair alike. Several instances per side,
//! because one Envoy process can sit 10-20 µs faster or slower than an identical one for its whole
//! life (memory layout, V8 code placement): with one instance per side that bias goes straight into
//! the result. The per-instance medians are printed as the error bar.
//! Usage: `meshwarden-paired [--iterations N] [--instances K] [--block B] [--filter SUBSTRING]`.
#![allow(clippy::indexing_slicing)]

use anyhow::{bail, Context, Result};
use meshwarden_integration_tests::bench::{scenarios, Scenario};
use meshwarden_integration_tests::envoy::{Envoy, EnvoyBuilder};
use meshwarden_integration_tests::mock_llm::MockLlm;
use meshwarden_integration_tests::sidecar::Sidecar;
use std::fmt::Write as _;
use std::time::Instant;

async fn start(template: &str, s: &Scenario, filtered: bool, upstream: u16, sidecar: Option<u16>) -> Result<Envoy> {
    let mut b = EnvoyBuilder::new(template).upstream_port(upstream).concurrency(1).log_level("warn");
    for (k, v) in &s.vars {
        b = b.var(k, v.clone());
    }
    if let Some(port) = sidecar {
        b = b.var("SIDECAR_PORT", port.to_string());
    }
    if filtered {
        for (f, c) in &s.configs {
            b = b.filter_config(f, c);
        }
    }
    b.start().await
}

async fn once(client: &reqwest::Client, url: &str, s: &Scenario) -> Result<f64> {
    let mut req = client.request(s.method.parse()?, url).body(s.body.clone());
    for (k, v) in &s.headers {
        req = req.header(k, v);
    }
    let t = Instant::now();
    let resp = req.send().await?;
    let status = resp.status();
    let _ = resp.bytes().await?;
    let us = t.elapsed().as_secs_f64() * 1e6;
    if !status.is_success() {
        bail!("{url}: status {status}");
    }
    Ok(us)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Fisher-Yates with a small xorshift generator: the order only has to vary, not be unpredictable.
fn shuffle(v: &mut [usize], state: &mut u64) {
    for i in (1..v.len()).rev() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let j = (*state % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

struct Target {
    url: String,
    client: reqwest::Client,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut iterations = 150usize;
    let mut instances = 3usize;
    let mut block = 16usize;
    let mut filter = std::env::var("BENCH").unwrap_or_default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iterations" => iterations = args.next().context("--iterations N")?.parse()?,
            "--instances" => instances = args.next().context("--instances K")?.parse()?,
            "--block" => block = args.next().context("--block B")?.parse()?,
            "--filter" => filter = args.next().context("--filter SUBSTRING")?,
            other => bail!("unknown argument {other}"),
        }
    }
    if instances == 0 || iterations == 0 || block < 2 {
        bail!("--instances and --iterations must be at least 1, --block at least 2");
    }
    for f in meshwarden_integration_tests::paths::FILTERS.iter().chain(&["wasm-floor"]) {
        meshwarden_integration_tests::paths::wasm_path(f)?;
    }
    let mock = MockLlm::start().await?;
    let mut md = String::new();
    writeln!(
        md,
        "| scenario | median plain | median meshwarden | **median added (paired)** | per-instance added (min .. max) | p90 of block differences | blocks |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|")?;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for s in scenarios::all().into_iter().filter(|s| s.name.contains(&filter)) {
        eprintln!(
            "==> {} ({instances} + {instances} Envoys, {iterations} iterations of {block}-request blocks)",
            s.name
        );
        let sidecar = match &s.sidecar_args {
            Some(a) => Some(Sidecar::start(&a.iter().map(String::as_str).collect::<Vec<_>>())?),
            None => None,
        };
        // Index 2j = plain instance j, 2j + 1 = filtered instance j. The Envoys live until the scenario ends.
        let mut envoys = Vec::new();
        let mut targets = Vec::new();
        for _ in 0..instances {
            for filtered in [false, true] {
                let template =
                    if filtered { s.template.as_str() } else { s.plain_template.as_deref().unwrap_or("plain.yaml") };
                let e = start(template, &s, filtered, mock.port(), sidecar.as_ref().map(Sidecar::port)).await?;
                let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(1).build()?;
                targets.push(Target { url: e.url(&s.path), client });
                envoys.push(e);
            }
        }
        for _ in 0..50 {
            for t in &targets {
                once(&t.client, &t.url, &s).await?;
            }
        }
        let mut order: Vec<usize> = (0..instances).collect();
        // Per pair: block-median differences; per side: every counted request (for the absolute columns).
        let mut diffs = vec![Vec::with_capacity(iterations); instances];
        let (mut plain_all, mut filtered_all) = (Vec::new(), Vec::new());
        for it in 0..iterations {
            shuffle(&mut order, &mut seed);
            for &j in &order {
                let mut medians = [0.0f64; 2];
                for k in 0..2 {
                    let side = (k + it + j) % 2; // 0 = plain, 1 = filtered; who goes first alternates
                    let t = &targets[2 * j + side];
                    let mut v = Vec::with_capacity(block);
                    for _ in 0..block {
                        v.push(once(&t.client, &t.url, &s).await?);
                    }
                    let counted = &mut v[1..];
                    if side == 0 {
                        plain_all.extend_from_slice(counted)
                    } else {
                        filtered_all.extend_from_slice(counted)
                    }
                    medians[side] = median(counted);
                }
                diffs[j].push(medians[1] - medians[0]);
            }
        }
        let mut all_diffs = Vec::new();
        let mut per_instance = Vec::new();
        for d in &mut diffs {
            all_diffs.extend_from_slice(d);
            per_instance.push(median(d));
        }
        per_instance.sort_by(|a, b| a.total_cmp(b));
        let added = median(&mut all_diffs);
        let p90 = all_diffs.get(((all_diffs.len() as f64 - 1.0) * 0.9).round() as usize).copied().unwrap_or(0.0);
        writeln!(
            md,
            "| {} | {:.0} µs | {:.0} µs | **{:+.0} µs** | {:+.0} .. {:+.0} µs | {:+.0} µs | {} |",
            s.name,
            median(&mut plain_all),
            median(&mut filtered_all),
            added,
            per_instance.first().copied().unwrap_or(0.0),
            per_instance.last().copied().unwrap_or(0.0),
            p90,
            all_diffs.len()
        )?;
        eprintln!("    added {added:+.0} µs; per instance {per_instance:.0?}");
        drop(envoys);
    }
    println!("{md}");
    let out = meshwarden_integration_tests::paths::repo_root().join("target").join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("paired.md"), &md)?;
    eprintln!("written to {}", out.join("paired.md").display());
    Ok(())
}
