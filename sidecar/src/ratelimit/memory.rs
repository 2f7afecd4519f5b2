//! In-memory backend: one process, one mutex, a monotonic clock. The same GCRA code as the filter's `local` state
//! (`meshwarden_shared::ratelimit`), so the semantics are identical by construction.

use super::now_us;
use meshwarden_shared::ratelimit::{
    reserve, reserve_all, settle, DenyReason, Group, GroupResult, GroupStore, ReserveRequest, ReserveResponse,
    SettleItem,
};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
struct State {
    /// `(key, window id)` -> tat (µs).
    tats: HashMap<(String, String), u64>,
    /// key -> lease id -> expiry (µs).
    leases: HashMap<String, HashMap<String, u64>>,
    /// `(key, settlement id)` -> when the id may be forgotten (µs): a resent settlement is applied once.
    settled: HashMap<(String, String), u64>,
    /// When a reserve last pruned because the state was full (µs): at most one such prune per
    /// [`FULL_PRUNE_INTERVAL_US`], so a stream of new keys at the cap does not scan the map on every call.
    last_full_prune_us: Option<u64>,
}

impl State {
    /// Entries counted against the cap: one per key and window, one per key holding concurrency leases.
    fn keys(&self) -> usize {
        self.tats.len().saturating_add(self.leases.len())
    }

    /// Entries `req` would add: its windows and concurrency keys that have none yet.
    fn new_keys(&self, req: &ReserveRequest) -> usize {
        let mut seen = std::collections::HashSet::new();
        let mut n = 0usize;
        for g in &req.groups {
            for w in &g.windows {
                let k = (g.key.clone(), w.id());
                if !self.tats.contains_key(&k) && seen.insert(k) {
                    n = n.saturating_add(1);
                }
            }
            if g.concurrency.is_some()
                && !self.leases.contains_key(&g.key)
                && seen.insert((g.key.clone(), String::new()))
            {
                n = n.saturating_add(1);
            }
        }
        n
    }

    /// Drop what equals "never seen": buckets full again (tat not after now), expired leases and ids.
    fn prune(&mut self, now: u64) -> usize {
        let before = self.tats.len();
        self.tats.retain(|_, tat| *tat > now);
        self.leases.retain(|_, m| {
            m.retain(|_, exp| *exp > now);
            !m.is_empty()
        });
        self.settled.retain(|_, exp| *exp > now);
        before - self.tats.len()
    }
}

/// Default of `--memory-max-keys`: about 200 MB of state at the measured ~200 bytes per entry.
pub const DEFAULT_MAX_KEYS: u64 = 1_000_000;

/// At most one prune per second on the "state full" path of reserve.
const FULL_PRUNE_INTERVAL_US: u64 = 1_000_000;

/// A reserve refused: it needs new entries and the state holds `--memory-max-keys` live ones. Answered
/// `503` (the filter's `failure_mode`); nothing was reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub max_keys: u64,
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rate-limit memory full: {} live keys (--memory-max-keys)", self.max_keys)
    }
}

impl std::error::Error for Full {}

pub struct MemoryBackend {
    state: Mutex<State>,
    clock: MonotonicClock,
    max_keys: u64,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_KEYS)
    }
}

/// Microseconds since the Unix epoch as of the process's start, then advanced by a monotonic clock: the
/// state only needs time to move forward at the real rate. With the wall clock, a step back (an NTP
/// step, a VM resumed from a snapshot) locked every budget spent before it for the length of the step
/// (a per-second budget answered "retry after 3,599 s" after a step back of an hour), and a step
/// forward expired every concurrency lease held (admitting requests over `max_concurrent_requests`).
struct MonotonicClock {
    origin_us: u64,
    origin: std::time::Instant,
}

impl MonotonicClock {
    fn new() -> Self {
        Self { origin_us: now_us(), origin: std::time::Instant::now() }
    }

    fn now_us(&self) -> u64 {
        let elapsed = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.origin_us.saturating_add(elapsed)
    }
}

struct Locked<'a> {
    s: &'a mut State,
    now: u64,
}

impl GroupStore for Locked<'_> {
    type Error = std::convert::Infallible;

    fn reserve_group(&mut self, g: &Group) -> Result<GroupResult, Self::Error> {
        let now = self.now;
        if let Some(c) = &g.concurrency {
            let leases = self.s.leases.entry(g.key.clone()).or_default();
            leases.retain(|_, exp| *exp > now);
            if leases.len() as u64 >= c.max && !leases.contains_key(&c.lease_id) {
                return Ok(GroupResult { allowed: false, reason: Some(DenyReason::Concurrency), ..Default::default() });
            }
        }
        let rs: Vec<_> = g
            .windows
            .iter()
            .map(|w| {
                let tat = self.s.tats.get(&(g.key.clone(), w.id())).copied().unwrap_or(0);
                reserve(w, tat, now, g.cost)
            })
            .collect();
        let allowed = rs.iter().all(|r| r.allowed);
        if allowed {
            for (w, r) in g.windows.iter().zip(&rs) {
                self.s.tats.insert((g.key.clone(), w.id()), r.new_tat_us);
            }
            if let Some(c) = &g.concurrency {
                self.s
                    .leases
                    .entry(g.key.clone())
                    .or_default()
                    .insert(c.lease_id.clone(), now.saturating_add(c.lease_ms.saturating_mul(1000)));
            }
        }
        Ok(GroupResult {
            allowed,
            reason: (!allowed).then_some(DenyReason::Tokens),
            windows: rs.iter().map(|r| r.state).collect(),
            never: rs.iter().any(|r| r.never),
        })
    }

    fn settle_item(&mut self, it: &SettleItem) -> Result<(), Self::Error> {
        let repeated = match &it.id {
            Some(id) if it.delta != 0 => {
                // Remembered for id_ttl_ms from its first application, as Redis's `SET NX PX`: a resend
                // does not restart the time (it did, and a caller resending within each id_ttl_ms kept
                // the id forever here while Redis applied the settlement again after id_ttl_ms).
                let expiry = self.now.saturating_add(it.id_ttl_ms().saturating_mul(1000));
                let now = self.now;
                let entry = self.s.settled.entry((it.key.clone(), id.clone())).or_insert(0);
                let seen = *entry > now;
                if !seen {
                    *entry = expiry;
                }
                seen
            }
            _ => false,
        };
        if it.delta != 0 && !repeated {
            for w in &it.windows {
                let k = (it.key.clone(), w.id());
                let tat = self.s.tats.get(&k).copied().unwrap_or(0);
                self.s.tats.insert(k, settle(w, tat, self.now, it.delta));
            }
        }
        if let Some(l) = &it.release_lease {
            if let Some(m) = self.s.leases.get_mut(&it.key) {
                m.remove(l);
            }
        }
        Ok(())
    }
}

impl MemoryBackend {
    /// A backend holding at most `max_keys` entries (one per key and window, one per key holding
    /// concurrency leases).
    pub fn new(max_keys: u64) -> Self {
        Self { state: Mutex::default(), clock: MonotonicClock::new(), max_keys }
    }

    /// Reserve, or refuse with [`Full`] when the call needs new entries and the state holds `max_keys`
    /// live ones even after dropping those worth nothing (buckets full again, expired leases). A live
    /// entry is never evicted: it holds a spent budget or a debt, and dropping it would give its key a
    /// full budget again.
    pub fn reserve(&self, req: &ReserveRequest) -> Result<ReserveResponse, Full> {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let now = self.clock.now_us();
        let max = usize::try_from(self.max_keys).unwrap_or(usize::MAX);
        // Most a call can add: its windows and concurrency groups. Below the cap by that much (the usual
        // case), the exact count (which clones keys) is not needed.
        let most = req
            .groups
            .iter()
            .map(|g| g.windows.len().saturating_add(usize::from(g.concurrency.is_some())))
            .sum::<usize>();
        if guard.keys().saturating_add(most) > max {
            let needed = guard.new_keys(req);
            // A call on entries all held is never refused (settlements may have taken the state past the cap).
            if needed > 0 && guard.keys().saturating_add(needed) > max {
                let may_prune =
                    guard.last_full_prune_us.is_none_or(|t| now.saturating_sub(t) >= FULL_PRUNE_INTERVAL_US);
                if may_prune {
                    guard.last_full_prune_us = Some(now);
                    guard.prune(now);
                }
                if guard.keys().saturating_add(guard.new_keys(req)) > max {
                    return Err(Full { max_keys: self.max_keys });
                }
            }
        }
        let mut store = Locked { s: &mut guard, now };
        match reserve_all(&mut store, req) {
            Ok(r) => Ok(r),
            Err(never) => match never {},
        }
    }

    pub fn settle(&self, req: &[SettleItem]) {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut store = Locked { s: &mut guard, now: self.clock.now_us() };
        for it in req {
            let _ = store.settle_item(it);
        }
    }

    /// Drop state that is equivalent to "never seen" (full buckets, expired leases): bounded memory.
    pub fn prune(&self) -> usize {
        let now = self.clock.now_us();
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        guard.prune(now)
    }

    /// Entries counted against `--memory-max-keys`.
    pub fn len(&self) -> usize {
        match self.state.lock() {
            Ok(g) => g.keys(),
            Err(p) => p.into_inner().keys(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use meshwarden_shared::ratelimit::{ConcurrencySpec, WindowSpec};

    fn group(key: &str, cost: u64, lease: Option<(&str, u64)>) -> ReserveRequest {
        ReserveRequest {
            groups: vec![Group {
                key: key.into(),
                windows: vec![WindowSpec { limit: 100, window_ms: 86_400_000 }],
                cost,
                concurrency: lease.map(|(id, ms)| ConcurrencySpec { max: 1, lease_id: id.into(), lease_ms: ms }),
            }],
        }
    }

    #[test]
    fn budget_settle_and_leases() {
        let m = MemoryBackend::default();
        assert!(m.reserve(&group("k", 60, None)).unwrap().allowed);
        let d = m.reserve(&group("k", 60, None)).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.groups[0].windows[0].remaining, 40);
        m.settle(&[SettleItem {
            key: "k".into(),
            windows: group("k", 0, None).groups[0].windows.clone(),
            delta: -50,
            release_lease: None,
            id: None,
            id_ttl_ms: None,
        }]);
        assert!(m.reserve(&group("k", 60, None)).unwrap().allowed, "refund made room");
        assert!(m.reserve(&group("c", 1, Some(("a", 600_000)))).unwrap().allowed);
        let busy = m.reserve(&group("c", 1, Some(("b", 600_000)))).unwrap();
        assert_eq!(busy.groups[0].reason, Some(DenyReason::Concurrency));
        m.settle(&[SettleItem {
            key: "c".into(),
            windows: vec![],
            delta: 0,
            release_lease: Some("a".into()),
            id: None,
            id_ttl_ms: None,
        }]);
        assert!(m.reserve(&group("c", 1, Some(("b", 600_000)))).unwrap().allowed);
    }

    /// A settlement resent with the same id (its first call failed or timed out after being applied) is
    /// applied once; another id, or the same id on another key, is another settlement.
    #[test]
    fn settlements_with_an_id_apply_once() {
        let m = MemoryBackend::default();
        let windows = group("k", 0, None).groups[0].windows.clone();
        let debt = |key: &str, id: &str| SettleItem {
            key: key.into(),
            windows: windows.clone(),
            delta: 30,
            release_lease: None,
            id: Some(id.into()),
            id_ttl_ms: None,
        };
        m.settle(&[debt("k", "r1")]);
        m.settle(&[debt("k", "r1")]);
        m.settle(&[debt("k", "r1"), debt("j", "r1")]);
        assert_eq!(m.reserve(&group("k", 0, None)).unwrap().groups[0].windows[0].remaining, 70, "charged once");
        assert_eq!(m.reserve(&group("j", 0, None)).unwrap().groups[0].windows[0].remaining, 70, "same id, other key");
        m.settle(&[debt("k", "r2")]);
        assert_eq!(m.reserve(&group("k", 0, None)).unwrap().groups[0].windows[0].remaining, 40, "another id");
        // Without an id every call applies (rollbacks, older filters).
        let mut plain = debt("k", "x");
        plain.id = None;
        m.settle(&[plain.clone(), plain]);
        assert_eq!(m.reserve(&group("k", 0, None)).unwrap().groups[0].windows[0].remaining, 0);
        // An id is remembered for the item's id_ttl_ms, then forgotten (and pruned).
        let mut short = debt("s", "r1");
        short.id_ttl_ms = Some(1);
        m.settle(&[short.clone()]);
        std::thread::sleep(std::time::Duration::from_millis(5));
        m.prune();
        assert!(m.state.lock().unwrap().settled.keys().all(|(k, _)| k != "s"), "pruned");
        m.settle(&[short]);
        assert_eq!(
            m.reserve(&group("s", 0, None)).unwrap().groups[0].windows[0].remaining,
            40,
            "applied again after its ttl"
        );
    }

    /// At the cap a reserve needing a new entry is refused, after entries worth nothing are dropped; keys
    /// already held keep their budgets (nothing live is evicted), and a refused call reserves nothing.
    #[test]
    fn the_key_cap_refuses_new_keys_and_keeps_live_budgets() {
        let m = MemoryBackend::new(4);
        assert!(m.reserve(&group("a", 60, None)).unwrap().allowed);
        assert!(m.reserve(&group("b", 60, None)).unwrap().allowed);
        assert!(m.reserve(&group("c", 1, Some(("l", 600_000)))).unwrap().allowed);
        assert_eq!(m.len(), 4, "a, b, c's window and c's leases");
        assert_eq!(m.reserve(&group("d", 1, None)).err(), Some(Full { max_keys: 4 }));
        let two = ReserveRequest { groups: [group("a", 10, None).groups, group("e", 10, None).groups].concat() };
        assert_eq!(m.reserve(&two).err(), Some(Full { max_keys: 4 }));
        let a = m.reserve(&group("a", 60, None)).unwrap();
        assert!(!a.allowed, "a's budget was not reset");
        assert_eq!(a.groups[0].windows[0].remaining, 40, "and the refused call reserved nothing of it");
        assert!(m.reserve(&group("a", 40, None)).unwrap().allowed, "held keys keep working");
        // A debt settled on a new key is kept even past the cap; held keys still reserve.
        m.settle(&[SettleItem {
            key: "f".into(),
            windows: group("f", 0, None).groups[0].windows.clone(),
            delta: 30,
            release_lease: None,
            id: None,
            id_ttl_ms: None,
        }]);
        assert_eq!(m.len(), 5);
        assert_eq!(m.reserve(&group("f", 80, None)).unwrap().groups[0].windows[0].remaining, 70, "f's debt kept");
        assert!(m.reserve(&group("b", 40, None)).unwrap().allowed, "held keys keep working past the cap");
        // Entries worth nothing (a bucket full again) make room at once.
        let m = MemoryBackend::new(1);
        let short = |key: &str| ReserveRequest {
            groups: vec![Group {
                key: key.into(),
                windows: vec![WindowSpec { limit: 10, window_ms: 1 }],
                cost: 1,
                concurrency: None,
            }],
        };
        assert!(m.reserve(&short("x")).unwrap().allowed);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(m.reserve(&short("y")).unwrap().allowed, "x's full bucket was dropped for y");
        assert_eq!(m.len(), 1);
    }

    /// Bytes per entry (run with `--ignored --nocapture`): the default cap's memory.
    #[test]
    #[ignore]
    fn bytes_per_entry() {
        let rss = || {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().to_string();
            l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
        };
        let n = 1_000_000u64;
        let m = MemoryBackend::new(n);
        let before = rss();
        for i in 0..n {
            // A key as token-limiter sends it: rule name and a hash of the header value.
            let key =
                format!("per-user:h:{:032x}", u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835));
            let r = ReserveRequest {
                groups: vec![Group {
                    key,
                    windows: vec![WindowSpec { limit: 1, window_ms: 86_400_000 }],
                    cost: 1,
                    concurrency: None,
                }],
            };
            assert!(m.reserve(&r).unwrap().allowed);
        }
        println!("{} bytes per entry", (rss() - before) / n);
    }

    #[test]
    fn leases_expire_and_prune_bounds_memory() {
        let m = MemoryBackend::default();
        assert!(m.reserve(&group("e", 1, Some(("a", 1)))).unwrap().allowed);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(m.reserve(&group("e", 1, Some(("b", 600_000)))).unwrap().allowed, "expired lease no longer counts");
        let short = ReserveRequest {
            groups: vec![Group {
                key: "p".into(),
                windows: vec![WindowSpec { limit: 1000, window_ms: 1 }],
                cost: 1,
                concurrency: None,
            }],
        };
        assert!(m.reserve(&short).unwrap().allowed);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(m.prune() >= 1);
    }
}
