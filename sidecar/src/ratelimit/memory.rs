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
}

pub struct MemoryBackend {
    state: Mutex<State>,
    clock: MonotonicClock,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self { state: Mutex::default(), clock: MonotonicClock::new() }
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
    pub fn reserve(&self, req: &ReserveRequest) -> ReserveResponse {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut store = Locked { s: &mut guard, now: self.clock.now_us() };
        match reserve_all(&mut store, req) {
            Ok(r) => r,
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
        let before = guard.tats.len();
        guard.tats.retain(|_, tat| *tat > now);
        guard.leases.retain(|_, m| {
            m.retain(|_, exp| *exp > now);
            !m.is_empty()
        });
        guard.settled.retain(|_, exp| *exp > now);
        before - guard.tats.len()
    }

    pub fn len(&self) -> usize {
        self.state.lock().map(|g| g.tats.len()).unwrap_or(0)
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
        assert!(m.reserve(&group("k", 60, None)).allowed);
        let d = m.reserve(&group("k", 60, None));
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
        assert!(m.reserve(&group("k", 60, None)).allowed, "refund made room");
        assert!(m.reserve(&group("c", 1, Some(("a", 600_000)))).allowed);
        let busy = m.reserve(&group("c", 1, Some(("b", 600_000))));
        assert_eq!(busy.groups[0].reason, Some(DenyReason::Concurrency));
        m.settle(&[SettleItem {
            key: "c".into(),
            windows: vec![],
            delta: 0,
            release_lease: Some("a".into()),
            id: None,
            id_ttl_ms: None,
        }]);
        assert!(m.reserve(&group("c", 1, Some(("b", 600_000)))).allowed);
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
        assert_eq!(m.reserve(&group("k", 0, None)).groups[0].windows[0].remaining, 70, "charged once");
        assert_eq!(m.reserve(&group("j", 0, None)).groups[0].windows[0].remaining, 70, "same id, other key");
        m.settle(&[debt("k", "r2")]);
        assert_eq!(m.reserve(&group("k", 0, None)).groups[0].windows[0].remaining, 40, "another id");
        // Without an id every call applies (rollbacks, older filters).
        let mut plain = debt("k", "x");
        plain.id = None;
        m.settle(&[plain.clone(), plain]);
        assert_eq!(m.reserve(&group("k", 0, None)).groups[0].windows[0].remaining, 0);
        // An id is remembered for the item's id_ttl_ms, then forgotten (and pruned).
        let mut short = debt("s", "r1");
        short.id_ttl_ms = Some(1);
        m.settle(&[short.clone()]);
        std::thread::sleep(std::time::Duration::from_millis(5));
        m.prune();
        assert!(m.state.lock().unwrap().settled.keys().all(|(k, _)| k != "s"), "pruned");
        m.settle(&[short]);
        assert_eq!(m.reserve(&group("s", 0, None)).groups[0].windows[0].remaining, 40, "applied again after its ttl");
    }

    #[test]
    fn leases_expire_and_prune_bounds_memory() {
        let m = MemoryBackend::default();
        assert!(m.reserve(&group("e", 1, Some(("a", 1)))).allowed);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(m.reserve(&group("e", 1, Some(("b", 600_000)))).allowed, "expired lease no longer counts");
        let short = ReserveRequest {
            groups: vec![Group {
                key: "p".into(),
                windows: vec![WindowSpec { limit: 1000, window_ms: 1 }],
                cost: 1,
                concurrency: None,
            }],
        };
        assert!(m.reserve(&short).allowed);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(m.prune() >= 1);
    }
}
