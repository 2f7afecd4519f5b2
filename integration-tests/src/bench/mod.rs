//! `make bench`: added latency and throughput of meshwarden filters versus plain Envoy, in one run.
//!
//! For every [`Scenario`], the driver starts the in-process mock LLM, a plain Envoy (`plain.yaml`) and an
//! Envoy with the scenario's filters, both with one worker thread, and drives each with `wrk`:
//! sequential requests on one connection for latency percentiles (the added latency is the difference
//! of the two p50s / p99s), then 32 connections for throughput. Runs are bounded in time.
//! Each filter adds its scenarios in `bench/scenarios/<filter>.rs`.

pub mod scenarios;

use serde_json::Value;

/// One benchmark case: a request sent through an Envoy config.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Short id, used with `BENCH=<substring>` to select scenarios.
    pub name: String,
    /// Template in `envoy-configs/` for the filtered Envoy.
    pub template: String,
    /// Filter configs (`filter`, JSON), as in `EnvoyBuilder::filter_config`.
    pub configs: Vec<(String, Value)>,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Template for the plain (baseline) Envoy; `plain.yaml` when `None`. A scenario whose filtered
    /// template has its own upstream (e.g. an Envoy internal listener answering a canned body) gives a
    /// baseline with the same upstream and no filter.
    pub plain_template: Option<String>,
    /// Extra template placeholders for both Envoys (`EnvoyBuilder::var`).
    pub vars: Vec<(String, String)>,
    /// Start a `meshwarden-sidecar` with these flags for the filtered Envoy (its port fills
    /// `{{SIDECAR_PORT}}`); `None` = no sidecar.
    pub sidecar_args: Option<Vec<String>>,
}

impl Scenario {
    pub fn post_json(name: &str, template: &str, path: &str, body: &Value) -> Scenario {
        Scenario {
            name: name.to_string(),
            template: template.to_string(),
            configs: Vec::new(),
            method: "POST".to_string(),
            path: path.to_string(),
            headers: vec![("content-type".to_string(), "application/json".to_string())],
            body: body.to_string(),
            plain_template: None,
            vars: Vec::new(),
            sidecar_args: None,
        }
    }

    /// The baseline template (see [`Scenario::plain_template`]).
    pub fn plain(mut self, template: &str) -> Scenario {
        self.plain_template = Some(template.to_string());
        self
    }

    pub fn var(mut self, name: &str, value: &str) -> Scenario {
        self.vars.push((name.to_string(), value.to_string()));
        self
    }

    /// Run a sidecar beside the filtered Envoy (flags such as `--redis-url`).
    pub fn with_sidecar(mut self, args: &[&str]) -> Scenario {
        self.sidecar_args = Some(args.iter().map(|a| a.to_string()).collect());
        self
    }

    pub fn config(mut self, filter: &str, config: Value) -> Scenario {
        self.configs.push((filter.to_string(), config));
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Scenario {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

/// A chat request whose JSON body is about `bytes` long.
pub fn chat_body_of_size(bytes: usize) -> Value {
    let base = serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ""}]});
    let overhead = base.to_string().len();
    let filler = "The quick brown fox jumps over the lazy dog. ";
    let mut text = String::new();
    while text.len() + overhead < bytes {
        text.push_str(filler);
    }
    text.truncate(bytes.saturating_sub(overhead));
    serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
}

/// A `wrk` Lua script sending the scenario's request.
pub fn wrk_script(s: &Scenario) -> String {
    let lua_str = |v: &str| format!("{:?}", v); // Rust debug quoting is valid Lua for ASCII and \u escapes are avoided below
    let mut out = String::new();
    out.push_str(&format!("wrk.method = {}\n", lua_str(&s.method)));
    out.push_str(&format!("wrk.path = {}\n", lua_str(&s.path)));
    // Lua long brackets take the body verbatim (no escaping issues with JSON).
    let mut level = String::new();
    while s.body.contains(&format!("]{level}]")) {
        level.push('=');
    }
    out.push_str(&format!("wrk.body = [{level}[{}]{level}]\n", s.body));
    for (k, v) in &s.headers {
        out.push_str(&format!("wrk.headers[{}] = {}\n", lua_str(k), lua_str(v)));
    }
    out
}

/// Figures parsed from `wrk --latency` output.
#[derive(Debug, Clone, Copy, Default)]
pub struct WrkResult {
    /// Requests completed in the run.
    pub requests: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests_per_sec: f64,
    pub non_2xx: u64,
    pub errors: u64,
}

fn parse_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mult)
}

/// CPU time a process has used so far, all threads, in nanoseconds (`/proc/<pid>/task/*/schedstat`,
/// first field: time on CPU). Read before and after a run, it gives the process's CPU per request,
/// a figure that scheduling noise and wake-up latency do not blur the way they blur latency.
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

pub fn parse_wrk(output: &str) -> WrkResult {
    let mut r = WrkResult::default();
    for line in output.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("50%") {
            r.p50_us = parse_duration_us(rest).unwrap_or(0.0);
        } else if let Some(rest) = t.strip_prefix("99%") {
            r.p99_us = parse_duration_us(rest).unwrap_or(0.0);
        } else if t.contains(" requests in ") {
            r.requests = t.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        } else if let Some(rest) = t.strip_prefix("Requests/sec:") {
            r.requests_per_sec = rest.trim().parse().unwrap_or(0.0);
        } else if let Some(rest) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = rest.trim().parse().unwrap_or(0);
        } else if let Some(rest) = t.strip_prefix("Socket errors:") {
            r.errors = rest.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum();
        }
    }
    r
}

/// One filter's mean time inside the VM per request, by callback (`make bench-breakdown`).
#[derive(Debug, Clone, PartialEq)]
pub struct VmBreakdown {
    /// The stat prefix, e.g. `meshwarden.token_limiter`.
    pub filter: String,
    /// (callback, mean µs per request), in stat-name order.
    pub callbacks: Vec<(String, f64)>,
}

impl VmBreakdown {
    pub fn total_us(&self) -> f64 {
        self.callbacks.iter().map(|(_, us)| us).sum()
    }
}

/// From a filtered Envoy's stats: each filter's `<prefix>.vm_us.<callback>` sums (written only by a
/// `bench-timers` build) divided by its `<prefix>.requests`. Empty for a normal build.
pub fn vm_breakdown(stats: &std::collections::BTreeMap<String, u64>) -> Vec<VmBreakdown> {
    let mut out: Vec<VmBreakdown> = Vec::new();
    for (name, sum) in stats {
        let Some((prefix, callback)) = name.split_once(".vm_us.") else {
            continue;
        };
        let requests = stats.get(&format!("{prefix}.requests")).copied().unwrap_or(0);
        if requests == 0 {
            continue;
        }
        let mean = *sum as f64 / requests as f64;
        match out.iter_mut().find(|b| b.filter == prefix) {
            Some(b) => b.callbacks.push((callback.to_string(), mean)),
            None => out.push(VmBreakdown { filter: prefix.to_string(), callbacks: vec![(callback.to_string(), mean)] }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_breakdown_is_sums_over_requests_per_filter() {
        let stats: std::collections::BTreeMap<String, u64> = [
            ("meshwarden.token_limiter.requests", 1000),
            ("meshwarden.token_limiter.vm_us.log", 9800),
            ("meshwarden.token_limiter.vm_us.request_body", 11800),
            ("meshwarden.token_limiter.admitted", 1000),
            ("meshwarden.pii_redactor.requests", 0),
            ("meshwarden.pii_redactor.vm_us.request_body", 5),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let b = vm_breakdown(&stats);
        assert_eq!(b.len(), 1, "a filter that served no request has no mean: {b:?}");
        assert_eq!(b[0].filter, "meshwarden.token_limiter");
        assert_eq!(b[0].callbacks, vec![("log".to_string(), 9.8), ("request_body".to_string(), 11.8)]);
        assert!((b[0].total_us() - 21.6).abs() < 1e-9);
        assert!(vm_breakdown(&std::collections::BTreeMap::new()).is_empty());
    }

    #[test]
    fn parses_wrk_output() {
        let out = "Running 5s test @ http://127.0.0.1:1/\n  1 threads and 1 connections\n  Latency Distribution\n     50%  180.00us\n     75%  200.00us\n     90%  1.20ms\n     99%    2.50ms\n  10000 requests in 5.00s, 1.00MB read\n  Socket errors: connect 0, read 1, write 0, timeout 2\n  Non-2xx or 3xx responses: 7\nRequests/sec:   2000.50\n";
        let r = parse_wrk(out);
        assert_eq!(r.p50_us, 180.0);
        assert_eq!(r.p99_us, 2500.0);
        assert_eq!(r.requests_per_sec, 2000.5);
        assert_eq!(r.non_2xx, 7);
        assert_eq!(r.requests, 10000);
        assert_eq!(r.errors, 3);
    }

    #[test]
    fn body_size_and_script() {
        let b = chat_body_of_size(1024);
        assert_eq!(b.to_string().len(), 1024);
        let s = Scenario::post_json("x", "plain.yaml", "/v1/chat/completions", &serde_json::json!({"a":"]]"}));
        let lua = wrk_script(&s);
        assert!(lua.contains("wrk.body = [=[{\"a\":\"]]\"}]=]"), "{lua}");
    }
}
