//! The endpoint picker: scorers, saturation filter, priority shedding and the fallbacks. Pure: the
//! adapter feeds it snapshots and clock readings and asks it for decisions.
//!
//! Safety rule (the llm-d stale-metrics failure cannot happen here): an endpoint counts as saturated
//! only on *fresh* evidence. Stale data (a snapshot older than `max_snapshot_age_ms`, or an endpoint
//! the sidecar could not scrape recently) is never a reason to shed, wait or fail: such endpoints are
//! placed on by this proxy's own in-flight counts.

use crate::config::{Config, Fallback, Saturation, Weights};
use crate::prefix::{hash_bytes, BlockLru};
use meshwarden_shared::endpoints::{EndpointState, PoolSnapshot};
use std::collections::{HashMap, VecDeque};

/// What the picker needs from a request.
#[derive(Debug, Clone, Default)]
pub struct RequestFeatures {
    pub model: Option<String>,
    /// Chained block hashes of the prompt prefix.
    pub blocks: Vec<u64>,
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Scored on fresh metrics.
    Scored,
    /// Every fresh endpoint is saturated; a standard or critical request was placed on the best one.
    AllSaturated,
    /// Snapshot too old (sidecar down or slow) or every endpoint stale: least in-flight.
    Stale,
    /// No snapshot has ever arrived.
    NoSnapshot,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Scored => "scored",
            Reason::AllSaturated => "all_saturated",
            Reason::Stale => "stale",
            Reason::NoSnapshot => "no_snapshot",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Route {
        endpoint: String,
        reason: Reason,
        prefix_hit_blocks: usize,
    },
    /// A sheddable request while every endpoint is (freshly) saturated: answer 429.
    Shed,
    /// Set no destination; Envoy's own load balancing decides.
    Passthrough(Reason),
}

#[derive(Debug, Default, Clone)]
struct Local {
    lru: BlockLru,
    /// Times of recent picks: those within `pending_window_ms` may not be visible in the server's
    /// metrics yet (scrape + publish + refresh lag) and are added to its load.
    picks: VecDeque<u64>,
    /// Requests this proxy has in flight to the endpoint.
    inflight: u32,
}

#[derive(Debug, Clone)]
pub struct PickerConfig {
    pub weights: Weights,
    pub saturation: Saturation,
    pub lru_blocks: usize,
    pub max_snapshot_age_ms: u64,
    pub fallback: Fallback,
    pub base_models: Vec<String>,
    pub pending_window_ms: u64,
}

impl From<&Config> for PickerConfig {
    fn from(c: &Config) -> Self {
        Self {
            weights: c.weights,
            saturation: c.saturation,
            lru_blocks: c.prefix.lru_blocks_per_endpoint,
            max_snapshot_age_ms: c.max_snapshot_age_ms,
            fallback: c.fallback,
            base_models: c.base_models.clone(),
            pending_window_ms: c.pending_window_ms,
        }
    }
}

#[derive(Debug)]
pub struct Picker {
    cfg: PickerConfig,
    snapshot: Option<PoolSnapshot>,
    /// When the sidecar last confirmed the snapshot (200 or 304), host clock in ms.
    confirmed_ms: u64,
    locals: HashMap<String, Local>,
    /// Clock of the decision in progress.
    now_ms: u64,
    /// Requests in flight per endpoint across all workers of this proxy (from the adapter).
    global_inflight: HashMap<String, u32>,
}

/// Per-candidate scorer values, for tests and debugging.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub queue: f64,
    pub kv: f64,
    pub lora: f64,
    pub prefix: f64,
    pub total: f64,
}

impl Picker {
    pub fn new(cfg: PickerConfig) -> Self {
        Self {
            cfg,
            snapshot: None,
            confirmed_ms: 0,
            locals: HashMap::new(),
            now_ms: 0,
            global_inflight: HashMap::new(),
        }
    }

    pub fn snapshot_version(&self) -> Option<u64> {
        self.snapshot.as_ref().map(|s| s.version)
    }

    pub fn snapshot_age_ms(&self, now_ms: u64) -> Option<u64> {
        self.snapshot.as_ref().map(|_| now_ms.saturating_sub(self.confirmed_ms))
    }

    /// A new snapshot (or the same one confirmed again, `304`) as of `confirmed_ms`.
    pub fn update(&mut self, snapshot: Option<PoolSnapshot>, confirmed_ms: u64) {
        if confirmed_ms < self.confirmed_ms {
            return; // an older answer arriving late
        }
        if let Some(s) = snapshot {
            let cap = self.cfg.lru_blocks;
            self.locals.retain(|a, l| l.inflight > 0 || s.endpoints.iter().any(|e| &e.address == a));
            for e in &s.endpoints {
                self.locals
                    .entry(e.address.clone())
                    .or_insert_with(|| Local { lru: BlockLru::new(cap), ..Default::default() });
            }
            self.snapshot = Some(s);
        }
        self.confirmed_ms = confirmed_ms;
    }

    /// Own picks of `endpoint` that the server's metrics may not show yet.
    fn pending(&self, endpoint: &str) -> u32 {
        let since = self.now_ms.saturating_sub(self.cfg.pending_window_ms);
        self.locals.get(endpoint).map_or(0, |l| l.picks.iter().rev().take_while(|t| **t >= since).count() as u32)
    }

    /// Requests in flight per endpoint across every worker of this proxy, when the adapter shares them.
    pub fn set_global_inflight(&mut self, counts: HashMap<String, u32>) {
        self.global_inflight = counts;
    }

    /// Outstanding requests on an endpoint: what the server reported plus own picks it may not show
    /// yet, and never less than this proxy's own requests in flight there (all workers when known).
    fn load(&self, e: &EndpointState) -> f64 {
        let reported = f64::from(e.waiting) + f64::from(e.running) + f64::from(self.pending(&e.address));
        let own = self.inflight(&e.address).max(self.global_inflight.get(&e.address).copied().unwrap_or(0));
        reported.max(f64::from(own))
    }

    /// The request to `endpoint` finished (any outcome).
    pub fn done(&mut self, endpoint: &str) {
        if let Some(l) = self.locals.get_mut(endpoint) {
            l.inflight = l.inflight.saturating_sub(1);
        }
    }

    pub fn inflight(&self, endpoint: &str) -> u32 {
        self.locals.get(endpoint).map_or(0, |l| l.inflight)
    }

    fn is_adapter(&self, snap: &PoolSnapshot, model: Option<&str>) -> bool {
        let Some(m) = model.filter(|m| !m.is_empty()) else {
            return false;
        };
        !self.cfg.base_models.iter().any(|b| b == m)
            && !snap.endpoints.iter().any(|e| e.models.iter().any(|x| x == m))
            && snap.endpoints.iter().any(|e| e.max_lora > 0)
    }

    fn saturated(&self, e: &EndpointState) -> bool {
        let pending = self.pending(&e.address);
        e.fresh
            && (e.waiting.saturating_add(pending) > self.cfg.saturation.queue
                || f64::from(e.kv) > self.cfg.saturation.kv)
    }

    /// Pick an endpoint and record the pick (prefix index, pending and in-flight counts).
    pub fn pick(&mut self, req: &RequestFeatures, now_ms: u64) -> Decision {
        self.now_ms = now_ms;
        let key = tiebreak_key(req);
        let decision = self.decide(req, key, now_ms);
        if let Decision::Route { endpoint, .. } = &decision {
            let cap = self.cfg.lru_blocks;
            let l = self
                .locals
                .entry(endpoint.clone())
                .or_insert_with(|| Local { lru: BlockLru::new(cap), ..Default::default() });
            l.lru.insert_all(&req.blocks);
            l.picks.push_back(now_ms);
            let since = now_ms.saturating_sub(self.cfg.pending_window_ms);
            while l.picks.front().is_some_and(|t| *t < since) || l.picks.len() > 4096 {
                l.picks.pop_front();
            }
            l.inflight = l.inflight.saturating_add(1);
        }
        decision
    }

    fn decide(&self, req: &RequestFeatures, key: u64, now_ms: u64) -> Decision {
        let Some(snap) = self.snapshot.as_ref().filter(|s| !s.endpoints.is_empty()) else {
            return Decision::Passthrough(Reason::NoSnapshot);
        };
        let snapshot_fresh = now_ms.saturating_sub(self.confirmed_ms) <= self.cfg.max_snapshot_age_ms;
        let fresh: Vec<&EndpointState> =
            if snapshot_fresh { snap.endpoints.iter().filter(|e| e.fresh).collect() } else { Vec::new() };
        if fresh.is_empty() {
            return self.fallback(snap.endpoints.iter().collect(), key, req);
        }
        let open: Vec<&EndpointState> = fresh.iter().copied().filter(|e| !self.saturated(e)).collect();
        let (cands, reason) = if !open.is_empty() {
            (open, Reason::Scored)
        } else {
            let stale: Vec<&EndpointState> = snap.endpoints.iter().filter(|e| !e.fresh).collect();
            if req.priority < 0 {
                if stale.is_empty() {
                    return Decision::Shed;
                }
                // Not every endpoint is known to be saturated: never shed on stale data.
                return self.least_in_flight(&stale, key, req, Reason::Stale);
            }
            (fresh, Reason::AllSaturated)
        };
        let adapter = self.is_adapter(snap, req.model.as_deref());
        let scores = self.score(&cands, req, adapter, key);
        let best = cands
            .iter()
            .zip(scores.iter())
            .max_by(|a, b| a.1.total.total_cmp(&b.1.total))
            .map(|(e, s)| (e.address.clone(), s.prefix));
        match best {
            Some((endpoint, prefix)) => Decision::Route {
                endpoint,
                reason,
                prefix_hit_blocks: (prefix * req.blocks.len() as f64).round() as usize,
            },
            None => Decision::Passthrough(Reason::NoSnapshot),
        }
    }

    fn fallback(&self, eps: Vec<&EndpointState>, key: u64, req: &RequestFeatures) -> Decision {
        match self.cfg.fallback {
            Fallback::Passthrough => Decision::Passthrough(Reason::Stale),
            Fallback::LeastInFlight => self.least_in_flight(&eps, key, req, Reason::Stale),
        }
    }

    fn least_in_flight(&self, eps: &[&EndpointState], key: u64, req: &RequestFeatures, reason: Reason) -> Decision {
        let best = eps
            .iter()
            .map(|e| {
                let l = self.locals.get(&e.address);
                let inflight = l.map_or(0, |l| l.inflight);
                // Prefix affinity still breaks ties: it costs nothing and keeps caches warm.
                let prefix = l.map_or(0, |l| l.lru.matched_prefix(&req.blocks));
                (e, inflight, prefix, rendezvous(key, &e.address))
            })
            .min_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)).then(b.3.total_cmp(&a.3)));
        match best {
            Some((e, _, prefix, _)) => {
                Decision::Route { endpoint: e.address.clone(), reason, prefix_hit_blocks: prefix }
            }
            None => Decision::Passthrough(Reason::NoSnapshot),
        }
    }

    /// Scorer values for each candidate (all fresh).
    pub fn score(&self, cands: &[&EndpointState], req: &RequestFeatures, adapter: bool, key: u64) -> Vec<Scores> {
        let w = self.cfg.weights;
        let wsum = (w.queue + w.kv + w.lora + w.prefix).max(f64::MIN_POSITIVE);
        let loads: Vec<f64> = cands.iter().map(|e| self.load(e)).collect();
        let min = loads.iter().copied().fold(f64::INFINITY, f64::min);
        let max = loads.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let model = req.model.as_deref().unwrap_or("");
        cands
            .iter()
            .zip(loads)
            .map(|(e, load)| {
                let queue = if max > min { (max - load) / (max - min) } else { 1.0 };
                let kv = 1.0 - f64::from(e.kv).clamp(0.0, 1.0);
                let lora = if !adapter || e.lora_running.iter().any(|a| a == model) {
                    1.0
                } else if (e.lora_running.len() as u32) < e.max_lora {
                    0.8
                } else if e.lora_waiting.iter().any(|a| a == model) {
                    0.6
                } else {
                    0.0
                };
                let prefix = if req.blocks.is_empty() {
                    0.0
                } else {
                    let m = self.locals.get(&e.address).map_or(0, |l| l.lru.matched_prefix(&req.blocks));
                    m as f64 / req.blocks.len() as f64
                };
                let total = (w.queue * queue + w.kv * kv + w.lora * lora + w.prefix * prefix) / wsum
                    // Deterministic tie-break per prompt/model: equal candidates are chosen the same way
                    // by every worker and every proxy, so new prefixes and adapters concentrate.
                    + 1e-3 * rendezvous(key, &e.address);
                Scores { queue, kv, lora, prefix, total }
            })
            .collect()
    }
}

fn tiebreak_key(req: &RequestFeatures) -> u64 {
    let m = hash_bytes(0, req.model.as_deref().unwrap_or("").as_bytes());
    m ^ req.blocks.first().copied().unwrap_or(0)
}

/// Rendezvous (highest random weight) value of `addr` for `key`, in 0..1.
fn rendezvous(key: u64, addr: &str) -> f64 {
    (hash_bytes(key, addr.as_bytes()) >> 11) as f64 / (1u64 << 53) as f64
}

/// Priority from a header value: an integer, or `critical` (1), `standard` (0), `sheddable` (-1).
pub fn parse_priority(v: &str) -> Option<i32> {
    let v = v.trim();
    match v.to_ascii_lowercase().as_str() {
        "critical" => Some(1),
        "standard" => Some(0),
        "sheddable" => Some(-1),
        _ => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
    use super::*;
    use crate::prefix::block_hashes;

    fn ep(addr: &str, w: u32, r: u32, kv: f32) -> EndpointState {
        EndpointState { address: addr.into(), fresh: true, waiting: w, running: r, kv, ..Default::default() }
    }

    fn picker(eps: Vec<EndpointState>) -> Picker {
        let mut p = Picker::new(PickerConfig::from(&Config::default()));
        p.update(Some(PoolSnapshot { pool: "p".into(), version: 1, endpoints: eps }), 1000);
        p
    }

    fn route(d: &Decision) -> (&str, Reason) {
        match d {
            Decision::Route { endpoint, reason, .. } => (endpoint.as_str(), *reason),
            other => panic!("expected a route, got {other:?}"),
        }
    }

    #[test]
    fn picks_shortest_queue() {
        let mut p = picker(vec![ep("a:1", 3, 4, 0.3), ep("b:1", 0, 1, 0.3), ep("c:1", 2, 4, 0.3)]);
        assert_eq!(route(&p.pick(&RequestFeatures::default(), 1010)), ("b:1", Reason::Scored));
    }

    #[test]
    fn picks_lowest_kv() {
        let mut p = picker(vec![ep("a:1", 0, 2, 0.7), ep("b:1", 0, 2, 0.1), ep("c:1", 0, 2, 0.5)]);
        assert_eq!(route(&p.pick(&RequestFeatures::default(), 1010)).0, "b:1");
    }

    #[test]
    fn own_picks_since_last_snapshot_spread_load() {
        let mut p = picker(vec![ep("a:1", 0, 0, 0.1), ep("b:1", 0, 0, 0.1)]);
        let first = route(&p.pick(&RequestFeatures::default(), 1010)).0.to_string();
        let second = route(&p.pick(&RequestFeatures::default(), 1010)).0.to_string();
        assert_ne!(first, second);
    }

    #[test]
    fn other_workers_in_flight_counts_floor_the_load() {
        // The metrics say both are idle, but the other workers have 3 requests in flight on a.
        let mut p = picker(vec![ep("a:1", 0, 0, 0.1), ep("b:1", 0, 0, 0.1)]);
        p.set_global_inflight([("a:1".to_string(), 3)].into_iter().collect());
        for _ in 0..2 {
            assert_eq!(route(&p.pick(&RequestFeatures::default(), 1010)).0, "b:1");
        }
    }

    #[test]
    fn lora_affinity() {
        let mut a = ep("a:1", 0, 2, 0.3);
        a.max_lora = 2;
        a.lora_running = vec!["x".into(), "y".into()];
        let mut b = ep("b:1", 0, 2, 0.3);
        b.max_lora = 2;
        b.lora_running = vec!["z".into(), "w".into()];
        let mut c = ep("c:1", 0, 2, 0.3);
        c.max_lora = 2;
        c.lora_running = vec!["q".into()];
        let mut p = picker(vec![a, b, c]);
        let req = |m: &str| RequestFeatures { model: Some(m.into()), ..Default::default() };
        assert_eq!(route(&p.pick(&req("z"), 1010)).0, "b:1", "adapter loaded");
        p.update(None, 1020);
        assert_eq!(route(&p.pick(&req("new"), 1030)).0, "c:1", "free slot");
    }

    #[test]
    fn base_model_is_not_scored_as_adapter() {
        let mut a = ep("a:1", 0, 2, 0.3);
        a.max_lora = 1;
        a.lora_running = vec!["x".into()];
        a.models = vec!["base".into()];
        let b = ep("b:1", 0, 1, 0.3);
        let mut p = picker(vec![a, b]);
        let snap = p.snapshot.clone().unwrap();
        assert!(!p.is_adapter(&snap, Some("base")));
        assert!(p.is_adapter(&snap, Some("x")));
        // For the base model only load counts: b has less.
        let d = p.pick(&RequestFeatures { model: Some("base".into()), ..Default::default() }, 1010);
        assert_eq!(route(&d).0, "b:1");
    }

    #[test]
    fn prefix_affinity_beats_small_load_difference() {
        let mut p = picker(vec![ep("a:1", 0, 1, 0.2), ep("b:1", 0, 1, 0.2), ep("c:1", 0, 1, 0.2)]);
        let text = "tenant-7 system prompt ".repeat(100);
        let blocks = block_hashes(text.as_bytes(), 64, 256);
        let req = RequestFeatures { blocks: blocks.clone(), ..Default::default() };
        let first = route(&p.pick(&req, 1010)).0.to_string();
        // The snapshot now shows the first endpoint one request busier.
        let eps = ["a:1", "b:1", "c:1"].iter().map(|a| ep(a, 0, if *a == first { 2 } else { 1 }, 0.2)).collect();
        p.update(Some(PoolSnapshot { pool: "p".into(), version: 2, endpoints: eps }), 1050);
        let d = p.pick(&req, 1060);
        assert_eq!(route(&d).0, first);
        match d {
            Decision::Route { prefix_hit_blocks, .. } => assert_eq!(prefix_hit_blocks, blocks.len()),
            _ => unreachable!(),
        }
    }

    #[test]
    fn same_prompt_same_choice_without_history() {
        // Two independent pickers (two workers) choose the same endpoint for a new prefix.
        let eps = vec![ep("a:1", 0, 1, 0.2), ep("b:1", 0, 1, 0.2), ep("c:1", 0, 1, 0.2), ep("d:1", 0, 1, 0.2)];
        let mut p1 = picker(eps.clone());
        let mut p2 = picker(eps);
        for t in 0..20 {
            let blocks = block_hashes(format!("tenant {t} ").repeat(40).as_bytes(), 64, 256);
            let req = RequestFeatures { blocks, ..Default::default() };
            assert_eq!(route(&p1.pick(&req, 1010)).0, route(&p2.pick(&req, 1010)).0);
        }
    }

    #[test]
    fn saturated_endpoints_are_filtered() {
        let mut p = picker(vec![ep("a:1", 9, 8, 0.2), ep("b:1", 0, 8, 0.95), ep("c:1", 4, 8, 0.5)]);
        assert_eq!(route(&p.pick(&RequestFeatures::default(), 1010)), ("c:1", Reason::Scored));
    }

    #[test]
    fn sheddable_gets_shed_when_all_saturated_critical_is_placed() {
        let mut p = picker(vec![ep("a:1", 9, 8, 0.2), ep("b:1", 7, 8, 0.95)]);
        let shed = RequestFeatures { priority: -1, ..Default::default() };
        assert_eq!(p.pick(&shed, 1010), Decision::Shed);
        let crit = RequestFeatures { priority: 1, ..Default::default() };
        assert_eq!(route(&p.pick(&crit, 1010)).1, Reason::AllSaturated);
        let std = RequestFeatures { priority: 0, ..Default::default() };
        assert_eq!(route(&p.pick(&std, 1010)).1, Reason::AllSaturated);
    }

    #[test]
    fn stale_metrics_never_make_a_healthy_pool_look_saturated() {
        // The last snapshot showed the only endpoint saturated; then the sidecar went away.
        let mut p = picker(vec![ep("a:1", 50, 8, 0.99)]);
        let shed = RequestFeatures { priority: -1, ..Default::default() };
        assert_eq!(p.pick(&shed, 1010), Decision::Shed, "fresh evidence: shed");
        // 1 s later the same data is stale: a sheddable request is placed, not shed or held.
        assert_eq!(route(&p.pick(&shed, 2500)), ("a:1", Reason::Stale));
        // Per-endpoint staleness (sidecar up, server scrape failing) is treated the same way.
        let mut stale = ep("a:1", 50, 8, 0.99);
        stale.fresh = false;
        p.update(Some(PoolSnapshot { pool: "p".into(), version: 2, endpoints: vec![stale] }), 3000);
        assert_eq!(route(&p.pick(&shed, 3010)), ("a:1", Reason::Stale));
    }

    #[test]
    fn all_fresh_saturated_but_one_stale_sheddable_goes_to_stale() {
        let mut stale = ep("b:1", 0, 0, 0.0);
        stale.fresh = false;
        let mut p = picker(vec![ep("a:1", 50, 8, 0.99), stale]);
        let shed = RequestFeatures { priority: -1, ..Default::default() };
        assert_eq!(route(&p.pick(&shed, 1010)), ("b:1", Reason::Stale));
    }

    #[test]
    fn stale_fallback_is_least_in_flight() {
        let mut p = picker(vec![ep("a:1", 0, 0, 0.0), ep("b:1", 0, 0, 0.0)]);
        let now = 5000; // snapshot 4 s old
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(route(&p.pick(&RequestFeatures::default(), now)).0.to_string());
        }
        assert_eq!(seen.iter().filter(|s| *s == "a:1").count(), 2, "{seen:?}");
        assert_eq!(p.inflight("a:1"), 2);
        p.done("a:1");
        p.done("a:1");
        assert_eq!(route(&p.pick(&RequestFeatures::default(), now)).0, "a:1");
    }

    #[test]
    fn no_snapshot_passthrough_and_configured_passthrough() {
        let mut p = Picker::new(PickerConfig::from(&Config::default()));
        assert_eq!(p.pick(&RequestFeatures::default(), 10), Decision::Passthrough(Reason::NoSnapshot));
        let mut cfg = PickerConfig::from(&Config::default());
        cfg.fallback = Fallback::Passthrough;
        let mut p = Picker::new(cfg);
        p.update(Some(PoolSnapshot { pool: "p".into(), version: 1, endpoints: vec![ep("a:1", 0, 0, 0.0)] }), 1000);
        assert_eq!(p.pick(&RequestFeatures::default(), 9000), Decision::Passthrough(Reason::Stale));
    }

    #[test]
    fn late_answers_do_not_roll_back() {
        let mut p = picker(vec![ep("a:1", 0, 0, 0.0)]);
        p.update(Some(PoolSnapshot { pool: "p".into(), version: 9, endpoints: vec![ep("b:1", 0, 0, 0.0)] }), 500);
        assert_eq!(p.snapshot_version(), Some(1));
    }

    #[test]
    fn priorities() {
        assert_eq!(parse_priority("critical"), Some(1));
        assert_eq!(parse_priority(" Sheddable "), Some(-1));
        assert_eq!(parse_priority("-5"), Some(-5));
        assert_eq!(parse_priority("high"), None);
    }
}
