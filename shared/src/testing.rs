//! Helpers for the tests of every crate (here because tests of other crates cannot share `cfg(test)`
//! code). Not for filter code.

/// Deterministic pseudo-random bytes (xorshift32), for tests that feed arbitrary input; `state` moves
/// on, so successive calls give different bytes.
pub fn pseudo_random_bytes(state: &mut u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            let mut x = *state;
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *state = x;
            x as u8
        })
        .collect()
}
