//! `make run`: Envoy with all five meshwarden filters in front of the built-in mock LLM, on localhost.
//! Ports: `LISTEN_PORT` (default 10000), `ADMIN_PORT` (9901), `MOCK_PORT` (8000). Ctrl-C stops everything.
#![allow(clippy::indexing_slicing)]

use anyhow::Result;
use meshwarden_integration_tests::envoy::EnvoyBuilder;
use meshwarden_integration_tests::mock_llm::{MockLlm, MockOptions};

fn port(var: &str, default: u16) -> Result<u16> {
    Ok(match std::env::var(var) {
        Ok(v) => v.parse()?,
        Err(_) => default,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let listen = port("LISTEN_PORT", 10000)?;
    let admin = port("ADMIN_PORT", 9901)?;
    let mock =
        MockLlm::start_on(format!("127.0.0.1:{}", port("MOCK_PORT", 8000)?).parse()?, MockOptions::default()).await?;
    let envoy = EnvoyBuilder::new("chain.yaml")
        .upstream_port(mock.port())
        .var("LISTEN_PORT", listen.to_string())
        .var("ADMIN_PORT", admin.to_string())
        .start()
        .await?;
    let url = envoy.url("");
    println!(
        r#"
meshwarden is running: Envoy + mcp-authz, prompt-guard, pii-redactor, token-limiter, inference-router
  gateway   {url}
  admin     {admin_url}   (stats: {admin_url}/stats?filter=meshwarden)
  mock LLM  http://{mock_addr}

Try:
  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Hello!"}}]}}'

  curl -sN {url}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"gpt-4o-mini","stream":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"Stream please"}}]}}'

  curl -s {url}/v1/messages -H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' \
    -d '{{"model":"claude-sonnet-4","max_tokens":64,"messages":[{{"role":"user","content":"Hi Claude"}}]}}'

Ctrl-C to stop."#,
        admin_url = envoy.admin_url(""),
        mock_addr = mock.addr,
    );
    // Stop on Ctrl-C or SIGTERM; returning drops Envoy and the mock, which stops them.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    println!("stopping");
    Ok(())
}
