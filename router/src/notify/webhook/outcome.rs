//! How a webhook delivery ended, classified for the retry logic: retryable (with the
//! target's `Retry-After`), permanent, or not attempted (open circuit).

use std::error::Error as StdError;
use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::address::Refused;
use super::breaker::Health;

/// Why a delivery failed, classified for the retry logic.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// Worth retrying later: a timeout, a connection error, a 5xx, 429 or 408 response.
    #[error("{reason} (will retry)")]
    Retryable {
        /// What happened.
        reason: String,
        /// The delay the target asked for in a `Retry-After` header, if any (not clamped:
        /// the retry logic bounds it).
        retry_after: Option<Duration>,
    },
    /// Will never succeed as sent: another 4xx or a 3xx response, an invalid URL, or a
    /// target the address rules refuse.
    #[error("{reason} (will not retry)")]
    Permanent {
        /// What happened.
        reason: String,
    },
    /// The target's circuit is open: the request was not attempted.
    #[error("{}", circuit_open_reason(target, *retry_in))]
    CircuitOpen {
        /// The target, `scheme://host:port`.
        target: String,
        /// When the circuit lets a trial request through (or, while a trial is in flight,
        /// the longest it may take).
        retry_in: Duration,
    },
}

fn circuit_open_reason(target: &str, retry_in: Duration) -> String {
    // Whole milliseconds: humantime would print the nanoseconds too.
    let retry_in = Duration::from_millis(u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX));
    format!(
        "circuit open for {target} after repeated failures; next attempt in {}",
        humantime::format_duration(retry_in)
    )
}

impl WebhookError {
    /// What happened, without the retry verdict.
    pub fn reason(&self) -> String {
        match self {
            WebhookError::Retryable { reason, .. } | WebhookError::Permanent { reason } => {
                reason.clone()
            }
            WebhookError::CircuitOpen { target, retry_in } => {
                circuit_open_reason(target, *retry_in)
            }
        }
    }

    /// Whether retrying is pointless.
    pub fn is_permanent(&self) -> bool {
        matches!(self, WebhookError::Permanent { .. })
    }

    /// The `outcome` label of
    /// [`WEBHOOK_REQUESTS_TOTAL`](crate::internal_events::WEBHOOK_REQUESTS_TOTAL).
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            WebhookError::Retryable { .. } => "retryable",
            WebhookError::Permanent { .. } => "permanent",
            WebhookError::CircuitOpen { .. } => "circuit_open",
        }
    }
}

pub(super) fn permanent(reason: impl Into<String>) -> WebhookError {
    WebhookError::Permanent {
        reason: reason.into(),
    }
}

pub(super) fn retryable(reason: impl Into<String>) -> WebhookError {
    WebhookError::Retryable {
        reason: reason.into(),
        retry_after: None,
    }
}

/// The outcome of a response.
pub(super) fn classify_status(
    status: StatusCode,
    retry_after: Option<Duration>,
    snippet: &str,
) -> (Result<(), WebhookError>, Health) {
    let mut reason = format!("HTTP {status}");
    if status.is_redirection() {
        reason.push_str(": redirects are not followed; use the final URL");
    } else if !snippet.is_empty() {
        reason.push_str(": ");
        reason.push_str(snippet);
    }
    if status.is_success() {
        (Ok(()), Health::Up)
    } else if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        let e = WebhookError::Retryable {
            reason,
            retry_after,
        };
        (Err(e), Health::Down)
    } else {
        (Err(permanent(reason)), Health::Up)
    }
}

/// The outcome of a request that got no response.
pub(super) fn classify_error(
    e: reqwest::Error,
    timeout: Duration,
) -> (Result<(), WebhookError>, Health) {
    if let Some(refused) = find_source::<Refused>(&e) {
        return (Err(permanent(refused.to_string())), Health::Unknown);
    }
    // The URL is the subscriber's and may hold a secret; the logs name the host.
    let e = e.without_url();
    if e.is_builder() {
        // E.g. a key or subscription that is not a valid header value.
        return (
            Err(permanent(format!("invalid request: {}", chain(&e)))),
            Health::Unknown,
        );
    }
    let reason = if e.is_timeout() {
        format!(
            "timed out (limit {}): {}",
            humantime::format_duration(timeout),
            chain(&e)
        )
    } else {
        chain(&e)
    };
    (Err(retryable(reason)), Health::Down)
}

/// The first error of type `T` in the source chain of `e`.
fn find_source<'e, T: StdError + 'static>(e: &'e (dyn StdError + 'static)) -> Option<&'e T> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// An error and its causes on one line, each message once.
fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let msg = err.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = err.source();
    }
    out
}

/// The delay a `Retry-After` header asks for: seconds or an HTTP date.
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, "120".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        let later = SystemTime::now() + Duration::from_secs(90);
        h.insert(RETRY_AFTER, httpdate::fmt_http_date(later).parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(85) && d <= Duration::from_secs(90),
            "{d:?}"
        );
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
