//! Start a real Envoy with our real `.wasm` filters on free loopback ports.
//!
//! Configs live in `envoy-configs/` as templates with `{{NAME}}` placeholders; rendering fails if a
//! placeholder has no value, so a template and the harness cannot drift apart silently. Envoy binds
//! port 0 for its listener and admin; the harness reads the real ports back from the admin API, so
//! parallel tests never race for ports. `Drop` stops Envoy and, if the test is failing, prints its log.

use crate::paths;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Placeholder names for each filter's JSON configuration in the templates.
pub fn config_var(filter: &str) -> String {
    format!("{}_CONFIG", filter.to_uppercase().replace('-', "_"))
}

/// Render `{{NAME}}` placeholders. Every placeholder must have a value.
pub fn render(template: &str, vars: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    let mut missing = Vec::new();
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").context("unterminated {{ in template")?;
        let name = after[..end].trim();
        match vars.get(name) {
            Some(v) => out.push_str(v),
            None => missing.push(name.to_string()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    if !missing.is_empty() {
        bail!("template placeholders without a value: {}", missing.join(", "));
    }
    Ok(out)
}

pub struct EnvoyBuilder {
    template: PathBuf,
    vars: BTreeMap<String, String>,
    concurrency: u32,
    log_level: String,
    env: Vec<(String, String)>,
    file_flush_interval_ms: Option<u32>,
}

impl EnvoyBuilder {
    /// `template` is a file name in `envoy-configs/` (or an absolute path).
    pub fn new(template: &str) -> Self {
        let path = Path::new(template);
        let template = if path.is_absolute() {
            path.to_path_buf()
        } else {
            paths::repo_root().join("envoy-configs").join(template)
        };
        let mut vars = BTreeMap::new();
        vars.insert("WASM_DIR".to_string(), paths::wasm_dir().display().to_string());
        vars.insert("LISTEN_PORT".to_string(), "0".to_string());
        vars.insert("ADMIN_PORT".to_string(), "0".to_string());
        for f in paths::FILTERS {
            vars.insert(config_var(f), json_string("{}"));
        }
        Self {
            template,
            vars,
            concurrency: 2,
            log_level: "info".to_string(),
            env: Vec::new(),
            file_flush_interval_ms: None,
        }
    }

    pub fn var(mut self, name: &str, value: impl Into<String>) -> Self {
        self.vars.insert(name.to_string(), value.into());
        self
    }

    /// The mock LLM (or any upstream) port for the `llm` cluster.
    pub fn upstream_port(self, port: u16) -> Self {
        self.var("UPSTREAM_PORT", port.to_string())
    }

    /// A filter's JSON configuration (`filter` as in [`paths::FILTERS`]).
    pub fn filter_config(self, filter: &str, config: &serde_json::Value) -> Self {
        let var = config_var(filter);
        self.var(&var, json_string(&config.to_string()))
    }

    /// A filter's configuration as raw text, for tests of invalid JSON.
    pub fn filter_config_raw(self, filter: &str, raw: &str) -> Self {
        let var = config_var(filter);
        self.var(&var, json_string(raw))
    }

    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    /// An environment variable of the Envoy process (what `vm_config.environment_variables.host_env_keys`
    /// passes into a Wasm VM).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// How often Envoy writes its access logs out (`--file-flush-interval-msec`; Envoy's default is 10 s),
    /// for tests that read them.
    pub fn access_log_flush_ms(mut self, ms: u32) -> Self {
        self.file_flush_interval_ms = Some(ms);
        self
    }

    fn spawn(self) -> Result<(Child, tempfile::TempDir, PathBuf, PathBuf)> {
        let template =
            std::fs::read_to_string(&self.template).with_context(|| format!("reading {}", self.template.display()))?;
        let rendered = render(&template, &self.vars)?;
        let dir = tempfile::Builder::new().prefix("meshwarden-envoy-").tempdir()?;
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, rendered)?;
        let admin_path = dir.path().join("admin-address");
        let log_path = dir.path().join("envoy.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(paths::envoy_bin()?);
        if let Some(ms) = self.file_flush_interval_ms {
            cmd.arg("--file-flush-interval-msec").arg(ms.to_string());
        }
        let child = cmd
            .arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--use-dynamic-base-id")
            .arg("--concurrency")
            .arg(self.concurrency.to_string())
            .arg("-l")
            .arg(&self.log_level)
            .arg("--component-log-level")
            .arg("wasm:info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting envoy")?;
        Ok((child, dir, admin_path, log_path))
    }

    /// Start Envoy and wait until its admin `/ready` says LIVE (30 s at most).
    pub async fn start(self) -> Result<Envoy> {
        let (child, dir, admin_path, log_path) = self.spawn()?;
        let mut envoy = Envoy {
            child,
            _dir: dir,
            log_path,
            admin: "127.0.0.1:0".parse()?,
            port: 0,
            http: reqwest::Client::builder().no_proxy().build()?,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = envoy.child.try_wait()? {
                bail!("envoy exited during startup ({status}):\n{}", envoy.log());
            }
            if Instant::now() > deadline {
                bail!("envoy not ready after 30 s:\n{}", envoy.log());
            }
            if let Ok(addr) = std::fs::read_to_string(&admin_path) {
                if let Ok(a) = addr.trim().parse::<SocketAddr>() {
                    envoy.admin = a;
                    if envoy.ready().await {
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        envoy.port = envoy.listener_port("ingress").await?;
        Ok(envoy)
    }

    /// Start Envoy expecting it to refuse the configuration; returns its log.
    pub async fn start_expect_failure(self) -> Result<String> {
        let (mut child, _dir, _admin, log_path) = self.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                if status.success() {
                    bail!("envoy exited successfully; expected a rejected configuration:\n{log}");
                }
                return Ok(log);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("envoy kept running; expected it to reject the configuration:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A JSON string literal, which is also a valid YAML double-quoted scalar.
pub fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

pub struct Envoy {
    child: Child,
    _dir: tempfile::TempDir,
    log_path: PathBuf,
    pub admin: SocketAddr,
    /// The `ingress` listener's port.
    pub port: u16,
    http: reqwest::Client,
}

impl Envoy {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn ready(&self) -> bool {
        match self.http.get(self.admin_url("/ready")).send().await {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        }
    }

    pub async fn listener_port(&self, name: &str) -> Result<u16> {
        let v: serde_json::Value = self.http.get(self.admin_url("/listeners?format=json")).send().await?.json().await?;
        let statuses = v["listener_statuses"].as_array().context("no listener_statuses")?;
        for s in statuses {
            if s["name"] == name {
                let port =
                    s["local_address"]["socket_address"]["port_value"].as_u64().context("listener without port")?;
                return Ok(u16::try_from(port)?);
            }
        }
        bail!("no listener named {name} in {v}")
    }

    /// All counters and gauges whose name contains `filter`, as `name -> value`. Wasm-defined stats
    /// appear under Envoy's `wasmcustom.` prefix; it is stripped here.
    ///
    /// token-limiter, mcp-authz and pii-redactor sum their counters in each worker's VM and hand them to
    /// Envoy on a timer (`stats_flush_interval_ms`, 20 ms by default): their stats are read once they have settled, i.e.
    /// when two reads [`STATS_SETTLE`] apart agree (after at least one such wait), for at most 5 s.
    pub async fn stats(&self, filter: &str) -> Result<BTreeMap<String, u64>> {
        if !BATCHED_STATS.iter().any(|f| filter.contains(f)) {
            return self.stats_now(filter).await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        tokio::time::sleep(STATS_SETTLE).await;
        let mut last = self.stats_now(filter).await?;
        loop {
            tokio::time::sleep(STATS_SETTLE).await;
            let now = self.stats_now(filter).await?;
            if now == last || Instant::now() > deadline {
                return Ok(now);
            }
            last = now;
        }
    }

    /// [`Envoy::stats`] without waiting for batched counters.
    pub async fn stats_now(&self, filter: &str) -> Result<BTreeMap<String, u64>> {
        let text = self.http.get(self.admin_url(&format!("/stats?filter={filter}"))).send().await?.text().await?;
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if let Some((k, v)) = line.split_once(": ") {
                if let Ok(n) = v.trim().parse::<u64>() {
                    out.insert(k.trim_start_matches("wasmcustom.").to_string(), n);
                }
            }
        }
        Ok(out)
    }

    pub async fn stat(&self, name: &str) -> Result<u64> {
        Ok(self.stats(name).await?.get(name).copied().unwrap_or(0))
    }
}

/// Stat name parts of the filters that batch their counters in the VM (see [`Envoy::stats`]).
const BATCHED_STATS: &[&str] = &["token_limiter", "mcp_authz", "pii_redactor"];

/// Three of the default flush intervals: what a read of batched stats waits before it trusts a value.
const STATS_SETTLE: Duration = Duration::from_millis(60);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            eprintln!("---- envoy log (last 200 lines) ----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            eprintln!("---- end of envoy log ----");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_fills_and_reports_missing() {
        let mut vars = BTreeMap::new();
        vars.insert("A".to_string(), "1".to_string());
        assert_eq!(render("x {{A}} y {{ A }}", &vars).unwrap(), "x 1 y 1");
        let err = render("{{A}} {{B}} {{C}}", &vars).unwrap_err().to_string();
        assert!(err.contains("B, C"), "{err}");
    }
}
