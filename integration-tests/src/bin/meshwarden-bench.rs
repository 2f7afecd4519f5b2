//! `make bench`: each scenario through plain Envoy and through Envoy + meshwarden, in the same run.
//! Usage: `meshwarden-bench [--seconds N] [--filter SUBSTRING] [--control]` (env `BENCH` works like
//! `--filter`; `BENCH_STATS=SUBSTRING` prints the filtered Envoy's matching stats after each scenario;
//! `--control` is an A/A run, both Envoys from the plain template, so "added" is the method's own bias
//! and noise, written to `target/bench/control*.md`).
//! Prints a Markdown table and writes it to `target/bench/latest.md` (a full run) or
//! `target/bench/latest-<filter>.md` (a selection), so a partial run never replaces the full table;
//! an instrumented run (`make bench-breakdown`) writes `breakdown.md` / `breakdown-<filter>.md`.
#![allow(clippy::indexing_slicing)]

use anyhow::{bail, Context, Result};
use meshwarden_integration_tests::bench::{
    parse_wrk, process_cpu_ns, scenarios, vm_breakdown, wrk_script, Scenario, VmBreakdown, WrkResult,
};
use meshwarden_integration_tests::envoy::{Envoy, EnvoyBuilder};
use meshwarden_integration_tests::mock_llm::MockLlm;
use meshwarden_integration_tests::paths;
use std::fmt::Write as _;
use std::process::Command;

fn wrk(url: &str, script: &std::path::Path, connections: u32, seconds: u64) -> Result<WrkResult> {
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk; make bench installs it)")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(parse_wrk(&String::from_utf8_lossy(&out.stdout)))
}

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

/// A sequential (one-connection) wrk run and Envoy's CPU time per request during it.
fn wrk_with_cpu(url: &str, script: &std::path::Path, seconds: u64, pid: u32) -> Result<(WrkResult, f64)> {
    let before = process_cpu_ns(pid);
    let r = wrk(url, script, 1, seconds)?;
    let cpu_ns = process_cpu_ns(pid).saturating_sub(before);
    Ok((r, if r.requests > 0 { cpu_ns as f64 / 1000.0 / r.requests as f64 } else { 0.0 }))
}

struct Row {
    name: String,
    /// In-VM time per callback (only from a `bench-timers` build).
    breakdown: Vec<VmBreakdown>,
    /// Envoy CPU µs per request in the sequential runs (all its threads).
    plain_cpu_us: f64,
    filtered_cpu_us: f64,
    plain: WrkResult,
    filtered: WrkResult,
    plain_tp: WrkResult,
    filtered_tp: WrkResult,
}

fn avg(a: WrkResult, b: WrkResult) -> WrkResult {
    WrkResult {
        p50_us: (a.p50_us + b.p50_us) / 2.0,
        p99_us: (a.p99_us + b.p99_us) / 2.0,
        requests: a.requests + b.requests,
        requests_per_sec: (a.requests_per_sec + b.requests_per_sec) / 2.0,
        non_2xx: a.non_2xx + b.non_2xx,
        errors: a.errors + b.errors,
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut seconds = 5u64;
    let mut filter = std::env::var("BENCH").unwrap_or_default();
    // An A/A run: both Envoys from the plain template, so "added" is the method's own bias.
    let mut control = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => seconds = args.next().context("--seconds N")?.parse()?,
            "--filter" => filter = args.next().context("--filter SUBSTRING")?,
            "--control" => control = true,
            other => bail!("unknown argument {other}"),
        }
    }
    // wasm-floor: the do-nothing reference filter (`make bench` builds it beside the filters).
    for f in paths::FILTERS.iter().chain(&["wasm-floor"]) {
        paths::wasm_path(f)?;
    }
    let mock = MockLlm::start().await?;
    let dir = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for s in scenarios::all().into_iter().filter(|s| s.name.contains(&filter)) {
        eprintln!("==> {} ({}s per run)", s.name, seconds);
        let script = dir.path().join(format!("{}.lua", s.name));
        std::fs::write(&script, wrk_script(&s))?;
        let sidecar = match &s.sidecar_args {
            Some(args) => {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                Some(meshwarden_integration_tests::sidecar::Sidecar::start(&a)?)
            }
            None => None,
        };
        let plain_template = s.plain_template.as_deref().unwrap_or("plain.yaml");
        let plain = start(plain_template, &s, false, mock.port(), None).await?;
        let filtered = if control {
            start(plain_template, &s, false, mock.port(), None).await?
        } else {
            start(&s.template, &s, true, mock.port(), sidecar.as_ref().map(|x| x.port())).await?
        };
        let (pu, fu) = (plain.url(""), filtered.url(""));
        // Warm up both (V8 compiles lazily; connection pools fill).
        wrk(&pu, &script, 1, 1)?;
        wrk(&fu, &script, 1, 1)?;
        // Latency: one connection, sequential requests; two interleaved rounds against drift.
        let half = (seconds / 2).max(1);
        let (p1, pc1) = wrk_with_cpu(&pu, &script, half, plain.pid())?;
        let (f1, fc1) = wrk_with_cpu(&fu, &script, half, filtered.pid())?;
        let (p2, pc2) = wrk_with_cpu(&pu, &script, half, plain.pid())?;
        let (f2, fc2) = wrk_with_cpu(&fu, &script, half, filtered.pid())?;
        let plain_tp = wrk(&pu, &script, 32, half)?;
        let filtered_tp = wrk(&fu, &script, 32, half)?;
        // BENCH_STATS=<substring>: print the filtered Envoy's matching stats (e.g. a filter's own
        // counters or timing histograms) after the scenario, to see where the added time goes.
        if let Ok(pattern) = std::env::var("BENCH_STATS") {
            for (k, v) in filtered.stats(&pattern).await? {
                eprintln!("    {k} = {v}");
            }
        }
        // A `bench-timers` build (`make bench-breakdown`) also reports where its time goes in the VM.
        let breakdown = vm_breakdown(&filtered.stats("meshwarden.").await?);
        for b in &breakdown {
            let parts: Vec<String> = b.callbacks.iter().map(|(c, us)| format!("{c} {us:.1}")).collect();
            eprintln!("    {} in the VM, µs per request: {} (total {:.1})", b.filter, parts.join(", "), b.total_us());
        }
        rows.push(Row {
            breakdown,
            name: s.name.clone(),
            plain_cpu_us: (pc1 + pc2) / 2.0,
            filtered_cpu_us: (fc1 + fc2) / 2.0,
            plain: avg(p1, p2),
            filtered: avg(f1, f2),
            plain_tp,
            filtered_tp,
        });
    }
    let mut md = String::new();
    writeln!(md, "| scenario | p50 plain | p50 meshwarden | added p50 | p99 plain | p99 meshwarden | added p99 | Envoy CPU/req plain | meshwarden | added CPU/req | req/s plain (32 conns) | req/s meshwarden | ratio | non-2xx / errors |")?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for r in &rows {
        writeln!(
            md,
            "| {} | {:.0} µs | {:.0} µs | **{:+.0} µs** | {:.0} µs | {:.0} µs | {:+.0} µs | {:.1} µs | {:.1} µs | **{:+.1} µs** | {:.0} | {:.0} | {:.2} | {} / {} |",
            r.name,
            r.plain.p50_us,
            r.filtered.p50_us,
            r.filtered.p50_us - r.plain.p50_us,
            r.plain.p99_us,
            r.filtered.p99_us,
            r.filtered.p99_us - r.plain.p99_us,
            r.plain_cpu_us,
            r.filtered_cpu_us,
            r.filtered_cpu_us - r.plain_cpu_us,
            r.plain_tp.requests_per_sec,
            r.filtered_tp.requests_per_sec,
            if r.plain_tp.requests_per_sec > 0.0 { r.filtered_tp.requests_per_sec / r.plain_tp.requests_per_sec } else { 0.0 },
            r.filtered.non_2xx + r.filtered_tp.non_2xx,
            r.filtered.errors + r.filtered_tp.errors,
        )?;
    }
    if rows.iter().any(|r| !r.breakdown.is_empty()) {
        writeln!(md, "\nTime inside the VM per request (`bench-timers` build: host-clock timers around each callback, so each figure includes ~0.3 µs of timer):\n")?;
        writeln!(md, "| scenario | filter | callbacks (µs per request) | total in the VM |")?;
        writeln!(md, "|---|---|---|---:|")?;
        for r in &rows {
            for b in &r.breakdown {
                let parts: Vec<String> = b.callbacks.iter().map(|(c, us)| format!("{c} {us:.1}")).collect();
                writeln!(md, "| {} | {} | {} | {:.1} µs |", r.name, b.filter, parts.join(", "), b.total_us())?;
            }
        }
    }
    println!("{md}");
    let out = paths::repo_root().join("target").join("bench");
    std::fs::create_dir_all(&out)?;
    // An instrumented run's latencies include its timers: never let it replace the plain figures.
    let base = if control {
        "control"
    } else if rows.iter().any(|r| !r.breakdown.is_empty()) {
        "breakdown"
    } else {
        "latest"
    };
    let file = if filter.is_empty() {
        format!("{base}.md")
    } else {
        let safe: String =
            filter.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        format!("{base}-{safe}.md")
    };
    std::fs::write(out.join(&file), &md)?;
    eprintln!("written to {}", out.join(&file).display());
    Ok(())
}
