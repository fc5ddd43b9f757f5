//! Why a notifier failed, classified for the delivery stage's retry logic.

use std::time::Duration;

use super::amqp::AmqpError;
use super::webhook::WebhookError;

/// Why a delivery to any target failed.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The webhook notifier.
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    /// The AMQP notifier.
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// The Redis-stream or live notifier: Redis failed (retried).
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl NotifyError {
    /// Whether retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            NotifyError::Webhook(e) => e.is_permanent(),
            NotifyError::Amqp(e) => e.is_permanent(),
            NotifyError::Redis(_) => false,
        }
    }

    /// What happened, for logs and the dead letter's reason.
    pub fn reason(&self) -> String {
        match self {
            NotifyError::Webhook(e) => e.reason(),
            NotifyError::Amqp(e) => e.to_string(),
            NotifyError::Redis(e) => e.to_string(),
        }
    }

    /// The dead letter's error kind.
    pub fn kind(&self) -> &'static str {
        match self {
            NotifyError::Webhook(e) if e.is_permanent() => "webhook-permanent",
            NotifyError::Webhook(_) => "webhook-retries-exhausted",
            NotifyError::Amqp(AmqpError::Forbidden { .. }) => "forbidden",
            NotifyError::Amqp(_) => "amqp",
            NotifyError::Redis(_) => "redis",
        }
    }

    /// How long to wait before the next attempt, given the backoff schedule's `backoff`.
    ///
    /// A target's `Retry-After` is honoured, but never below 1 s (`MIN_RETRY_AFTER`): a
    /// receiver answering `Retry-After: 0` would otherwise have every attempt spent within
    /// milliseconds. An open circuit counts as an attempt
    /// but never shortens the schedule: the breaker's next trial may be sooner than the
    /// backoff, and retrying at every trial would spend the whole attempt budget within a
    /// few `breaker_open_for` periods of an outage the budget was sized to outlast.
    pub fn retry_wait(&self, backoff: Duration) -> Duration {
        match self {
            NotifyError::Webhook(WebhookError::Retryable {
                retry_after: Some(after),
                ..
            }) => (*after).max(MIN_RETRY_AFTER),
            NotifyError::Webhook(WebhookError::CircuitOpen { retry_in, .. }) => {
                (*retry_in).max(backoff)
            }
            _ => backoff,
        }
    }
}

/// The shortest wait a `Retry-After` may ask for.
pub(crate) const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(e: WebhookError) -> NotifyError {
        NotifyError::Webhook(e)
    }

    #[test]
    fn an_open_circuit_never_shortens_the_backoff_schedule() {
        let backoff = Duration::from_secs(3);
        let open = |retry_in| {
            webhook(WebhookError::CircuitOpen {
                target: "http://t:80".into(),
                retry_in,
            })
        };
        assert_eq!(
            open(Duration::from_millis(200)).retry_wait(backoff),
            backoff
        );
        assert_eq!(
            open(Duration::from_secs(20)).retry_wait(backoff),
            Duration::from_secs(20)
        );
    }

    #[test]
    fn retry_after_is_honoured_and_other_failures_back_off() {
        let backoff = Duration::from_secs(3);
        let asked = webhook(WebhookError::Retryable {
            reason: "429".into(),
            retry_after: Some(Duration::from_millis(1500)),
        });
        assert_eq!(asked.retry_wait(backoff), Duration::from_millis(1500));
        let now = webhook(WebhookError::Retryable {
            reason: "503".into(),
            retry_after: Some(Duration::ZERO),
        });
        assert_eq!(now.retry_wait(backoff), MIN_RETRY_AFTER, "Retry-After: 0");
        let plain = webhook(WebhookError::Retryable {
            reason: "503".into(),
            retry_after: None,
        });
        assert_eq!(plain.retry_wait(backoff), backoff);
    }
}
