//! Many clients at once against a rate limit: how many were admitted and how many limited.

#![allow(clippy::unwrap_used, clippy::panic)] // test tooling: a failed send is a broken test run

/// `clients` concurrent tasks, each sending `per_client` requests one after another; `request(i)` builds
/// client `i`'s request. Returns (answers 200, answers 429); any other status fails the test. Every
/// answer's body is read to the end, so each request is complete (and settled) before the next.
pub async fn admitted_and_limited<F>(clients: usize, per_client: usize, request: F) -> (u64, u64)
where
    F: Fn(usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let request = std::sync::Arc::new(request);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut limited) = (0u64, 0u64);
            for _ in 0..per_client {
                let r = request(i).send().await.unwrap();
                match r.status().as_u16() {
                    200 => ok += 1,
                    429 => limited += 1,
                    s => panic!("status {s}: {}", r.text().await.unwrap_or_default()),
                }
                let _ = r.bytes().await;
            }
            (ok, limited)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (o, l) = t.await.unwrap();
        ok += o;
        limited += l;
    }
    (ok, limited)
}
