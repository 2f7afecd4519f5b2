//! `make soak`: the whole chain under sustained load, memory sampled, bounded in time.
//! Usage: `meshwarden-soak [--minutes N] [--connections C]` (defaults 3 minutes, 16 connections).
//! Runs wrk in 15-second slices against Envoy + all five filters in front of the mock LLM (JSON and
//! streaming requests, with PII and an injection-free prompt), samples Envoy's RSS after each slice, and
//! prints a table (slice, requests, non-2xx, socket errors, Envoy RSS) plus the RSS growth between the
//! first and last third of the run. Exit status 1 if any request failed or RSS grew by more than 10%.
#![allow(clippy::indexing_slicing)]

use anyhow::{bail, Context, Result};
use meshwarden_integration_tests::bench::{parse_wrk, wrk_script, Scenario};
use meshwarden_integration_tests::envoy::EnvoyBuilder;
use meshwarden_integration_tests::mock_llm::MockLlm;
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

#[tokio::main]
async fn main() -> Result<()> {
    let mut minutes = 3u64;
    let mut connections = 16u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--minutes" => minutes = args.next().context("--minutes N")?.parse()?,
            "--connections" => connections = args.next().context("--connections C")?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let mock = MockLlm::start().await?;
    let envoy = EnvoyBuilder::new("chain.yaml").upstream_port(mock.port()).log_level("warn").start().await?;
    let body = json!({"model":"gpt-4o-mini","stream": false,"messages":[
        {"role":"system","content":"You are a helpful assistant."},
        {"role":"user","content":"Summarise the meeting notes and email them to jane.doe@example.com. The call is at 14:00."}]});
    let mut scenario = Scenario::post_json("soak", "chain.yaml", "/v1/chat/completions", &body);
    scenario.headers.push(("x-mock-echo".to_string(), "1".to_string()));
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("soak.lua");
    std::fs::write(&script, wrk_script(&scenario))?;
    let slices = (minutes * 60 / 15).max(3);
    let mut rss = Vec::new();
    let mut failed = 0u64;
    println!("| slice | requests | non-2xx | socket errors | Envoy RSS (MiB) |\n|---:|---:|---:|---:|---:|");
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
        println!("| {} | {} | {} | {} | {:.1} |", i + 1, requests_in(&text), r.non_2xx, r.errors, m as f64 / 1024.0);
    }
    let third = (rss.len() / 3).max(1);
    let first: f64 = rss[..third].iter().sum::<u64>() as f64 / third as f64;
    let last: f64 = rss[rss.len() - third..].iter().sum::<u64>() as f64 / third as f64;
    let growth = (last - first) / first * 100.0;
    println!(
        "\nEnvoy RSS: first third {:.1} MiB, last third {:.1} MiB, growth {growth:+.1}%; failed requests: {failed}",
        first / 1024.0,
        last / 1024.0
    );
    if failed > 0 || growth > 10.0 {
        bail!("soak failed: {failed} failed requests, RSS growth {growth:+.1}%");
    }
    Ok(())
}
