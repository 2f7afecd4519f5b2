use meshwarden_shared::config::{check_range, ConfigError, Validate};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Largest request body buffered for inspection.
    pub max_body_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self { max_body_bytes: 1 << 20 }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        check_range("max_body_bytes", self.max_body_bytes, 1, 64 << 20)
    }
}
