//! Session and task binding: which caller created an MCP session (`Mcp-Session-Id`) or an A2A task, so
//! that another caller who learns the id cannot use it (MCP security best practices, "session
//! hijacking"). Pure logic over a key-value [`Store`] (Envoy shared data in the filter, a map in tests).
//!
//! The table is a fixed set of `max_bindings` slots (keys `meshwarden.mcp_authz.bind.<n>`), so memory
//! is bounded however many ids come and go: Envoy shared data never forgets a key, so a key per id would
//! grow without end. An id hashes to a slot and is stored in the first usable one of [`PROBES`]
//! consecutive slots. A slot holds the expiry (ms since the epoch), a 128-bit hash of the kind and id
//! (to recognise it) and a 128-bit hash of the owner's subject (never the subject itself). A slot whose
//! entry expired, or that was cleared (DELETE of a session), is reused.

use sha2::{Digest, Sha256};

/// Slots tried for one id.
pub const PROBES: u64 = 8;
/// Key prefix of the slots in Envoy shared data.
pub const KEY_PREFIX: &str = "meshwarden.mcp_authz.bind.";
/// A cleared slot (a key cannot be removed from Envoy shared data).
const CLEARED: &[u8] = &[0];
const ENTRY_LEN: usize = 8 + 16 + 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Session,
    /// An A2A task.
    Task,
    /// An MCP task (the 2026-07-28 Tasks extension, 2025-11-25 tasks).
    McpTask,
    /// An A2A context (`contextId`): the conversation an agent keeps its state under.
    Context,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Session => "mcp-session",
            Kind::Task => "a2a-task",
            Kind::McpTask => "mcp-task",
            Kind::Context => "a2a-context",
        }
    }
}

/// Who may use an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Bound to this caller.
    Owner,
    /// Bound to another caller.
    Foreign,
    /// Not bound (created before this Envoy started, through another replica, expired, or not recorded
    /// because the table was full).
    Unknown,
}

/// What recording a binding did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Recorded.
    Recorded,
    /// Bound to this caller already.
    Owned,
    /// The id is bound to another caller already: left as it is.
    Taken,
    /// Every slot the id may use holds a live binding of another id: not recorded.
    Full,
}

/// Envoy shared data, or a map in tests.
pub trait Store {
    /// The value and its CAS token; `None` for a key never written.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Write if the CAS token still matches (`None`: unconditionally); false on a CAS mismatch or failure.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
}

/// The hash of a caller's subject that a binding keeps.
pub fn owner_hash(subject: &str) -> [u8; 16] {
    let d = Sha256::new().chain_update(b"meshwarden-mcp-authz-owner\0").chain_update(subject.as_bytes()).finalize();
    first16(&d)
}

fn first16(d: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(d) {
        *o = *b;
    }
    out
}

/// (first slot, tag) of an id.
fn locate(kind: Kind, id: &str, slots: u64) -> (u64, [u8; 16]) {
    let d =
        Sha256::new().chain_update(kind.tag().as_bytes()).chain_update(b"\0").chain_update(id.as_bytes()).finalize();
    let mut start = [0u8; 8];
    for (o, b) in start.iter_mut().zip(d.iter().skip(16)) {
        *o = *b;
    }
    (u64::from_le_bytes(start) % slots.max(1), first16(&d))
}

struct Entry {
    expiry_ms: u64,
    tag: [u8; 16],
    owner: [u8; 16],
}

fn decode(v: &[u8]) -> Option<Entry> {
    if v.len() != ENTRY_LEN {
        return None;
    }
    let (e, rest) = v.split_at(8);
    let (tag, owner) = rest.split_at(16);
    let mut expiry = [0u8; 8];
    expiry.copy_from_slice(e);
    Some(Entry { expiry_ms: u64::from_le_bytes(expiry), tag: first16(tag), owner: first16(owner) })
}

fn encode(e: &Entry) -> Vec<u8> {
    let mut v = Vec::with_capacity(ENTRY_LEN);
    v.extend_from_slice(&e.expiry_ms.to_le_bytes());
    v.extend_from_slice(&e.tag);
    v.extend_from_slice(&e.owner);
    v
}

/// The binding table: `slots` slots, entries living `ttl_ms`.
pub struct Table<'a, S: Store> {
    pub store: &'a S,
    pub slots: u64,
    pub ttl_ms: u64,
}

/// One probed slot: its key, what it holds, its CAS token.
struct Probe {
    key: String,
    value: Option<Vec<u8>>,
    cas: Option<u32>,
}

impl<S: Store> Table<'_, S> {
    /// The slots `id` may use, in order, up to the first never written (no entry lies beyond it).
    fn probes(&self, start: u64) -> Vec<Probe> {
        let mut out = Vec::new();
        for i in 0..PROBES.min(self.slots.max(1)) {
            let key = format!("{KEY_PREFIX}{}", (start + i) % self.slots.max(1));
            let (value, cas) = self.store.get(&key);
            let never_written = value.is_none() && cas.is_none();
            out.push(Probe { key, value, cas });
            if never_written {
                break;
            }
        }
        out
    }

    /// Who may use `id`, for a caller whose subject hashes to `owner`.
    pub fn verdict(&self, kind: Kind, id: &str, owner: &[u8; 16], now_ms: u64) -> Verdict {
        let (start, tag) = locate(kind, id, self.slots);
        for p in self.probes(start) {
            if let Some(e) = p.value.as_deref().and_then(decode) {
                if e.tag == tag && e.expiry_ms > now_ms {
                    return if &e.owner == owner { Verdict::Owner } else { Verdict::Foreign };
                }
            }
        }
        Verdict::Unknown
    }

    /// Bind `id` to `owner` unless it is bound already.
    pub fn bind(&self, kind: Kind, id: &str, owner: &[u8; 16], now_ms: u64) -> Bound {
        let (start, tag) = locate(kind, id, self.slots);
        let entry = Entry { expiry_ms: now_ms.saturating_add(self.ttl_ms), tag, owner: *owner };
        // A concurrent writer (another worker) may take the slot between read and write: read again.
        for _ in 0..3 {
            let probes = self.probes(start);
            let mut free = None;
            for p in &probes {
                match p.value.as_deref().and_then(decode) {
                    Some(e) if e.expiry_ms > now_ms => {
                        if e.tag == tag {
                            return if &e.owner == owner { Bound::Owned } else { Bound::Taken };
                        }
                    }
                    // Expired, cleared, never written or unreadable: usable.
                    _ => {
                        if free.is_none() {
                            free = Some(p);
                        }
                    }
                }
            }
            let Some(slot) = free else { return Bound::Full };
            if self.store.set(&slot.key, &encode(&entry), slot.cas) {
                return Bound::Recorded;
            }
        }
        Bound::Full
    }

    /// Forget `id` (a deleted session). Returns whether a binding was cleared.
    pub fn unbind(&self, kind: Kind, id: &str) -> bool {
        let (start, tag) = locate(kind, id, self.slots);
        for p in self.probes(start) {
            if p.value.as_deref().and_then(decode).is_some_and(|e| e.tag == tag) {
                return self.store.set(&p.key, CLEARED, p.cas);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Map(RefCell<HashMap<String, (Vec<u8>, u32)>>);

    impl Store for Map {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            match self.0.borrow().get(key) {
                Some((v, cas)) => (Some(v.clone()), Some(*cas)),
                None => (None, None),
            }
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
            let mut m = self.0.borrow_mut();
            let current = m.get(key).map(|(_, c)| *c);
            if cas.is_some() && cas != current {
                return false;
            }
            let next = current.unwrap_or(0) + 1;
            m.insert(key.to_string(), (value.to_vec(), next));
            true
        }
    }

    const HOUR: u64 = 3_600_000;

    #[test]
    fn owner_foreign_unknown_and_delete() {
        let store = Map::default();
        let t = Table { store: &store, slots: 1000, ttl_ms: HOUR };
        let (alice, bob) = (owner_hash("alice"), owner_hash("bob"));
        assert_eq!(t.verdict(Kind::Session, "s1", &alice, 0), Verdict::Unknown);
        assert_eq!(t.bind(Kind::Session, "s1", &alice, 0), Bound::Recorded);
        assert_eq!(t.verdict(Kind::Session, "s1", &alice, 1), Verdict::Owner);
        assert_eq!(t.verdict(Kind::Session, "s1", &bob, 1), Verdict::Foreign);
        // The same id as a task is another binding.
        assert_eq!(t.verdict(Kind::Task, "s1", &bob, 1), Verdict::Unknown);
        // First writer wins; binding again for the owner is a no-op.
        assert_eq!(t.bind(Kind::Session, "s1", &bob, 2), Bound::Taken);
        assert_eq!(t.bind(Kind::Session, "s1", &alice, 2), Bound::Owned);
        assert!(t.unbind(Kind::Session, "s1"));
        assert_eq!(t.verdict(Kind::Session, "s1", &bob, 3), Verdict::Unknown);
        assert!(!t.unbind(Kind::Session, "s1"));
        // Raw subjects are never stored.
        assert_eq!(t.bind(Kind::Session, "s2", &alice, 0), Bound::Recorded);
        for (v, _) in store.0.borrow().values() {
            assert!(!v.windows(5).any(|w| w == b"alice"));
        }
    }

    #[test]
    fn entries_expire_and_their_slots_are_reused() {
        let store = Map::default();
        let t = Table { store: &store, slots: 1, ttl_ms: 1000 };
        let (alice, bob) = (owner_hash("alice"), owner_hash("bob"));
        assert_eq!(t.bind(Kind::Task, "t1", &alice, 0), Bound::Recorded);
        assert_eq!(t.verdict(Kind::Task, "t1", &bob, 999), Verdict::Foreign);
        assert_eq!(t.verdict(Kind::Task, "t1", &bob, 1000), Verdict::Unknown, "expired");
        // One slot: a second live id does not fit, an expired one's slot is taken over.
        assert_eq!(t.bind(Kind::Task, "t2", &bob, 500), Bound::Full);
        assert_eq!(t.verdict(Kind::Task, "t1", &alice, 500), Verdict::Owner, "a full table evicts nobody");
        assert_eq!(t.bind(Kind::Task, "t2", &bob, 1000), Bound::Recorded);
        assert_eq!(t.verdict(Kind::Task, "t2", &bob, 1001), Verdict::Owner);
        assert_eq!(store.0.borrow().len(), 1, "memory is bounded by the slot count");
    }

    #[test]
    fn the_cap_is_the_slot_count() {
        let store = Map::default();
        let t = Table { store: &store, slots: 16, ttl_ms: HOUR };
        let owner = owner_hash("alice");
        let results: Vec<Bound> = (0..64).map(|i| t.bind(Kind::Session, &format!("s{i}"), &owner, 0)).collect();
        let recorded = results.iter().filter(|b| **b == Bound::Recorded).count();
        assert!((8..=16).contains(&recorded), "{recorded}");
        assert!(store.0.borrow().len() <= 16);
        // Every recorded one is still known; the others are unknown (their owner is not locked out by a
        // binding to someone else).
        for (i, b) in results.iter().enumerate() {
            let v = t.verdict(Kind::Session, &format!("s{i}"), &owner, 1);
            assert_eq!(v == Verdict::Owner, *b == Bound::Recorded, "s{i}");
        }
    }

    #[test]
    fn a_lost_race_reads_again() {
        struct Racy(Map, RefCell<bool>);
        impl Store for Racy {
            fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
                self.0.get(key)
            }
            fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
                if !self.1.replace(true) {
                    // Another worker binds the same id to bob first.
                    let (start, tag) = locate(Kind::Session, "s", 4);
                    let e = Entry { expiry_ms: u64::MAX, tag, owner: owner_hash("bob") };
                    self.0.set(&format!("{KEY_PREFIX}{start}"), &encode(&e), None);
                    return false;
                }
                self.0.set(key, value, cas)
            }
        }
        let store = Racy(Map::default(), RefCell::new(false));
        let t = Table { store: &store, slots: 4, ttl_ms: HOUR };
        assert_eq!(t.bind(Kind::Session, "s", &owner_hash("alice"), 0), Bound::Taken);
        assert_eq!(t.verdict(Kind::Session, "s", &owner_hash("alice"), 0), Verdict::Foreign);
    }
}
