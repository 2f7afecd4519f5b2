//! The sidecar binary serves health, readiness and Prometheus metrics, and shuts down on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::sidecar::Sidecar;

#[tokio::test]
async fn health_readiness_and_metrics() {
    let sidecar = Sidecar::start(&["--log-format", "json"]).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = http.get(sidecar.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(sidecar.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(sidecar.url("/readyz/backend")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.text().await.unwrap()), (200, "memory ok".to_string()));
    let m = http.get(sidecar.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("meshwarden_sidecar_http_requests_total{route=\"/readyz\",status=\"2xx\"} 1"), "{m}");
    assert!(m.contains("meshwarden_sidecar_http_request_duration_seconds_bucket"), "{m}");
}
