//! Admission: which rules apply to a request, what each reserves, and what a reservation answer means
//! (admit, fall back to a cheaper model, or reject). A state machine so that the same logic drives the
//! synchronous `local` store and the asynchronous sidecar callout.

use crate::config::{Config, OnMissingKey};
use crate::keys::{budget_key_hashed, hash_key_memo};
use meshwarden_shared::ratelimit::{
    retry_after_ms, tightest, ConcurrencySpec, DenyReason, Group, ReserveRequest, ReserveResponse, WindowState,
};

/// What the filter learned about a request before admission.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub model: Option<String>,
    /// The model came from the request path (Bedrock, Gemini, Azure): the path decides what is served,
    /// and a path cannot be rewritten, so no fallback.
    pub model_from_path: bool,
    /// Another model the request names (the body's, when the path names the served one): rules with a
    /// `model` that match it apply as well.
    pub other_model: Option<String>,
    /// Estimated prompt tokens.
    pub input_estimate: u64,
    /// Output tokens reserved (max_tokens capped, or the default reservation).
    pub output_reservation: u64,
    /// Per rule (same order as `Config::rules`): the raw identity, `None` when missing.
    pub identities: Vec<Option<String>>,
}

fn memo_hash<'a, 'r>(memo: &'a mut Vec<(&'r str, String)>, raw: &'r str) -> &'a str {
    let pos = match memo.iter().position(|(r, _)| *r == raw) {
        Some(p) => p,
        None => {
            memo.push((raw, hash_key_memo(raw)));
            memo.len() - 1
        }
    };
    memo.get(pos).map_or("", |(_, h)| h.as_str())
}

/// At most this many fallbacks per request (a chain a -> b -> c is allowed, loops are cut).
pub const MAX_FALLBACKS: usize = 4;

#[derive(Debug, Clone)]
pub struct Plan {
    pub request: ReserveRequest,
    /// Rule index of each group.
    pub rules: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Reserved. `window` is the tightest window (for `x-ratelimit-*`).
    Admit { window: Option<WindowState> },
    /// A rule with `fallback_model` is spent: try again with this model.
    Fallback { model: String },
    /// Rejected with a 429.
    Deny(Denial),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub rule: usize,
    pub reason: DenyReason,
    /// Exact milliseconds until the reservation fits (0 for concurrency denials: unknown).
    pub retry_after_ms: u64,
    pub window: Option<WindowState>,
    /// The request alone exceeds a window's limit.
    pub never: bool,
    /// The rule's key was missing and the rule says `reject`.
    pub missing_key: bool,
}

impl Denial {
    /// The wait the 429 announces (`retry-after-ms`): the exact wait of a token denial; the window
    /// length for a request that can never fit; for a concurrency denial 1 s (when a slot frees is
    /// unknown), or longer when a token budget denied the request too (`retry_after_ms`).
    pub fn retry_ms(&self) -> u64 {
        match self.reason {
            DenyReason::Tokens if !self.never => self.retry_after_ms,
            DenyReason::Tokens => self.window.map_or(1000, |w| w.window_ms),
            DenyReason::Concurrency => self.retry_after_ms.max(1000),
        }
    }
}

#[derive(Debug)]
pub struct Admission {
    pub facts: Facts,
    /// The model being tried now (after fallbacks).
    pub model: Option<String>,
    /// Models tried, in order; first = the client's.
    pub tried: Vec<String>,
    /// The shortest wait after which a model this request fell back from is admitted itself (its spent
    /// budgets refilled): a 429 at the end of the chain announces it when it is shorter than the last
    /// model's wait.
    pub earliest_fallen_back_wait_ms: Option<u64>,
}

/// How long until a request denied with `groups` is admitted as it is: the longest wait of its denying
/// groups (a concurrency slot counts 1 s); `None` when it never is (more tokens than a window's limit).
fn wait_until_admitted(groups: &[meshwarden_shared::ratelimit::GroupResult]) -> Option<u64> {
    let denying: Vec<_> = groups.iter().filter(|g| !g.allowed).cloned().collect();
    if denying.iter().any(|g| g.never) {
        return None;
    }
    let wait = retry_after_ms(&denying);
    Some(if denying.iter().any(|g| g.reason == Some(DenyReason::Concurrency)) { wait.max(1000) } else { wait })
}

impl Admission {
    pub fn new(facts: Facts) -> Self {
        let model = facts.model.clone();
        Self { tried: model.iter().cloned().collect(), facts, model, earliest_fallen_back_wait_ms: None }
    }

    /// True once a fallback replaced the client's model.
    pub fn fell_back(&self) -> bool {
        self.tried.len() > 1
    }

    /// The value of `fallback_header` on the answer: the model used after a fallback, else `None`, which
    /// means the header is **removed**: only this filter may say that a fallback happened, never the
    /// upstream (nor anything else in front of it).
    pub fn fallback_header_value(admission: Option<&Admission>) -> Option<&str> {
        admission.filter(|a| a.fell_back()).and_then(|a| a.model.as_deref())
    }

    /// The groups to reserve for the current model, or a denial when a `reject` rule's key is missing.
    pub fn plan(&self, cfg: &Config, lease_id: &str) -> Result<Plan, Denial> {
        let mut groups = Vec::new();
        let mut rules = Vec::new();
        // Rules keyed on the same value (team total + per-model limits) hash it once.
        let mut hashed: Vec<(&str, String)> = Vec::new();
        for (i, rule) in cfg.rules.iter().enumerate() {
            let other = self.facts.other_model.as_deref();
            if !rule.matches_model(self.model.as_deref(), cfg.unknown_model)
                && !other.is_some_and(|m| rule.matches_model(Some(m), cfg.unknown_model))
            {
                continue;
            }
            let identity = self.facts.identities.get(i).and_then(Option::as_deref);
            if identity.is_none() {
                match rule.on_missing_key {
                    OnMissingKey::Skip => continue,
                    OnMissingKey::Reject => {
                        return Err(Denial {
                            rule: i,
                            reason: DenyReason::Tokens,
                            retry_after_ms: 0,
                            window: None,
                            never: true,
                            missing_key: true,
                        })
                    }
                    OnMissingKey::Shared => {}
                }
            }
            let windows = rule.limits.windows();
            let cost = if windows.is_empty() {
                0
            } else {
                rule.counts.cost(self.facts.input_estimate, self.facts.output_reservation)
            };
            groups.push(Group {
                key: budget_key_hashed(&rule.name, &rule.key, identity.map(|raw| memo_hash(&mut hashed, raw))),
                windows,
                cost,
                concurrency: rule.max_concurrent_requests.map(|max| ConcurrencySpec {
                    max,
                    lease_id: lease_id.to_string(),
                    lease_ms: cfg.lease_ms,
                }),
            });
            rules.push(i);
        }
        Ok(Plan { request: ReserveRequest { groups }, rules })
    }

    /// The model a token denial by rule `rule_idx` falls back to, if it may: the body names the model
    /// (a fallback rewrites it), the rule has a fallback not tried yet, and the chain is not too long.
    fn fallback<'c>(&self, cfg: &'c Config, rule_idx: usize) -> Option<&'c String> {
        let rewritable = self.facts.model.is_some() && !self.facts.model_from_path;
        cfg.rules
            .get(rule_idx)
            .and_then(|r| r.fallback_model.as_ref())
            .filter(|fb| rewritable && !self.tried.iter().any(|m| m == *fb) && self.tried.len() <= MAX_FALLBACKS)
    }

    /// Interpret the store's answer to `plan`.
    pub fn decide(&mut self, cfg: &Config, plan: &Plan, resp: &ReserveResponse) -> Outcome {
        if resp.allowed {
            return Outcome::Admit { window: tightest(&resp.groups) };
        }
        let g = resp.denied_group.unwrap_or(0);
        let rule_idx = plan.rules.get(g).copied().unwrap_or(0);
        let result = resp.groups.get(g).cloned().unwrap_or_default();
        let reason = result.reason.unwrap_or(DenyReason::Tokens);
        // A fallback rewrites `model` in the body: not possible when the body has none to rewrite.
        if reason == DenyReason::Tokens {
            if let Some(fb) = self.fallback(cfg, rule_idx).cloned() {
                // (A denial always waits; an answer without its waits, from an older sidecar, tells nothing.)
                if let Some(wait) = wait_until_admitted(&resp.groups).filter(|w| *w > 0) {
                    self.earliest_fallen_back_wait_ms =
                        Some(self.earliest_fallen_back_wait_ms.map_or(wait, |e| e.min(wait)));
                }
                self.tried.push(fb.clone());
                self.model = Some(fb.clone());
                return Outcome::Fallback { model: fb };
            }
        }
        // Every denying group counts for the wait: at `retry-after` all of them must fit, not only the
        // first (the sidecar and the local store try every group; an older sidecar answered only one).
        // A spent token budget with a fallback does not: the retry falls back instead of waiting for it.
        let denying: Vec<meshwarden_shared::ratelimit::GroupResult> = resp
            .groups
            .iter()
            .zip(&plan.rules)
            .filter(|(g, _)| !g.allowed)
            .filter(|(g, ri)| {
                g.reason.unwrap_or(DenyReason::Tokens) != DenyReason::Tokens || self.fallback(cfg, **ri).is_none()
            })
            .map(|(g, _)| g.clone())
            .collect();
        let denying = if denying.is_empty() { vec![result.clone()] } else { denying };
        let mut denial = Denial {
            rule: rule_idx,
            reason,
            retry_after_ms: retry_after_ms(&denying),
            window: denying
                .iter()
                .flat_map(|g| g.windows.iter())
                .copied()
                .filter(|w| w.retry_after_ms > 0)
                .max_by_key(|w| w.retry_after_ms)
                .or_else(|| tightest(&denying)),
            never: denying.iter().any(|g| g.never),
            missing_key: false,
        };
        // The end of a fallback chain: a model fallen back from may be admitted sooner than this one (its
        // budget refills first); the retry then passes on it, so that is the wait to announce.
        if let Some(wait) = self.earliest_fallen_back_wait_ms {
            if denial.never || denial.retry_ms() > wait {
                denial.never = false;
                denial.retry_after_ms = wait;
            }
        }
        Outcome::Deny(denial)
    }
}

/// The per-group settlement deltas for actual usage: each group's weighted actual cost minus what it
/// reserved (`cached_input` of the `input` tokens at the rules' `cached_input` weight).
pub fn settle_deltas(cfg: &Config, plan: &Plan, input: u64, cached_input: u64, output: u64) -> Vec<i64> {
    plan.request
        .groups
        .iter()
        .zip(&plan.rules)
        .map(|(g, &ri)| {
            let actual = if g.windows.is_empty() {
                0
            } else {
                cfg.rules.get(ri).map_or(0, |r| r.counts.cost_with_cache(input, cached_input, output))
            };
            i64::try_from(actual).unwrap_or(i64::MAX) - i64::try_from(g.cost).unwrap_or(i64::MAX)
        })
        .collect()
}

/// The per-VM part of every lease id. Lease ids must be unique across every VM that shares the
/// sidecar's state: one VM per Envoy worker, and many Envoys on one Redis. The clock alone is not enough:
/// Envoy configures its workers' VMs in parallel, and in 2 of 12 starts with `--concurrency 2` both VMs
/// read the same microsecond, so both handed out equal lease ids and two requests held one concurrency
/// slot (a third was admitted over `max_concurrent_requests`). The seed comes from the host's random
/// source (WASI `random_get`, which Envoy serves from BoringSSL) keyed over the time and the context id.
pub fn lease_seed(now_us: u64, root_context_id: u32) -> u64 {
    std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), (now_us, root_context_id))
}

#[cfg(test)]
mod tests {
    /// Two VMs that start in the same microsecond with the same root context id (what Envoy's parallel
    /// worker start produced) still get different lease seeds; the clock-only seed gave equal ones.
    #[test]
    fn lease_seeds_differ_for_vms_started_in_the_same_microsecond() {
        let seeds: std::collections::HashSet<u64> =
            (0..64).map(|_| super::lease_seed(1_796_470_292_281_510, 1)).collect();
        assert_eq!(seeds.len(), 64);
    }

    #[test]
    fn fallback_header_is_ours_or_removed() {
        let facts = |m: &str| Facts { model: Some(m.to_string()), ..Facts::default() };
        assert_eq!(Admission::fallback_header_value(None), None, "not admitted: an upstream copy is removed");
        let mut a = Admission::new(facts("gpt-4o"));
        assert_eq!(Admission::fallback_header_value(Some(&a)), None, "no fallback: removed");
        a.tried.push("gpt-4o-mini".to_string());
        a.model = Some("gpt-4o-mini".to_string());
        assert_eq!(Admission::fallback_header_value(Some(&a)), Some("gpt-4o-mini"));
    }

    use super::*;
    use meshwarden_shared::config::parse_config;
    use meshwarden_shared::ratelimit::{GroupResult, WindowState};

    fn cfg() -> Config {
        parse_config(
            br#"{"rules":[
            {"name":"team","key":{"header":"x-team"},"limits":{"tokens_per_minute":1000}},
            {"name":"big","key":{"header":"x-team"},"model":"gpt-4o","limits":{"tokens_per_minute":100},"fallback_model":"gpt-4o-mini","counts":{"input":1,"output":4}},
            {"name":"strict","key":{"header":"x-user"},"on_missing_key":"skip","limits":{"tokens_per_minute":100}},
            {"name":"conc","key":{"constant":"all"},"model":"gpt-4o-mini","max_concurrent_requests":2}]}"#,
        )
        .unwrap()
    }

    fn facts() -> Facts {
        Facts {
            model: Some("gpt-4o".into()),
            model_from_path: false,
            other_model: None,
            input_estimate: 10,
            output_reservation: 20,
            identities: vec![Some("a".into()), Some("a".into()), None, Some("all".into())],
        }
    }

    #[test]
    fn an_unreadable_or_path_model_meets_model_rules_but_never_falls_back() {
        let c = cfg();
        let unknown = Facts { model: None, ..facts() };
        let p = Admission::new(unknown.clone()).plan(&c, "l").unwrap();
        assert_eq!(p.rules, vec![0, 1, 3], "by default every model rule applies to an unknown model");
        let mut skip = cfg();
        skip.unknown_model = crate::config::UnknownModel::SkipModelRules;
        assert_eq!(Admission::new(unknown.clone()).plan(&skip, "l").unwrap().rules, vec![0]);
        let denied = |g: usize, n: usize| ReserveResponse {
            allowed: false,
            denied_group: Some(g),
            groups: (0..n)
                .map(|i| GroupResult {
                    allowed: i != g,
                    reason: (i == g).then_some(DenyReason::Tokens),
                    ..Default::default()
                })
                .collect(),
        };
        let mut a = Admission::new(unknown);
        assert!(matches!(a.decide(&c, &p, &denied(1, 3)), Outcome::Deny(_)), "no body model to rewrite");
        let mut from_path = Admission::new(Facts { model_from_path: true, ..facts() });
        let p = from_path.plan(&c, "l").unwrap();
        assert!(matches!(from_path.decide(&c, &p, &denied(1, 2)), Outcome::Deny(_)), "the path names the model");
    }

    #[test]
    fn plan_layers_and_fallback() {
        let c = cfg();
        let mut a = Admission::new(facts());
        let p = a.plan(&c, "l").unwrap();
        assert_eq!(p.rules, vec![0, 1], "team total + per-model; strict skipped (no key); conc is for mini");
        assert_eq!(p.request.groups[0].cost, 30);
        assert_eq!(p.request.groups[1].cost, 90);
        let denied = ReserveResponse {
            allowed: false,
            denied_group: Some(1),
            groups: vec![
                GroupResult { allowed: true, ..Default::default() },
                GroupResult { allowed: false, reason: Some(DenyReason::Tokens), ..Default::default() },
            ],
        };
        assert_eq!(a.decide(&c, &p, &denied), Outcome::Fallback { model: "gpt-4o-mini".into() });
        let p2 = a.plan(&c, "l").unwrap();
        assert_eq!(p2.rules, vec![0, 3]);
        assert!(p2.request.groups[1].concurrency.is_some());
        assert_eq!(p2.request.groups[1].cost, 0);
        let w = WindowState { limit: 1000, window_ms: 60000, remaining: 5, reset_ms: 100, retry_after_ms: 700 };
        let denied_team = ReserveResponse {
            allowed: false,
            denied_group: Some(0),
            groups: vec![GroupResult {
                allowed: false,
                reason: Some(DenyReason::Tokens),
                windows: vec![w],
                never: false,
            }],
        };
        match a.decide(&c, &p2, &denied_team) {
            Outcome::Deny(d) => {
                assert_eq!((d.rule, d.retry_after_ms), (0, 700));
            }
            o => panic!("{o:?}"),
        }
        assert!(a.fell_back());
        assert_eq!(settle_deltas(&c, &p2, 15, 0, 5), vec![-10, 0]);
    }

    /// A request refused both for a concurrency slot and for tokens: a slot may free at any moment, but
    /// the token budget needs its exact wait, so `retry-after` is that wait (the longest of every denying
    /// rule's), not the 1 s of a concurrency denial (a client retrying after 1 s is refused again).
    #[test]
    fn a_concurrency_denial_does_not_hide_a_longer_token_wait() {
        let c: Config = parse_config(
            br#"{"rules":[
            {"name":"slots","key":{"constant":"all"},"max_concurrent_requests":1},
            {"name":"tokens","key":{"header":"x-team"},"limits":{"tokens_per_minute":100}}]}"#,
        )
        .unwrap();
        let mut a = Admission::new(Facts {
            model: Some("m".into()),
            input_estimate: 10,
            output_reservation: 20,
            identities: vec![Some("all".into()), Some("a".into())],
            ..Facts::default()
        });
        let p = a.plan(&c, "l").unwrap();
        assert_eq!(p.rules, vec![0, 1]);
        let w = WindowState { limit: 100, window_ms: 60_000, remaining: 0, reset_ms: 60_000, retry_after_ms: 30_000 };
        let both = ReserveResponse {
            allowed: false,
            denied_group: Some(0),
            groups: vec![
                GroupResult { allowed: false, reason: Some(DenyReason::Concurrency), ..Default::default() },
                GroupResult { allowed: false, reason: Some(DenyReason::Tokens), windows: vec![w], never: false },
            ],
        };
        let Outcome::Deny(d) = a.decide(&c, &p, &both) else { panic!("denied") };
        assert_eq!((d.rule, d.reason), (0, DenyReason::Concurrency), "the first denying rule is named");
        assert_eq!(d.retry_ms(), 30_000, "the token budget's wait, not a concurrency retry after 1 s");
        assert_eq!(d.window, Some(w), "x-ratelimit-* describe the token window that denied");
        // A concurrency denial alone: 1 s.
        let slots_only = ReserveResponse {
            allowed: false,
            denied_group: Some(0),
            groups: vec![
                GroupResult { allowed: false, reason: Some(DenyReason::Concurrency), ..Default::default() },
                GroupResult {
                    allowed: true,
                    windows: vec![WindowState { retry_after_ms: 0, ..w }],
                    ..Default::default()
                },
            ],
        };
        let Outcome::Deny(d) = a.decide(&c, &p, &slots_only) else { panic!("denied") };
        assert_eq!(d.retry_ms(), 1000);
        // The spent token rule has a fallback: once a slot is free the request falls back instead of
        // waiting for that budget, so the retry stays the concurrency one.
        let with_fallback: Config = parse_config(
            br#"{"rules":[
            {"name":"slots","key":{"constant":"all"},"max_concurrent_requests":1},
            {"name":"tokens","key":{"header":"x-team"},"model":"m","limits":{"tokens_per_minute":100},"fallback_model":"mini"}]}"#,
        )
        .unwrap();
        let Outcome::Deny(d) = a.decide(&with_fallback, &p, &both) else { panic!("denied") };
        assert_eq!(d.retry_ms(), 1000);
    }

    /// A request whose path names the served model (Azure, Bedrock, Gemini) and whose body names another:
    /// the rules of both apply, and no fallback is tried (the body's `model` does not decide).
    #[test]
    fn the_models_of_the_path_and_of_the_body_both_meet_their_rules() {
        let c = cfg();
        let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
        let p = crate::request::parse_request(&c, "/openai/deployments/gpt-4o/chat/completions", body, false);
        let mut a = Admission::new(Facts {
            model: p.model.clone(),
            model_from_path: p.model_from_path,
            other_model: p.other_model.clone(),
            identities: facts().identities,
            ..Facts::default()
        });
        let plan = a.plan(&c, "l").unwrap();
        assert_eq!(plan.rules, vec![0, 1, 3], "team, the gpt-4o rule (path) and the gpt-4o-mini rule (body)");
        let spent = ReserveResponse {
            allowed: false,
            denied_group: Some(1),
            groups: (0..3)
                .map(|i| GroupResult {
                    allowed: i != 1,
                    reason: (i == 1).then_some(DenyReason::Tokens),
                    ..Default::default()
                })
                .collect(),
        };
        assert!(matches!(a.decide(&c, &plan, &spent), Outcome::Deny(_)), "no fallback: Azure serves the path's model");
    }

    /// A fallback chain that ends in a 429 announces when the first model it can pass on frees: gpt-4o's
    /// budget refills in 5 s, its fallback's in 20 minutes, so the retry after 5 s passes on gpt-4o. It
    /// announced the 20 minutes of the fallback's budget.
    #[test]
    fn a_spent_fallback_announces_when_the_fallen_back_model_frees() {
        let c = cfg();
        let mut a = Admission::new(facts());
        let p = a.plan(&c, "l").unwrap();
        let window = |wait: u64| WindowState {
            limit: 100,
            window_ms: 3_600_000,
            remaining: 0,
            reset_ms: wait,
            retry_after_ms: wait,
        };
        let gpt4o_spent = ReserveResponse {
            allowed: false,
            denied_group: Some(1),
            groups: vec![
                GroupResult { allowed: true, ..Default::default() },
                GroupResult {
                    allowed: false,
                    reason: Some(DenyReason::Tokens),
                    windows: vec![window(5_000)],
                    never: false,
                },
            ],
        };
        assert_eq!(a.decide(&c, &p, &gpt4o_spent), Outcome::Fallback { model: "gpt-4o-mini".into() });
        let p2 = a.plan(&c, "l").unwrap();
        let team_spent = ReserveResponse {
            allowed: false,
            denied_group: Some(0),
            groups: vec![
                GroupResult {
                    allowed: false,
                    reason: Some(DenyReason::Tokens),
                    windows: vec![window(1_200_000)],
                    never: false,
                },
                GroupResult { allowed: true, ..Default::default() },
            ],
        };
        let Outcome::Deny(d) = a.decide(&c, &p2, &team_spent) else { panic!("denied") };
        assert_eq!(d.retry_ms(), 5_000, "gpt-4o is admitted again in 5 s");
        // Had the first model been denied for longer, the last model's wait stands.
        let mut b = Admission::new(facts());
        let long = ReserveResponse {
            groups: vec![
                GroupResult { allowed: true, ..Default::default() },
                GroupResult {
                    allowed: false,
                    reason: Some(DenyReason::Tokens),
                    windows: vec![window(3_000_000)],
                    never: false,
                },
            ],
            ..gpt4o_spent.clone()
        };
        assert!(matches!(b.decide(&c, &p, &long), Outcome::Fallback { .. }));
        let Outcome::Deny(d) = b.decide(&c, &p2, &team_spent) else { panic!("denied") };
        assert_eq!(d.retry_ms(), 1_200_000);
        // A first model that can never pass (too large for its window) does not shorten anything.
        let mut n = Admission::new(facts());
        let never = ReserveResponse {
            groups: vec![
                GroupResult { allowed: true, ..Default::default() },
                GroupResult {
                    allowed: false,
                    reason: Some(DenyReason::Tokens),
                    windows: vec![window(5_000)],
                    never: true,
                },
            ],
            ..gpt4o_spent
        };
        assert!(matches!(n.decide(&c, &p, &never), Outcome::Fallback { .. }));
        let Outcome::Deny(d) = n.decide(&c, &p2, &team_spent) else { panic!("denied") };
        assert_eq!(d.retry_ms(), 1_200_000);
    }

    #[test]
    fn missing_key_reject() {
        let c: Config = parse_config(
            br#"{"rules":[{"name":"k","key":{"header":"x-k"},"on_missing_key":"reject","limits":{"tokens_per_second":5}}]}"#,
        )
        .unwrap();
        let a = Admission::new(Facts { identities: vec![None], ..Default::default() });
        assert!(a.plan(&c, "l").unwrap_err().missing_key);
    }
}
