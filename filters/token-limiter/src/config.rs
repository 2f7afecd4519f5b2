//! token-limiter configuration. Every field is documented with an example in `docs/token-limiter.md`.

use meshwarden_shared::callout::CalloutConfig;
use meshwarden_shared::config::{check_range, ConfigError, Validate};
use meshwarden_shared::ratelimit::WindowSpec;

/// The longest rule name. A budget key is `<rule>:<kind>:<32 hex digits>` and the sidecar refuses keys
/// over `MAX_NAME_BYTES` (a longer name made every sidecar call of the rule a `400`: its `failure_mode`).
pub const MAX_RULE_NAME_BYTES: usize = 256;
const _: () = assert!(MAX_RULE_NAME_BYTES + ":h:".len() + 32 <= meshwarden_shared::ratelimit::MAX_NAME_BYTES);
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Largest request body read for the prompt estimate; larger bodies are admitted on a size-based
    /// estimate (bytes / 4) without reading the model.
    pub max_body_bytes: u64,
    /// Where budgets live: `local` (this Envoy's shared data) or `sidecar`.
    pub state: StateMode,
    /// The sidecar callout (cluster, timeout_ms, failure_mode); required with `state: sidecar`.
    pub sidecar: Option<CalloutConfig>,
    /// Sent as `authorization: Bearer <token>` on every sidecar call: the sidecar's `--api-token`.
    pub sidecar_token: Option<String>,
    /// The name of an environment variable of the Wasm VM (Envoy `vm_config.environment_variables`,
    /// Istio `WasmPlugin.spec.vmConfig.env`) that holds the sidecar token, so the secret can come from
    /// a Kubernetes Secret instead of the plugin configuration. Exclusive with `sidecar_token`.
    pub sidecar_token_env: Option<String>,
    /// Allow `unverified_jwt_claim` keys (decoding a bearer token without checking its signature).
    pub trust_unverified_jwt: bool,
    /// Output tokens reserved at admission when a request has no `max_tokens`.
    pub default_output_reservation: u64,
    /// Cap on the output reservation taken from a request's `max_tokens`.
    pub max_output_reservation: u64,
    /// Admission estimate of an image whose size cannot be read (a URL, a file id, an unknown format).
    pub image_default_tokens: u64,
    /// Admission estimate of a file (PDF, document) whose pages cannot be counted.
    pub file_default_tokens: u64,
    /// Admission estimate of one page of a base64 PDF whose pages are counted.
    pub pdf_page_tokens: u64,
    /// Responses answered through this Envoy whose context size is remembered, so that a request naming
    /// one (`previous_response_id`, `conversation`) is admitted on it (see `context_memory`); 0: none.
    pub context_memory_slots: u64,
    /// Response header naming the model actually used after a fallback.
    pub fallback_header: String,
    /// How often (ms) queued settlements are sent to the sidecar.
    pub settle_interval_ms: u64,
    /// How often (ms) a worker hands its counters to Envoy (they are summed in the VM in between).
    pub stats_flush_interval_ms: u64,
    /// Concurrency leases in the sidecar expire after this long (a crashed Envoy cannot hold slots).
    pub lease_ms: u64,
    /// What rules with a `model` do with a request whose model cannot be read (compressed, over
    /// `max_body_bytes`, not JSON, no `model` in the body or the path).
    pub unknown_model: UnknownModel,
    /// What a WebSocket upgrade or CONNECT tunnel gets (OpenAI's Realtime API, Gemini Live): refused by
    /// default; `meter` reads OpenAI Realtime sessions' usage from their frames.
    pub on_upgrade: OnUpgrade,
    /// `on_upgrade: meter`: input tokens reserved for each response of a Realtime session (the first at
    /// admission, each next one when the previous is done), replaced by the response's reported usage.
    pub realtime_input_reservation: u64,
    /// `on_upgrade: meter`: output tokens reserved for each response of a Realtime session.
    pub realtime_output_reservation: u64,
    /// Publish each request's decision, model and tokens as filter state for access logs
    /// (`%FILTER_STATE(wasm.meshwarden.token_limiter.<name>:PLAIN)%`). Off by default: it costs seven
    /// host calls per request, which only gateways that log the values should pay.
    pub filter_state: bool,
    pub rules: Vec<Rule>,
}

/// See [`Config::on_upgrade`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnUpgrade {
    /// 403 `permission_error` / `upgrade_refused` before the upgrade reaches the upstream: a budget that a
    /// WebSocket session walks past is not a budget.
    #[default]
    Reject,
    /// Let it through, unmetered and uncharged (stat `upgrade.passed`).
    Pass,
    /// A WebSocket session (OpenAI Realtime API, Azure OpenAI realtime, OpenAI-compatible servers) is
    /// admitted like a request and charged each `response.done`'s usage; when its budget is spent it
    /// is ended with an `error` event and a close frame 1008 (see `realtime.rs`). Other upgrades (a path
    /// not ending in `/realtime`, such as Gemini Live, whose usage is not read; a `CONNECT` tunnel) are
    /// refused as with `reject`.
    Meter,
}

/// See [`Config::unknown_model`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownModel {
    /// Every rule with a `model` applies (charged on the estimate; no fallback, the body cannot be
    /// rewritten): per-model budgets cannot be escaped by hiding the model.
    #[default]
    ApplyModelRules,
    /// Rules with a `model` do not apply: only model-independent rules limit such requests.
    SkipModelRules,
    /// 400 `invalid_request_error` / `model_unreadable` when a rule has a `model`.
    Reject,
}

impl Config {
    /// The admission prices of images and files ([`meshwarden_shared::media`]).
    pub fn media_prices(&self) -> meshwarden_shared::media::MediaPrices {
        meshwarden_shared::media::MediaPrices {
            image_default_tokens: self.image_default_tokens,
            file_default_tokens: self.file_default_tokens,
            pdf_page_tokens: self.pdf_page_tokens,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            state: StateMode::Local,
            sidecar: None,
            sidecar_token: None,
            sidecar_token_env: None,
            trust_unverified_jwt: false,
            default_output_reservation: 256,
            max_output_reservation: 4096,
            image_default_tokens: 1600,
            file_default_tokens: 3000,
            pdf_page_tokens: 3000,
            context_memory_slots: 4096,
            fallback_header: "x-meshwarden-fallback-model".to_string(),
            settle_interval_ms: 20,
            stats_flush_interval_ms: 20,
            lease_ms: 600_000,
            unknown_model: UnknownModel::default(),
            on_upgrade: OnUpgrade::default(),
            realtime_input_reservation: 2000,
            realtime_output_reservation: 500,
            filter_state: false,
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StateMode {
    #[default]
    Local,
    Sidecar,
}

/// Who is charged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeySource {
    /// A request header (API key, team); the value is hashed (SHA-256) before use.
    Header(String),
    /// A claim from Envoy `jwt_authn` dynamic metadata (`payload_in_metadata` name + claim).
    JwtClaim { claim: String, metadata_key: String },
    /// A claim from the unverified bearer token in `header` (default `authorization`).
    /// Only with `trust_unverified_jwt: true`.
    UnverifiedJwtClaim {
        claim: String,
        #[serde(default = "default_auth_header")]
        header: String,
    },
    /// From the mTLS peer's SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>`.
    Spiffe(SpiffePart),
    /// One budget for everyone.
    Constant(String),
}

fn default_auth_header() -> String {
    "authorization".to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpiffePart {
    Namespace,
    ServiceAccount,
}

/// What to do when a rule's key is not in the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnMissingKey {
    /// All requests without the key share one budget of this rule.
    #[default]
    Shared,
    /// The rule does not apply.
    Skip,
    /// 401-free rejection: 429 with a message naming the missing key source.
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub tokens_per_second: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_hour: Option<u64>,
    pub tokens_per_day: Option<u64>,
}

impl Limits {
    pub fn windows(&self) -> Vec<WindowSpec> {
        [
            (self.tokens_per_second, 1_000),
            (self.tokens_per_minute, 60_000),
            (self.tokens_per_hour, 3_600_000),
            (self.tokens_per_day, 86_400_000),
        ]
        .iter()
        .filter_map(|(l, w)| l.map(|limit| WindowSpec { limit, window_ms: *w }))
        .collect()
    }
}

/// What a token costs: `input`, `output`, `total`, or weights `{"input": 1, "output": 4}` (with
/// `cached_input` for the input tokens a provider read from its prompt cache).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Counts {
    Named(CountsName),
    Weighted(Weights),
}

impl Default for Counts {
    fn default() -> Self {
        Counts::Named(CountsName::Total)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CountsName {
    Input,
    Output,
    Total,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    #[serde(default)]
    pub input: f64,
    #[serde(default)]
    pub output: f64,
    /// The weight of input tokens served from the provider's prompt cache (OpenAI `cached_tokens`,
    /// Anthropic `cache_read_input_tokens`), which providers bill at a fraction of the input price;
    /// absent = `input`. Applies when the answer reports them, so at settlement: the admission
    /// estimate cannot know what the cache will hold and charges every input token at `input`.
    #[serde(default)]
    pub cached_input: Option<f64>,
}

impl Counts {
    pub fn weights(&self) -> Weights {
        match self {
            Counts::Named(CountsName::Input) => Weights { input: 1.0, output: 0.0, cached_input: None },
            Counts::Named(CountsName::Output) => Weights { input: 0.0, output: 1.0, cached_input: None },
            Counts::Named(CountsName::Total) => Weights { input: 1.0, output: 1.0, cached_input: None },
            Counts::Weighted(w) => *w,
        }
    }

    /// Weighted cost, rounded up. Binary floating point does not hold most decimal weights exactly
    /// (`1.1 * 100` is `110.00000000000001`): the sum's rounding error (a few parts in 10^16) is taken off
    /// before rounding up, else such a sum cost one token more than the weights say, on every request.
    pub fn cost(&self, input: u64, output: u64) -> u64 {
        self.cost_with_cache(input, 0, output)
    }

    /// [`Counts::cost`] when `cached_input` of the `input` tokens were read from the prompt cache (more
    /// than `input` counts as `input`).
    pub fn cost_with_cache(&self, input: u64, cached_input: u64, output: u64) -> u64 {
        let w = self.weights();
        let cached = cached_input.min(input);
        let exact = w.input * (input - cached) as f64
            + w.cached_input.unwrap_or(w.input) * cached as f64
            + w.output * output as f64;
        let c = (exact - exact.abs() * 1e-14).ceil();
        if c.is_finite() && c > 0.0 {
            c as u64
        } else {
            0
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name; used in stats and state keys.
    pub name: String,
    pub key: KeySource,
    #[serde(default)]
    pub on_missing_key: OnMissingKey,
    /// Exact model name or glob (`gpt-4o*`), matched without regard to case; absent = every request.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub counts: Counts,
    #[serde(default)]
    pub max_concurrent_requests: Option<u64>,
    /// When this rule's token budget is spent, rewrite `model` to this one instead of rejecting.
    #[serde(default)]
    pub fallback_model: Option<String>,
}

impl Rule {
    /// Whether the rule applies to a request for `model` (`None`: unreadable, see `unknown_model`).
    pub fn matches_model(&self, model: Option<&str>, unknown: UnknownModel) -> bool {
        match (&self.model, model) {
            (None, _) => true,
            (Some(_), None) => unknown == UnknownModel::ApplyModelRules,
            // Without case: upstreams that compare model names so (Ollama, Azure deployment names) would
            // serve `GPT-4O` as gpt-4o, past a case-sensitive rule. A case a strict upstream refuses only
            // costs the caller the refused request's estimate.
            (Some(p), Some(m)) => {
                let glob = meshwarden_shared::config::glob_match_ignore_case;
                glob(p, m)
                    || glob(ollama_short_name(p), ollama_short_name(m))
                    || glob(bedrock_base_model_id(p), bedrock_base_model_id(m))
            }
        }
    }
}

/// An Ollama model name without the parts Ollama fills in by default: the registry host, the `library`
/// namespace and the `latest` tag (`registry.ollama.ai/library/llama3:latest`, `library/llama3` and
/// `llama3` are one model to Ollama, so a rule on `llama3` must not be escaped by `llama3:latest`).
/// Names of other providers carry none of these and are returned as they are.
fn ollama_short_name(name: &str) -> &str {
    fn strip_prefix<'a>(s: &'a str, prefix: &str) -> &'a str {
        match (s.get(..prefix.len()), s.get(prefix.len()..)) {
            (Some(head), Some(rest)) if head.eq_ignore_ascii_case(prefix) => rest,
            _ => s,
        }
    }
    let name = strip_prefix(strip_prefix(name, "registry.ollama.ai/"), "library/");
    match name.len().checked_sub(":latest".len()).and_then(|cut| Some((name.get(..cut)?, name.get(cut..)?))) {
        Some((short, tag)) if !short.is_empty() && tag.eq_ignore_ascii_case(":latest") => short,
        _ => name,
    }
}

/// The Bedrock foundation model a model id runs: the id without the ARN around it
/// (`arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-…`,
/// `arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-…`) and without the
/// geography of a cross-region inference profile (`us.`, `eu.`, `apac.`, `global.`, …). Bedrock serves
/// all these spellings (newer models only through a profile), so a rule on
/// `anthropic.claude-3-5-sonnet-20240620-v1:0` must not be escaped by `us.anthropic.claude-3-5-…` or by
/// its ARN. Application inference profiles and provisioned-throughput ARNs name no model: they are
/// matched as they are. Other providers' names are returned unchanged.
fn bedrock_base_model_id(name: &str) -> &str {
    let id = match name.strip_prefix("arn:") {
        Some(arn) => match arn.rsplit_once('/') {
            Some((kind, id)) if kind.ends_with(":foundation-model") || kind.ends_with(":inference-profile") => id,
            _ => return name,
        },
        None => name,
    };
    // A geography prefix is followed by `provider.model` (`us.anthropic.claude-…`); `gpt-4.1` has none.
    match id.split_once('.') {
        Some((geo, rest))
            if ["us", "eu", "apac", "global", "us-gov", "jp", "au", "ca"]
                .iter()
                .any(|g| geo.eq_ignore_ascii_case(g))
                && rest.contains('.') =>
        {
            rest
        }
        _ => id,
    }
}

/// A sidecar token is sent in a header: visible ASCII only, and no space (the sidecar compares it exactly).
fn check_sidecar_token(field: &str, token: &str) -> Result<(), ConfigError> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::at(field, "must be non-empty printable ASCII without spaces"));
    }
    Ok(())
}

impl Config {
    /// The `authorization` value for sidecar calls: `sidecar_token`, or the value of the VM environment
    /// variable `sidecar_token_env` names (read with `env`, the host's environment in the filter). A
    /// variable that is missing or not a valid token refuses the configuration naming
    /// `sidecar_token_env`: starting without it would send every call unauthorised, which a sidecar
    /// with `--api-token` refuses, so `failure_mode` would decide every request.
    pub fn sidecar_authorization(&self, env: impl Fn(&str) -> Option<String>) -> Result<Option<String>, ConfigError> {
        let token = match (&self.sidecar_token, &self.sidecar_token_env) {
            (Some(t), _) => t.clone(),
            (None, Some(name)) => {
                let Some(value) = env(name) else {
                    return Err(ConfigError::at(
                        "sidecar_token_env",
                        format!(
                            "environment variable {name} is not set in the Wasm VM (Envoy vm_config.environment_variables, Istio WasmPlugin vmConfig.env)"
                        ),
                    ));
                };
                // A trailing newline is what a token file or `kubectl create secret --from-file` leaves.
                let value = value.trim_end_matches(['\r', '\n']).to_string();
                check_sidecar_token("sidecar_token_env", &value)?;
                value
            }
            (None, None) => return Ok(None),
        };
        Ok(Some(format!("Bearer {token}")))
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        check_range("max_body_bytes", self.max_body_bytes, 1, 64 << 20)?;
        check_range("default_output_reservation", self.default_output_reservation, 0, 10_000_000)?;
        check_range("max_output_reservation", self.max_output_reservation, 0, 10_000_000)?;
        check_range("image_default_tokens", self.image_default_tokens, 0, 1_000_000)?;
        check_range("file_default_tokens", self.file_default_tokens, 0, 10_000_000)?;
        check_range("pdf_page_tokens", self.pdf_page_tokens, 0, 1_000_000)?;
        check_range("context_memory_slots", self.context_memory_slots, 0, 1_000_000)?;
        check_range("settle_interval_ms", self.settle_interval_ms, 1, 10_000)?;
        check_range("stats_flush_interval_ms", self.stats_flush_interval_ms, 1, 10_000)?;
        check_range("lease_ms", self.lease_ms, 1_000, 86_400_000)?;
        check_range("realtime_input_reservation", self.realtime_input_reservation, 0, 10_000_000)?;
        check_range("realtime_output_reservation", self.realtime_output_reservation, 0, 10_000_000)?;
        // A name or value Envoy refuses in a header would break every fallback answer at run time.
        if self.fallback_header.is_empty()
            || !self
                .fallback_header
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::at(
                "fallback_header",
                "must be a non-empty lower-case header name (a-z, 0-9, '-', '_')",
            ));
        }
        if self.sidecar_token.is_some() && self.state == StateMode::Local {
            return Err(ConfigError::at("sidecar_token", "only used with \"state\": \"sidecar\""));
        }
        if self.sidecar_token_env.is_some() && self.state == StateMode::Local {
            return Err(ConfigError::at("sidecar_token_env", "only used with \"state\": \"sidecar\""));
        }
        if let Some(t) = &self.sidecar_token {
            check_sidecar_token("sidecar_token", t)?;
        }
        if let Some(name) = &self.sidecar_token_env {
            if self.sidecar_token.is_some() {
                return Err(ConfigError::at(
                    "sidecar_token_env",
                    "set either sidecar_token or sidecar_token_env, not both",
                ));
            }
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(ConfigError::at(
                    "sidecar_token_env",
                    "must be an environment variable name (A-Z, a-z, 0-9, '_')",
                ));
            }
        }
        match (&self.state, &self.sidecar) {
            (StateMode::Sidecar, None) => {
                return Err(ConfigError::at("sidecar", "required when state is \"sidecar\""));
            }
            // Ignored otherwise: budgets would stay in each Envoy (one per gateway replica), not shared.
            (StateMode::Local, Some(_)) => {
                return Err(ConfigError::at(
                    "sidecar",
                    "given, but state is \"local\" (the default), which would keep budgets in this Envoy: \
                     set \"state\": \"sidecar\" to use the sidecar",
                ));
            }
            (_, Some(s)) => s.validate("sidecar")?,
            _ => {}
        }
        if self.rules.len() > meshwarden_shared::ratelimit::MAX_GROUPS {
            // A request's reserve has a group per rule, and the sidecar refuses more.
            return Err(ConfigError::at(
                "rules",
                format!("at most {} rules", meshwarden_shared::ratelimit::MAX_GROUPS),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let p = format!("rules[{i}]");
            if r.name.is_empty() || !r.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(ConfigError::at(&format!("{p}.name"), "must be non-empty [A-Za-z0-9_-]"));
            }
            if r.name.len() > MAX_RULE_NAME_BYTES {
                return Err(ConfigError::at(
                    &format!("{p}.name"),
                    format!("must be at most {MAX_RULE_NAME_BYTES} bytes (it is part of every budget key)"),
                ));
            }
            if !names.insert(r.name.as_str()) {
                return Err(ConfigError::at(&format!("{p}.name"), format!("duplicate rule name {:?}", r.name)));
            }
            let windows = r.limits.windows();
            if windows.is_empty() && r.max_concurrent_requests.is_none() {
                return Err(ConfigError::at(
                    &format!("{p}.limits"),
                    "set at least one of tokens_per_second/minute/hour/day or max_concurrent_requests",
                ));
            }
            let l = &r.limits;
            for (field, limit) in [
                ("tokens_per_second", l.tokens_per_second),
                ("tokens_per_minute", l.tokens_per_minute),
                ("tokens_per_hour", l.tokens_per_hour),
                ("tokens_per_day", l.tokens_per_day),
            ] {
                if limit == Some(0) {
                    return Err(ConfigError::at(&format!("{p}.limits.{field}"), "a token limit must be at least 1"));
                }
            }
            if let Some(n) = r.max_concurrent_requests {
                check_range(&format!("{p}.max_concurrent_requests"), n, 1, 1_000_000)?;
            }
            if let Counts::Weighted(w) = r.counts {
                for (f, v) in
                    [("input", w.input), ("output", w.output), ("cached_input", w.cached_input.unwrap_or(0.0))]
                {
                    if !(0.0..=1000.0).contains(&v) {
                        return Err(ConfigError::at(&format!("{p}.counts.{f}"), "weight must be between 0 and 1000"));
                    }
                }
                if w.input == 0.0 && w.output == 0.0 {
                    return Err(ConfigError::at(&format!("{p}.counts"), "at least one weight must be positive"));
                }
            }
            match &r.key {
                KeySource::UnverifiedJwtClaim { .. } if !self.trust_unverified_jwt => {
                    return Err(ConfigError::at(
                        &format!("{p}.key"),
                        "unverified_jwt_claim needs trust_unverified_jwt: true (signatures are not checked)",
                    ));
                }
                KeySource::Header(h) | KeySource::UnverifiedJwtClaim { header: h, .. } if h.trim().is_empty() => {
                    return Err(ConfigError::at(&format!("{p}.key"), "header name must not be empty"));
                }
                KeySource::JwtClaim { claim, metadata_key } if claim.is_empty() || metadata_key.is_empty() => {
                    return Err(ConfigError::at(&format!("{p}.key"), "claim and metadata_key must not be empty"));
                }
                _ => {}
            }
            if let Some(f) = &r.fallback_model {
                if f.is_empty() {
                    return Err(ConfigError::at(&format!("{p}.fallback_model"), "must not be empty"));
                }
                // It is sent back in `fallback_header`: no control bytes (Envoy refuses them in a header).
                if f.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
                    return Err(ConfigError::at(&format!("{p}.fallback_model"), "must not contain control characters"));
                }
                if windows.is_empty() {
                    return Err(ConfigError::at(&format!("{p}.fallback_model"), "needs a token limit"));
                }
                // The rule applies to its fallback too, with the same key: the fallback would be charged to
                // the very budget that is spent, so it could never be admitted (every request got the 429).
                if r.matches_model(Some(f), UnknownModel::ApplyModelRules) {
                    let why = match &r.model {
                        Some(m) => format!("matches this rule's own model {m:?}"),
                        None => "is limited by this rule too (it has no model)".to_string(),
                    };
                    return Err(ConfigError::at(
                        &format!("{p}.fallback_model"),
                        format!(
                            "{f:?} {why}: the fallback would be charged to the same spent budget and never admitted; \
                             give the rule a model the fallback does not match"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// Every full configuration in `docs/token-limiter.md` (a ```json block with `rules`) is valid.
    #[test]
    fn documented_configurations_load() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/token-limiter.md")).unwrap();
        let mut checked = 0;
        for block in doc.split("```json").skip(1) {
            let text = block.split("```").next().unwrap_or_default();
            let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else { continue };
            if v.get("rules").is_none() {
                continue;
            }
            let r = meshwarden_shared::config::parse_config::<Config>(text.as_bytes());
            assert!(r.is_ok(), "{:?} in\n{text}", r.err());
            checked += 1;
        }
        assert!(checked >= 2, "only {checked} configurations found");
    }

    use super::*;
    use meshwarden_shared::config::parse_config;

    #[test]
    fn full_example_parses() {
        let c: Config = parse_config(
            br#"{"state":"local","trust_unverified_jwt":true,"rules":[
            {"name":"team","key":{"header":"x-team"},"limits":{"tokens_per_minute":1000,"tokens_per_day":100000},"max_concurrent_requests":4},
            {"name":"gpt4","key":{"unverified_jwt_claim":{"claim":"sub"}},"model":"gpt-4*","counts":{"input":1,"output":4},
             "limits":{"tokens_per_hour":50},"fallback_model":"gpt-3.5-turbo"},
            {"name":"ns","key":{"spiffe":"namespace"},"limits":{"tokens_per_second":10},"counts":"output"},
            {"name":"all","key":{"constant":"global"},"limits":{"tokens_per_second":10}},
            {"name":"jwt","key":{"jwt_claim":{"claim":"team","metadata_key":"payload"}},"limits":{"tokens_per_second":10}}]}"#,
        )
        .unwrap();
        assert_eq!(c.rules.len(), 5);
        assert_eq!(c.rules[0].limits.windows().len(), 2);
        assert_eq!(c.rules[1].counts.cost(10, 10), 50);
        assert_eq!(c.rules[2].counts.cost(10, 3), 3);
        assert!(c.rules[1].matches_model(Some("gpt-4o"), UnknownModel::SkipModelRules));
        // Ollama and Azure serve a model under any case of its name: the rule must see it too.
        assert!(c.rules[1].matches_model(Some("GPT-4O"), UnknownModel::SkipModelRules));
        assert!(!c.rules[1].matches_model(Some("gpt-3.5-turbo"), UnknownModel::SkipModelRules));
        // Ollama fills in the registry, `library/` and `:latest`: those spellings are the same model.
        let llama: Rule = serde_json::from_str(
            r#"{"name":"l","key":{"constant":"x"},"model":"llama3","limits":{"tokens_per_second":1}}"#,
        )
        .unwrap();
        for m in
            ["llama3", "llama3:latest", "LLAMA3:Latest", "library/llama3", "registry.ollama.ai/library/llama3:latest"]
        {
            assert!(llama.matches_model(Some(m), UnknownModel::SkipModelRules), "{m}");
        }
        for m in ["llama3:8b", "llama3.1", "other/llama3", ":latest", "llama3:latest2"] {
            assert!(!llama.matches_model(Some(m), UnknownModel::SkipModelRules), "{m}");
        }
        assert_eq!(ollama_short_name("gpt-4o"), "gpt-4o");
        // Bedrock serves a foundation model by its id, its ARN and cross-region inference profiles.
        let sonnet: Rule = serde_json::from_str(
            r#"{"name":"s","key":{"constant":"x"},"model":"anthropic.claude-3-5-sonnet-20240620-v1:0","limits":{"tokens_per_second":1}}"#,
        )
        .unwrap();
        for m in [
            "anthropic.claude-3-5-sonnet-20240620-v1:0",
            "us.anthropic.claude-3-5-sonnet-20240620-v1:0",
            "APAC.anthropic.claude-3-5-sonnet-20240620-v1:0",
            "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-5-sonnet-20240620-v1:0",
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.anthropic.claude-3-5-sonnet-20240620-v1:0",
        ] {
            assert!(sonnet.matches_model(Some(m), UnknownModel::SkipModelRules), "{m}");
        }
        for m in [
            "anthropic.claude-3-haiku-20240307-v1:0",
            "xx.anthropic.claude-3-5-sonnet-20240620-v1:0",
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3",
            "arn:aws:bedrock:us-east-1:123456789012:provisioned-model/anthropic.claude-3-5-sonnet-20240620-v1:0",
        ] {
            assert!(!sonnet.matches_model(Some(m), UnknownModel::SkipModelRules), "{m}");
        }
        assert_eq!(bedrock_base_model_id("gpt-4.1"), "gpt-4.1");
        assert_eq!(bedrock_base_model_id("us.gpt"), "us.gpt");
        assert_eq!(ollama_short_name(":latest"), ":latest");
        assert!(!c.rules[1].matches_model(None, UnknownModel::SkipModelRules));
        assert!(c.rules[1].matches_model(None, UnknownModel::ApplyModelRules), "the default: fail closed");
        assert_eq!(c.on_upgrade, OnUpgrade::Reject, "the default: fail closed");
        let pass: Config = parse_config(br#"{"on_upgrade":"pass"}"#).unwrap();
        assert_eq!(pass.on_upgrade, OnUpgrade::Pass);
        assert!(parse_config::<Config>(br#"{"on_upgrade":"allow"}"#).unwrap_err().to_string().contains("on_upgrade"));
        let meter: Config = parse_config(br#"{"on_upgrade":"meter","realtime_output_reservation":100}"#).unwrap();
        assert_eq!(
            (meter.on_upgrade, meter.realtime_input_reservation, meter.realtime_output_reservation),
            (OnUpgrade::Meter, 2000, 100)
        );
        let err = parse_config::<Config>(br#"{"realtime_input_reservation":20000000}"#).unwrap_err().to_string();
        assert!(err.contains("realtime_input_reservation"), "{err}");
    }

    /// Decimal weights cost what they say: 100 input tokens at 1.1 cost 110, not 111 (the float product
    /// is 110.00000000000001); a true fraction still rounds up.
    #[test]
    fn cached_input_tokens_cost_their_own_weight() {
        let c: Config = parse_config(
            br#"{"rules":[{"name":"a","key":{"constant":"x"},"limits":{"tokens_per_day":10},
                 "counts":{"input":1,"cached_input":0.1,"output":4}}]}"#,
        )
        .unwrap();
        let counts = c.rules[0].counts;
        // 1000 input tokens of which 900 from the cache: 100 + 90, plus 4 x 10 output.
        assert_eq!(counts.cost_with_cache(1000, 900, 10), 230);
        assert_eq!(counts.cost(1000, 10), 1040, "the admission estimate charges every input token at `input`");
        assert_eq!(counts.cost_with_cache(10, 50, 0), 1, "more cached than input counts as all input cached");
        // Without `cached_input`, cached tokens cost what input tokens cost.
        assert_eq!(Counts::default().cost_with_cache(1000, 900, 10), 1010);
        let e = |s: &str| parse_config::<Config>(s.as_bytes()).unwrap_err().path;
        assert_eq!(
            e(
                r#"{"rules":[{"name":"a","key":{"constant":"x"},"limits":{"tokens_per_day":1},"counts":{"input":1,"cached_input":-1}}]}"#
            ),
            "$.rules[0].counts.cached_input"
        );
    }

    #[test]
    fn decimal_weights_round_up_only_real_fractions() {
        let w = |input: f64, output: f64| Counts::Weighted(Weights { input, output, cached_input: None });
        assert_eq!(w(0.3, 0.0).cost(10, 0), 3);
        assert_eq!(w(0.1, 0.7).cost(30, 10), 10);
        assert_eq!(w(0.7, 0.0).cost(10, 0), 7);
        assert_eq!(w(0.15, 0.0).cost(100, 0), 15);
        assert_eq!(w(1.1, 0.0).cost(100, 0), 110);
        assert_eq!(w(0.3, 0.0).cost(11, 0), 4, "3.3 rounds up");
        assert_eq!(w(1.0, 4.0).cost(1_000_000_000_000, 1), 1_000_000_000_004);
        assert_eq!(w(0.5, 0.0).cost(2_000_000_000_001, 0), 1_000_000_000_001, "x.5 rounds up at any size");
    }

    #[test]
    fn errors_name_the_field() {
        let e = |s: &str| parse_config::<Config>(s.as_bytes()).unwrap_err().path;
        assert_eq!(e(r#"{"rules":[{"name":"a","key":{"constant":"x"},"limits":{}}]}"#), "$.rules[0].limits");
        assert_eq!(
            e(
                r#"{"rules":[{"name":"a","key":{"unverified_jwt_claim":{"claim":"sub"}},"limits":{"tokens_per_second":1}}]}"#
            ),
            "$.rules[0].key"
        );
        assert_eq!(e(r#"{"state":"sidecar"}"#), "$.sidecar");
        assert_eq!(e(r#"{"image_default_tokens":1000001}"#), "$.image_default_tokens");
        assert_eq!(e(r#"{"pdf_page_tokens":-1}"#), "$.pdf_page_tokens");
        assert_eq!(e(r#"{"file_default_tokens":"many"}"#), "$.file_default_tokens");
        // A sidecar block (or token) without `state: sidecar` would be ignored: budgets kept in each Envoy,
        // one per gateway replica instead of one shared budget.
        assert_eq!(e(r#"{"sidecar":{"cluster":"meshwarden_sidecar"}}"#), "$.sidecar");
        assert_eq!(e(r#"{"state":"local","sidecar":{"cluster":"meshwarden_sidecar"}}"#), "$.sidecar");
        assert_eq!(e(r#"{"sidecar_token":"s3cret"}"#), "$.sidecar_token");
        assert!(parse_config::<Config>(br#"{"state":"sidecar","sidecar":{"cluster":"c"},"sidecar_token":"t"}"#).is_ok());
        // At most MAX_GROUPS rules: a reserve has a group per rule, and the sidecar refuses more.
        let rules = |n: usize| {
            let r: Vec<String> = (0..n)
                .map(|i| format!(r#"{{"name":"r{i}","key":{{"constant":"x"}},"limits":{{"tokens_per_minute":1}}}}"#))
                .collect();
            format!(r#"{{"rules":[{}]}}"#, r.join(","))
        };
        assert!(parse_config::<Config>(rules(meshwarden_shared::ratelimit::MAX_GROUPS).as_bytes()).is_ok());
        assert_eq!(e(&rules(meshwarden_shared::ratelimit::MAX_GROUPS + 1)), "$.rules");
        // A rule name is part of every budget key the sidecar holds (at most MAX_NAME_BYTES): 256 bytes.
        let named = |n: usize| {
            format!(
                r#"{{"rules":[{{"name":"{}","key":{{"constant":"x"}},"limits":{{"tokens_per_minute":1}}}}]}}"#,
                "n".repeat(n)
            )
        };
        assert!(parse_config::<Config>(named(MAX_RULE_NAME_BYTES).as_bytes()).is_ok());
        assert_eq!(e(&named(MAX_RULE_NAME_BYTES + 1)), "$.rules[0].name");
        // A zero limit names its window, not only `limits`.
        assert_eq!(
            e(
                r#"{"rules":[{"name":"a","key":{"constant":"x"},"limits":{"tokens_per_minute":100,"tokens_per_hour":0}}]}"#
            ),
            "$.rules[0].limits.tokens_per_hour"
        );
        for bad in [0, 10_001] {
            assert_eq!(e(&format!(r#"{{"stats_flush_interval_ms":{bad}}}"#)), "$.stats_flush_interval_ms", "{bad}");
        }
        assert!(parse_config::<Config>(br#"{"stats_flush_interval_ms":1000}"#).is_ok());
        assert_eq!(e(r#"{"rules":[{"name":"a","key":{"constant":"x"},"limitz":{}}]}"#), "$.rules[0].limitz");
        assert_eq!(
            e(
                r#"{"rules":[{"name":"a","key":{"constant":"x"},"limits":{"tokens_per_second":1},"counts":{"input":-1}}]}"#
            ),
            "$.rules[0].counts.input"
        );
        for bad in ["", "X-Fallback", "x fallback", "x-fallback:", ":status", "x-fallback\\n"] {
            let cfg = format!(r#"{{"fallback_header":"{bad}"}}"#);
            assert_eq!(e(&cfg), "$.fallback_header", "{bad:?}");
        }
        let fallback = |m: &str| {
            format!(
                r#"{{"rules":[{{"name":"a","key":{{"constant":"x"}},"model":"gpt-4o","limits":{{"tokens_per_second":1}},"fallback_model":"{m}"}}]}}"#
            )
        };
        assert_eq!(e(&fallback("gpt\\r\\nx-injected: 1")), "$.rules[0].fallback_model");
        for bad in ["", "two words", "x\\r\\ny: z"] {
            let cfg = format!(r#"{{"state":"sidecar","sidecar":{{"cluster":"c"}},"sidecar_token":"{bad}"}}"#);
            assert_eq!(e(&cfg), "$.sidecar_token", "{bad:?}");
        }
        assert!(parse_config::<Config>(
            br#"{"state":"sidecar","sidecar":{"cluster":"c"},"sidecar_token":"s3cret-Token_1"}"#
        )
        .is_ok());
        let sc = r#""state":"sidecar","sidecar":{"cluster":"c""#;
        for bad in [
            format!(r#"{{{sc}}},"sidecar_token":"a","sidecar_token_env":"T"}}"#),
            format!(r#"{{{sc}}},"sidecar_token_env":""}}"#),
            format!(r#"{{{sc}}},"sidecar_token_env":"A-B"}}"#),
            r#"{"sidecar_token_env":"T"}"#.to_string(),
        ] {
            assert_eq!(e(&bad), "$.sidecar_token_env", "{bad}");
        }
        assert!(parse_config::<Config>(fallback("gpt-4o-mini").as_bytes()).is_ok());
        // A fallback the rule itself limits (its glob matches it, or the rule has no model) would be charged
        // to the same spent budget: never admitted.
        let own = |model: &str| {
            format!(
                r#"{{"rules":[{{"name":"a","key":{{"constant":"x"}},{model}"limits":{{"tokens_per_second":1}},"fallback_model":"gpt-4o-mini"}}]}}"#
            )
        };
        for model in [r#""model":"gpt-4o*","#, r#""model":"gpt-4o-mini","#, ""] {
            assert_eq!(e(&own(model)), "$.rules[0].fallback_model", "{model}");
        }
        assert!(parse_config::<Config>(own(r#""model":"gpt-4o","#).as_bytes()).is_ok());
        // Models match without case, so a rule on `GPT-4O-MINI` limits its fallback `gpt-4o-mini` too.
        assert_eq!(e(&own(r#""model":"GPT-4O-MINI","#)), "$.rules[0].fallback_model");
    }

    /// The token can come from the VM's environment (a Kubernetes Secret through Envoy's
    /// `vm_config.environment_variables` / Istio's `vmConfig.env`) instead of the plugin configuration.
    #[test]
    fn sidecar_token_from_the_vm_environment() {
        let cfg = |json: &str| parse_config::<Config>(json.as_bytes()).unwrap();
        let env = |name: &str| match name {
            "MESHWARDEN_SIDECAR_API_TOKEN" => Some("s3cret\n".to_string()),
            "SPACED" => Some("two words".to_string()),
            _ => None,
        };
        let from_env =
            cfg(r#"{"state":"sidecar","sidecar":{"cluster":"c"},"sidecar_token_env":"MESHWARDEN_SIDECAR_API_TOKEN"}"#);
        assert_eq!(from_env.sidecar_authorization(env).unwrap().as_deref(), Some("Bearer s3cret"));
        let inline = cfg(r#"{"state":"sidecar","sidecar":{"cluster":"c"},"sidecar_token":"abc"}"#);
        assert_eq!(inline.sidecar_authorization(env).unwrap().as_deref(), Some("Bearer abc"));
        assert_eq!(cfg("{}").sidecar_authorization(env).unwrap(), None);
        for name in ["MISSING", "SPACED"] {
            let json = format!(r#"{{"state":"sidecar","sidecar":{{"cluster":"c"}},"sidecar_token_env":"{name}"}}"#);
            let err = cfg(&json).sidecar_authorization(env).unwrap_err();
            assert_eq!(err.path, "$.sidecar_token_env", "{name}");
        }
    }
}
