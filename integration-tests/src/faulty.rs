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
