//! The plugin configuration (plain JSON; Istio `pluginConfig`). Every struct rejects unknown fields;
//! semantic checks report the JSON path of the bad field. See `docs/mcp-authz.md` for every field.

use crate::event_id::{EventIdKey, MIN_SECRET_BYTES};
use meshwarden_shared::config::{check_range, ConfigError, Validate};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Largest request body buffered for inspection; larger POSTs get 413 (never forwarded unchecked).
    pub max_body_bytes: u64,
    /// Largest answer buffered for list filtering (JSON answers; one SSE event); larger: 502, fail closed.
    pub max_response_bytes: u64,
    /// Path globs (query string ignored) of MCP Streamable HTTP endpoints.
    pub mcp_paths: Vec<String>,
    /// Path globs of A2A JSON-RPC endpoints.
    pub a2a_paths: Vec<String>,
    /// Paths of A2A agent cards whose `skills[]` are filtered per caller.
    pub agent_card_paths: Vec<String>,
    /// What to do with requests to any other path: `pass` (not MCP traffic; untouched) or `deny` (403).
    pub other_paths: OtherPaths,
    /// Handle a request to any other path as MCP when it carries `Mcp-Method`, `MCP-Protocol-Version` or
    /// `Mcp-Session-Id`, and as A2A when it carries `A2A-Version`: an endpoint missing from the path lists
    /// is still authorized instead of passing unchecked.
    pub detect_by_headers: bool,
    pub identity: IdentityConfig,
    pub policy: PolicyConfig,
    /// One structured log line per decision.
    pub audit_log: bool,
    /// How often (ms) a worker hands its counters to Envoy (they are summed in the VM in between).
    pub stats_flush_interval_ms: u64,
    /// Bind each MCP session (`Mcp-Session-Id` of an initialize answer) to the caller who created it.
    pub bind_sessions: bool,
    /// Bind each A2A task (named in a `message/send` / `message/stream` answer) to the caller who created it.
    pub bind_tasks: bool,
    /// A session id this Envoy never saw bound (created before a restart or through another replica):
    /// `allow` or `deny` (404, the client starts a new session).
    pub unknown_sessions: UnknownSessions,
    /// How long a binding lives (seconds since its creation).
    pub binding_ttl_secs: u64,
    /// Most bindings (sessions and tasks together) kept per Envoy.
    pub max_bindings: u64,
    /// Bind MCP stream resumption to the caller: every SSE event id leaves tagged with a MAC over the
    /// caller, the session and the id; a `Last-Event-ID` without this caller's tag is refused (see
    /// `event_id`).
    pub bind_event_ids: bool,
    /// The name of an environment variable of the Wasm VM holding the secret the event id tags are keyed
    /// with, shared by replicas (and kept across restarts) so that a stream resumes through any of them.
    /// Without it each Envoy keys them with a random key of its own.
    pub event_id_key_env: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSessions {
    Allow,
    Deny,
}

/// `max_response_bytes` when not configured.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 4 << 20;

impl Default for Config {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            mcp_paths: vec!["/mcp".into(), "/mcp/*".into()],
            a2a_paths: Vec::new(),
            agent_card_paths: meshwarden_shared::a2a::AGENT_CARD_PATHS.iter().map(|s| s.to_string()).collect(),
            other_paths: OtherPaths::Pass,
            detect_by_headers: true,
            identity: IdentityConfig::default(),
            policy: PolicyConfig::default(),
            audit_log: true,
            stats_flush_interval_ms: 20,
            bind_sessions: true,
            bind_tasks: true,
            unknown_sessions: UnknownSessions::Allow,
            binding_ttl_secs: 24 * 3600,
            max_bindings: 100_000,
            bind_event_ids: true,
            event_id_key_env: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OtherPaths {
    Pass,
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Claims verified by Envoy's `jwt_authn` filter (its `payload_in_metadata`); `null` disables.
    pub jwt_authn: Option<JwtAuthnConfig>,
    /// DEVELOPMENT ONLY: take claims from the bearer token's payload WITHOUT verifying its signature,
    /// when `jwt_authn` gave none. Anyone can forge such a token.
    pub unverified_bearer_dev_only: bool,
    /// Add the mTLS peer's SPIFFE ID as claim `spiffe` (`id`, `trust_domain`, `namespace`, `service_account`).
    pub spiffe: bool,
    /// Headers set by earlier trusted filters, mapped to claims (they override token claims).
    pub trusted_headers: Vec<TrustedHeader>,
    /// Claims tried in order for the audit log's subject.
    pub subject_claims: Vec<String>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            jwt_authn: Some(JwtAuthnConfig::default()),
            unverified_bearer_dev_only: false,
            spiffe: true,
            trusted_headers: Vec::new(),
            subject_claims: vec!["sub".into(), "spiffe.id".into()],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtAuthnConfig {
    /// Dynamic metadata namespace the `jwt_authn` filter writes.
    pub metadata_namespace: String,
    /// Its `payload_in_metadata` key; `null` = the first object in the namespace.
    pub payload_key: Option<String>,
}

impl Default for JwtAuthnConfig {
    fn default() -> Self {
        Self { metadata_namespace: "envoy.filters.http.jwt_authn".into(), payload_key: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedHeader {
    pub header: String,
    pub claim: String,
    /// Split the value on commas and whitespace into a list (e.g. groups, scopes).
    #[serde(default)]
    pub list: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DenyAnswer {
    /// As if the target did not exist: JSON-RPC -32602 "Unknown tool: x" (HTTP 200).
    Hide,
    /// HTTP 403, JSON-RPC error body, `WWW-Authenticate: Bearer error="insufficient_scope"`.
    Forbid,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Mcp,
    A2a,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Mcp => "mcp",
            Protocol::A2a => "a2a",
        }
    }
}

/// Methods every caller may use unless a deny rule says otherwise (they disclose nothing that list
/// filtering does not already cover).
pub const DEFAULT_BUILTIN_ALLOW: &[&str] = &[
    "initialize",
    "ping",
    "server/discover",
    "notifications/*",
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
    "session/stream",
    "session/delete",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Decision when no rule matches.
    pub default: Effect,
    /// Answer for denied requests (rules may override).
    pub deny_answer: DenyAnswer,
    /// Method globs allowed for everyone after deny rules (an implicit allow rule named `builtin`).
    pub builtin_allow: Vec<String>,
    /// `scope` value in the forbid answer's `WWW-Authenticate` header (optional).
    pub forbid_scope: Option<String>,
    pub rules: Vec<RuleConfig>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            default: Effect::Deny,
            deny_answer: DenyAnswer::Hide,
            builtin_allow: DEFAULT_BUILTIN_ALLOW.iter().map(|s| s.to_string()).collect(),
            forbid_scope: None,
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    pub effect: Effect,
    /// Deny rules only: overrides `policy.deny_answer`.
    #[serde(default)]
    pub answer: Option<DenyAnswer>,
    /// `mcp` or `a2a`; absent = both.
    #[serde(default)]
    pub protocol: Option<Protocol>,
    /// Method globs (any may match); empty = every method. A2A methods match under v0.3 or v1.0 name.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Target globs (tool / prompt name, resource URI, A2A skill id); empty = any (or none).
    #[serde(default)]
    pub targets: Vec<String>,
    /// All must match.
    #[serde(default)]
    pub identity: Vec<ClaimMatcherConfig>,
    /// All must match.
    #[serde(default)]
    pub arguments: Vec<ArgMatcherConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimMatcherConfig {
    /// Claim name; a dotted path (`realm_access.roles`, `spiffe.namespace`) reaches nested claims.
    pub claim: String,
    #[serde(default)]
    pub equals: Option<Value>,
    #[serde(default)]
    pub one_of: Option<Vec<Value>>,
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default)]
    pub glob: Option<String>,
    #[serde(default)]
    pub present: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgMatcherConfig {
    /// Path into the arguments: `key`, `a.b`, `items[0].id`.
    pub path: String,
    #[serde(default)]
    pub equals: Option<Value>,
    #[serde(default)]
    pub one_of: Option<Vec<Value>>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub present: Option<bool>,
}

impl Config {
    /// The event id key from the VM's environment (`event_id_key_env`); `None` when not configured (each
    /// Envoy then uses a random key of its own). An unset or too short variable refuses the configuration.
    pub fn event_id_key(&self, env: impl Fn(&str) -> Option<String>) -> Result<Option<EventIdKey>, ConfigError> {
        let Some(name) = &self.event_id_key_env else { return Ok(None) };
        let Some(value) = env(name) else {
            return Err(ConfigError::at(
                "event_id_key_env",
                format!(
                    "environment variable {name} is not set in the Wasm VM (Envoy vm_config.environment_variables, Istio WasmPlugin vmConfig.env)"
                ),
            ));
        };
        // A trailing newline is what a secret file or `kubectl create secret --from-file` leaves.
        let value = value.trim_end_matches(['\r', '\n']);
        if value.len() < MIN_SECRET_BYTES {
            return Err(ConfigError::at(
                "event_id_key_env",
                format!("the secret in {name} must be at least {MIN_SECRET_BYTES} bytes"),
            ));
        }
        Ok(Some(EventIdKey::from_secret(value.as_bytes())))
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        check_range("max_body_bytes", self.max_body_bytes, 1, 64 << 20)?;
        check_range("max_response_bytes", self.max_response_bytes, 1024, 64 << 20)?;
        check_range("stats_flush_interval_ms", self.stats_flush_interval_ms, 1, 10_000)?;
        check_range("binding_ttl_secs", self.binding_ttl_secs, 1, 30 * 24 * 3600)?;
        check_range("max_bindings", self.max_bindings, 1, 10_000_000)?;
        if self.event_id_key_env.as_deref().is_some_and(|n| n.is_empty() || n.contains(['=', '\0'])) {
            return Err(ConfigError::at("event_id_key_env", "must be an environment variable name"));
        }
        for (field, list) in [("mcp_paths", &self.mcp_paths), ("a2a_paths", &self.a2a_paths)] {
            for (i, p) in list.iter().enumerate() {
                if !p.starts_with('/') {
                    return Err(ConfigError::at(&format!("{field}[{i}]"), "must start with /"));
                }
            }
        }
        for (i, h) in self.identity.trusted_headers.iter().enumerate() {
            if h.header.is_empty() || h.header.starts_with(':') {
                return Err(ConfigError::at(&format!("identity.trusted_headers[{i}].header"), "must be a header name"));
            }
            if h.claim.is_empty() {
                return Err(ConfigError::at(&format!("identity.trusted_headers[{i}].claim"), "must not be empty"));
            }
        }
        if let Some(j) = &self.identity.jwt_authn {
            if j.metadata_namespace.is_empty() {
                return Err(ConfigError::at("identity.jwt_authn.metadata_namespace", "must not be empty"));
            }
        }
        // Rules are compiled (regexes, one operator per matcher) by `policy::Policy::compile`, which
        // reports paths itself.
        crate::policy::Policy::compile(&self.policy).map(|_| ())
    }
}
