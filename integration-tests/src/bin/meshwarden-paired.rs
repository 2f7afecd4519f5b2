//! Paired latency measurement, robust on a busy machine: each bench scenario's request is sent
//! alternately to plain Envoy and to Envoy + meshwarden (one keep-alive connection each, order swapped
//! every iteration), and the added latency is the median of the per-pair differences, so load spikes
//! hit both sides of a pair alike. Complements `meshwarden-bench` (wrk: percentiles and throughput).
//! Usage: `meshwarden-paired [--iterations N] [--filter SUBSTRING] [--control]`. `--control` starts both
//! sides from the plain template (an A/A run): the method's own bias. On the 2-vCPU benchmark VM that
//! bias is large and unstable (2026-12-04: +53 and +73 µs; -68 and -77 µs with the start order swapped;
//! +31 and +94 µs averaging both orders), so this tool's figures are not used for targets;
//! `meshwarden-bench --control` shows no such bias.
#![allow(clippy::indexing_slicing)]

use anyhow::{bail, Context, Result};
use meshwarden_integration_tests::bench::{scenarios, Scenario};
use meshwarden_integration_tests::envoy::{Envoy, EnvoyBuilder};
use meshwarden_integration_tests::mock_llm::MockLlm;
use std::time::Instant;

async fn start(template: &str, s: &Scenario, filtered: bool, upstream: u16) -> Result<Envoy> {
    let mut b = EnvoyBuilder::new(template).upstream_port(upstream).concurrency(1).log_level("warn");
    for (k, v) in &s.vars {
        b = b.var(k, v.clone());
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

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(0.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut iterations = 2000usize;
    let mut filter = String::new();
    let mut control = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iterations" => iterations = args.next().context("--iterations N")?.parse()?,
            "--filter" => filter = args.next().context("--filter SUBSTRING")?,
            "--control" => control = true,
            other => bail!("unknown argument {other}"),
        }
    }
    let mock = MockLlm::start().await?;
    println!("| scenario | median plain | median meshwarden | **median added (paired)** | p90 added | pairs |");
    println!("|---|---:|---:|---:|---:|---:|");
    for s in scenarios::all().into_iter().filter(|s| s.name.contains(&filter)) {
        let plain_template = s.plain_template.as_deref().unwrap_or("plain.yaml");
        let plain = start(plain_template, &s, false, mock.port()).await?;
        let filtered = if control {
            start(plain_template, &s, false, mock.port()).await?
        } else {
            start(&s.template, &s, true, mock.port()).await?
        };
        let (pu, fu) = (plain.url(&s.path), filtered.url(&s.path));
        let cp = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(1).build()?;
        let cf = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(1).build()?;
        for _ in 0..300 {
            once(&cp, &pu, &s).await?;
            once(&cf, &fu, &s).await?;
        }
        let (mut p, mut f, mut d) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..iterations {
            let (a, b) = if i % 2 == 0 {
                let a = once(&cp, &pu, &s).await?;
                (a, once(&cf, &fu, &s).await?)
            } else {
                let b = once(&cf, &fu, &s).await?;
                (once(&cp, &pu, &s).await?, b)
            };
            p.push(a);
            f.push(b);
            d.push(b - a);
        }
        let mut d2 = d.clone();
        println!(
            "| {} | {:.0} µs | {:.0} µs | **{:+.0} µs** | {:+.0} µs | {} |",
            s.name,
            pct(&mut p, 0.5),
            pct(&mut f, 0.5),
            pct(&mut d, 0.5),
            pct(&mut d2, 0.9),
            iterations
        );
    }
    Ok(())
}
