//! The mock LLM as a standalone server, for `make run` and benchmarks.
//! Usage: `mock-llm [--listen 127.0.0.1:8000] [--latency-ms N]`. See `mock_llm` for request headers.
#![allow(clippy::indexing_slicing)]

use meshwarden_integration_tests::mock_llm::{MockLlm, MockOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:8000".to_string();
    let mut options = MockOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().ok_or_else(|| anyhow::anyhow!("--listen needs ADDR:PORT"))?,
            "--latency-ms" => {
                options.latency_ms = args.next().ok_or_else(|| anyhow::anyhow!("--latency-ms needs N"))?.parse()?
            }
            "-h" | "--help" => {
                println!("mock-llm [--listen 127.0.0.1:8000] [--latency-ms N]");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other}; see --help"),
        }
    }
    let mock = MockLlm::start_on(listen.parse()?, options).await?;
    println!("mock LLM listening on http://{}", mock.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
