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
        let mut r = RedisServer { child: None, port: pick()?, dir };
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
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
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
