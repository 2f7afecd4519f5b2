//! `make soak`: the whole chain under sustained load, memory sampled, bounded in time.
//! Usage: `meshwarden-soak [--minutes N] [--connections C] [--sidecar [--max-concurrent N]]` (defaults
//! 3 minutes, 16 connections, 256). Runs wrk in 15-second slices against Envoy + all five filters in front of the mock LLM
//! (a chat request carrying an email, echo mode so restore runs), samples Envoy's RSS after each slice,
//! and prints a table (slice, requests, non-2xx, socket errors, Envoy RSS) plus the RSS growth between
//! the first and last third of the run. Exit status 1 if any request failed or RSS grew by more than 10%.
//!
//! `--sidecar`: the local gateway's config (`gateway.yaml`) with the real `meshwarden-sidecar`:
//! token-limiter in `sidecar` state mode (a reserve call per request, batched settlements, a concurrency
//! lease per request, `failure_mode: deny` so any sidecar failure shows as a non-2xx answer),
//! inference-router picking from the sidecar's snapshot of the mock pool, mcp-authz on `/mcp`. Each slice
//! also samples the sidecar's RSS and Envoy's heap (`/memory` `allocated`, tcmalloc: Envoy's C++ heap,
//! not the Wasm VMs' linear memory, which Envoy does not report). Growth of any of the three over 10%
//! fails the run. Both modes also fail if the number of active Wasm VMs changes or a VM was reloaded.
#![allow(clippy::indexing_slicing)]

use anyhow::{bail, Context, Result};
use meshwarden_integration_tests::bench::{parse_wrk, wrk_script, Scenario};
use meshwarden_integration_tests::envoy::{Envoy, EnvoyBuilder};
use meshwarden_integration_tests::gateway;
use meshwarden_integration_tests::mock_llm::MockLlm;
use meshwarden_integration_tests::mock_mcp::MockMcp;
use meshwarden_integration_tests::sidecar::Sidecar;
use serde_json::json;
use std::process::Command;

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("bad VmRSS")?.parse()?)
}

fn requests_in(output: &str) -> u64 {
    output
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Envoy's heap in use (tcmalloc `allocated` from the admin `/memory`), bytes.
async fn envoy_heap(envoy: &Envoy) -> Result<u64> {
    let v: serde_json::Value =
        reqwest::Client::builder().no_proxy().build()?.get(envoy.admin_url("/memory")).send().await?.json().await?;
    v["allocated"].as_str().context("no allocated in /memory")?.parse().context("allocated")
}

/// Growth in % between the mean of the first and the last third of `samples`.
fn growth(samples: &[u64]) -> (f64, f64, f64) {
    let third = (samples.len() / 3).max(1);
    let first: f64 = samples[..third].iter().sum::<u64>() as f64 / third as f64;
    let last: f64 = samples[samples.len() - third..].iter().sum::<u64>() as f64 / third as f64;
    (first, last, (last - first) / first * 100.0)
}

/// The chain with the real sidecar (see the module doc), kept alive for the run.
struct WithSidecar {
    envoy: Envoy,
    sidecar: Sidecar,
    mcp: MockMcp,
    pools: tempfile::NamedTempFile,
}

async fn start_with_sidecar(mock: &MockLlm, concurrency: u32) -> Result<WithSidecar> {
    let pools = tempfile::Builder::new().prefix("meshwarden-soak-pools-").suffix(".json").tempfile()?;
    std::fs::write(
        pools.path(),
        json!({"pools": [{"name": "local", "kind": "vllm", "endpoints": [mock.addr.to_string()],
                          "scrape_interval_ms": 100, "stale_after_ms": 1000}]})
        .to_string(),
    )?;
    let sidecar = Sidecar::start(&["--pools-config", pools.path().to_str().context("temp path is not UTF-8")?])?;
    let mcp = MockMcp::start().await?;
    let mut b = EnvoyBuilder::new("gateway.yaml")
        .var(
            "POOL_LB_ENDPOINTS",
            format!(
                "[{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}}}]",
                mock.port()
            ),
        )
        .var("MCP_PORT", mcp.port().to_string())
        .var("SIDECAR_PORT", sidecar.port().to_string())
        .log_level("warn");
    for (f, c) in gateway::configs() {
        let c = if f == "token-limiter" {
            json!({"state": "sidecar",
                   "sidecar": {"cluster": "meshwarden_sidecar", "timeout_ms": 250, "failure_mode": "deny"},
                   "rules": [{"name": "soak", "key": {"header": "x-team"}, "max_concurrent_requests": concurrency,
                              "limits": {"tokens_per_minute": 1_000_000_000u64}}]})
        } else {
            c
        };
        b = b.filter_config(f, &c);
    }
    let envoy = b.start().await?;
    Ok(WithSidecar { envoy, sidecar, mcp, pools })
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut minutes = 3u64;
    let mut connections = 16u32;
    let mut with_sidecar = false;
    // token-limiter's max_concurrent_requests in sidecar mode. Leases come back with the batched
    // settlement (every settle_interval_ms), so the key's count also holds requests finished in the last
    // interval: it must sit well above the connections.
    let mut max_concurrent = 256u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--minutes" => minutes = args.next().context("--minutes N")?.parse()?,
            "--connections" => connections = args.next().context("--connections C")?.parse()?,
            "--sidecar" => with_sidecar = true,
            "--max-concurrent" => max_concurrent = args.next().context("--max-concurrent N")?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let mock = MockLlm::start().await?;
    let (envoy, sidecar) = if with_sidecar {
        let s = start_with_sidecar(&mock, max_concurrent).await?;
        (s.envoy, Some((s.sidecar, s.mcp, s.pools)))
    } else {
        (EnvoyBuilder::new("chain.yaml").upstream_port(mock.port()).log_level("warn").start().await?, None)
    };
    let body = json!({"model":"gpt-4o-mini","stream": false,"messages":[
        {"role":"system","content":"You are a helpful assistant."},
        {"role":"user","content":"Summarise the meeting notes and email them to jane.doe@example.com. The call is at 14:00."}]});
    let mut scenario = Scenario::post_json("soak", "chain.yaml", "/v1/chat/completions", &body);
    scenario.headers.push(("x-mock-echo".to_string(), "1".to_string()));
    scenario.headers.push(("x-team".to_string(), "soak".to_string()));
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("soak.lua");
    std::fs::write(&script, wrk_script(&scenario))?;
    let vms_at_start = envoy.stats("wasm.").await?.get("wasm.envoy.wasm.runtime.v8.active").copied().unwrap_or(0);
    let slices = (minutes * 60 / 15).max(3);
    let mut rss = Vec::new();
    let mut heap = Vec::new();
    let mut sidecar_rss = Vec::new();
    let mut failed = 0u64;
    let mut total = 0u64;
    if sidecar.is_some() {
        println!("| slice | requests | non-2xx | socket errors | Envoy RSS (MiB) | Envoy heap (MiB) | sidecar RSS (MiB) |\n|---:|---:|---:|---:|---:|---:|---:|");
    } else {
        println!("| slice | requests | non-2xx | socket errors | Envoy RSS (MiB) |\n|---:|---:|---:|---:|---:|");
    }
    for i in 0..slices {
        let out = Command::new("wrk")
            .args(["-t1", &format!("-c{connections}"), "-d15s", "--latency", "-s"])
            .arg(&script)
            .arg(envoy.url(""))
            .output()
            .context("wrk")?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let r = parse_wrk(&text);
        let m = rss_kib(envoy.pid())?;
        rss.push(m);
        failed += r.non_2xx + r.errors;
        total += requests_in(&text);
        let mib = |kib: u64| kib as f64 / 1024.0;
        match &sidecar {
            Some((sc, _, _)) => {
                let h = envoy_heap(&envoy).await?;
                let s = rss_kib(sc.pid())?;
                heap.push(h);
                sidecar_rss.push(s);
                println!(
                    "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} |",
                    i + 1,
                    requests_in(&text),
                    r.non_2xx,
                    r.errors,
                    mib(m),
                    h as f64 / 1048576.0,
                    mib(s)
                );
            }
            None => {
                println!("| {} | {} | {} | {} | {:.1} |", i + 1, requests_in(&text), r.non_2xx, r.errors, mib(m))
            }
        }
    }
    let (first, last, g) = growth(&rss);
    println!(
        "\n{total} requests. Envoy RSS: first third {:.1} MiB, last third {:.1} MiB, growth {g:+.1}%; failed requests: {failed}",
        first / 1024.0,
        last / 1024.0
    );
    let mut worst = g;
    if !heap.is_empty() {
        let (hf, hl, hg) = growth(&heap);
        let (sf, sl, sg) = growth(&sidecar_rss);
        println!(
            "Envoy heap: {:.1} -> {:.1} MiB ({hg:+.1}%); sidecar RSS: {:.1} -> {:.1} MiB ({sg:+.1}%)",
            hf / 1048576.0,
            hl / 1048576.0,
            sf / 1024.0,
            sl / 1024.0
        );
        let stats = envoy.stats("meshwarden.token_limiter").await?;
        let get = |n: &str| stats.get(&format!("meshwarden.token_limiter.{n}")).copied().unwrap_or(0);
        println!(
            "token-limiter (sidecar mode): admitted {}, limited {} (concurrency {}), callout failures {} (timeout {}, status {}, dispatch {}, bad body {}), settle failures {}, failure_denied {}",
            get("admitted"),
            get("limited"),
            get("rule.soak.limited_concurrency"),
            get("callout_failures"),
            get("callout_failures.timeout"),
            get("callout_failures.status"),
            get("callout_failures.dispatch"),
            get("callout_failures.bad_body"),
            get("settle_failures"),
            get("failure_denied")
        );
        worst = worst.max(hg).max(sg);
    }
    // Envoy reports no Wasm memory; what it reports about the VMs: how many are active and whether any
    // was reloaded (a VM that failed, e.g. a panic, is replaced and counted as a reload).
    let wasm = envoy.stats("wasm.").await?;
    let reloads: u64 = wasm.iter().filter(|(k, _)| k.ends_with(".vm_reload")).map(|(_, v)| v).sum();
    let active = wasm.get("wasm.envoy.wasm.runtime.v8.active").copied().unwrap_or(0);
    println!("Wasm VMs active at the end: {active} (at the start: {vms_at_start}); VM reloads: {reloads}");
    if reloads > 0 || active != vms_at_start {
        bail!("soak failed: Wasm VMs changed ({vms_at_start} -> {active}, {reloads} reloads)");
    }
    if failed > 0 || worst > 10.0 {
        bail!("soak failed: {failed} failed requests, memory growth up to {worst:+.1}%");
    }
    Ok(())
}
