//! The policy half of a callout (sidecar, moderation service): where to call, how long to wait, and
//! what to do when the call fails. The transport half is in [`crate::host`].

use crate::config::ConfigError;
use serde::Deserialize;

/// What to do when a callout fails (connect error, timeout, 5xx, unparsable answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the request through (fail open). Availability over enforcement.
    Allow,
    /// Reject the request (fail closed). Enforcement over availability; the safe default.
    #[default]
    Deny,
}

/// Where and how to call out. Shared config block for every filter that calls a service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalloutConfig {
    /// Envoy cluster name; in Istio `outbound|PORT||FQDN`.
    pub cluster: String,
    /// `:authority` of the call; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    /// How long to wait before the call counts as failed.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub failure_mode: FailureMode,
}

pub const DEFAULT_CALLOUT_TIMEOUT_MS: u64 = 50;

fn default_timeout_ms() -> u64 {
    DEFAULT_CALLOUT_TIMEOUT_MS
}

impl CalloutConfig {
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        if self.cluster.trim().is_empty() {
            return Err(ConfigError::at(&format!("{path}.cluster"), "must name an Envoy cluster"));
        }
        crate::config::check_range(&format!("{path}.timeout_ms"), self.timeout_ms, 1, 60_000)
    }

    pub fn authority(&self) -> &str {
        self.authority.as_deref().unwrap_or(&self.cluster)
    }
}

/// Why a callout failed; each is counted separately so operators can tell a dead sidecar from a slow one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutFailure {
    /// `dispatch_http_call` refused (unknown cluster, bad headers).
    Dispatch,
    /// No answer in time, the connection failed, or the answer was cut after its headers (Envoy reports
    /// all of these as a missing response).
    Timeout,
    /// The service answered with a non-2xx status.
    Status(u16),
    /// 2xx but the body could not be understood.
    BadBody,
}

impl CalloutFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            CalloutFailure::Dispatch => "dispatch",
            CalloutFailure::Timeout => "timeout",
            CalloutFailure::Status(_) => "status",
            CalloutFailure::BadBody => "bad_body",
        }
    }
}

/// Logs a recurring failure at most once per interval, with how many were suppressed, so a dead sidecar
/// under load produces one log line a minute instead of thousands a second. Time is passed in so the
/// logic is testable and host-independent.
#[derive(Debug, Clone)]
pub struct LogThrottle {
    interval_ms: u64,
    last_ms: Option<u64>,
    suppressed: u64,
}

impl LogThrottle {
    pub fn new(interval_ms: u64) -> Self {
        Self { interval_ms, last_ms: None, suppressed: 0 }
    }

    /// `Some(suppressed_since_last)` if a line should be logged now.
    pub fn should_log(&mut self, now_ms: u64) -> Option<u64> {
        match self.last_ms {
            Some(last) if now_ms.saturating_sub(last) < self.interval_ms => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_ms = Some(now_ms);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn throttle() {
        let mut t = LogThrottle::new(1000);
        assert_eq!(t.should_log(0), Some(0));
        assert_eq!(t.should_log(10), None);
        assert_eq!(t.should_log(999), None);
        assert_eq!(t.should_log(1000), Some(2));
        assert_eq!(t.should_log(1500), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn callout_config_defaults_and_validation() {
        let c: CalloutConfig = serde_json::from_str(r#"{"cluster":"sidecar"}"#).unwrap();
        assert_eq!(c.timeout_ms, DEFAULT_CALLOUT_TIMEOUT_MS);
        assert_eq!(c.failure_mode, FailureMode::Deny);
        assert_eq!(c.authority(), "sidecar");
        let bad =
            CalloutConfig { cluster: " ".into(), authority: None, timeout_ms: 5, failure_mode: FailureMode::Allow };
        assert_eq!(bad.validate("$.sidecar").unwrap_err().path, "$.sidecar.cluster");
        let slow =
            CalloutConfig { cluster: "c".into(), authority: None, timeout_ms: 0, failure_mode: FailureMode::Allow };
        assert!(slow.validate("sidecar").is_err());
        assert!(serde_json::from_str::<CalloutConfig>(r#"{"cluster":"c","failure_mode":"maybe"}"#).is_err());
    }
}
