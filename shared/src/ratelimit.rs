//! Token budgets: the GCRA (generic cell rate algorithm, a token bucket kept as one timestamp) with
//! reservations, and the versioned JSON wire format between token-limiter and the sidecar.
//!
//! Written once and used by the filter's `local` state (Envoy shared data), the sidecar's memory backend
//! and, transcribed line by line into Lua, the sidecar's Redis backend, so the three have one semantics.
//!
//! ## The algorithm
//! A window is `limit` tokens per `window_us`. One token "costs" `window_us / limit` microseconds of
//! the window. The state is one number, the theoretical arrival time `tat` (µs): the moment at which
//! the bucket would be full again. A reservation of `n` tokens at `now`:
//!
//! - `base = max(tat, now)`, `new_tat = base + cost(n)`;
//! - allowed iff `new_tat - window_us <= now`; then `tat = new_tat`;
//! - otherwise denied, state unchanged, and `retry_after = new_tat - window_us - now`, which is exact:
//!   at `now + retry_after` the same reservation is allowed (nothing else is needed to free).
//!
//! `remaining = limit * (window_us - (tat - now)) / window_us` (floored) and `reset = tat - now`, the time
//! until the bucket is full again (OpenAI's `x-ratelimit-reset-tokens`).
//!
//! Settling (reconcile the reservation with the provider's count): `delta = actual - reserved` tokens;
//! a positive delta moves `tat` forward (debt, paid back before the next admission), a negative delta
//! moves it back but never below `now` (a refund can fill the bucket, not overfill it).
//!
//! ## Guarantee (overshoot bound)
//! Each reservation is an atomic read-check-write (CAS on Envoy shared data, a mutex in the sidecar, a
//! Lua script in Redis), so concurrent requests can never both take the same budget. Over any interval
//! of length `t`, the tokens charged are at most `limit + limit * t / window + Σ max(0, actual_i -
//! reserved_i)` over the requests admitted in that interval. With `reserved_i` = the prompt estimate
//! plus `max_tokens` (or the configured output reservation), the only overshoot is what models produce
//! beyond their reservation, bounded by `in-flight requests × (output beyond reservation + estimate
//! error)`; requests that set `max_tokens` never overshoot.

use serde::{Deserialize, Serialize};

/// The wire format version; the path is `/v1/ratelimit/...`.
pub const API_VERSION: &str = "v1";

/// One rate window: `limit` tokens per `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpec {
    pub limit: u64,
    pub window_ms: u64,
}

impl WindowSpec {
    pub fn window_us(&self) -> u64 {
        self.window_ms.saturating_mul(1000)
    }

    /// Microseconds of the window that `tokens` tokens take (rounded up: never cheaper than exact), at
    /// most [`MAX_AHEAD_US`].
    pub fn cost_us(&self, tokens: u64) -> u64 {
        if self.limit == 0 {
            return MAX_AHEAD_US;
        }
        let c = (u128::from(tokens) * u128::from(self.window_us())).div_ceil(u128::from(self.limit));
        u64::try_from(c).unwrap_or(MAX_AHEAD_US).min(MAX_AHEAD_US)
    }

    /// A stable short id of the window, used in state keys (`60000` for a minute).
    pub fn id(&self) -> String {
        format!("{}:{}", self.window_ms, self.limit)
    }
}

/// The furthest a budget's state runs ahead of now, in µs (2^51, about 71 years): a cost or a debt
/// beyond it counts as this much. Every timestamp then stays below 2^53 µs (until the year 2255), where
/// the Redis backend's Lua numbers (doubles) are exact integers, so Redis stores what memory stores.
pub const MAX_AHEAD_US: u64 = 1 << 51;

/// The longest window the sidecar API accepts (366 days; token-limiter's longest is a day).
pub const MAX_WINDOW_MS: u64 = 366 * 86_400_000;

/// The longest concurrency lease the sidecar API accepts (a day, as token-limiter's `lease_ms`).
pub const MAX_LEASE_MS: u64 = 86_400_000;

/// The longest budget key, lease id or settlement id the sidecar API accepts, in bytes.
pub const MAX_NAME_BYTES: usize = 512;

/// The most windows a group or a settle item may have (token-limiter sends at most 4, one per
/// `tokens_per_*`): a group's windows are one Redis script, which holds Redis while it runs.
pub const MAX_WINDOWS: usize = 16;

/// The most groups one reserve may have (token-limiter: one per rule, at most this many rules).
pub const MAX_GROUPS: usize = 256;

/// The most items one settle may have (token-limiter sends its settlements in batches of this many).
pub const MAX_ITEMS: usize = 256;

/// What one window says about a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WindowState {
    pub limit: u64,
    pub window_ms: u64,
    /// Tokens left after this decision.
    pub remaining: u64,
    /// Milliseconds until the bucket is full again.
    pub reset_ms: u64,
    /// Milliseconds until the denied reservation would be allowed (0 when allowed).
    pub retry_after_ms: u64,
}

/// Result of [`reserve`] on one window: the new state (`tat`) to store when allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub allowed: bool,
    pub new_tat_us: u64,
    pub state: WindowState,
    /// The reservation can never be allowed (more tokens than the window's limit).
    pub never: bool,
}

fn remaining(w: &WindowSpec, tat: u64, now: u64) -> u64 {
    let used = tat.saturating_sub(now);
    let free = w.window_us().saturating_sub(used);
    let r = (u128::from(w.limit) * u128::from(free)) / u128::from(w.window_us().max(1));
    u64::try_from(r).unwrap_or(u64::MAX)
}

fn ceil_ms(us: u64) -> u64 {
    us.div_ceil(1000)
}

/// Try to reserve `tokens` in window `w` whose stored state is `tat_us` (0 when new), at `now_us`.
pub fn reserve(w: &WindowSpec, tat_us: u64, now_us: u64, tokens: u64) -> Reservation {
    let base = tat_us.max(now_us);
    let new_tat = base.saturating_add(w.cost_us(tokens));
    let allow_at = new_tat.saturating_sub(w.window_us());
    if allow_at <= now_us {
        Reservation {
            allowed: true,
            new_tat_us: new_tat,
            state: WindowState {
                limit: w.limit,
                window_ms: w.window_ms,
                remaining: remaining(w, new_tat, now_us),
                reset_ms: ceil_ms(new_tat - now_us),
                retry_after_ms: 0,
            },
            never: false,
        }
    } else {
        Reservation {
            allowed: false,
            new_tat_us: tat_us,
            state: WindowState {
                limit: w.limit,
                window_ms: w.window_ms,
                remaining: remaining(w, base, now_us),
                reset_ms: ceil_ms(base - now_us),
                retry_after_ms: ceil_ms(allow_at - now_us),
            },
            never: tokens > w.limit,
        }
    }
}

/// Apply a settlement of `delta_tokens` (actual minus reserved) to a stored `tat_us`.
pub fn settle(w: &WindowSpec, tat_us: u64, now_us: u64, delta_tokens: i64) -> u64 {
    if delta_tokens >= 0 {
        // A debt is capped at MAX_AHEAD_US from now (it was unbounded: repeated debts ran the state past
        // 2^53 µs, where Redis's Lua numbers are no longer exact integers).
        let base = tat_us.max(now_us);
        base.saturating_add(w.cost_us(delta_tokens.unsigned_abs())).min(base.max(now_us.saturating_add(MAX_AHEAD_US)))
    } else {
        let refund = w.cost_us(delta_tokens.unsigned_abs());
        if tat_us <= now_us {
            tat_us
        } else {
            tat_us.saturating_sub(refund).max(now_us)
        }
    }
}

/// The current state of a window without reserving anything.
pub fn peek(w: &WindowSpec, tat_us: u64, now_us: u64) -> WindowState {
    let base = tat_us.max(now_us);
    WindowState {
        limit: w.limit,
        window_ms: w.window_ms,
        remaining: remaining(w, base, now_us),
        reset_ms: ceil_ms(base - now_us),
        retry_after_ms: 0,
    }
}

/// A concurrency limit on a group: at most `max` leases at once. A lease expires after `lease_ms`
/// (sidecar only) so that a crashed Envoy cannot hold slots forever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConcurrencySpec {
    pub max: u64,
    pub lease_id: String,
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

pub const DEFAULT_LEASE_MS: u64 = 600_000;

fn default_lease_ms() -> u64 {
    DEFAULT_LEASE_MS
}

/// One budget key (a rule applied to one caller): its windows, reserved atomically together, and its
/// optional concurrency limit. `key` is already hashed/sanitised by the filter; stores prefix it and put
/// it in a Redis hash tag so that every window of a key lives in one Cluster slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub key: String,
    pub windows: Vec<WindowSpec>,
    /// Tokens to reserve (already weighted).
    pub cost: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencySpec>,
}

/// `POST /v1/ratelimit/reserve`: all groups are reserved, or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveRequest {
    pub groups: Vec<Group>,
}

/// A budget key, lease id or settlement id the sidecar accepts: 1 to [`MAX_NAME_BYTES`] printable
/// ASCII bytes without spaces or Redis hash-tag braces (token-limiter sends `<rule>:h:<hex>` keys and
/// hexadecimal ids). A brace would move the key's hash tag in Redis (`mw:tl:{<key>}:...`): a key and an
/// id could then name another key's state.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!("{what} must be 1 to {MAX_NAME_BYTES} bytes"));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}') {
        return Err(format!("{what} must be printable ASCII without spaces or braces"));
    }
    Ok(())
}

fn check_windows(at: &str, windows: &[WindowSpec]) -> Result<(), String> {
    if windows.len() > MAX_WINDOWS {
        return Err(format!("{at}.windows must have at most {MAX_WINDOWS} windows"));
    }
    for (j, w) in windows.iter().enumerate() {
        if w.limit == 0 {
            return Err(format!("{at}.windows[{j}].limit must be at least 1"));
        }
        if w.window_ms == 0 || w.window_ms > MAX_WINDOW_MS {
            return Err(format!("{at}.windows[{j}].window_ms must be 1 to {MAX_WINDOW_MS}"));
        }
    }
    Ok(())
}

impl ReserveRequest {
    /// Whether the sidecar can answer this request exactly on every backend; the error names the field.
    /// Checked before any backend sees the request (`400`): a limit or window of 0, a concurrency `max`
    /// of 0 (omit `concurrency` for no limit), a lease over [`MAX_LEASE_MS`], an odd key or lease id,
    /// more than [`MAX_GROUPS`] groups or [`MAX_WINDOWS`] windows in a group, a cost over `i64::MAX` (a
    /// rollback gives it back as a settlement's `delta`).
    pub fn validate(&self) -> Result<(), String> {
        if self.groups.len() > MAX_GROUPS {
            return Err(format!("groups must have at most {MAX_GROUPS} groups"));
        }
        for (i, g) in self.groups.iter().enumerate() {
            let at = format!("groups[{i}]");
            check_name(&format!("{at}.key"), &g.key)?;
            check_windows(&at, &g.windows)?;
            if i64::try_from(g.cost).is_err() {
                // A rollback gives the cost back as a settlement's i64 delta: a larger cost stayed
                // partly charged when another group denied.
                return Err(format!("{at}.cost must be at most {}", i64::MAX));
            }
            if let Some(c) = &g.concurrency {
                if c.max == 0 {
                    return Err(format!("{at}.concurrency.max must be at least 1"));
                }
                if c.lease_ms == 0 || c.lease_ms > MAX_LEASE_MS {
                    return Err(format!("{at}.concurrency.lease_ms must be 1 to {MAX_LEASE_MS}"));
                }
                check_name(&format!("{at}.concurrency.lease_id"), &c.lease_id)?;
            }
        }
        Ok(())
    }
}

impl SettleRequest {
    /// As [`ReserveRequest::validate`], for settlements.
    pub fn validate(&self) -> Result<(), String> {
        if self.items.len() > MAX_ITEMS {
            return Err(format!("items must have at most {MAX_ITEMS} items"));
        }
        for (i, it) in self.items.iter().enumerate() {
            let at = format!("items[{i}]");
            check_name(&format!("{at}.key"), &it.key)?;
            check_windows(&at, &it.windows)?;
            if let Some(l) = &it.release_lease {
                check_name(&format!("{at}.release_lease"), l)?;
            }
            if let Some(id) = &it.id {
                check_name(&format!("{at}.id"), id)?;
            }
        }
        Ok(())
    }
}

/// Why a group denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    Tokens,
    Concurrency,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GroupResult {
    pub allowed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DenyReason>,
    /// Per window, in the order of the request.
    pub windows: Vec<WindowState>,
    /// The reservation exceeds a window's whole limit and can never pass.
    #[serde(default)]
    pub never: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ReserveResponse {
    pub allowed: bool,
    /// Index of the first group that denied, when denied. Groups after it were not evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied_group: Option<usize>,
    pub groups: Vec<GroupResult>,
}

/// One settlement: adjust the group's windows by `delta` tokens and release its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleItem {
    pub key: String,
    pub windows: Vec<WindowSpec>,
    pub delta: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_lease: Option<String>,
    /// Idempotency id (sidecar API): the sidecar applies the `delta` of an item with an id at most once
    /// per key within `id_ttl_ms`, so a caller may resend a settlement whose call failed or timed out
    /// (it may have been applied). Lease releases are idempotent without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// How long the sidecar remembers `id` (ms): the caller's resend horizon. Default
    /// [`SETTLE_ID_TTL_MS`], at most [`MAX_SETTLE_ID_TTL_MS`]. Memory and Redis hold one entry per id
    /// for this long, so a caller passes what its resends need (token-limiter: a few seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_ttl_ms: Option<u64>,
}

/// How long the sidecar remembers a settled item's id when the item does not say (10 minutes).
pub const SETTLE_ID_TTL_MS: u64 = 600_000;
/// The longest an id is remembered (one hour).
pub const MAX_SETTLE_ID_TTL_MS: u64 = 3_600_000;

impl SettleItem {
    /// How long the sidecar remembers this item's id (ms), within 1 ms ..= [`MAX_SETTLE_ID_TTL_MS`].
    pub fn id_ttl_ms(&self) -> u64 {
        self.id_ttl_ms.unwrap_or(SETTLE_ID_TTL_MS).clamp(1, MAX_SETTLE_ID_TTL_MS)
    }
}

/// `POST /v1/ratelimit/settle`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleRequest {
    pub items: Vec<SettleItem>,
}

/// The storage side of a budget: one group reserved atomically, one item settled. Implemented over Envoy
/// shared data (filter), a mutex-protected map and Redis (sidecar).
pub trait GroupStore {
    type Error;
    fn reserve_group(&mut self, group: &Group) -> Result<GroupResult, Self::Error>;
    fn settle_item(&mut self, item: &SettleItem) -> Result<(), Self::Error>;
}

/// Reserve every group in order, all-or-nothing from the caller's view. On a denial the remaining groups
/// are still tried, so that the answer holds every denying group (a client told to retry when the first
/// budget refills must not be refused again by a second one that refills later), then every group that
/// was reserved is rolled back (cost refunded, lease released). `denied_group` is the first denial.
/// A storage error rolls back what was reserved before it is returned: the caller then holds nothing (no
/// budget drawn, no concurrency slot kept until a restart).
pub fn reserve_all<S: GroupStore>(store: &mut S, req: &ReserveRequest) -> Result<ReserveResponse, S::Error> {
    let mut results: Vec<GroupResult> = Vec::with_capacity(req.groups.len());
    let mut denied_group = None;
    for (i, g) in req.groups.iter().enumerate() {
        let r = match store.reserve_group(g) {
            Ok(r) => r,
            Err(e) => {
                let _ = roll_back(store, reserved(req, &results));
                return Err(e);
            }
        };
        if !r.allowed {
            denied_group.get_or_insert(i);
        }
        results.push(r);
    }
    if denied_group.is_some() {
        // The denial stands even if a rollback fails: an error here would let the caller fail open
        // and admit a request that is over its budget. A failed rollback leaves that group charged
        // (more than used, never less).
        let _ = roll_back(store, reserved(req, &results));
    }
    Ok(ReserveResponse { allowed: denied_group.is_none(), denied_group, groups: results })
}

/// The groups of `req` that `results` (a prefix of the answers) shows reserved.
pub fn reserved<'a>(req: &'a ReserveRequest, results: &'a [GroupResult]) -> impl Iterator<Item = &'a Group> + 'a {
    req.groups.iter().zip(results).filter(|(_, r)| r.allowed).map(|(g, _)| g)
}

/// The results of every group that denied, for the answer's `retry-after` (the longest wait of all).
pub fn denying(resp: &ReserveResponse) -> impl Iterator<Item = &GroupResult> + '_ {
    resp.groups.iter().filter(|g| !g.allowed)
}

/// Undo the reservations of `groups`, every one of them even when one fails; the first error is returned.
fn roll_back<'a, S: GroupStore>(store: &mut S, groups: impl Iterator<Item = &'a Group>) -> Result<(), S::Error> {
    let mut first_err = None;
    for g in groups {
        if let Err(e) = store.settle_item(&rollback_item(g)) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// The settlement that undoes a reservation of `g`.
pub fn rollback_item(g: &Group) -> SettleItem {
    SettleItem {
        key: g.key.clone(),
        windows: g.windows.clone(),
        delta: -i64::try_from(g.cost).unwrap_or(i64::MAX),
        release_lease: g.concurrency.as_ref().map(|c| c.lease_id.clone()),
        id: None,
        id_ttl_ms: None,
    }
}

/// The window with the least remaining budget over all groups (what `x-ratelimit-*` headers report).
pub fn tightest(groups: &[GroupResult]) -> Option<WindowState> {
    groups.iter().flat_map(|g| g.windows.iter()).copied().min_by_key(|w| (w.remaining, std::cmp::Reverse(w.reset_ms)))
}

/// The longest wait among denying windows: the exact time until the whole reservation fits.
pub fn retry_after_ms(groups: &[GroupResult]) -> u64 {
    groups.iter().flat_map(|g| g.windows.iter()).map(|w| w.retry_after_ms).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    const MIN: WindowSpec = WindowSpec { limit: 600, window_ms: 60_000 }; // 10 tokens/s, 100 ms per token

    #[wasm_bindgen_test(unsupported = test)]
    fn reserve_until_empty_then_exact_retry_after() {
        let now = 1_000_000_000;
        let r = reserve(&MIN, 0, now, 500);
        assert!(r.allowed);
        assert_eq!(r.state.remaining, 100);
        assert_eq!(r.state.reset_ms, 50_000);
        let r2 = reserve(&MIN, r.new_tat_us, now, 150);
        assert!(!r2.allowed);
        assert_eq!(r2.state.retry_after_ms, 5_000, "50 missing tokens at 10/s");
        assert_eq!(r2.new_tat_us, r.new_tat_us, "denial leaves state unchanged");
        // exactly at now + retry_after it fits, 1 ms before it does not
        assert!(!reserve(&MIN, r.new_tat_us, now + 4_999_000, 150).allowed);
        let r3 = reserve(&MIN, r.new_tat_us, now + 5_000_000, 150);
        assert!(r3.allowed);
        assert_eq!(r3.state.remaining, 0);
        assert!(reserve(&MIN, 0, now, 601).never);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn settle_debt_and_refund_never_overfills() {
        let now = 10_000_000_000;
        let r = reserve(&MIN, 0, now, 100);
        let tat = settle(&MIN, r.new_tat_us, now, 50);
        assert_eq!(peek(&MIN, tat, now).remaining, 450);
        let tat = settle(&MIN, tat, now, -1000);
        assert_eq!(tat, now);
        assert_eq!(peek(&MIN, tat, now).remaining, 600);
        // debt beyond the window: denied until paid back, with the exact wait
        let tat = settle(&MIN, now, now, 700);
        let d = reserve(&MIN, tat, now, 1);
        assert!(!d.allowed);
        assert_eq!(d.state.retry_after_ms, 10_100);
    }

    struct Mem(std::collections::HashMap<String, u64>, u64, std::collections::HashMap<String, Vec<String>>);
    impl GroupStore for Mem {
        type Error = ();
        fn reserve_group(&mut self, g: &Group) -> Result<GroupResult, ()> {
            let now = self.1;
            if let Some(c) = &g.concurrency {
                let l = self.2.entry(g.key.clone()).or_default();
                if l.len() as u64 >= c.max {
                    return Ok(GroupResult {
                        allowed: false,
                        reason: Some(DenyReason::Concurrency),
                        ..Default::default()
                    });
                }
            }
            let rs: Vec<Reservation> = g
                .windows
                .iter()
                .map(|w| reserve(w, *self.0.get(&format!("{}{}", g.key, w.id())).unwrap_or(&0), now, g.cost))
                .collect();
            let allowed = rs.iter().all(|r| r.allowed);
            if allowed {
                for (w, r) in g.windows.iter().zip(&rs) {
                    self.0.insert(format!("{}{}", g.key, w.id()), r.new_tat_us);
                }
                if let Some(c) = &g.concurrency {
                    self.2.entry(g.key.clone()).or_default().push(c.lease_id.clone());
                }
            }
            Ok(GroupResult {
                allowed,
                reason: (!allowed).then_some(DenyReason::Tokens),
                windows: rs.iter().map(|r| r.state).collect(),
                never: rs.iter().any(|r| r.never),
            })
        }
        fn settle_item(&mut self, it: &SettleItem) -> Result<(), ()> {
            for w in &it.windows {
                let k = format!("{}{}", it.key, w.id());
                let t = *self.0.get(&k).unwrap_or(&0);
                self.0.insert(k, settle(w, t, self.1, it.delta));
            }
            if let Some(l) = &it.release_lease {
                self.2.entry(it.key.clone()).or_default().retain(|x| x != l);
            }
            Ok(())
        }
    }

    /// A store whose reservations of one key fail (a storage error, e.g. CAS contention).
    struct FailingOn(Mem, &'static str);
    impl GroupStore for FailingOn {
        type Error = ();
        fn reserve_group(&mut self, g: &Group) -> Result<GroupResult, ()> {
            if g.key == self.1 {
                return Err(());
            }
            self.0.reserve_group(g)
        }
        fn settle_item(&mut self, it: &SettleItem) -> Result<(), ()> {
            self.0.settle_item(it)
        }
    }

    /// A store whose settlements (hence rollbacks) always fail.
    struct SettleFails(Mem);
    impl GroupStore for SettleFails {
        type Error = ();
        fn reserve_group(&mut self, g: &Group) -> Result<GroupResult, ()> {
            self.0.reserve_group(g)
        }
        fn settle_item(&mut self, _: &SettleItem) -> Result<(), ()> {
            Err(())
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_denial_stays_a_denial_when_the_rollback_fails() {
        let mut m = SettleFails(Mem(Default::default(), 1_000_000_000, Default::default()));
        let open = Group { key: "a".into(), windows: vec![MIN], cost: 10, concurrency: None };
        let full = Group { key: "b".into(), windows: vec![MIN], cost: 10_000, concurrency: None };
        let r = reserve_all(&mut m, &ReserveRequest { groups: vec![open, full] });
        assert!(matches!(r, Ok(ReserveResponse { allowed: false, denied_group: Some(1), .. })), "{r:?}");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_storage_error_on_a_later_group_rolls_back_the_earlier_ones() {
        let mut m = FailingOn(Mem(Default::default(), 1_000_000_000, Default::default()), "model");
        let team = Group {
            key: "team".into(),
            windows: vec![MIN],
            cost: 100,
            concurrency: Some(ConcurrencySpec { max: 1, lease_id: "l1".into(), lease_ms: 1000 }),
        };
        let model = Group { key: "model".into(), windows: vec![MIN], cost: 100, concurrency: None };
        assert!(reserve_all(&mut m, &ReserveRequest { groups: vec![team.clone(), model] }).is_err());
        // Nothing is held: the slot (max 1) is free and the tokens refunded.
        assert!(m.0 .2.get("team").is_none_or(Vec::is_empty));
        let again = reserve_all(&mut m, &ReserveRequest { groups: vec![team] }).unwrap();
        assert!(again.allowed);
        assert_eq!(again.groups[0].windows[0].remaining, 500);
    }

    /// Costs and debts stop at MAX_AHEAD_US from now: every state stays below 2^53 µs, where the Redis
    /// backend's Lua numbers are exact (a debt of 2^63 tokens ran the state to 2^62 µs, then past u64).
    #[wasm_bindgen_test(unsupported = test)]
    fn costs_and_debts_stay_below_two_to_the_53() {
        let now = 1_800_000_000_000_000;
        assert_eq!(MIN.cost_us(u64::MAX), MAX_AHEAD_US);
        assert_eq!(WindowSpec { limit: 0, window_ms: 1000 }.cost_us(1), MAX_AHEAD_US);
        let mut tat = 0;
        for _ in 0..4 {
            tat = settle(&MIN, tat, now, i64::MAX);
        }
        assert_eq!(tat, now + MAX_AHEAD_US);
        assert!(tat < 1 << 53);
        let d = reserve(&MIN, tat, now, 1);
        assert!(!d.allowed && !d.never);
        assert_eq!(d.state.retry_after_ms, (MAX_AHEAD_US + 100_000 - 60_000_000).div_ceil(1000));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn requests_a_backend_cannot_answer_exactly_are_refused() {
        let g = |key: &str, windows: Vec<WindowSpec>, concurrency: Option<ConcurrencySpec>| ReserveRequest {
            groups: vec![Group { key: key.into(), windows, cost: 1, concurrency }],
        };
        let lease = |max: u64, lease_ms: u64| Some(ConcurrencySpec { max, lease_id: "l-1".into(), lease_ms });
        assert_eq!(g("team:h:4f1c", vec![MIN], lease(1, 600_000)).validate(), Ok(()));
        let bad = [
            (g("k", vec![WindowSpec { limit: 0, window_ms: 1000 }], None), "groups[0].windows[0].limit"),
            (g("k", vec![MIN, WindowSpec { limit: 1, window_ms: 0 }], None), "groups[0].windows[1].window_ms"),
            (g("k", vec![WindowSpec { limit: 1, window_ms: MAX_WINDOW_MS + 1 }], None), "window_ms"),
            (g("k", vec![], lease(0, 1000)), "concurrency.max"),
            (
                ReserveRequest {
                    groups: vec![Group { key: "k".into(), windows: vec![MIN], cost: 1 << 63, concurrency: None }],
                },
                "groups[0].cost",
            ),
            (g("k", vec![], lease(1, MAX_LEASE_MS + 1)), "concurrency.lease_ms"),
            (g("k", vec![], lease(1, 0)), "concurrency.lease_ms"),
            (g("", vec![MIN], None), "groups[0].key"),
            (g("a}:s:x", vec![MIN], None), "groups[0].key"),
            (g("a b", vec![MIN], None), "groups[0].key"),
            (g(&"k".repeat(MAX_NAME_BYTES + 1), vec![MIN], None), "groups[0].key"),
        ];
        for (req, field) in bad {
            let e = req.validate().unwrap_err();
            assert!(e.contains(field), "{e} should name {field}");
        }
        let item = |id: &str| SettleRequest {
            items: vec![SettleItem {
                key: "k".into(),
                windows: vec![MIN],
                delta: 5,
                release_lease: None,
                id: Some(id.into()),
                id_ttl_ms: None,
            }],
        };
        assert_eq!(item("9a3f-12-7").validate(), Ok(()));
        assert!(item("x}:w").validate().unwrap_err().contains("items[0].id"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_denial_reports_every_denying_group_and_refunds_the_rest() {
        let mut m = Mem(Default::default(), 1_000_000_000, Default::default());
        let g = |key: &str, limit: u64, window_ms: u64, cost: u64| Group {
            key: key.into(),
            windows: vec![WindowSpec { limit, window_ms }],
            cost,
            concurrency: None,
        };
        // Fill the per-second budget `a` and the per-minute budget `c`.
        assert!(reserve_all(&mut m, &ReserveRequest { groups: vec![g("a", 10, 1000, 10)] }).unwrap().allowed);
        assert!(reserve_all(&mut m, &ReserveRequest { groups: vec![g("c", 60, 60_000, 60)] }).unwrap().allowed);
        let req = ReserveRequest { groups: vec![g("a", 10, 1000, 5), g("b", 100, 60_000, 5), g("c", 60, 60_000, 5)] };
        let r = reserve_all(&mut m, &req).unwrap();
        assert_eq!((r.allowed, r.denied_group, r.groups.len()), (false, Some(0), 3));
        let waits: Vec<u64> = denying(&r).map(|g| retry_after_ms(std::slice::from_ref(g))).collect();
        assert_eq!(waits, [500, 5_000], "a refills 5 tokens in 0.5 s, c in 5 s");
        // `b` was reserved while probing and refunded.
        let b = reserve_all(&mut m, &ReserveRequest { groups: vec![g("b", 100, 60_000, 5)] }).unwrap();
        assert_eq!(b.groups[0].windows[0].remaining, 95);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn reserve_all_rolls_back_earlier_groups() {
        let mut m = Mem(Default::default(), 1_000_000_000, Default::default());
        let team = Group {
            key: "team".into(),
            windows: vec![MIN],
            cost: 100,
            concurrency: Some(ConcurrencySpec { max: 5, lease_id: "l1".into(), lease_ms: 1000 }),
        };
        let model = Group {
            key: "model".into(),
            windows: vec![WindowSpec { limit: 50, window_ms: 1000 }],
            cost: 100,
            concurrency: None,
        };
        let r = reserve_all(&mut m, &ReserveRequest { groups: vec![team.clone(), model] }).unwrap();
        assert!(!r.allowed);
        assert_eq!(r.denied_group, Some(1));
        assert!(r.groups[1].never);
        // the team group was refunded and its lease released
        let again = reserve_all(&mut m, &ReserveRequest { groups: vec![team] }).unwrap();
        assert!(again.allowed);
        assert_eq!(again.groups[0].windows[0].remaining, 500);
        assert_eq!(m.2["team"].len(), 1);
        assert_eq!(tightest(&again.groups).unwrap().remaining, 500);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn wire_format_round_trips() {
        let req =
            ReserveRequest { groups: vec![Group { key: "k".into(), windows: vec![MIN], cost: 3, concurrency: None }] };
        let s = serde_json::to_string(&req).unwrap();
        assert_eq!(s, r#"{"groups":[{"key":"k","windows":[{"limit":600,"window_ms":60000}],"cost":3}]}"#);
        assert_eq!(serde_json::from_str::<ReserveRequest>(&s).unwrap(), req);
    }
}
