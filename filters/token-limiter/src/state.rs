//! The `local` state's value format: all windows of one budget key in one Envoy shared-data entry, so a
//! reservation over several windows is one compare-and-swap (atomic across windows, and half the host
//! calls of one entry per window). Layout: 8 header bytes (zero), then per window 24 bytes
//! `window_ms | limit | tat_us`, little-endian u64s. Windows that are no longer configured are dropped on
//! the next write.

use meshwarden_shared::ratelimit::WindowSpec;

pub const HEADER: [u8; 8] = [0; 8];

fn u64_at(b: &[u8], i: usize) -> u64 {
    b.get(i..i + 8).and_then(|s| <[u8; 8]>::try_from(s).ok()).map_or(0, u64::from_le_bytes)
}

/// The stored tat of each of `windows` (0 when absent or unreadable).
pub fn decode(bytes: &[u8], windows: &[WindowSpec]) -> Vec<u64> {
    let body = bytes.get(HEADER.len()..).unwrap_or(&[]);
    windows
        .iter()
        .map(|w| {
            body.chunks_exact(24)
                .find(|c| u64_at(c, 0) == w.window_ms && u64_at(c, 8) == w.limit)
                .map_or(0, |c| u64_at(c, 16))
        })
        .collect()
}

pub fn encode(windows: &[WindowSpec], tats: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER.len() + 24 * windows.len());
    out.extend_from_slice(&HEADER);
    for (w, t) in windows.iter().zip(tats) {
        out.extend_from_slice(&w.window_ms.to_le_bytes());
        out.extend_from_slice(&w.limit.to_le_bytes());
        out.extend_from_slice(&t.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_config_changes() {
        let a = WindowSpec { limit: 10, window_ms: 1000 };
        let b = WindowSpec { limit: 600, window_ms: 60_000 };
        let bytes = encode(&[a, b], &[5, 7]);
        assert_eq!(decode(&bytes, &[b, a]), vec![7, 5]);
        let c = WindowSpec { limit: 20, window_ms: 1000 };
        assert_eq!(decode(&bytes, &[c, a]), vec![0, 5], "a changed limit starts fresh");
        assert_eq!(decode(&HEADER, &[a]), vec![0]);
        assert_eq!(decode(b"garbage", &[a]), vec![0]);
    }
}
