//! Real Python servers and clients used by the tests (e.g. the official MCP and A2A SDKs), from
//! `integration-tests/python/`. A server binds 127.0.0.1 port 0 itself and prints `PORT <n>` as its
//! first stdout line, so there is no port race; it is killed (by its own pid) when dropped.

use crate::paths;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// `integration-tests/python/<name>`.
pub fn script(name: &str) -> PathBuf {
    paths::repo_root().join("integration-tests").join("python").join(name)
}

pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string())
}

pub struct PyServer {
    child: Child,
    pub port: u16,
}

impl PyServer {
    /// Start `script` with `args` and wait (60 s at most) for its `PORT <n>` line.
    pub async fn start(name: &str, args: &[&str]) -> Result<PyServer> {
        let mut child = Command::new(python())
            .arg(script(name))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {name} (scripts/install-tools.sh installs its Python packages)"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let line = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::task::spawn_blocking(move || {
                let mut r = BufReader::new(stdout);
                let mut line = String::new();
                let n = r.read_line(&mut line);
                // Keep draining stdout so the server never blocks on a full pipe.
                std::thread::spawn(move || {
                    let mut sink = String::new();
                    while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                        sink.clear();
                    }
                });
                n.map(|_| line)
            }),
        )
        .await;
        let line = match line {
            Ok(Ok(Ok(l))) => l,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{name} did not print its port");
            }
        };
        let Some(port) = line.trim().strip_prefix("PORT ").and_then(|p| p.parse::<u16>().ok()) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name} printed {line:?} instead of PORT <n>");
        };
        // Wait until it accepts connections.
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(PyServer { child, port });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("{name} never accepted connections on port {port}")
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a Python script to completion (e.g. an SDK client) and return its output.
pub async fn run(name: &str, args: &[String]) -> Result<Output> {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(script(name)).args(args).stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .with_context(|| format!("{name} timed out"))??;
    Ok(out)
}
