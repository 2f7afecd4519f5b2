//! Error bodies in the shapes the official OpenAI and Anthropic SDKs parse, so a client sees a typed
//! exception (`RateLimitError`, `PermissionDeniedError`, ...) with our message, not a generic failure.

use serde_json::{json, Value};

/// Which SDK family the caller speaks; chosen per request from [`crate::llm::Api`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorFlavor {
    OpenAi,
    Anthropic,
}

impl ErrorFlavor {
    pub fn for_api(api: crate::llm::Api) -> ErrorFlavor {
        if api.is_anthropic() {
            ErrorFlavor::Anthropic
        } else {
            ErrorFlavor::OpenAi
        }
    }
}

/// The error classes we answer with, mapped to each provider's `type` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    RateLimit,
    /// 401: the request does not say who it is (the SDKs raise `AuthenticationError`).
    Authentication,
    PermissionDenied,
    InvalidRequest,
    RequestTooLarge,
    Unavailable,
}

impl ErrorKind {
    fn openai_type(self) -> &'static str {
        match self {
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::PermissionDenied => "permission_error",
            // OpenAI answers a missing or wrong API key with 401 and this type.
            ErrorKind::InvalidRequest | ErrorKind::RequestTooLarge | ErrorKind::Authentication => {
                "invalid_request_error"
            }
            ErrorKind::Unavailable => "server_error",
        }
    }

    fn anthropic_type(self) -> &'static str {
        match self {
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::PermissionDenied => "permission_error",
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::Unavailable => "api_error",
        }
    }
}

/// OpenAI: `{"error":{"message","type","param","code"}}`.
pub fn openai_error(kind: ErrorKind, code: Option<&str>, message: &str) -> Value {
    json!({"error": {"message": message, "type": kind.openai_type(), "param": null, "code": code}})
}

/// Anthropic: `{"type":"error","error":{"type","message"}}`.
pub fn anthropic_error(kind: ErrorKind, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind.anthropic_type(), "message": message}})
}

/// Google's error shape (Gemini API, Vertex AI): `{"error":{"code","message","status"}}`, `code` the HTTP
/// status as a number and `status` its canonical name. The google-genai SDKs raise a typed error (ClientError
/// for 4xx) on a stream chunk of this shape; an OpenAI-shaped `error` there (a string `code`) made the
/// Python SDK fail with a `TypeError` instead.
pub fn google_error(kind: ErrorKind, message: &str) -> Value {
    let (code, status) = match kind {
        ErrorKind::RateLimit => (429, "RESOURCE_EXHAUSTED"),
        ErrorKind::Authentication => (401, "UNAUTHENTICATED"),
        ErrorKind::PermissionDenied => (403, "PERMISSION_DENIED"),
        ErrorKind::InvalidRequest | ErrorKind::RequestTooLarge => (400, "INVALID_ARGUMENT"),
        ErrorKind::Unavailable => (503, "UNAVAILABLE"),
    };
    json!({"error": {"code": code, "message": message, "status": status}})
}

/// The body for `flavor`, serialised. `code` is OpenAI's machine-readable code (e.g.
/// `rate_limit_exceeded`); Anthropic bodies have no such field.
pub fn error_body(flavor: ErrorFlavor, kind: ErrorKind, code: Option<&str>, message: &str) -> String {
    let v = match flavor {
        ErrorFlavor::OpenAi => openai_error(kind, code, message),
        ErrorFlavor::Anthropic => anthropic_error(kind, message),
    };
    v.to_string()
}

/// OpenAI's duration format for `x-ratelimit-reset-*`: `6m0s`, `1.5s`, `20ms`, `1h2m3s`.
pub fn openai_reset_duration(millis: u64) -> String {
    if millis == 0 {
        return "0s".to_string(); // as Go's `time.Duration` prints zero, which OpenAI's headers follow
    }
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let hours = millis / 3_600_000;
    let minutes = (millis % 3_600_000) / 60_000;
    let sec_millis = millis % 60_000;
    let secs = if sec_millis % 1000 == 0 {
        format!("{}s", sec_millis / 1000)
    } else {
        let s = format!("{:.3}", sec_millis as f64 / 1000.0);
        format!("{}s", s.trim_end_matches('0').trim_end_matches('.'))
    };
    match (hours, minutes) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

/// An instant (milliseconds since the Unix epoch) in RFC 3339 UTC with whole seconds rounded up, as
/// Anthropic's `anthropic-ratelimit-*-reset` headers give it: `2026-12-07T00:21:05Z`.
pub fn rfc3339_utc(epoch_ms: u64) -> String {
    let secs = epoch_ms.div_ceil(1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm, proleptic Gregorian).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `retry-after` is whole seconds; round up so a client that honours it is never early.
pub fn retry_after_seconds(millis: u64) -> u64 {
    millis.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn shapes() {
        let o: Value = serde_json::from_str(&error_body(
            ErrorFlavor::OpenAi,
            ErrorKind::RateLimit,
            Some("rate_limit_exceeded"),
            "slow down",
        ))
        .unwrap();
        assert_eq!(
            o,
            json!({"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":"rate_limit_exceeded"}})
        );
        let a: Value =
            serde_json::from_str(&error_body(ErrorFlavor::Anthropic, ErrorKind::RequestTooLarge, None, "big")).unwrap();
        assert_eq!(a, json!({"type":"error","error":{"type":"request_too_large","message":"big"}}));
        assert_eq!(ErrorFlavor::for_api(crate::llm::Api::AnthropicMessages), ErrorFlavor::Anthropic);
        // Google's shape: a numeric code (the SDK compares it with 400) and the canonical status name
        assert_eq!(
            google_error(ErrorKind::PermissionDenied, "no"),
            json!({"error":{"code":403,"message":"no","status":"PERMISSION_DENIED"}})
        );
        let gemini = json!({"candidates":[{"content":{"parts":[{"text":"hi"}]}}]});
        assert!(crate::llm::is_gemini_stream_event(&gemini));
        assert!(crate::llm::is_gemini_stream_event(&json!({"usageMetadata":{"promptTokenCount":3}})));
        assert!(!crate::llm::is_gemini_stream_event(&json!({"choices":[],"usage":{}})));
        assert!(!crate::llm::is_gemini_stream_event(&json!({"type":"message_delta","usage":{}})));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn durations() {
        assert_eq!(openai_reset_duration(0), "0s");
        assert_eq!(openai_reset_duration(20), "20ms");
        assert_eq!(openai_reset_duration(1500), "1.5s");
        assert_eq!(openai_reset_duration(360_000), "6m0s");
        assert_eq!(openai_reset_duration(3_723_000), "1h2m3s");
        assert_eq!(retry_after_seconds(1), 1);
        assert_eq!(retry_after_seconds(0), 1);
        assert_eq!(retry_after_seconds(2001), 3);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn rfc3339_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(1), "1970-01-01T00:00:01Z", "rounded up: never early");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_796_602_865_000), "2026-12-07T00:21:05Z");
        assert_eq!(rfc3339_utc(4_102_444_799_000), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339_utc(1_709_251_199_500), "2024-03-01T00:00:00Z", "leap day rolls over");
    }
}
