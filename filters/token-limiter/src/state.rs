//! The `local` state's value format: one Envoy shared-data entry per budget identity (the key source and
//! the hashed key value) holding the windows of every rule charged to that identity. A request that a
//! team total and a per-model rule inside it both charge (the usual two layers) is one compare-and-swap
//! for both rules and all their windows: atomic across them, and half the host calls of one entry per
//! rule. Layout: 8 header bytes ([`HEADER`], the layout version), then per window 32 bytes
//! `rule_tag | window_ms | limit | tat_us`, little-endian u64s, where `rule_tag` is [`rule_tag`] of the
//! rule's name. A write drops the windows a configured rule no longer has (a changed limit starts fresh)
//! and keeps records of rules it does not know (another plugin may share the Envoy's shared data).

use meshwarden_shared::ratelimit::WindowSpec;

/// Layout version 2 (version 1 was one entry per rule, 24-byte records, under other keys).
pub const HEADER: [u8; 8] = [2, 0, 0, 0, 0, 0, 0, 0];
const RECORD: usize = 32;

/// A rule's tag inside an entry: 64-bit FNV-1a of its name (names are unique in a configuration).
pub fn rule_tag(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// One rule's windows in an entry, with their new tats (for [`update`]).
pub struct RuleTats<'a> {
    pub tag: u64,
    pub windows: &'a [WindowSpec],
    pub tats: &'a [u64],
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    b.get(i..i + 8).and_then(|s| <[u8; 8]>::try_from(s).ok()).map_or(0, u64::from_le_bytes)
}

/// The records of an entry (none when it is empty, of another layout, or unreadable).
fn records(bytes: &[u8]) -> std::slice::ChunksExact<'_, u8> {
    let body = match bytes.get(..HEADER.len()) {
        Some(h) if h == HEADER => bytes.get(HEADER.len()..).unwrap_or(&[]),
        _ => &[],
    };
    body.chunks_exact(RECORD)
}

/// The stored tat of each of rule `tag`'s `windows` (0 when absent).
pub fn decode(bytes: &[u8], tag: u64, windows: &[WindowSpec]) -> Vec<u64> {
    windows
        .iter()
        .map(|w| {
            records(bytes)
                .find(|c| u64_at(c, 0) == tag && u64_at(c, 8) == w.window_ms && u64_at(c, 16) == w.limit)
                .map_or(0, |c| u64_at(c, 24))
        })
        .collect()
}

/// The entry `bytes` with the rules in `changes` holding exactly their given windows and tats. Records
/// of the other rules are kept, except windows that a rule in `configured` (tag and current windows)
/// no longer has.
pub fn update(bytes: &[u8], changes: &[RuleTats<'_>], configured: &[(u64, Vec<WindowSpec>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len().max(HEADER.len()) + RECORD * 4);
    out.extend_from_slice(&HEADER);
    for c in records(bytes) {
        let (tag, window_ms, limit) = (u64_at(c, 0), u64_at(c, 8), u64_at(c, 16));
        if changes.iter().any(|r| r.tag == tag) {
            continue;
        }
        let stale = configured
            .iter()
            .find(|(t, _)| *t == tag)
            .is_some_and(|(_, ws)| !ws.iter().any(|w| w.window_ms == window_ms && w.limit == limit));
        if !stale {
            out.extend_from_slice(c);
        }
    }
    for r in changes {
        for (w, t) in r.windows.iter().zip(r.tats) {
            out.extend_from_slice(&r.tag.to_le_bytes());
            out.extend_from_slice(&w.window_ms.to_le_bytes());
            out.extend_from_slice(&w.limit.to_le_bytes());
            out.extend_from_slice(&t.to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: WindowSpec = WindowSpec { limit: 10, window_ms: 1000 };
    const B: WindowSpec = WindowSpec { limit: 600, window_ms: 60_000 };

    #[test]
    fn two_rules_share_an_entry_and_keep_each_others_windows() {
        let (team, model) = (rule_tag("team"), rule_tag("gpt4"));
        assert_ne!(team, model);
        let configured = vec![(team, vec![A, B]), (model, vec![A])];
        let bytes = update(&[], &[RuleTats { tag: team, windows: &[A, B], tats: &[5, 7] }], &configured);
        let bytes = update(&bytes, &[RuleTats { tag: model, windows: &[A], tats: &[9] }], &configured);
        assert_eq!(decode(&bytes, team, &[B, A]), vec![7, 5], "the model rule's write kept the team's windows");
        assert_eq!(decode(&bytes, model, &[A]), vec![9], "same window spec, another rule: its own record");
        let both = update(
            &bytes,
            &[
                RuleTats { tag: team, windows: &[A, B], tats: &[6, 8] },
                RuleTats { tag: model, windows: &[A], tats: &[10] },
            ],
            &configured,
        );
        assert_eq!((decode(&both, team, &[A, B]), decode(&both, model, &[A])), (vec![6, 8], vec![10]));
        assert_eq!(both.len(), HEADER.len() + 3 * RECORD);
    }

    #[test]
    fn a_changed_limit_starts_fresh_and_unknown_rules_are_kept() {
        let team = rule_tag("team");
        let other_plugin = rule_tag("someone-elses");
        let old = update(
            &[],
            &[
                RuleTats { tag: team, windows: &[A, B], tats: &[5, 7] },
                RuleTats { tag: other_plugin, windows: &[A], tats: &[3] },
            ],
            &[],
        );
        let c = WindowSpec { limit: 20, window_ms: 1000 };
        assert_eq!(decode(&old, team, &[c, B]), vec![0, 7], "a changed limit starts fresh");
        // The team rule now has only B: a write of another rule drops the team's stale A window.
        let model = rule_tag("gpt4");
        let configured = vec![(team, vec![B]), (model, vec![A])];
        let new = update(&old, &[RuleTats { tag: model, windows: &[A], tats: &[1] }], &configured);
        assert_eq!(decode(&new, team, &[A, B]), vec![0, 7]);
        assert_eq!(decode(&new, other_plugin, &[A]), vec![3], "a rule this configuration does not know stays");
        assert_eq!(new.len(), HEADER.len() + 3 * RECORD);
    }

    #[test]
    fn unreadable_or_older_layouts_read_as_empty() {
        let t = rule_tag("team");
        assert_eq!(decode(&HEADER, t, &[A]), vec![0]);
        assert_eq!(decode(b"garbage", t, &[A]), vec![0]);
        // Layout 1: a zero header and 24-byte records.
        let mut v1 = vec![0u8; 8];
        for n in [1000u64, 10, 5] {
            v1.extend_from_slice(&n.to_le_bytes());
        }
        assert_eq!(decode(&v1, t, &[A]), vec![0]);
        let written = update(&v1, &[RuleTats { tag: t, windows: &[A], tats: &[4] }], &[]);
        assert_eq!(decode(&written, t, &[A]), vec![4]);
        // A truncated record is ignored, the ones before it are read.
        let mut cut = written.clone();
        cut.extend_from_slice(&[1, 2, 3]);
        assert_eq!(decode(&cut, t, &[A]), vec![4]);
    }
}
