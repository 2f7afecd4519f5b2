//! A real `redis-server` (Debian package `redis-server`, listed in `scripts/tools/apt-token-limiter.txt`)
//! on a free loopback port, without persistence, stopped on drop.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// A Redis Cluster node (`--cluster-enabled yes`, its bus on a free port of its own).
    cluster_node: bool,
    /// Also serving TLS on this port, with `srv.crt` / `srv.key` of this directory (see [`crate::pki`]).
    tls: Option<(u16, std::path::PathBuf)>,
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf.get(..n).is_some_and(|b| b.starts_with(b"+PONG")))
}

impl RedisServer {
    /// A free port is picked, then handed to redis-server: another process of the test run can take it
    /// in between (every server here picks its port the same way). redis-server then exits at once, and
    /// a fresh port is tried, up to five times.
    pub fn start() -> Result<RedisServer> {
        Self::start_with(free_port)
    }

    /// [`RedisServer::start`] with the ports `pick` gives.
    fn start_with(mut pick: impl FnMut() -> Result<u16>) -> Result<RedisServer> {
        let dir = tempfile::Builder::new().prefix("meshwarden-redis-").tempdir()?;
        let mut r = RedisServer { child: None, port: pick()?, dir, cluster_node: false, tls: None };
        let mut attempts = 0;
        loop {
            match r.spawn() {
                Ok(()) => return Ok(r),
                Err(e) if attempts < 4 && r.exited() => {
                    attempts += 1;
                    eprintln!("redis-server exited on port {} ({e:#}); trying another port", r.port);
                    r.port = pick()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The last redis-server started has exited (it could not bind its port, for one).
    fn exited(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_string());
        let mut cluster_args = Vec::new();
        if self.cluster_node {
            // The bus port defaults to port + 10000, which can be taken or past 65535.
            let bus = free_port()?.to_string();
            cluster_args.extend(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"].map(String::from));
            cluster_args.extend([
                "--cluster-node-timeout".to_string(),
                "5000".to_string(),
                "--cluster-port".to_string(),
                bus,
            ]);
        }
        let mut tls_args = Vec::new();
        if let Some((port, pki)) = &self.tls {
            tls_args.extend(["--tls-port".to_string(), port.to_string(), "--tls-auth-clients".into(), "no".into()]);
            for (flag, file) in
                [("--tls-cert-file", "srv.crt"), ("--tls-key-file", "srv.key"), ("--tls-ca-cert-file", "ca.crt")]
            {
                tls_args.extend([flag.to_string(), pki.join(file).display().to_string()]);
            }
        }
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&cluster_args)
            .args(&tls_args)
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(self.port) {
            if self.exited() {
                bail!("redis-server exited before answering PING on port {}", self.port);
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING on port {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A server that also serves TLS (`rediss://`) with the certificate `srv.crt` of `pki` (for 127.0.0.1,
    /// signed by its `ca.crt`: [`crate::pki::spiffe_pki`] writes them); the plain port stays for [`ping`].
    pub fn start_tls(pki: &std::path::Path) -> Result<RedisServer> {
        let dir = tempfile::Builder::new().prefix("meshwarden-redis-tls-").tempdir()?;
        let mut r = RedisServer {
            child: None,
            port: free_port()?,
            dir,
            cluster_node: false,
            tls: Some((free_port()?, pki.to_path_buf())),
        };
        r.spawn()?;
        Ok(r)
    }

    /// The `rediss://` URL of a server started with [`start_tls`](Self::start_tls).
    pub fn tls_url(&self) -> Option<String> {
        self.tls.as_ref().map(|(port, _)| format!("rediss://127.0.0.1:{port}/0"))
    }

    /// The server's process id (to freeze it with SIGSTOP in fault tests); `None` once killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill and start again on the same port (state is lost, as with a Redis without persistence).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

/// One command in Redis's inline form on `port`, and the start of its answer (what fits in 64 KiB).
pub fn command(port: u16, line: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(format!("{line}\r\n").as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).into_owned())
}

/// A Redis Cluster of three primaries without replicas (`redis-cli --cluster create`, package
/// `redis-tools`, which `redis-server` depends on), on loopback ports; stopped on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Result<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new().prefix("meshwarden-redis-cluster-").tempdir()?;
            let mut node = RedisServer { child: None, port: free_port()?, dir, cluster_node: true, tls: None };
            node.spawn()?;
            nodes.push(node);
        }
        let cli = std::env::var("REDIS_CLI_BIN").unwrap_or_else(|_| "redis-cli".to_string());
        let out = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context("redis-cli --cluster create")?;
        if !out.status.success() {
            bail!("redis-cli --cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &nodes {
            while !command(n.port, "CLUSTER INFO").is_ok_and(|i| i.contains("cluster_state:ok")) {
                if Instant::now() > deadline {
                    bail!("the cluster is not ok on port {}", n.port);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(RedisCluster { nodes })
    }

    /// The URL of the first node (any node leads a cluster client to the others).
    pub fn url(&self) -> String {
        self.nodes.first().map(RedisServer::url).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    /// A port taken between picking it and redis-server binding it (here: held by a listener) makes
    /// redis-server exit; the next port is tried and the server answers there.
    #[test]
    fn a_port_taken_meanwhile_is_replaced_by_another() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let mut ports = vec![taken_port];
        let r = RedisServer::start_with(|| match ports.pop() {
            Some(p) => Ok(p),
            None => free_port(),
        })
        .unwrap();
        assert_ne!(r.port, taken_port);
        assert!(ping(r.port));
        drop(taken);
    }
}
