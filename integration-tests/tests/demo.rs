//! `make demo` as a test, so the scripted tour cannot rot: the full local gateway (Envoy + five filters +
//! sidecar + model pool + MCP server) and every step of the tour.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::gateway::{tour, LocalGateway, Ports};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_tour_shows_every_filter_act() {
    let gw = LocalGateway::start(Ports::default()).await.unwrap();
    if let Err(e) = tour(&gw).await {
        panic!(
            "demo step failed: {e:#}\n---- envoy log ----\n{}",
            gw.envoy.log().lines().rev().take(60).collect::<Vec<_>>().join("\n")
        );
    }
}
