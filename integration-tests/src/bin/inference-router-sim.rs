// Benchmark tooling, not shipped code: indices are bounded by construction (modulo lengths, fixed arrays).
#![allow(clippy::indexing_slicing)]

//! The inference-router simulation benchmark: 8 simulated vLLM-like servers (heterogeneous speeds)
//! behind real Envoy, the same open-loop request sequence sent through Envoy `ROUND_ROBIN`, Envoy
//! `LEAST_REQUEST` and inference-router (with the real sidecar), side by side in one run.
//!
//! Workloads: (a) shared-prefix (32 tenants, 4000-character system prompts, short questions),
//! (b) multi-LoRA (24 adapters, 4 slots per server), (c) low-prefix random prompts. Load is a
//! fraction of the pool's cache-less capacity computed from the simulator's costs.
//!
//! ```text
//! cargo build --release -p meshwarden-sidecar
//! cargo run --release -p meshwarden-integration-tests --bin inference-router-sim -- [--seconds 15] [--load 0.7] [--workloads abc]
//! cargo run --release -p meshwarden-integration-tests --bin inference-router-sim -- --scrape-bench [--endpoints 64]
//! ```
//! Bounded: every run stops issuing after warm-up + `--seconds` and waits at most 30 s for the rest.

use anyhow::{Context, Result};
use futures_util::StreamExt;
use meshwarden_integration_tests::envoy::{Envoy, EnvoyBuilder};
use meshwarden_integration_tests::model_sim::{lb_endpoints_yaml, pools_config_file, SimConfig, SimServer, SimStats};
use meshwarden_integration_tests::sidecar::Sidecar;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SPEEDS: [f64; 8] = [1.6, 1.6, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Policy {
    RoundRobin,
    LeastRequest,
    Router,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "Envoy ROUND_ROBIN",
            Policy::LeastRequest => "Envoy LEAST_REQUEST",
            Policy::Router => "inference-router",
        }
    }
}

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

const WORDS: [&str; 16] = [
    "alpha", "beta", "gamma", "delta", "kernel", "token", "cache", "model", "route", "proxy", "budget", "tensor",
    "vector", "policy", "sample", "stream",
];

fn text(rng: &mut Rng, chars: usize) -> String {
    let mut s = String::with_capacity(chars + 8);
    while s.len() < chars {
        s.push_str(WORDS[(rng.next() % 16) as usize]);
        s.push(' ');
        if rng.next() % 7 == 0 {
            s.push_str(&rng.range(0, 99_999).to_string());
            s.push(' ');
        }
    }
    s.truncate(chars);
    s
}

struct Req {
    model: String,
    system: String,
    user: String,
    max_tokens: u64,
}

#[derive(Clone, Copy)]
struct Workload {
    key: char,
    name: &'static str,
    /// Mean prompt tokens and output tokens (for the capacity estimate).
    prompt_tokens: f64,
    output_tokens: f64,
}

const WORKLOADS: [Workload; 3] = [
    Workload { key: 'a', name: "(a) shared-prefix", prompt_tokens: 1053.0, output_tokens: 16.0 },
    Workload { key: 'b', name: "(b) multi-LoRA", prompt_tokens: 600.0, output_tokens: 16.0 },
    Workload { key: 'c', name: "(c) low-prefix random", prompt_tokens: 550.0, output_tokens: 20.0 },
];

fn gen(w: char, rng: &mut Rng, tenants: &[String]) -> Req {
    match w {
        'a' => {
            let t = (rng.next() % tenants.len() as u64) as usize;
            Req { model: "base".into(), system: tenants[t].clone(), user: text(rng, 200), max_tokens: 16 }
        }
        'b' => Req {
            model: format!("lora-{}", rng.next() % 24),
            system: String::new(),
            user: text(rng, 2400),
            max_tokens: 16,
        },
        _ => {
            let n = rng.range(400, 4000) as usize;
            Req { model: "base".into(), system: String::new(), user: text(rng, n), max_tokens: rng.range(8, 32) }
        }
    }
}

fn sim_config(id: usize) -> SimConfig {
    SimConfig {
        id,
        speed: SPEEDS[id % SPEEDS.len()],
        batch_limit: 8,
        prefill_us_per_token: 120.0,
        decode_step_us: 24_000.0,
        decode_us_per_seq: 1_000.0,
        kv_blocks: 1024,
        max_lora: 4,
        lora_load_ms: 60.0,
        base_model: "base".into(),
        default_output_tokens: 16,
        old_kv_metric_name: false,
    }
}

/// Requests per second the pool sustains when no prompt token is ever cached (and no adapter load).
fn capacity(w: &Workload) -> f64 {
    let c = sim_config(0);
    let b = c.batch_limit as f64;
    let per_req_us =
        w.prompt_tokens * c.prefill_us_per_token + w.output_tokens * (c.decode_step_us + b * c.decode_us_per_seq) / b;
    SPEEDS.iter().sum::<f64>() * 1e6 / per_req_us
}

#[derive(Default, Clone)]
struct Sample {
    ok: bool,
    ttft_ms: f64,
    e2e_ms: f64,
    tokens: u64,
    done_at: f64,
}

struct RunResult {
    policy: Policy,
    samples: Vec<Sample>,
    issued: usize,
    window_s: f64,
    stats: SimStats,
    router_stats: Option<String>,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn sum_stats(sims: &[SimServer]) -> SimStats {
    let mut t = SimStats::default();
    for s in sims {
        let x = s.stats();
        t.requests += x.requests;
        t.completed += x.completed;
        t.prompt_tokens += x.prompt_tokens;
        t.cached_tokens += x.cached_tokens;
        t.output_tokens += x.output_tokens;
        t.lora_loads += x.lora_loads;
    }
    t
}

fn diff(a: &SimStats, b: &SimStats) -> SimStats {
    SimStats {
        requests: a.requests - b.requests,
        completed: a.completed - b.completed,
        prompt_tokens: a.prompt_tokens - b.prompt_tokens,
        cached_tokens: a.cached_tokens - b.cached_tokens,
        output_tokens: a.output_tokens - b.output_tokens,
        lora_loads: a.lora_loads - b.lora_loads,
    }
}

async fn one_request(http: reqwest::Client, url: String, r: Req) -> Sample {
    let mut messages = Vec::new();
    if !r.system.is_empty() {
        messages.push(json!({"role":"system","content":r.system}));
    }
    messages.push(json!({"role":"user","content":r.user}));
    let body = json!({"model": r.model, "messages": messages, "max_tokens": r.max_tokens, "stream": true});
    let start = Instant::now();
    let Ok(resp) = http.post(&url).json(&body).timeout(Duration::from_secs(60)).send().await else {
        return Sample::default();
    };
    if resp.status() != 200 {
        return Sample::default();
    }
    let mut stream = resp.bytes_stream();
    let mut ttft = None;
    let mut tokens = 0u64;
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let Ok(c) = chunk else { return Sample::default() };
        let s = String::from_utf8_lossy(&c);
        let n = s.matches("\"content\":\"tok ").count() as u64;
        if n > 0 && ttft.is_none() {
            ttft = Some(start.elapsed());
        }
        tokens += n;
        if s.contains("[DONE]") {
            done = true;
        }
    }
    let e2e = start.elapsed();
    Sample {
        ok: done && ttft.is_some(),
        ttft_ms: ttft.map_or(0.0, |t| t.as_secs_f64() * 1000.0),
        e2e_ms: e2e.as_secs_f64() * 1000.0,
        tokens,
        done_at: 0.0,
    }
}

async fn wait_router_ready(sidecar: &Sidecar, envoy: &Envoy, n: usize) -> Result<()> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value = http.get(sidecar.url("/v1/pools/bench/endpoints")).send().await?.json().await?;
        let fresh = v["eps"].as_array().map(|a| a.iter().filter(|e| e["f"] == true).count()).unwrap_or(0);
        if fresh == n && envoy.stat("meshwarden.inference_router.snapshot.updates").await? > 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "router not ready: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run(policy: Policy, w: &Workload, args: &Args) -> Result<RunResult> {
    let mut sims = Vec::new();
    for id in 0..SPEEDS.len() {
        sims.push(SimServer::start(sim_config(id)).await?);
    }
    let addrs: Vec<_> = sims.iter().map(|s| s.addr).collect();
    let eps: Vec<String> = sims.iter().map(|s| s.endpoint()).collect();
    let pools = pools_config_file("bench", &eps, json!({"stale_after_ms": 500}))?;
    let mut sidecar = None;
    let envoy = match policy {
        Policy::RoundRobin | Policy::LeastRequest => {
            EnvoyBuilder::new("inference-router-baseline.yaml")
                .var("LB_POLICY", if policy == Policy::RoundRobin { "ROUND_ROBIN" } else { "LEAST_REQUEST" })
                .var("POOL_LB_ENDPOINTS", lb_endpoints_yaml(&addrs))
                .start()
                .await?
        }
        Policy::Router => {
            let sc = Sidecar::start(&["--pools-config", &pools.path().display().to_string()])?;
            let envoy = EnvoyBuilder::new("inference-router-pool.yaml")
                .filter_config("inference-router", &{
                    let mut c = args.router_config.clone();
                    c["pool"] = json!("bench");
                    c
                })
                .var("POOL_LB_ENDPOINTS", lb_endpoints_yaml(&addrs))
                .var("SIDECAR_PORT", sc.port().to_string())
                .start()
                .await?;
            wait_router_ready(&sc, &envoy, sims.len()).await?;
            sidecar = Some(sc);
            envoy
        }
    };
    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(1024).build()?;
    let url = envoy.url("/v1/chat/completions");
    let rate = capacity(w) * args.load;
    let mut rng = Rng(0x5EED_0000 + w.key as u64);
    let tenants: Vec<String> = (0..32).map(|t| text(&mut Rng(1000 + t), 4000)).collect();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let total = args.warmup + args.seconds;
    let mut at = 0.0f64;
    let mut handles = Vec::new();
    let mut base_stats = None;
    let mut issued = 0usize;
    loop {
        at += -(1.0 - rng.f64()).ln() / rate;
        if at >= total {
            break;
        }
        let req = gen(w.key, &mut rng, &tenants);
        tokio::time::sleep_until(tokio::time::Instant::from_std(t0 + Duration::from_secs_f64(at))).await;
        if base_stats.is_none() && at >= args.warmup {
            base_stats = Some(sum_stats(&sims));
        }
        let measured = at >= args.warmup;
        if measured {
            issued += 1;
        }
        let (http, url, samples) = (http.clone(), url.clone(), samples.clone());
        handles.push(tokio::spawn(async move {
            let mut s = one_request(http, url, req).await;
            s.done_at = t0.elapsed().as_secs_f64();
            if measured {
                if let Ok(mut v) = samples.lock() {
                    v.push(s);
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for h in handles {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, h).await;
    }
    let stats = diff(&sum_stats(&sims), &base_stats.unwrap_or_default());
    let samples = samples.lock().map(|v| v.clone()).unwrap_or_default();
    let last = samples.iter().map(|s| s.done_at).fold(total, f64::max);
    let router_stats = if sidecar.is_some() {
        let st = envoy.stats("meshwarden.inference_router").await?;
        Some(
            st.iter()
                .filter(|(k, v)| **v > 0 && (k.contains("routed") || k.contains("shed") || k.contains("passthrough")))
                .map(|(k, v)| format!("{}={v}", k.trim_start_matches("meshwarden.inference_router.")))
                .collect::<Vec<_>>()
                .join(" "),
        )
    } else {
        None
    };
    drop(envoy);
    drop(sidecar);
    Ok(RunResult { policy, samples, issued, window_s: last - args.warmup, stats, router_stats })
}

struct Args {
    seconds: f64,
    warmup: f64,
    load: f64,
    workloads: String,
    scrape_bench: bool,
    decision_bench: bool,
    endpoints: usize,
    policies: String,
    router_config: Value,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        seconds: 15.0,
        warmup: 3.0,
        load: 0.7,
        workloads: "abc".into(),
        scrape_bench: false,
        decision_bench: false,
        endpoints: 64,
        policies: "rli".into(),
        router_config: json!({}),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--seconds" => a.seconds = it.next().context("--seconds N")?.parse()?,
            "--warmup" => a.warmup = it.next().context("--warmup N")?.parse()?,
            "--load" => a.load = it.next().context("--load F")?.parse()?,
            "--workloads" => a.workloads = it.next().context("--workloads abc")?,
            "--scrape-bench" => a.scrape_bench = true,
            "--decision-bench" => a.decision_bench = true,
            "--endpoints" => a.endpoints = it.next().context("--endpoints N")?.parse()?,
            "--policies" => a.policies = it.next().context("--policies rli")?,
            "--router-config" => a.router_config = serde_json::from_str(&it.next().context("--router-config JSON")?)?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(a.seconds > 0.0 && a.seconds <= 300.0, "--seconds must be in (0, 300]");
    anyhow::ensure!(a.load > 0.0 && a.load <= 1.5, "--load must be in (0, 1.5]");
    Ok(a)
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = s.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn rss_kb(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS")?.parse()?)
}

async fn scrape_bench(n: usize) -> Result<()> {
    let mut sims = Vec::new();
    for id in 0..n {
        sims.push(SimServer::start(sim_config(id)).await?);
    }
    let eps: Vec<String> = sims.iter().map(|s| s.endpoint()).collect();
    let pools = pools_config_file("bench", &eps, json!({"scrape_interval_ms": 50}))?;
    let sc = Sidecar::start(&["--pools-config", &pools.path().display().to_string()])?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let scrapes = |m: &str| -> u64 {
        m.lines()
            .find(|l| l.starts_with("meshwarden_sidecar_endpoint_scrapes_total{pool=\"bench\",result=\"ok\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let secs = 10.0;
    let m0 = scrapes(&http.get(sc.url("/metrics")).send().await?.text().await?);
    let c0 = cpu_ticks(sc.pid())?;
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let c1 = cpu_ticks(sc.pid())?;
    let m1 = scrapes(&http.get(sc.url("/metrics")).send().await?.text().await?);
    let rss = rss_kb(sc.pid())?;
    let page = http.get(format!("http://{}/metrics", sims[0].addr)).send().await?.text().await?;
    let snap = http.get(sc.url("/v1/pools/bench/endpoints")).send().await?.text().await?;
    // Linux USER_HZ is 100 on every platform we run on.
    let cores = (c1 - c0) as f64 / 100.0 / secs;
    println!("## Sidecar scraping: {n} endpoints every 50 ms, {secs} s\n");
    println!("| metric | value | target |\n|---|---|---|");
    println!("| successful scrapes/s | {:.0} (ideal {}) | |", (m1 - m0) as f64 / secs, n * 20);
    println!("| CPU (cores) | {cores:.3} | <= 0.1 |");
    println!("| RSS | {:.1} MB | <= 30 MB |", rss as f64 / 1024.0);
    println!("| /metrics page size per endpoint | {} bytes | |", page.len());
    println!("| snapshot body size | {} bytes | |", snap.len());
    Ok(())
}

/// The routing decision measured inside the filter (wasm under V8): 16 endpoints, 16 KB prompts.
async fn decision_bench() -> Result<()> {
    let mut sims = Vec::new();
    for id in 0..16 {
        let fast =
            SimConfig { prefill_us_per_token: 0.0, decode_step_us: 200.0, decode_us_per_seq: 0.0, ..sim_config(id) };
        sims.push(SimServer::start(fast).await?);
    }
    let addrs: Vec<_> = sims.iter().map(|s| s.addr).collect();
    let eps: Vec<String> = sims.iter().map(|s| s.endpoint()).collect();
    let pools = pools_config_file("bench", &eps, json!({}))?;
    let sc = Sidecar::start(&["--pools-config", &pools.path().display().to_string()])?;
    let envoy = EnvoyBuilder::new("inference-router-pool.yaml")
        .filter_config("inference-router", &json!({"pool": "bench"}))
        .var("POOL_LB_ENDPOINTS", lb_endpoints_yaml(&addrs))
        .var("SIDECAR_PORT", sc.port().to_string())
        .start()
        .await?;
    wait_router_ready(&sc, &envoy, sims.len()).await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let tenants: Vec<String> = (0..64).map(|t| text(&mut Rng(1000 + t), 12 * 1024)).collect();
    let mut rng = Rng(7);
    let n = 2000;
    for i in 0..n {
        let body = json!({"model": format!("lora-{}", i % 32), "max_tokens": 1, "messages": [
            {"role":"system","content": tenants[i % 64]}, {"role":"user","content": text(&mut rng, 4 * 1024)}]});
        let r = http.post(envoy.url("/v1/chat/completions")).json(&body).send().await?;
        anyhow::ensure!(r.status() == 200, "status {}", r.status());
        let _ = r.bytes().await?;
    }
    let text = http.get(envoy.admin_url("/stats?filter=decision_us")).send().await?.text().await?;
    let scored = envoy.stat("meshwarden.inference_router.routed.scored").await?;
    println!(
        "## Routing decision inside Envoy (wasm, V8): 16 endpoints, 16 KB bodies, {n} requests ({scored} scored)
"
    );
    for line in text.lines().filter(|l| l.contains("decision_us") && l.contains("P50")) {
        // Envoy prints `P50(interval,cumulative)`; the cumulative values are the whole run.
        let cumulative: Vec<String> = line
            .split_whitespace()
            .filter(|t| ["P25(", "P50(", "P90(", "P99(", "P100("].iter().any(|p| t.starts_with(p)))
            .map(|t| {
                let name = t.split('(').next().unwrap_or("");
                let val = t.trim_end_matches(')').split(',').nth(1).unwrap_or("?");
                format!("{name} {val} µs")
            })
            .collect();
        println!("decision_us: {}", cumulative.join(", "));
    }
    Ok(())
}

fn report(w: &Workload, rate: f64, results: &[RunResult]) {
    println!(
        "\n## {} at {:.1} req/s ({:.0}% of cache-less capacity {:.1} req/s)\n",
        w.name,
        rate,
        rate / capacity(w) * 100.0,
        capacity(w)
    );
    println!("| policy | done/issued | TTFT p50 | TTFT p90 | TTFT p99 | e2e p50 | e2e p90 | e2e p99 | output tok/s | prefix-cache hit | adapter loads |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut p90 = Vec::new();
    for r in results {
        let ok: Vec<&Sample> = r.samples.iter().filter(|s| s.ok).collect();
        let mut ttft: Vec<f64> = ok.iter().map(|s| s.ttft_ms).collect();
        let mut e2e: Vec<f64> = ok.iter().map(|s| s.e2e_ms).collect();
        let tokens: u64 = ok.iter().map(|s| s.tokens).sum();
        let hit =
            if r.stats.prompt_tokens > 0 { r.stats.cached_tokens as f64 / r.stats.prompt_tokens as f64 } else { 0.0 };
        let t90 = pct(&mut ttft, 0.9);
        p90.push((r.policy, t90, r.stats.lora_loads, pct(&mut e2e, 0.5)));
        println!(
            "| {} | {}/{} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} | {:.1}% | {} |",
            r.policy.name(),
            ok.len(),
            r.issued,
            pct(&mut ttft, 0.5),
            t90,
            pct(&mut ttft, 0.99),
            pct(&mut e2e, 0.5),
            pct(&mut e2e, 0.9),
            pct(&mut e2e, 0.99),
            tokens as f64 / r.window_s.max(0.001),
            hit * 100.0,
            r.stats.lora_loads
        );
    }
    for r in results {
        if let Some(s) = &r.router_stats {
            println!("\ninference-router decisions: {s}");
        }
    }
    let get = |p: Policy| p90.iter().find(|x| x.0 == p).copied();
    if let (Some(rr), Some(lr), Some(ir)) = (get(Policy::RoundRobin), get(Policy::LeastRequest), get(Policy::Router)) {
        match w.key {
            'a' => println!(
                "\nTTFT p90 router/round-robin = {:.3} (target <= 0.1); router/least-request = {:.3} (target <= 0.5)",
                ir.1 / rr.1,
                ir.1 / lr.1
            ),
            'b' => println!(
                "\nadapter loads least-request/router = {:.1}x (target >= 2x); TTFT p90 router/least-request = {:.3}",
                lr.2 as f64 / (ir.2.max(1)) as f64,
                ir.1 / lr.1
            ),
            _ => println!(
                "\nTTFT p90 router/least-request = {:.3}, e2e p50 router/least-request = {:.3} (target: no worse than 1.05)",
                ir.1 / lr.1,
                ir.3 / lr.3
            ),
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = parse_args()?;
    if args.scrape_bench {
        return scrape_bench(args.endpoints).await;
    }
    if args.decision_bench {
        return decision_bench().await;
    }
    println!(
        "# inference-router simulation benchmark\n\n8 simulated servers, speeds {SPEEDS:?}; warm-up {} s (excluded), measured {} s per run; load {:.0}% of cache-less capacity",
        args.warmup,
        args.seconds,
        args.load * 100.0
    );
    for w in WORKLOADS.iter().filter(|w| args.workloads.contains(w.key)) {
        let mut results = Vec::new();
        for (k, p) in [('r', Policy::RoundRobin), ('l', Policy::LeastRequest), ('i', Policy::Router)] {
            if !args.policies.contains(k) {
                continue;
            }
            eprintln!("running {} with {}", w.name, p.name());
            results.push(run(p, w, &args).await?);
        }
        report(w, capacity(w) * args.load, &results);
    }
    Ok(())
}
