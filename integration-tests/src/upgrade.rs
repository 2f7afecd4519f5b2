//! HTTP/1.1 connection upgrades (WebSocket: OpenAI's Realtime API, Gemini Live) through Envoy, and
//! requests whose body does not end while the client waits for answers (gRPC client and bidirectional
//! streams).
//!
//! Istio's sidecars and gateways enable WebSocket upgrades on every listener, and after the `101`
//! Envoy hands the upgraded bytes to the HTTP filters as request and response body data. These helpers
//! derive such a configuration from one of `envoy-configs/`, serve an upstream that accepts the upgrade
//! and echoes what follows, and play the client: no WebSocket framing is needed, since Envoy does not
//! read the frames.

use anyhow::{anyhow, Context, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A copy of `envoy-configs/<template>` with WebSocket upgrades enabled on its connection manager and
/// Envoy's buffer filter left out, as in an Istio sidecar (whose chain has no buffer filter). The file
/// lives as long as the returned handle.
pub fn with_websocket_upgrades(template: &str) -> Result<(tempfile::NamedTempFile, PathBuf)> {
    let path = crate::paths::repo_root().join("envoy-configs").join(template);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = String::with_capacity(text.len() + 128);
    let mut lines = text.lines().peekable();
    let mut upgrades = 0;
    while let Some(line) = lines.next() {
        if line.trim() == "- name: envoy.filters.http.buffer" {
            // Skip the buffer filter's block: every following line indented deeper than its `- name`.
            let indent = line.len() - line.trim_start().len();
            while lines.peek().is_some_and(|l| l.len() - l.trim_start().len() > indent || l.trim().is_empty()) {
                lines.next();
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line.trim() == "codec_type: AUTO" {
            let indent = " ".repeat(line.len() - line.trim_start().len());
            out.push_str(&format!("{indent}upgrade_configs:\n{indent}- upgrade_type: websocket\n"));
            upgrades += 1;
        }
    }
    if upgrades == 0 {
        return Err(anyhow!("{template}: no `codec_type: AUTO` line to put upgrade_configs after"));
    }
    let mut file = tempfile::Builder::new().prefix("meshwarden-ws-").suffix(".yaml").tempfile()?;
    std::io::Write::write_all(&mut file, out.as_bytes())?;
    let path = file.path().to_path_buf();
    Ok((file, path))
}

/// An upstream on a free loopback port that reads each request's head, counts the request, and hands the
/// connection (with the bytes read past the head) to `serve`; the accept loop ends with the runtime.
async fn counting_upstream<F, Fut>(serve: F) -> Result<(u16, Arc<AtomicUsize>)>
where
    F: Fn(TcpStream, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (counter, serve) = (counter.clone(), serve.clone());
            tokio::spawn(async move {
                let Ok((_, rest)) = read_head(&mut sock).await else { return };
                counter.fetch_add(1, Ordering::SeqCst);
                serve(sock, rest).await;
            });
        }
    });
    Ok((port, seen))
}

/// An upstream on a free loopback port that answers every upgrade request `101 Switching Protocols` and
/// then echoes every byte back; the accept loop ends with the runtime. The counter counts the requests
/// that reached it.
pub async fn echo_upgrade_upstream() -> Result<(u16, Arc<AtomicUsize>)> {
    counting_upstream(|mut sock, _| async move {
        let head = "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n";
        if sock.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if sock.write_all(buf.get(..n).unwrap_or_default()).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await
}

/// What a client got for an upgrade request: the response head, and (after a `101`) what came back
/// for `payload` within `wait` (`None`: nothing, the bytes were held).
pub struct UpgradeOutcome {
    pub head: String,
    pub body: String,
    pub echoed: Option<Vec<u8>>,
}

impl UpgradeOutcome {
    /// The status code of the response head.
    pub fn status(&self) -> u16 {
        self.head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }
}

/// Send a WebSocket upgrade `GET path` (with `headers`) to `port`; after a `101`, send `payload` and wait
/// up to `wait` for it to come back.
pub async fn upgrade_round_trip(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    payload: &[u8],
    wait: Duration,
) -> Result<UpgradeOutcome> {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    sock.write_all(req.as_bytes()).await?;
    let (head, rest) = tokio::time::timeout(Duration::from_secs(10), read_head(&mut sock))
        .await
        .map_err(|_| anyhow!("no response head within 10 s"))??;
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    if status != 101 {
        // A refusal: read its body (content-length) to show what the client was told.
        let len = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = rest;
        while body.len() < len {
            let mut buf = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => body.extend_from_slice(buf.get(..n).unwrap_or_default()),
                _ => break,
            }
        }
        return Ok(UpgradeOutcome { head, body: String::from_utf8_lossy(&body).to_string(), echoed: None });
    }
    sock.write_all(payload).await?;
    let mut got = rest;
    let deadline = tokio::time::Instant::now() + wait;
    while got.len() < payload.len() {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
            _ => break,
        }
    }
    let echoed = (got.len() >= payload.len()).then_some(got);
    Ok(UpgradeOutcome { head, body: String::new(), echoed })
}

/// An upstream on a free loopback port that answers a request as soon as its first body bytes arrive,
/// before the request ends (as a gRPC server answers a bidirectional stream's first message): `200`,
/// `content-type: application/grpc`, chunked, echoing every request byte after the head as it comes. The
/// counter counts the requests that reached it.
pub async fn early_answer_upstream() -> Result<(u16, Arc<AtomicUsize>)> {
    counting_upstream(|mut sock, mut pending| async move {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n";
        if sock.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            if !pending.is_empty() {
                let mut out = format!("{:x}\r\n", pending.len()).into_bytes();
                out.extend_from_slice(&pending);
                out.extend_from_slice(b"\r\n");
                if sock.write_all(&out).await.is_err() {
                    return;
                }
                pending.clear();
            }
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(buf.get(..n).unwrap_or_default()),
            }
        }
    })
    .await
}

/// A gRPC message as it travels: the 5-byte frame header (not compressed, length) and a protobuf with the
/// `model` as field 1 and the `prompt` as field 2 (strings under 128 bytes).
pub fn grpc_message(model: &[u8], prompt: &[u8]) -> Vec<u8> {
    let mut msg = Vec::new();
    for (tag, value) in [(0x0a, model), (0x12, prompt)] {
        msg.push(tag);
        msg.push(u8::try_from(value.len()).unwrap_or(u8::MAX) & 0x7f);
        msg.extend_from_slice(value);
    }
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    framed.extend_from_slice(&msg);
    framed
}

/// POST `path` to `port` with `headers` and a chunked body of which only `first` is sent: the request
/// stays open, as a streaming client's does. Returns the response head (empty when none came within
/// `wait`: the request was held) and the answer's bytes that arrived within `wait`.
pub async fn streaming_post(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    first: &[u8],
    wait: Duration,
) -> Result<(String, Vec<u8>)> {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut req = format!("POST {path} HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("\r\n{:x}\r\n", first.len()));
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(first);
    bytes.extend_from_slice(b"\r\n");
    sock.write_all(&bytes).await?;
    let deadline = tokio::time::Instant::now() + wait;
    let Ok(head) = tokio::time::timeout_at(deadline, read_head(&mut sock)).await else {
        return Ok((String::new(), Vec::new()));
    };
    let (head, mut body) = head?;
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        body.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    Ok((head, body))
}

/// Read an HTTP head (up to the blank line): (head text, bytes read past it).
async fn read_head(sock: &mut TcpStream) -> Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Err(anyhow!("connection closed before the end of the head"));
        }
        buf.extend_from_slice(tmp.get(..n).unwrap_or_default());
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(buf.get(..i).unwrap_or_default()).to_string();
            return Ok((head, buf.get(i + 4..).unwrap_or_default().to_vec()));
        }
        if buf.len() > 64 * 1024 {
            return Err(anyhow!("head over 64 KiB"));
        }
    }
}

/// Envoy from `envoy-configs/<template>` with WebSocket upgrades enabled, `filter` configured with
/// `config`, the upstream on `upstream`; the file holds the configuration as long as the Envoy runs.
pub async fn envoy_with_upgrades(
    template: &str,
    filter: &str,
    upstream: u16,
    config: &serde_json::Value,
    vars: &[(&str, String)],
) -> Result<(tempfile::NamedTempFile, crate::envoy::Envoy)> {
    let (file, path) = with_websocket_upgrades(template)?;
    let mut b = crate::envoy::EnvoyBuilder::new(path.to_str().unwrap_or_default())
        .upstream_port(upstream)
        .filter_config(filter, config);
    for (k, v) in vars {
        b = b.var(k, v.clone());
    }
    Ok((file, b.start().await?))
}

/// The mock Realtime server's counters (`integration-tests/python/realtime_server.py`, `GET /stats`).
pub async fn realtime_server_stats(port: u16) -> Result<serde_json::Value> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/stats")).await?.text().await?;
    Ok(serde_json::from_str(&body)?)
}

/// Run the official `openai` SDK's Realtime client (`integration-tests/python/openai_realtime.py`) through
/// the Envoy on `port` with `args` after its URL: its JSON report.
pub async fn realtime_sdk_session(port: u16, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec![format!("ws://127.0.0.1:{port}/v1")];
    all.extend(args.iter().map(|a| a.to_string()));
    let out = crate::python::run("openai_realtime.py", &all).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(anyhow!(
            "openai_realtime.py failed (scripts/install-tools.sh installs openai and websockets):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(serde_json::from_str(stdout.trim())?)
}
