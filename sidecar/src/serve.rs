//! Serving connections: HTTP/1 with a header-read timeout and an idle keep-alive timeout.
//!
//! `axum::serve` runs hyper without a timer, so hyper's header-read timeout never fired: a client that
//! connected and sent nothing, or trickled a request's headers, held its connection forever. hyper's own
//! timeout (with a timer) also runs while a keep-alive connection waits for its next request, so it would
//! close the idle connections Envoy keeps in its pool every few seconds, and a call Envoy sends on one as
//! it closes fails. Here each connection has its own timer that knows the connection's reads:
//!
//! - the first request's headers must arrive within `header_read` of the connection's accept;
//! - a later request's headers within `header_read` of its first byte;
//! - a keep-alive connection waiting for its next request is closed after `idle` (None: never), which is
//!   meant to be longer than the gateways' own upstream idle timeout (Envoy closes first, no race).

use axum::Router;
use hyper::rt::{Sleep, Timer};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The time limits of one connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnTimeouts {
    /// To receive a request's headers: from the accept (first request) or from its first byte.
    pub header_read: Duration,
    /// A keep-alive connection waiting for its next request; None: kept until the client closes it.
    pub idle: Option<Duration>,
}

/// What a connection's reads and writes tell its header timer.
#[derive(Default)]
struct Activity(Mutex<ActivityState>);

#[derive(Default)]
struct ActivityState {
    /// Head reads started on this connection (hyper arms the timer once per request head).
    heads: u64,
    /// When the first byte read since the last response write arrived: the next request has begun.
    first_read_since_write: Option<Instant>,
}

impl Activity {
    fn lock(&self) -> MutexGuard<'_, ActivityState> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The connection's socket, recording when bytes are read and answers written.
struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let mut s = self.activity.lock();
            if s.first_read_since_write.is_none() {
                s.first_read_since_write = Some(Instant::now());
            }
        }
        r
    }
}

impl Watched {
    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.activity.lock().first_read_since_write = None;
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(&r);
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// One connection's timer. hyper's HTTP/1 server uses its timer only for the header-read timeout, arming
/// it (`sleep_until`) each time it starts reading a request head.
struct ConnTimer {
    activity: Arc<Activity>,
    timeouts: ConnTimeouts,
}

/// Far enough to never fire (tokio caps far deadlines itself).
const NEVER: Duration = Duration::from_secs(100 * 365 * 86_400);

impl Timer for ConnTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, _deadline: Instant) -> Pin<Box<dyn Sleep>> {
        let first = {
            let mut s = self.activity.lock();
            s.heads += 1;
            s.heads == 1
        };
        let started = Instant::now();
        let mut sleep = HeadSleep {
            activity: self.activity.clone(),
            timeouts: self.timeouts,
            first,
            started,
            sleep: Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(started + NEVER))),
        };
        let deadline = sleep.deadline();
        sleep.sleep.as_mut().reset(tokio::time::Instant::from_std(deadline));
        Box::pin(sleep)
    }
}

/// The header-read timeout of one request head.
struct HeadSleep {
    activity: Arc<Activity>,
    timeouts: ConnTimeouts,
    /// The connection's first request: its headers are due `header_read` after the accept.
    first: bool,
    started: Instant,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl HeadSleep {
    fn deadline(&self) -> Instant {
        let t = self.timeouts;
        match self.activity.lock().first_read_since_write {
            _ if self.first => self.started + t.header_read,
            Some(first_byte) => first_byte + t.header_read,
            None => self.started + t.idle.unwrap_or(NEVER),
        }
    }
}

impl Future for HeadSleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls the timer each time a read leaves the head incomplete: bytes that began a request
        // turn the idle deadline into the header deadline.
        let deadline = tokio::time::Instant::from_std(self.deadline());
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        self.sleep.as_mut().poll(cx)
    }
}

impl Sleep for HeadSleep {}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting (the listener is closed),
/// lets every connection finish the request it is serving (idle ones close at once) and returns when all
/// are closed.
pub async fn serve<F>(listener: TcpListener, app: Router, timeouts: ConnTimeouts, shutdown: F)
where
    F: Future<Output = ()>,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Every answer is one small write that a filter waits for on its request path: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let io = TokioIo::new(Watched { io: tcp, activity: activity.clone() });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(ConnTimer { activity, timeouts }).header_read_timeout(timeouts.header_read);
        let conn = builder.serve_connection(io, hyper_util::service::TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// As `axum::serve`: a connection that failed before its accept is skipped; anything else (out of file
/// descriptors) waits a moment instead of spinning.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
