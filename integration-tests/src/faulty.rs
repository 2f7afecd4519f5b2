//! Upstreams and services that misbehave on purpose, for fault tests.

#![allow(clippy::unwrap_used)] // test tooling: a bind failure on loopback is a broken test machine

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP/1.1 server on a free loopback port that answers every request with a 200, its headers
/// (`content-length: 500`) and the first 12 bytes of a JSON body, then closes the connection. Envoy reports
/// a callout answered this way with no headers at all (the call was reset). Stopped when the returned task
/// is aborted.
pub async fn server_that_cuts_its_answers() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
                    }
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n";
                let _ = socket.write_all(format!("{head}{{\"allowed\":tr").as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (port, task)
}

/// What [`sidecar_fault_proxy`] does to the calls it forwards; switched while a test runs.
#[derive(Default)]
pub struct SidecarFaults {
    /// Hold every `/v1/ratelimit/reserve` call this long (ms) before delivering it, and deliver it even
    /// when the caller gave up meanwhile: a sidecar that is slow but alive.
    pub reserve_delay_ms: std::sync::atomic::AtomicU64,
    /// Answer this many `/v1/ratelimit/settle` calls with a 503 without delivering them.
    pub failed_settles: std::sync::atomic::AtomicUsize,
    /// Settle calls answered with the 503.
    pub settles_refused: std::sync::atomic::AtomicUsize,
    /// Deliver this many `/v1/ratelimit/settle` calls to the sidecar but answer the caller 503 (an answer
    /// lost after the work was done, as a timeout does): the caller must not apply them twice.
    pub applied_but_failed_settles: std::sync::atomic::AtomicUsize,
}

/// A loopback HTTP/1.1 forwarder to the sidecar on `target`, applying `faults`. One request at a time
/// per client connection (as Envoy's HTTP/1.1 pool uses it), a fresh connection to the target for each.
/// Stopped when the returned task is aborted.
pub async fn sidecar_fault_proxy(
    target: u16,
    faults: std::sync::Arc<SidecarFaults>,
) -> (u16, tokio::task::JoinHandle<()>) {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let faults = faults.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                while let Some(request) = read_http_message(&mut client, &mut pending).await {
                    let head = String::from_utf8_lossy(&request).lines().next().unwrap_or_default().to_string();
                    if head.contains("/v1/ratelimit/settle") {
                        let refuse = faults
                            .failed_settles
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        if refuse {
                            faults.settles_refused.fetch_add(1, Ordering::SeqCst);
                            let answer = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
                            if client.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                    let lose_answer = head.contains("/v1/ratelimit/settle")
                        && faults
                            .applied_but_failed_settles
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                    let delay = faults.reserve_delay_ms.load(Ordering::SeqCst);
                    // Delivered from its own task: the caller giving up does not stop it.
                    let delivery = tokio::spawn(async move {
                        if delay > 0 && head.contains("/v1/ratelimit/reserve") {
                            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
                        }
                        let mut upstream = tokio::net::TcpStream::connect(("127.0.0.1", target)).await.ok()?;
                        upstream.write_all(&request).await.ok()?;
                        read_http_message(&mut upstream, &mut Vec::new()).await
                    });
                    let Ok(Some(mut answer)) = delivery.await else {
                        return;
                    };
                    if lose_answer {
                        faults.settles_refused.fetch_add(1, Ordering::SeqCst);
                        answer = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n".to_vec();
                    }
                    if client.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, task)
}

/// One HTTP/1.1 message (head and a `content-length` body) from `socket`; bytes read past it stay in
/// `pending` for the next call. `None` when the peer closed first.
async fn read_http_message(socket: &mut tokio::net::TcpStream, pending: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) {
            let head = String::from_utf8_lossy(pending.get(..end)?).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if pending.len() >= end + len {
                let rest = pending.split_off(end + len);
                return Some(std::mem::replace(pending, rest));
            }
        }
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(buf.get(..n)?),
        }
    }
}
