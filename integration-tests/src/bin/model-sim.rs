//! Run simulated vLLM-like model servers (see `model_sim`) on consecutive loopback ports until Ctrl-C.
//!
//! `cargo run -p meshwarden-integration-tests --bin model-sim -- [--count 2] [--base-port 8001] [--speeds 1.0,0.5]`

use anyhow::Context;
use meshwarden_integration_tests::model_sim::{SimConfig, SimServer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (mut count, mut base, mut speeds) = (2usize, 8001u16, Vec::<f64>::new());
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--count" => count = v.parse()?,
            "--base-port" => base = v.parse()?,
            "--speeds" => speeds = v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let mut servers = Vec::new();
    for i in 0..count {
        let port = base.checked_add(u16::try_from(i)?).context("port overflow")?;
        let speed = speeds.get(i).copied().unwrap_or(1.0);
        let s =
            SimServer::start_on(format!("127.0.0.1:{port}").parse()?, SimConfig { id: i, speed, ..Default::default() })
                .await?;
        println!("model-sim {i} listening on {} (speed {speed})", s.addr);
        servers.push(s);
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}
