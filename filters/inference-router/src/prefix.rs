//! Chained block hashes of a prompt's prefix, and the per-endpoint index of recently served blocks.
//!
//! The prompt (every text the model reads, in order, with its role) is cut into fixed-size blocks; block
//! `i`'s hash covers block `i` and the hash of block `i-1`, so equal hashes mean equal prefixes up to
//! there, like a model server's prefix cache. Only full blocks count (servers cache full blocks only).

use meshwarden_shared::llm::{extract_request_texts, Api, Role};
use serde_json::Value;
use std::collections::HashMap;

/// The text a model server would tokenise, in order: roles matter (same text as system vs user prompt
/// is a different prefix).
pub fn prompt_text(api: Api, body: &Value) -> String {
    let spans = extract_request_texts(api, body);
    let mut out = String::with_capacity(spans.iter().map(|s| s.text.len() + 8).sum());
    for s in spans {
        out.push_str(match s.role {
            Role::System | Role::Developer => "<s>",
            Role::User => "<u>",
            Role::Assistant => "<a>",
            Role::Tool => "<t>",
            Role::Other => "<o>",
        });
        out.push_str(&s.text);
    }
    out
}

const K: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn mix(mut h: u64) -> u64 {
    h ^= h >> 32;
    h = h.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    h ^= h >> 32;
    h
}

/// A fast 64-bit hash of `bytes` seeded with `seed` (8 bytes per step). Not cryptographic: a client
/// can at worst steer its own requests' affinity.
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed ^ K ^ (bytes.len() as u64);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        for (d, s) in w.iter_mut().zip(rest) {
            *d = *s;
        }
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    mix(h)
}

/// Chained hashes of the first `max_blocks` full blocks of `block` bytes.
pub fn block_hashes(text: &[u8], block: usize, max_blocks: usize) -> Vec<u64> {
    if block == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity((text.len() / block).min(max_blocks));
    let mut prev = 0u64;
    for b in text.chunks_exact(block).take(max_blocks) {
        prev = hash_bytes(prev, b);
        out.push(prev);
    }
    out
}

/// Block hashes are already well mixed 64-bit values: hashing them again (SipHash) would be the
/// dominant cost of scoring. This hasher passes a `u64` key through.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThroughHasher(u64);

impl std::hash::Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(K);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type BlockMap = HashMap<u64, u64, std::hash::BuildHasherDefault<PassThroughHasher>>;

/// Recently served block hashes of one endpoint, least recently used evicted. Eviction is amortised:
/// when the map grows 25% over capacity, the oldest entries are dropped in one pass.
#[derive(Debug, Default, Clone)]
pub struct BlockLru {
    stamps: BlockMap,
    clock: u64,
    capacity: usize,
}

impl BlockLru {
    pub fn new(capacity: usize) -> Self {
        Self { stamps: BlockMap::default(), clock: 0, capacity }
    }

    pub fn len(&self) -> usize {
        self.stamps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stamps.is_empty()
    }

    pub fn insert_all(&mut self, hashes: &[u64]) {
        if self.capacity == 0 {
            return;
        }
        for h in hashes {
            self.clock += 1;
            self.stamps.insert(*h, self.clock);
        }
        if self.stamps.len() > self.capacity + self.capacity / 4 {
            let mut ages: Vec<u64> = self.stamps.values().copied().collect();
            let drop = ages.len() - self.capacity;
            ages.select_nth_unstable(drop);
            let cutoff = ages.get(drop).copied().unwrap_or(0);
            self.stamps.retain(|_, s| *s >= cutoff);
        }
    }

    /// How many leading blocks of `hashes` this endpoint served recently. Because hashes are chained,
    /// the first miss ends the match.
    pub fn matched_prefix(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.stamps.contains_key(h)).count()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chained_hashes_share_prefix_and_diverge_after() {
        let a = "x".repeat(64 * 3) + &"a".repeat(64);
        let b = "x".repeat(64 * 3) + &"b".repeat(64);
        let ha = block_hashes(a.as_bytes(), 64, 256);
        let hb = block_hashes(b.as_bytes(), 64, 256);
        assert_eq!(ha.len(), 4);
        assert_eq!(ha[..3], hb[..3]);
        assert_ne!(ha[3], hb[3]);
        // Same block content at another position hashes differently (chained).
        assert_ne!(ha[0], ha[1]);
    }

    #[test]
    fn only_full_blocks_and_at_most_max() {
        assert_eq!(block_hashes(&[b'a'; 63], 64, 256).len(), 0);
        assert_eq!(block_hashes(&[b'a'; 130], 64, 256).len(), 2);
        assert_eq!(block_hashes(&[b'a'; 64 * 300], 64, 256).len(), 256);
        assert_eq!(block_hashes(&[b'a'; 640], 0, 256).len(), 0);
    }

    #[test]
    fn lru_matches_leading_blocks_and_evicts_oldest() {
        let mut lru = BlockLru::new(8);
        lru.insert_all(&[1, 2, 3]);
        assert_eq!(lru.matched_prefix(&[1, 2, 3, 4]), 3);
        assert_eq!(lru.matched_prefix(&[2, 3]), 2);
        assert_eq!(lru.matched_prefix(&[9, 1]), 0);
        lru.insert_all(&(100..120).collect::<Vec<_>>());
        assert!(lru.len() <= 10, "{}", lru.len());
        assert_eq!(lru.matched_prefix(&[1]), 0, "oldest evicted");
        assert_eq!(lru.matched_prefix(&[119]), 1, "newest kept");
    }

    #[test]
    fn roles_are_part_of_the_prefix() {
        let sys = serde_json::json!({"messages":[{"role":"system","content":"hello"}]});
        let usr = serde_json::json!({"messages":[{"role":"user","content":"hello"}]});
        assert_ne!(prompt_text(Api::OpenAiChat, &sys), prompt_text(Api::OpenAiChat, &usr));
        let p = serde_json::json!({"prompt":"hello world"});
        assert!(prompt_text(Api::OpenAiCompletions, &p).ends_with("hello world"));
    }
}
