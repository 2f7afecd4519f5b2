//! `make run`: the full local gateway (Envoy + all five filters + the sidecar + two mock LLM servers as the
//! model pool + a mock MCP server), on localhost. `make demo` runs it with `--demo`: a scripted tour that
//! shows each filter act and exits non-zero if one does not.
//! Ports: `LISTEN_PORT` (default 10000), `ADMIN_PORT` (9901). Ctrl-C or SIGTERM stops everything.

use anyhow::Result;
use meshwarden_integration_tests::gateway::{configs, tour, LocalGateway, Ports};

fn port(var: &str, default: u16) -> Result<u16> {
    Ok(match std::env::var(var) {
        Ok(v) => v.parse()?,
        Err(_) => default,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let demo = std::env::args().any(|a| a == "--demo");
    let ports = if demo {
        Ports::default() // free ports: the tour can run beside anything
    } else {
        Ports { listen: port("LISTEN_PORT", 10000)?, admin: port("ADMIN_PORT", 9901)? }
    };
    let gw = LocalGateway::start(ports).await?;
    if demo {
        println!(
            "meshwarden demo: Envoy + five filters + sidecar + 2 model servers + MCP server on {}",
            gw.envoy.url("")
        );
        return tour(&gw).await;
    }
    let url = gw.envoy.url("");
    println!(
        r#"
meshwarden is running: Envoy + mcp-authz, prompt-guard, pii-redactor, token-limiter, inference-router
  gateway      {url}    (/v1/* -> model pool picked by inference-router, /mcp -> MCP server)
  admin        {admin}   (stats: {admin}/stats?filter=meshwarden)
  sidecar      {sidecar}   (/metrics, /v1/pools/local/endpoints)
  model pool   {models}
  filter configs: {configs}

Try:
  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Hello!"}}]}}'

  curl -sN {url}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"Stream please"}}]}}'

  curl -s {url}/v1/messages -H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' \
    -d '{{"model":"claude-sonnet-4","max_tokens":64,"messages":[{{"role":"user","content":"Hi Claude"}}]}}'

  curl -s {url}/v1/chat/completions -H 'content-type: application/json' -H 'x-mock-echo: 1' \
    -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Mail jane.doe@example.com"}}]}}'

  curl -s {url}/mcp -H 'content-type: application/json' -H 'x-demo-user: bob' \
    -d '{{"jsonrpc":"2.0","id":1,"method":"tools/list"}}'

`make demo` shows each filter act. Ctrl-C to stop."#,
        admin = gw.envoy.admin_url(""),
        sidecar = gw.sidecar.url(""),
        models = gw.models.iter().map(|m| m.addr.to_string()).collect::<Vec<_>>().join(", "),
        configs = serde_json::Value::Object(configs().into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    println!("stopping");
    Ok(())
}
