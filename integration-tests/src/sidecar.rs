//! Start the real `meshwarden-sidecar` binary on a free loopback port; stop it on drop.
//! The binary is `$MESHWARDEN_SIDECAR_BIN`, else `target/{debug,release}/meshwarden-sidecar`
//! (`make build` / `make test-integration` build it).

use crate::paths;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn sidecar_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MESHWARDEN_SIDECAR_BIN") {
        return Ok(PathBuf::from(p));
    }
    let target = paths::repo_root().join("target");
    let candidates =
        [target.join("debug").join("meshwarden-sidecar"), target.join("release").join("meshwarden-sidecar")];
    candidates
        .into_iter()
        .filter(|p| p.is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .context("meshwarden-sidecar is not built: run `cargo build -p meshwarden-sidecar` (make build does)")
}

pub struct Sidecar {
    child: Child,
    pub addr: SocketAddr,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Sidecar {
    /// Start with extra flags (e.g. `["--redis-url", url]`), listening on a free port.
    pub fn start(args: &[&str]) -> Result<Sidecar> {
        Self::start_with_env(args, &[])
    }

    /// [`start`](Self::start) with environment variables set for the process (e.g. `SSL_CERT_FILE`).
    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Result<Sidecar> {
        let envs = envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Self::start_on("127.0.0.1:0", args.iter().map(|s| s.to_string()).collect(), envs)
    }

    fn start_on(listen: &str, args: Vec<String>, envs: Vec<(String, String)>) -> Result<Sidecar> {
        let mut child = Command::new(sidecar_bin()?)
            .arg("--listen")
            .arg(listen)
            .args(&args)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting meshwarden-sidecar")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = log2.lock() {
                    l.push(line);
                }
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        // The structured logs go to stdout: kept in `log` with stderr's lines.
        let log3 = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(a) = line.strip_prefix("meshwarden-sidecar listening on ") {
                        let _ = tx.send(a.trim().to_string());
                        sent = true;
                    }
                }
                if let Ok(mut l) = log3.lock() {
                    l.push(line);
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(a) = rx.recv_timeout(Duration::from_millis(50)) {
                let addr: SocketAddr = a.parse()?;
                return Ok(Sidecar { child, addr, args, envs, log });
            }
            if let Some(status) = child.try_wait()? {
                let log = log.lock().map(|l| l.join("\n")).unwrap_or_default();
                bail!("meshwarden-sidecar exited during startup ({status}):\n{log}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("meshwarden-sidecar did not start in 20 s");
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Process id (for CPU / RSS measurements).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote (stderr and stdout lines).
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Wait up to `timeout` for the process to exit by itself (after a SIGTERM); its exit status.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    /// Kill the process (SIGKILL): a crash, as far as clients can tell.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start again on the same address and flags (after [`kill`](Self::kill)).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let again = Self::start_on(&self.addr.to_string(), self.args.clone(), self.envs.clone())?;
        let old = std::mem::replace(self, again);
        drop(old);
        Ok(())
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- sidecar log ----\n{}\n---- end of sidecar log ----", self.log());
        }
    }
}
