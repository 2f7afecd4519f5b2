//! The sidecar binary: flags/env -> logging -> serve until SIGTERM/Ctrl-C, then drain.

use clap::Parser;
use meshwarden_sidecar::config::{Config, LogFormat};
use meshwarden_sidecar::serve::ConnTimeouts;
use meshwarden_sidecar::server::{build_router, AppState};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(config.worker_threads))
        .enable_all()
        .build()?
        .block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.log)?;
    match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let state = AppState::new()?;
    meshwarden_sidecar::ratelimit::install(&state, &config)?;
    let app = build_router(state.clone(), Duration::from_millis(config.body_read_timeout_ms));
    meshwarden_sidecar::endpoints::start(&state, config.pools_config.as_deref())?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to learn the port when --listen uses port 0.
    println!("meshwarden-sidecar listening on {addr}");
    tracing::info!(%addr, "listening");
    state.ready.store(true, Ordering::Relaxed);
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let delay = Duration::from_secs(config.shutdown_delay_secs);
    let shutdown_state = state.clone();
    let timeouts = ConnTimeouts {
        header_read: Duration::from_millis(config.header_read_timeout_ms),
        idle: (config.idle_timeout_secs > 0).then(|| Duration::from_secs(config.idle_timeout_secs)),
    };
    let server = meshwarden_sidecar::serve::serve(listener, app, timeouts, async move {
        shutdown_signal().await;
        // Out of service first, still serving: the pod's endpoint is removed and the gateways learn it
        // within seconds, and until then their calls still come here (refused, each was the filter's
        // failure_mode).
        shutdown_state.ready.store(false, Ordering::Relaxed);
        tracing::info!(delay_secs = delay.as_secs(), "shutting down: /readyz 503, serving until the delay ends");
        tokio::time::sleep(delay).await;
        tracing::info!("shutting down: draining in-flight requests");
    });
    tokio::select! {
        () = server => {}
        _ = async { shutdown_signal().await; tokio::time::sleep(delay.saturating_add(grace)).await } => {
            tracing::warn!("grace period over; exiting with requests still in flight");
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
